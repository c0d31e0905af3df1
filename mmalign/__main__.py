from mmalign.cli import main

main()
