"""Domain errors and the one place that maps them to gRPC status codes.

Admission, the servicer and the batcher raise these; :class:`StatusInterceptor` (interceptor.py)
turns them into status codes. Any other exception becomes INTERNAL (logged and counted),
never UNKNOWN.

| error              | code               | client action                                       |
|--------------------|--------------------|-----------------------------------------------------|
| InvalidArgument    | INVALID_ARGUMENT   | fix the input; names the sample id and field         |
| Overloaded         | UNAVAILABLE        | back off (trailing ``retry-after-ms``) and retry     |
| NotReady           | UNAVAILABLE        | retry: the model is loading, or the server drains    |
| DeadlineExceeded   | DEADLINE_EXCEEDED  | the sample expired in the queue and was not computed |
| Unauthenticated    | UNAUTHENTICATED    | send ``authorization: Bearer <token>``               |
| NotResident        | FAILED_PRECONDITION| pin a resident version (the message names them)      |
| LoadFailed         | INVALID_ARGUMENT   | admin: the checkpoint cannot be served (one line)    |
| NoRoom             | RESOURCE_EXHAUSTED | admin: unload a version first, or lower the count    |
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    code = grpc.StatusCode.INTERNAL
    reason = "internal"  # label value of rm_rejected_total{reason}
    counted_by_batcher = False  # the batcher counts these per sample

    def __init__(self, message: str, trailing: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.message = message
        self.trailing = trailing


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "invalid"

    @classmethod
    def for_sample(cls, sample_id: str, field: str, message: str) -> InvalidArgument:
        return cls(f"sample {sample_id!r}: {field}: {message}")


class Overloaded(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "queue_full"
    counted_by_batcher = True

    def __init__(self, message: str, retry_after_ms: int):
        super().__init__(message, (("retry-after-ms", str(int(retry_after_ms))),))
        self.retry_after_ms = retry_after_ms


class NotReady(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "not_ready"


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "deadline"
    counted_by_batcher = True


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "unauthenticated"


class NotResident(ServiceError):
    """A version that is not resident was named (a pin, a rollback, an unload), or the
    default was asked to unload."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "version"


class LoadFailed(ServiceError):
    """An admin load of a checkpoint that cannot be served; the default keeps serving."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "load_failed"


class NoRoom(ServiceError):
    """An admin load refused: the new version's weights would not fit in free memory."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "load_failed"
