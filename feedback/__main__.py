"""``python -m feedback`` = ``feedback-server``."""

import sys

from feedback.cli import main

sys.exit(main())
