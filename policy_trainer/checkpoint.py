"""Resumable training checkpoints: OUT/checkpoints/step-N/, written atomically.

Each checkpoint is a loadable Hugging Face directory (model + tokenizer, ``save_pretrained``)
plus ``trainer_state.pt``: optimizer, scheduler, RNG states, data cursor and the config it was
written with. A checkpoint is written to a hidden ``.step-N.tmp`` directory and renamed into
place, so a crash mid-write never leaves a half checkpoint that ``latest_checkpoint`` picks.
:class:`TrainLog` (OUT/train_log.jsonl) rewinds with the checkpoint on resume. Shared by
``policy-trainer sft`` and (later) ``ppo``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def save_checkpoint(root: str | Path, step: int, model, tokenizer, state: dict,
                    keep: int = 2) -> Path:
    """Write step-``step`` under ``root`` and delete all but the newest ``keep`` (0 keeps all)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"step-{step}", root / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save(state, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep > 0:
        for _step, old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(path: str | Path) -> dict:
    # weights_only: a checkpoint holds tensors, numbers, strings and tuples; nothing to unpickle.
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainLog:
    """OUT/train_log.jsonl; on resume, records after the checkpoint's step are dropped (they
    belong to the run that crashed and will be written again)."""

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
        self.f = path.open("a")

    def write(self, record: dict) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()  # a crash loses at most the record being written

    def close(self) -> None:
        self.f.close()
