"""python -m bilevel: the command line."""

from bilevel.entry import main

main()
