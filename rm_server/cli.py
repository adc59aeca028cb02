"""``rm-server``: serve, train and evaluate reward models.

    rm-server serve --model DIR [--host 127.0.0.1] [--port 50051] [--metrics-port 50053] ...
    rm-server train --data prefs.jsonl --base DIR --out DIR ...
    rm-server eval  --model DIR --data prefs.jsonl

Each subcommand's flags are generated from its config dataclass. Failures that are the user's
(a missing checkpoint, a malformed file) print one line to stderr and exit non-zero.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from rm_server.cliargs import add_dataclass_args, from_args

# subcommand -> (module, config class, entry function, help)
COMMANDS = {
    "serve": ("rm_server.server", "ServeConfig", "serve", "serve a reward model over gRPC"),
    "train": ("rm_server.train", "TrainConfig", "train", "train a reward model (Bradley-Terry)"),
    "eval": ("rm_server.evaluate", "EvalConfig", "evaluate", "evaluate a reward model on preferences"),
}


class UserError(Exception):
    """An error caused by the user's input: reported as one line, exit code 2."""


def build_parser(argv_command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rm-server", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, cfg_name, _fn, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if argv_command in (None, name):  # import only the module of the command being run
            try:
                cfg_cls = getattr(importlib.import_module(module), cfg_name)
            except ImportError:
                continue
            add_dataclass_args(p, cfg_cls)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(command).parse_args(argv)
    module, cfg_name, fn_name, _ = COMMANDS[args.command]
    mod = importlib.import_module(module)
    cfg = from_args(getattr(mod, cfg_name), args)
    try:
        return int(getattr(mod, fn_name)(cfg) or 0)
    except (UserError, FileNotFoundError, ValueError) as e:
        print(f"rm-server {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
