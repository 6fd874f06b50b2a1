"""``python -m pyserve`` is the ``pyserve`` console script."""

import sys

from pyserve.cli.main import main

sys.exit(main())
