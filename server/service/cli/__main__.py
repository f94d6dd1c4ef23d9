"""``python -m server.service.cli …``: the same as ``one2345 …``."""

import sys

from server.service.cli.main import main

sys.exit(main())
