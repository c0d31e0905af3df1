import sys

from mmalign.quiet import plain_notices
from mmalign.tools import dispatch

plain_notices()

# A tool runs without importing Lightning; the console script (mmalign.cli:main) dispatches the same way.
if (status := dispatch(sys.argv[1:])) is not None:
    sys.exit(status)

from mmalign.cli import exit_fast, main  # noqa: E402

main()
exit_fast(0)  # a finished command: skip the interpreter's teardown (errors and SystemExit never get here)
