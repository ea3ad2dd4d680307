"""``python -m medquant``: the medquant command line (see :mod:`medquant.cli`)."""
import sys

from .cli import main

sys.exit(main())
