import sys

from mmalign.tools import dispatch

# A tool runs without importing Lightning (mmalign.cli imports it at the top); the console script
# (mmalign.cli:main) dispatches the same way, only after that import.
if (status := dispatch(sys.argv[1:])) is not None:
    sys.exit(status)

from mmalign.cli import main  # noqa: E402

main()
