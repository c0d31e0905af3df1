import sys

from mmalign.cli import console_main  # light: Lightning is imported only when a training command needs it

# One entry point with the installed ``mmalign`` script: tools are dispatched before Lightning is imported,
# a finished command skips the interpreter's teardown, a reader closing the pipe ends it quietly.
sys.exit(console_main())
