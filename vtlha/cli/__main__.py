"""``python -m vtlha.cli``."""

from vtlha.cli import main

main()
