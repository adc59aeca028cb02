"""Reward-service addresses: checked before any connection, so a malformed one fails at once.

gRPC accepts almost any string as a target and then retries it for ever: ``http://host:50051``
looks up a host named "http", ``localhost`` dials port 443. :func:`parse_targets` refuses those
with :class:`AddressError` naming the address and what is wrong with it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence


class AddressError(ValueError):
    """A reward-service address that cannot be right, refused before any connection."""


_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")  # a DNS name or IPv4 address


def parse_targets(targets: str | Sequence[str]) -> list[str]:
    """Check reward-service addresses (a list, or one comma-separated string); return them.

    Accepted: ``HOST:PORT``, ``[IPV6]:PORT`` and gRPC's own target forms ``dns:[//AUTH/]HOST:PORT``,
    ``ipv4:ADDR:PORT``, ``ipv6:[ADDR]:PORT``, ``unix:PATH``, ``unix-abstract:NAME``. Refused with
    :class:`AddressError`: a URL scheme (``http://h:1``: gRPC would look up a host named
    "http"), a missing port (gRPC dials 443 then: ``localhost`` quietly meant localhost:443),
    a port that is not a number in 1..65535, a bare IPv6 address (ambiguous without brackets).
    """
    if isinstance(targets, str):
        targets = targets.split(",")
    out = [_check_target(t.strip()) for t in targets if t.strip()]
    if not out:
        raise AddressError("no reward-model address given (expected HOST:PORT)")
    return out


def _check_target(address: str) -> str:
    if address.startswith(("unix:", "unix-abstract:")):
        if not address.partition(":")[2].strip("/"):
            raise AddressError(f"reward-model address {address!r}: no socket path")
        return address
    rest = address
    for scheme in ("dns:", "ipv4:", "ipv6:"):
        if address.startswith(scheme):
            rest = address[len(scheme):]
            if scheme == "dns:" and rest.startswith("//"):
                rest = rest[2:].partition("/")[2]  # dns://[AUTHORITY]/HOST:PORT
            break
    else:
        if "://" in address:
            scheme, _, after = address.partition("://")
            hint = after.rstrip("/") or "host"
            raise AddressError(f"reward-model address {address!r}: gRPC takes no {scheme}:// "
                               f"scheme; write HOST:PORT, e.g. "
                               f"{hint if ':' in hint else hint + ':50051'}")
    _check_host_port(rest, address)
    return address


def _check_host_port(hp: str, address: str) -> None:
    def bad(why: str) -> AddressError:
        return AddressError(f"reward-model address {address!r}: {why}")

    if hp.startswith("["):
        host, _, after = hp[1:].partition("]")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad(f"{host!r} is not an IPv6 address") from None
        if not after:
            raise bad(f"no port (gRPC would dial 443): write [{host}]:PORT")
        port = after[1:] if after.startswith(":") else after
    else:
        host, sep, port = hp.rpartition(":")
        if not sep:
            raise bad(f"no port (gRPC would dial 443): write HOST:PORT, e.g. {hp}:50051")
        if ":" in host:
            raise bad("an IPv6 address goes in brackets: [ADDR]:PORT")
        if not _HOST.fullmatch(host):
            raise bad(f"{host!r} is not a host name or address")
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise bad(f"port {port!r} is not a number in 1..65535")
