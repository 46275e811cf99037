"""``python -m classroom``: the same command line as ``notebooks`` (the hub's hook runs it)."""

from .cli import main

main()
