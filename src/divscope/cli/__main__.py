"""``python -m divscope.cli`` runs the command line (as ``python -m divscope`` does)."""

import sys

from divscope.cli import main

if __name__ == "__main__":
    sys.exit(main())
