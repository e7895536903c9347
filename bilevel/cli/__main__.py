"""python -m bilevel.cli: the command line (as python -m bilevel)."""

from bilevel.cli import main

main()
