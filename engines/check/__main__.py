"""`python -m engines.check BUNDLE ...`: the same as `ficoco-check`."""

from engines.check.cli import main

main(prog_name="ficoco-check")
