"""``python -m resdense`` (and ``torchrun -m resdense``) runs the command line."""

import sys

from .cli import main

sys.exit(main())
