"""``rm-server``: serve reward models; train and evaluate them through the training side.

    rm-server serve --model DIR [--host 127.0.0.1] [--port 50051] [--metrics-port 50053] ...
    rm-server train --data prefs.jsonl --base DIR --out DIR ...   (= policy-trainer rm)
    rm-server eval  --model DIR --data prefs.jsonl ...            (= policy-trainer rm-eval)

``serve`` is this package's. ``train`` and ``eval`` belong to the training package, which
declares them as entry points of the group ``rm_server.commands`` (pyproject.toml); this CLI
finds them there, so the serving package never imports the training one, and a serving-only
install simply lacks them. Flags come from each command's config dataclass through ``tyro``;
``--config FILE`` (YAML or JSON) gives defaults that flags override. Failures that are the
user's (a missing checkpoint, an occupied port) print one line to stderr and exit non-zero.
"""

from __future__ import annotations

import dataclasses
import sys
from importlib.metadata import entry_points
from pathlib import Path

from rm_server import __version__

PLUGIN_GROUP = "rm_server.commands"


def parse_config(cfg_cls, argv: list[str], prog: str, description: str | None = None):
    """The config from flags (tyro: a flag per field, its docstring as help). ``--config FILE``
    (YAML or JSON, keys as field names) supplies the defaults; flags given override them."""
    import tyro
    import yaml  # YAML is a superset of JSON: one reader for both

    default = None
    if "--config" in argv[:-1]:
        i = argv.index("--config")
        path, argv = Path(argv[i + 1]), argv[:i] + argv[i + 2:]
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"--config {path}: {str(e).splitlines()[0]}") from None
        names = {f.name: f for f in dataclasses.fields(cfg_cls)}
        if not isinstance(data, dict) or set(data) - set(names):
            unknown = sorted(set(data) - set(names)) if isinstance(data, dict) else repr(data)
            raise ValueError(f"--config {path}: expected a mapping of {cfg_cls.__name__} fields; "
                             f"unknown: {unknown}")
        default = cfg_cls(**{n: data.get(n, _default(f)) for n, f in names.items()})
    return tyro.cli(cfg_cls, args=argv, default=default, prog=prog, description=description)


def _default(f: dataclasses.Field):
    import tyro

    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else tyro.MISSING


def parse_serve_config(argv: list[str]):
    """``ServeConfig`` from serve's flags (tyro); a bad flag exits 2 with usage."""
    from rm_server.config import ServeConfig

    return parse_config(ServeConfig, argv, "rm-server serve", "serve a reward model over gRPC")


def serve_main(argv: list[str]) -> int:
    try:
        from rm_server.server import serve

        cfg = parse_serve_config(argv)
    except ModuleNotFoundError as e:  # a client-only install: no torch, transformers, tyro
        print(f"rm-server serve: error: serving needs the [serve] extra (no module {e.name!r}): "
              "pip install 'rlhf-rm-service[serve]'", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"rm-server serve: error: {e}", file=sys.stderr)
        return 2
    try:
        return int(serve(cfg) or 0)
    except KeyboardInterrupt:
        return 130


def plugins() -> dict[str, object]:
    """Subcommands other packages declare (``train``, ``eval`` from the training package)."""
    return {ep.name: ep for ep in entry_points(group=PLUGIN_GROUP)}


def usage(found: dict) -> str:
    names = ["serve", *sorted(found)]
    return (f"{__doc__.splitlines()[0]}\n\ncommands: {', '.join(names)}\n\n"
            "rm-server COMMAND --help: the command's flags")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["--version"], ["-V"]):
        print(f"rm-server {__version__}")
        return 0
    if argv[:1] == ["serve"]:
        return serve_main(argv[1:])
    found = plugins()
    if argv and argv[0] in found:
        try:
            return int(found[argv[0]].load()(argv[1:]) or 0)
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else 2
    if argv and argv[0] in ("train", "eval"):
        print(f"rm-server {argv[0]}: error: the training side is not installed: "
              "pip install 'rlhf-rm-service[train]'", file=sys.stderr)
        return 2
    help_asked = argv[:1] in (["-h"], ["--help"])
    print(usage(found), file=sys.stdout if help_asked else sys.stderr)
    return 0 if help_asked else 2


if __name__ == "__main__":
    sys.exit(main())
