"""python -m bilevel: the command line."""

from bilevel.cli import main

main()
