"""``python -m divscope`` runs the command line."""

import sys

from divscope.cli import main

# vLLM starts its engine in a spawned process, which imports this module again as
# ``__mp_main__``: without the guard that child would run the command a second time.
if __name__ == "__main__":
    sys.exit(main())
