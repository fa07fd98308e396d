"""``python -m flexna`` runs the command line."""

import sys

from flexna.tools.cli import main

sys.exit(main())
