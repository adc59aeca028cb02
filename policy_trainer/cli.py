"""``policy-trainer``: the training side of RLHF, all three stages.

    policy-trainer sft     --data demos.jsonl --base DIR --out DIR ...
    policy-trainer rm      --data prefs.jsonl --base DIR --out DIR ...   (also: rm-server train)
    policy-trainer rm-eval --model DIR --data prefs.jsonl ...            (also: rm-server eval)
    policy-trainer ppo     --policy DIR --rm HOST:PORT[,HOST:PORT...] --prompts prompts.jsonl \
                           --out DIR ...
    policy-trainer refresh --feedback-url URL --current RM_DIR --out DIR --rm-admin HOST:PORT ...
    policy-trainer loop    (ppo's flags) --feedback-url URL --rm-model RM_DIR --refresh-every N

Each subcommand's flags come from its config dataclass through ``tyro`` (one flag per field,
the field's docstring as its help); ``--config FILE`` (YAML or JSON, keys as the field names)
gives defaults that flags on the command line override. Only the module of the command being
run is imported. Errors that are the user's (a missing file, malformed data, a bad flag value)
print one line to stderr and exit 2.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import sys
from pathlib import Path

from policy_trainer import __version__
from policy_trainer.errors import UserError

# subcommand -> (module, config class, entry function, help)
COMMANDS = {
    "sft": ("policy_trainer.sft", "SFTConfig", "train_sft",
            "supervised fine-tuning on demonstrations (response tokens only)"),
    "rm": ("policy_trainer.rm_train", "TrainConfig", "train",
           "train a reward model on preference pairs (Bradley-Terry)"),
    "rm-eval": ("policy_trainer.rm_eval", "EvalConfig", "evaluate",
                "evaluate a reward model on preference pairs"),
    "ppo": ("policy_trainer.ppo_loop", "PPOConfig", "train_ppo",
            "PPO against a reward model served over gRPC"),
    "refresh": ("policy_trainer.refresh", "RefreshConfig", "refresh",
                "fresh judgments -> a candidate RM, promoted into the server if as good"),
    "loop": ("policy_trainer.loop", "LoopConfig", "run_loop",
             "PPO with pairs to the feedback service and an RM refresh every N steps"),
}
# The reward-model commands also report a ValueError in one line, as `rm-server train` always
# has: transformers raises it for a checkpoint it cannot read (an unknown model type, say).
USER_ERRORS = (UserError, FileNotFoundError)
RM_USER_ERRORS = USER_ERRORS + (ValueError,)


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
            raise UserError(f"--config {path}: {str(e).splitlines()[0]}") from None
        names = {f.name: f for f in dataclasses.fields(cfg_cls)}
        if not isinstance(data, dict) or set(data) - set(names):
            unknown = sorted(set(data) - set(names)) if isinstance(data, dict) else data
            raise UserError(f"--config {path}: expected a mapping of {cfg_cls.__name__} fields; "
                            f"unknown: {unknown!r}")
        default = cfg_cls(**{n: data.get(n, _default(f)) for n, f in names.items()})
    return tyro.cli(cfg_cls, args=argv, default=default, prog=prog, description=description)


def _default(f: dataclasses.Field):
    import tyro

    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else tyro.MISSING


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


def run(command: str, argv: list[str], prog: str) -> int:
    """Run one subcommand with its flags; ``prog`` names it in messages (``rm-server train``
    hands over here with its own name)."""
    module, cfg_name, fn_name, _ = COMMANDS[command]
    try:
        mod = importlib.import_module(module)
        import tyro  # noqa: F401  (the flag parser; in the [train] extra)
    except ModuleNotFoundError as e:  # a client-only install: no torch, transformers, tyro
        print(f"{prog}: error: training needs the [train] extra (no module {e.name!r}): "
              "pip install 'rlhf-rm-service[train]'", file=sys.stderr)
        return 2
    errors = RM_USER_ERRORS if command in ("rm", "rm-eval") else USER_ERRORS
    try:
        cfg = parse_config(getattr(mod, cfg_name), argv, prog, COMMANDS[command][3])
        setup_logging()
        return int(getattr(mod, fn_name)(cfg) or 0)
    except errors as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # tyro: --help (0) or a flag it cannot parse (2)
        return e.code if isinstance(e.code, int) else 2
    except KeyboardInterrupt:
        return 130


def usage() -> str:
    lines = [__doc__.split("\n")[0], "", "commands:"]
    lines += [f"  {name:<8} {help_text}" for name, (*_, help_text) in COMMANDS.items()]
    return "\n".join(lines + ["", "policy-trainer COMMAND --help: the command's flags"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["--version"], ["-V"]):
        print(f"policy-trainer {__version__}")
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(usage(), file=sys.stderr if argv[:1] not in (["-h"], ["--help"]) else sys.stdout)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    return run(argv[0], argv[1:], f"policy-trainer {argv[0]}")


# rm-server train / eval hand over to these (entry points of the group rm_server.commands)
def rm_server_train(argv: list[str]) -> int:
    return run("rm", argv, "rm-server train")


def rm_server_eval(argv: list[str]) -> int:
    return run("rm-eval", argv, "rm-server eval")


if __name__ == "__main__":
    sys.exit(main())
