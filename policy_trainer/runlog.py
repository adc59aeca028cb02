"""The run's logs, the same for every stage: OUT/train_log.jsonl, one record per step (plus
eval and event records), rewound on resume; for PPO also TensorBoard scalars and
OUT/rollouts.jsonl, samples of each step's rollouts as text (prompt, response, score: for
reading, or for scoring with another judge, e.g. the demo's hidden gold reward).

On resume, records after the checkpoint's step are dropped: they belong to the run that
crashed and will be written again, so the log of a resumed run reads as one that ran through.
Only rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

from tqdm.auto import tqdm

log = logging.getLogger("policy_trainer.runlog")


class RunLog:
    """A JSONL log, one record per line, each flushed as it is written (a crash loses at most
    the record being written); on resume, rewound to ``resume_step``."""

    def __init__(self, path: Path, resume_step: int | None):
        kept = []
        if resume_step is not None and path.exists():
            for ln in path.read_text().splitlines():
                try:
                    if json.loads(ln).get("step", 0) <= resume_step:
                        kept.append(ln)
                except ValueError:  # a line torn by the crash we are resuming from
                    continue
        path.write_text("".join(ln + "\n" for ln in kept))
        self.path = path
        self.f = path.open("a")

    def write(self, record: dict) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


class NullLog:
    """What ranks other than 0 write to: nothing."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def read_log(path: Path) -> list[dict]:
    """The records of a JSONL log (a torn last line is skipped)."""
    records = []
    for ln in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(ln))
        except ValueError:
            continue
    return records


def progress_bar(total: int, initial: int, desc: str, show: bool) -> tqdm:
    """A bar on stderr, shown only when asked for and stderr is a terminal."""
    return tqdm(total=total, initial=initial, desc=desc, unit="step", file=sys.stderr,
                dynamic_ncols=True, disable=not (show and sys.stderr.isatty()))


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


class StepLog:
    """PPO's logs: OUT/train_log.jsonl plus TensorBoard scalars (when the package is
    installed), and OUT/rollouts.jsonl."""

    def __init__(self, out: Path, resume_step: int | None, tensorboard: bool):
        self.jsonl = RunLog(out / "train_log.jsonl", resume_step)
        self.rollouts = RunLog(out / "rollouts.jsonl", resume_step)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("tensorboard is not installed: no TensorBoard events "
                            "(pip install tensorboard, or pass --no-tensorboard)")
            else:
                # purge_step drops events a crashed run wrote after the checkpoint
                self.tb = SummaryWriter(str(out / "tensorboard"),
                                        purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict) -> None:
        # NaN (e.g. explained variance of constant returns) is not JSON: write null
        self.jsonl.write({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                          for k, v in record.items()})
        if self.tb is not None and "step" in record and "event" not in record:
            for k, v in record.items():
                if k != "step" and _finite(v) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, record["step"])

    def write_rollouts(self, records: list[dict]) -> None:
        for r in records:
            self.rollouts.write(r)

    def close(self) -> None:
        self.jsonl.close()
        self.rollouts.close()
        if self.tb is not None:
            self.tb.close()
