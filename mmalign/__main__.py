from mmalign.cli import exit_fast, main

main()
exit_fast(0)  # a finished command: skip the interpreter's teardown (errors and SystemExit never get here)
