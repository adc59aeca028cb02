"""Resumable training checkpoints, the same for every stage: ROOT/step-N/, where ROOT is
OUT/checkpoints for ``sft`` and ``ppo``, and for the reward model a directory beside its
servable output (:func:`checkpoint_root`).

Each checkpoint is a loadable Hugging Face directory (model + tokenizer, ``save_pretrained``)
plus ``trainer_state.pt``: the step, the state of every optimizer, scheduler and controller,
the RNG states, the data cursor and the config it was written with. A sharded or LoRA run
writes its trained tensors and optimizer states with ``torch.distributed.checkpoint`` into
``dcp/`` instead of the model (``scaling.py``). A checkpoint is written
to a hidden ``.step-N.tmp`` directory and renamed into place, so a crash mid-write never
leaves a half checkpoint that ``latest_checkpoint`` picks. With the data order a function of
(seed, epoch) (``data.epoch_order``), that is all a resumed run needs to take the same steps
as one that ran through.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path

import torch

from policy_trainer.errors import UserError

log = logging.getLogger("policy_trainer.checkpoint")

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as (step, path), oldest first."""
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


def checkpoint_root(out: Path, chosen: str | Path | None) -> Path:
    """Where a run writing its servable model to ``out`` keeps its resumable checkpoints (each
    about 3x the model: weights, optimizer moments, RNG), so OUT holds only what is served.

    ``chosen`` (a ``--checkpoint-dir``) when given; else OUT/checkpoints when a run of an
    earlier version left its checkpoints there (it resumes, and goes on saving, there); else
    ``OUT.checkpoints`` beside OUT (``runs/rm`` -> ``runs/rm.checkpoints``)."""
    if chosen:
        return Path(chosen)
    if latest_checkpoint(out / "checkpoints") is not None:
        return out / "checkpoints"
    resolved = out.resolve()  # OUT "." has no name of its own
    return resolved.parent / f"{resolved.name}.checkpoints"


def find_resume_point(out: Path, resume: bool, *, fresh_if_none: bool,
                      root: Path | None = None) -> Path | None:
    """The checkpoint in ``root`` (default OUT/checkpoints) to continue from, or None to start
    fresh.

    Without ``resume``, an OUT that already holds a run (a checkpoint, or a finished model) is
    refused rather than overwritten. With ``resume`` and no checkpoint: start from the
    beginning when ``fresh_if_none`` (``sft``, ``ppo``), else refuse (``rm``)."""
    root = out / "checkpoints" if root is None else root
    latest = latest_checkpoint(root)
    if not resume and (latest is not None or (out / "config.json").exists()):
        raise UserError(f"{out} already holds a run: pass --resume to continue it, "
                        "or choose another --out")
    if resume and latest is None:
        if not fresh_if_none:
            raise UserError(f"--resume: no checkpoint in {root}")
        log.info("--resume: no checkpoint in %s, starting from the beginning", root)
    return latest


def save_checkpoint(root: str | Path, step: int, model, tokenizer, state: dict,
                    keep: int = 2, *, dist=None, write_shards=None) -> Path:
    """Write step-``step`` under ``root`` and delete all but the newest ``keep`` (0 keeps all).

    ``write_shards`` (a sharded or LoRA run: ``scaling.Run``): every rank of ``dist`` calls
    this, each writes its shards with ``write_shards(tmp_dir)`` in place of
    ``model.save_pretrained``, and rank 0 writes the rest and renames the directory."""
    root = Path(root)
    main = dist is None or dist.is_main
    final, tmp = root / f"step-{step}", root / f".step-{step}.tmp"
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    if write_shards is not None:
        _barrier(dist)  # tmp exists before any rank writes into it
        write_shards(tmp)
        _barrier(dist)  # every shard is written before rank 0 renames
    else:
        model.save_pretrained(tmp)
    if main:
        tokenizer.save_pretrained(tmp)
        torch.save(state, tmp / STATE_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep > 0:
            for _step, old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier(dist)
    return final


def _barrier(dist) -> None:
    if dist is not None and dist.enabled:
        import torch.distributed

        torch.distributed.barrier()


def load_state(path: str | Path) -> dict:
    # weights_only: a checkpoint holds tensors, numbers, strings and tuples; nothing to unpickle.
    # map_location cpu: RNG states must stay there; load_state_dict moves optimizer state.
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)


def trainer_state(step: int, stateful: dict, **extra) -> dict:
    """What ``trainer_state.pt`` holds: the step, ``state_dict()`` of each of ``stateful``
    (optimizers, schedulers, a KL controller) under its key, the RNG states, and ``extra``."""
    return {"step": step, **{k: obj.state_dict() for k, obj in stateful.items()},
            "rng": rng_state(), **extra}


def restore(state: dict, stateful: dict) -> int:
    """Load what :func:`trainer_state` saved into ``stateful`` and the RNGs; returns the step."""
    for key, obj in stateful.items():
        obj.load_state_dict(state[key])
    set_rng_state(state["rng"])
    return state["step"]


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
