"""python -m cli: the same as the installed `imgpipe` command."""

from cli.main import main

main()
