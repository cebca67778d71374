"""``python -m meterstream``: the command line."""

from meterstream.cli import main

main()
