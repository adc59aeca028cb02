"""The training side of RLHF: SFT, reward-model training (Bradley-Terry) and PPO.

Modules are imported on demand (``policy_trainer.cli`` loads only the command being run), so
importing this package stays cheap.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rlhf-rm-service")
except PackageNotFoundError:  # run from a source tree that is not installed
    __version__ = "0+unknown"
