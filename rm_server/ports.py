"""The server's ports: range and clash checks, a probe for ports another process holds, binding.

Every port a server binds (gRPC, health, metrics, the HTTP door) goes through the same checks:
a number in range, no fixed port twice, and a probe before anything binds.

grpc turns SO_REUSEPORT on by default: a second server on a port another process listens on
"binds" and the kernel splits the connections between the two (possibly two different models).
The server passes ``("grpc.so_reuseport", 0)`` (rm_server/server.py ``server_options``) and
checks here first, so an occupied or impossible port is one line naming the flag and the port.
"""

from __future__ import annotations

import errno
import socket

import grpc


def listed_ports(cfg) -> list[tuple[str, str, int]]:
    """(flag, host, port) of every port a ServeConfig binds; --metrics-port -1 binds none, and
    the HTTP door binds only when --http-port is given."""
    ports = [("--port", cfg.host, cfg.port)]
    if cfg.health_port is not None:
        ports.append(("--health-port", cfg.host, cfg.health_port))
    if cfg.metrics_port is not None and cfg.metrics_port != -1:
        ports.append(("--metrics-port", cfg.metrics_host or cfg.host, cfg.metrics_port))
    if cfg.http_port is not None:
        ports.append(("--http-port", cfg.http_host or cfg.host, cfg.http_port))
    return ports


def check_ports(cfg) -> None:
    """Every port in 0-65535 (grpc binds 70000 as 70000 mod 65536), no fixed port twice."""
    ports = listed_ports(cfg)
    for flag, _host, port in ports:
        if not 0 <= port <= 65535:
            extra = " or -1 to disable" if flag == "--metrics-port" else ""
            raise ValueError(f"{flag} must be in 0-65535{extra} (got {port})")
    fixed = [(flag, port) for flag, _host, port in ports if port]
    for i, (flag, port) in enumerate(fixed):
        for other, same in fixed[i + 1:]:
            if port == same:
                raise ValueError(f"{flag} and {other} are both {port}")


def check_port_free(flag: str, host: str, port: int) -> None:
    """One line naming the port if another process listens on it.

    Probed with a plain socket before grpc binds (grpc's own refusal is a C-core log line that
    names no flag). SO_REUSEADDR as grpc and http.server set it: a port left in TIME_WAIT by a
    previous run is no conflict. A race with another process still ends in a refused bind (no
    SO_REUSEPORT), reported by :func:`add_grpc_port`.
    """
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(f"{flag} {port}: cannot resolve host {host!r} ({e.strerror})") from None
    for family, kind, proto, _name, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise OSError(f"{flag} {port}: {host}:{port} is already in use by another "
                                  "process") from None
                # anything else (an address this host lacks) is the bind's to report


def add_grpc_port(server: grpc.aio.Server, flag: str, address: str, creds=None) -> int:
    """Bind ``address`` (TLS when ``creds``); the port bound, or OSError naming ``flag``."""
    try:
        port = (server.add_secure_port(address, creds) if creds
                else server.add_insecure_port(address))
    except RuntimeError:  # grpc: "Failed to bind to address ..."
        port = 0
    if not port:
        raise OSError(f"{flag}: cannot bind {address} (in use, or not an address of this host)")
    return port


def bind_tcp(flag: str, host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` for a server that is not grpc's (the HTTP door);
    the port bound is ``getsockname()[1]``. SO_REUSEADDR as above, never SO_REUSEPORT: a held
    port is refused, as for grpc. OSError naming ``flag`` when it cannot bind."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]
        return socket.create_server((host, port), family=family, backlog=1024)
    except OSError as e:  # gaierror included
        raise OSError(f"{flag} {port}: cannot bind {host}:{port} ({e.strerror or e})") from None
