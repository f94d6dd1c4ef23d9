import sys

from server.service.cli import main

sys.exit(main())
