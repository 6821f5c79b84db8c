"""`python -m semilla` and the `semilla` console script: the commands live in semilla.cli."""

import sys

from semilla.cli import main

if __name__ == "__main__":
    sys.exit(main())
