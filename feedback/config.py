"""The feedback service's configuration: one dataclass per command, a docstring per field (the
CLI's help, through tyro), and the checks that need no socket and no database."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeConfig:
    store: str = "feedback.db"
    """Where the queue and judgments live: a SQLite file (created when absent; also
    sqlite:///relative.db, sqlite:////absolute.db), or a PostgreSQL connection string
    postgresql://user@host:5432/db (password from PGPASSWORD or ~/.pgpass)."""
    host: str = "127.0.0.1"
    """Address to bind; 127.0.0.1 unless told otherwise (use 0.0.0.0 in a container)."""
    port: int = 50055
    """HTTP port of the API and the labeling page; 0 picks a free one (see --port-file). Next to
    the reward server's ports (gRPC 50051, health 50052, metrics 50053, HTTP 50054)."""
    metrics_port: int = 50056
    """Prometheus /metrics port; 0 picks a free one; -1 disables it."""
    metrics_host: str | None = None
    """Address for /metrics (default: same as --host)."""
    port_file: str | None = None
    """Write {"port", "metrics_port", "pid"} as JSON here once bound (for tests and scripts)."""
    auth_token_file: str | None = None
    """File holding a bearer token; when set, every /v1 request needs 'Authorization: Bearer
    <token>' (or Basic with the token as the password). The page itself is public and holds no
    data: it asks for the token (or reads it from the URL fragment, #token=...)."""
    max_queue: int = 10_000
    """Pairs pending (wanting a label) at most; an enqueue that would pass it is refused whole
    (429 RESOURCE_EXHAUSTED, reason queue_full)."""
    max_pairs_per_request: int = 1000
    """Pairs one enqueue call may carry."""
    lease_seconds: float = 600.0
    """How long a labeler holds a pair before it returns to the queue (a lease request may ask
    for less or more, up to --max-lease-seconds)."""
    max_lease_seconds: float = 3600.0
    """The longest lease a request may ask for."""
    double_label_fraction: float = 0.0
    """Share of pairs (chosen by a hash of the pair id) labeled by two different labelers, to
    measure agreement."""
    max_body_bytes: int = 16 * 1024 * 1024
    """Largest request body (413 above it)."""
    refresh_seconds: float = 5.0
    """How often leases past their time are expired and the store's gauges refreshed."""
    seed: int | None = None
    """Seed of the left/right draw (default: from the OS)."""
    grace_seconds: float = 10.0
    """On shutdown, how long requests in flight may take to finish."""
    log_level: str = "info"
    """Logging level: debug, info, warning, error."""


@dataclass
class ExportConfig:
    out: str = "-"
    """Preference JSONL to write ('-': standard output)."""
    store: str | None = None
    """Read the store directly (a SQLite file or a PostgreSQL connection string)..."""
    server: str | None = None
    """...or through a running feedback server's API, http://host:port."""
    auth_token_file: str | None = None
    """Bearer token file for --server."""
    after: int = 0
    """Export judgments with sequence number above this (the last one exported is printed, for
    the next incremental export)."""
    timeout_s: float = 30.0
    """--server: seconds per API call."""


def check_serve(cfg: ServeConfig) -> None:
    """Reject nonsensical numbers before anything opens (one line, exit 2)."""
    for name in ("max_queue", "max_pairs_per_request", "max_body_bytes"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(cfg, name)})")
    for name in ("lease_seconds", "max_lease_seconds", "refresh_seconds"):
        if not getattr(cfg, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0 (got {getattr(cfg, name)})")
    if not 0.0 <= cfg.double_label_fraction <= 1.0:
        raise ValueError(f"--double-label-fraction must be in [0, 1] (got "
                         f"{cfg.double_label_fraction})")
    for flag, port in (("--port", cfg.port), ("--metrics-port", cfg.metrics_port)):
        if not (0 <= port <= 65535 or (flag == "--metrics-port" and port == -1)):
            raise ValueError(f"{flag} must be in 0-65535 (got {port})")
    if cfg.port and cfg.port == cfg.metrics_port:
        raise ValueError(f"--port and --metrics-port are both {cfg.port}")


def check_export(cfg: ExportConfig) -> None:
    if (cfg.store is None) == (cfg.server is None):
        raise ValueError("give one of --store (read the database) or --server (read the API)")
    if cfg.after < 0:
        raise ValueError(f"--after must be >= 0 (got {cfg.after})")
