"""Who sends an HTTP door request: its bearer token, its client id, its peer, its deadline.

The HTTP twins of what the gRPC servicer reads from a call's context (rm_server/service.py):
the same fairness key (:func:`peer_of`), the same tokens (Bearer, or Basic with the token as
the password for clients that take only a URL).
"""

from __future__ import annotations

import base64
import binascii
import math

from aiohttp import web

from rm_server.admission import Caller
from rm_server.errors import InvalidArgument


def bearer_token(request: web.Request) -> bytes:
    """``Authorization: Bearer <token>``, or Basic with the token as the password (clients that
    take only a URL send ``http://user:TOKEN@host/...`` as Basic)."""
    scheme, _, value = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer":
        return value.strip().encode()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip(), validate=True).partition(b":")[2]
        except (binascii.Error, ValueError):
            return b""
    return b""


def caller_of(request: web.Request) -> Caller:
    """``X-Client-Id``, the peer (as the gRPC servicer names it) and ``X-Timeout-Ms``."""
    timeout = request.headers.get("X-Timeout-Ms")
    if timeout is not None:
        try:
            seconds = float(timeout) / 1000
        except ValueError:
            seconds = math.nan
        if not seconds > 0 or math.isinf(seconds):
            raise InvalidArgument(f"X-Timeout-Ms: expected a positive number, got {timeout!r}")
        timeout = seconds
    return Caller(request.headers.get("X-Client-Id", ""), peer_of(request), timeout)


def peer_of(request: web.Request) -> str:
    """A verified client certificate's names (mTLS), else the host address without its port:
    ``ipv4:10.0.0.7``, the same key a gRPC call from that host gets (rm_server/service.py)."""
    transport = request.transport
    cert = transport.get_extra_info("peercert") if transport is not None else None
    if cert:
        names = [v for _, v in cert.get("subjectAltName", ())] or [
            v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
        if names:
            return "id:" + ",".join(names)
    host = request.remote or ""
    return f"ipv6:[{host}]" if ":" in host else f"ipv4:{host}"
