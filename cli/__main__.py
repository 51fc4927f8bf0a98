"""``python -m vsd.cli``: the ``vsd-run`` command line."""

import sys

from .main import main

sys.exit(main())
