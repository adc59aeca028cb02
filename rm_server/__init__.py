"""The reward-model service: serving only (config, servicer, admission, batching, model,
the last-token surgery, interceptor, errors, metrics, lifecycle)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rlhf-rm-service")
except PackageNotFoundError:  # run from a source tree that is not installed
    __version__ = "0+unknown"
