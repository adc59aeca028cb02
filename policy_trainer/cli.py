"""``policy-trainer``: the policy side of RLHF.

    policy-trainer sft --data demos.jsonl --base DIR --out DIR ...
    policy-trainer ppo --policy DIR --rm HOST:PORT[,HOST:PORT...] --prompts prompts.jsonl --out DIR ...

Each subcommand's flags are generated from its config dataclass (rm_server.cliargs), and only
the module of the command being run is imported. Errors that are the user's (a missing file,
malformed data with --strict, a bad flag value) print one line to stderr and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from policy_trainer.data import UserError
from rm_server.cliargs import add_dataclass_args, from_args

# subcommand -> (module, config class, entry function, help)
COMMANDS = {
    "sft": ("policy_trainer.sft", "SFTConfig", "train_sft",
            "supervised fine-tuning on demonstrations (response tokens only)"),
    "ppo": ("policy_trainer.ppo_loop", "PPOConfig", "train_ppo",
            "PPO against a reward model served over gRPC"),
}


def build_parser(argv_command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="policy-trainer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, cfg_name, _fn, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if argv_command in (None, name):  # import only the module of the command being run
            add_dataclass_args(p, getattr(importlib.import_module(module), cfg_name))
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted (it may be replaced later)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def setup_logging() -> None:
    """INFO and up from policy_trainer.* to stderr, once (main may run several times in tests)."""
    logger = logging.getLogger("policy_trainer")
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(command).parse_args(argv)
    module, cfg_name, fn_name, _ = COMMANDS[args.command]
    mod = importlib.import_module(module)
    cfg = from_args(getattr(mod, cfg_name), args)
    setup_logging()
    try:
        return int(getattr(mod, fn_name)(cfg) or 0)
    except (UserError, FileNotFoundError) as e:
        print(f"policy-trainer {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
