"""``python -m surge.cli``: what the ``surge`` entry point runs."""

from surge.cli import main

main()
