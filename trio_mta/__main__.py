"""``python -m trio_mta`` is the same program as ``trio-mta``."""

import sys

from .cli import main

sys.exit(main())
