"""Where a command runs: the torch device and, on the CPU, the number of threads."""

from __future__ import annotations

import torch

from policy_trainer.errors import UserError


def pick_device(name: str, threads: int | None = None) -> torch.device:
    """``name`` "auto": CUDA when available, else the CPU; otherwise the device named (cpu,
    cuda, cuda:1, ...). ``threads`` sets torch's CPU threads (None: torch's choice)."""
    if threads:
        torch.set_num_threads(threads)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise UserError(f"--device {name}: {e}") from None
