"""python -m makima: the makima command."""

from makima.cli import main

main()
