"""``python -m etda.cli``."""

from etda.cli import main

main()
