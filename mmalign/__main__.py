import sys

from mmalign.quiet import plain_notices, reader_closed_early
from mmalign.tools import dispatch

plain_notices()

try:
    # A tool runs without importing Lightning; the console script (mmalign.cli:console_main) dispatches the same way.
    if (status := dispatch(sys.argv[1:])) is not None:
        sys.exit(status)

    from mmalign.cli import exit_fast, main

    main()
except BrokenPipeError as e:
    sys.exit(reader_closed_early(e))
exit_fast(0)  # a finished command: skip the interpreter's teardown (errors and SystemExit never get here)
