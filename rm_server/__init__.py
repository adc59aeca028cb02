"""The reward-model service: serving only, one concept per module.

``config`` (ServeConfig, one flag per field), ``service`` (the servicer: protobuf <-> domain
objects), ``admission`` (validation and encoding of a request, no gRPC), ``sinks`` (where a
call's results go), ``batch_policy`` (when a batch closes and what it takes, pure),
``batcher`` (the queue, one model thread, deadlines), ``model_time`` (a lower bound on a
batch's model time), ``model`` (load a checkpoint, score batches), ``last_token`` (the
last-token surgery), ``checkpoint`` (what a checkpoint must hold), ``interceptor`` and
``errors`` (one map from exceptions to status codes), ``metrics``, ``ports``, ``server``
(lifecycle), ``cli``, and ``launch`` (start a server process for scripts, tests, demo, bench).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rlhf-rm-service")
except PackageNotFoundError:  # run from a source tree that is not installed
    __version__ = "0+unknown"
