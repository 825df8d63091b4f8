"""``python -m divscope`` runs the command line."""

import sys

from divscope.cli import main

sys.exit(main())
