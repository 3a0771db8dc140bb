"""``python -m fleximmt``: the same command line as the ``fleximmt`` script."""

import sys

from .apps.cli import main

if __name__ == "__main__":
    sys.exit(main())
