"""``python -m rm_server``: the ``rm-server`` command."""

import sys

from rm_server.cli import main

sys.exit(main())
