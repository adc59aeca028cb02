"""The feedback service's errors: one class per outcome a caller must tell apart, each with the
status name, HTTP status and reason it travels as (``{"error": {"code", "reason", "message"}}``).

The HTTP API raises them from handlers and answers them in one middleware (feedback/http.py);
the client (feedback/client.py) turns an error body back into the same class, so a trainer or a
labeling program catches ``QueueFull`` or ``LeaseExpired``, not a status number.

| error            | code                | HTTP | when                                             |
|------------------|---------------------|------|--------------------------------------------------|
| InvalidArgument  | INVALID_ARGUMENT    | 400  | bad JSON, a missing or mistyped field (named)    |
| Unauthenticated  | UNAUTHENTICATED     | 401  | the bearer token is missing or wrong             |
| NotFound         | NOT_FOUND           | 404  | no such lease, no such route                     |
| AlreadyAnswered  | ALREADY_EXISTS      | 409  | a second submit for a lease, with another choice |
| LeaseExpired     | FAILED_PRECONDITION | 410  | a submit after the lease expired (pair requeued) |
| TooLarge         | RESOURCE_EXHAUSTED  | 413  | request body over --max-body-bytes               |
| QueueFull        | RESOURCE_EXHAUSTED  | 429  | enqueue past --max-queue pending pairs: dropped  |
| StoreUnavailable | UNAVAILABLE         | 503  | the database cannot be reached (retry)           |
| Unreachable      | UNAVAILABLE         | -    | (client side) no answer: refused, timed out      |
| FeedbackError    | INTERNAL            | 500  | an unexpected fault: logged, counted             |

Standard library only: the client imports this module.
"""

from __future__ import annotations


class FeedbackError(Exception):
    code = "INTERNAL"
    http_status = 500
    reason = "internal"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(FeedbackError):
    code, http_status, reason = "INVALID_ARGUMENT", 400, "invalid"


class Unauthenticated(FeedbackError):
    code, http_status, reason = "UNAUTHENTICATED", 401, "unauthenticated"


class NotFound(FeedbackError):
    code, http_status, reason = "NOT_FOUND", 404, "not_found"


class MethodNotAllowed(FeedbackError):
    code, http_status, reason = "UNIMPLEMENTED", 405, "method"


class AlreadyAnswered(FeedbackError):
    code, http_status, reason = "ALREADY_EXISTS", 409, "already_answered"


class LeaseExpired(FeedbackError):
    code, http_status, reason = "FAILED_PRECONDITION", 410, "lease_expired"


class TooLarge(FeedbackError):
    code, http_status, reason = "RESOURCE_EXHAUSTED", 413, "too_large"


class QueueFull(FeedbackError):
    code, http_status, reason = "RESOURCE_EXHAUSTED", 429, "queue_full"


class StoreUnavailable(FeedbackError):
    code, http_status, reason = "UNAVAILABLE", 503, "store_unavailable"


class Unreachable(FeedbackError):
    code, http_status, reason = "UNAVAILABLE", 0, "unreachable"


ERRORS = (InvalidArgument, Unauthenticated, NotFound, MethodNotAllowed, AlreadyAnswered,
          LeaseExpired, TooLarge, QueueFull, StoreUnavailable)
BY_REASON = {cls.reason: cls for cls in ERRORS}


def error_json(exc: FeedbackError) -> dict:
    return {"error": {"code": exc.code, "reason": exc.reason, "message": exc.message}}


def error_from_json(status: int, body: object) -> FeedbackError:
    """The error an API answer carries (by its reason), or a plain FeedbackError naming the
    HTTP status when the body is not ours (a proxy's page)."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict) and err.get("reason") in BY_REASON:
        return BY_REASON[err["reason"]](str(err.get("message", "")))
    exc = FeedbackError(f"HTTP {status}: {str(body)[:200]}")
    exc.http_status = status
    return exc
