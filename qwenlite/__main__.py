"""``python -m qwenlite``: the same command line as the ``qwenlite`` script."""

import sys

from qwenlite.cli import main

sys.exit(main())
