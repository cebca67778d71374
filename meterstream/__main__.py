"""``python -m meterstream``: the command line."""

from meterstream.cli import main

# Guarded: the aggregator's applying child (multiprocessing, spawn) imports this module again.
if __name__ == "__main__":
    main()
