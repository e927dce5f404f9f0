"""``python -m trio_mta`` is the same program as ``trio-mta``."""

import sys

from trio_mta.cli.main import main

sys.exit(main())
