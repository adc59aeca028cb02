"""``feedback-server``: the comparison queue and labeling service, and its export.

    feedback-server serve  [--store feedback.db | postgresql://...] [--port 50055] ...
    feedback-server export (--store URL | --server http://host:port) [--out prefs.jsonl]
                           [--after SEQ]

Flags come from each command's config dataclass (feedback/config.py) through ``tyro``;
``--config FILE`` (YAML or JSON) gives defaults that flags override. Failures that are the
user's (an occupied port, an unreachable database) print one line and exit non-zero. The same
commands run as ``python -m feedback``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

COMMANDS = ("serve", "export")
EXTRA_HINT = "pip install 'rlhf-rm-service[feedback]'"


def parse_config(cfg_cls, argv: list[str], prog: str, description: str):
    """The config from flags; ``--config FILE`` (YAML or JSON) supplies the defaults."""
    import tyro
    import yaml

    default = None
    if "--config" in argv[:-1]:
        i = argv.index("--config")
        path, argv = Path(argv[i + 1]), argv[:i] + argv[i + 2:]
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"--config {path}: {str(e).splitlines()[0]}") from None
        names = {f.name for f in dataclasses.fields(cfg_cls)}
        if not isinstance(data, dict) or set(data) - names:
            unknown = sorted(set(data) - names) if isinstance(data, dict) else repr(data)
            raise ValueError(f"--config {path}: expected a mapping of {cfg_cls.__name__} "
                             f"fields; unknown: {unknown}")
        default = cfg_cls(**data)
    return tyro.cli(cfg_cls, args=argv, default=default, prog=prog, description=description)


def serve_main(argv: list[str]) -> int:
    from feedback.config import ServeConfig, check_serve
    from feedback.server import serve

    cfg = parse_config(ServeConfig, argv, "feedback-server serve",
                       "serve the comparison queue, the labeling page and its API")
    check_serve(cfg)
    return serve(cfg)


def export_main(argv: list[str]) -> int:
    from feedback.config import ExportConfig, check_export
    from feedback.export import ExportReport, preferences, write_jsonl

    cfg = parse_config(ExportConfig, argv, "feedback-server export",
                       "write judgments as preference JSONL (prompt, chosen, rejected)")
    check_export(cfg)
    report = ExportReport(last_seq=cfg.after)
    out = sys.stdout if cfg.out == "-" else open(cfg.out + ".tmp", "w", encoding="utf-8")
    try:
        write_jsonl(preferences(_rows(cfg), report), out)
    finally:
        if out is not sys.stdout:
            out.close()
    if out is not sys.stdout:
        Path(cfg.out + ".tmp").replace(cfg.out)
    print(report.summary(), file=sys.stderr)
    return 0


def _rows(cfg):
    """(judgment, pair) in sequence order from the store or through the API."""
    if cfg.store is not None:
        from feedback.store import open_store

        with open_store(cfg.store) as store:
            for row in store.labeled(cfg.after):
                yield row.judgment, row.pair
        return
    from feedback.client import FeedbackClient

    client = FeedbackClient(cfg.server, token_file=cfg.auth_token_file, timeout=cfg.timeout_s)
    after = cfg.after
    while True:
        rows, after = client.judgments(after, limit=1000)
        yield from rows
        if not rows:
            return


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        asked = argv[:1] in (["-h"], ["--help"])
        print(f"{__doc__.splitlines()[0]}\n\ncommands: {', '.join(COMMANDS)}\n\n"
              "feedback-server COMMAND --help: the command's flags",
              file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    from feedback.errors import FeedbackError

    run = serve_main if argv[0] == "serve" else export_main
    try:
        return run(argv[1:])
    except ModuleNotFoundError as e:
        print(f"feedback-server {argv[0]}: error: needs the [feedback] extra (no module "
              f"{e.name!r}): {EXTRA_HINT}", file=sys.stderr)
    except (ValueError, OSError, FeedbackError) as e:
        print(f"feedback-server {argv[0]}: error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
