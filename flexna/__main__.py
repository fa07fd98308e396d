"""``python -m flexna`` runs the command line."""

import sys

from flexna.cli import main

sys.exit(main())
