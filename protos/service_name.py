"""The service's name as the contract declares it, read from the compiled ``reward.proto``.

One source for every user (the server's handlers, health and reflection entries, the
interceptor's method filter, the tests): rename the proto's package or service and they all
follow. A module of its own, not ``protos/__init__.py``, so that importing the package (for
``protos.encoding`` or ``protos.generate``) does not need the generated stubs.
"""

from protos import reward_pb2

SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name
"""``rlhf.reward.v1.RewardService``: the gRPC service, and its name in health and reflection."""

METHOD_PREFIX = f"/{SERVICE_NAME}/"
"""The path every method of the service starts with (``/rlhf.reward.v1.RewardService/Score``)."""
