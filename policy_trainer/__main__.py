"""``python -m policy_trainer``: the ``policy-trainer`` command."""

import sys

from policy_trainer.cli import main

sys.exit(main())
