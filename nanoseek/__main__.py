"""`python -m nanoseek ...` runs the command line (nanoseek/cli/)."""

import sys

from nanoseek.cli import main

if __name__ == "__main__":
    sys.exit(main())
