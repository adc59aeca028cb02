"""Several processes, one run: torchrun's environment, each rank's share of a batch, sums and
means of logged numbers across ranks.

Under ``torchrun --nproc_per_node N`` (RANK / WORLD_SIZE / LOCAL_RANK set) each process is one
rank of a process group: gloo on the CPU, NCCL on CUDA (one GPU per rank, ``cuda:LOCAL_RANK``).
The weights are sharded across the ranks with FSDP2 (``policy_trainer.sharding``); this module
holds the rest of what the stages need to agree on: which examples each rank trains on, and
the numbers they log (summed or averaged over ranks, so every rank logs the same).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device_kind: str) -> Dist:
    """A process group when launched by torchrun; a single-process Dist otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def rank_device(d: Dist, device: torch.device) -> torch.device:
    """Under torchrun on CUDA each rank takes its own GPU, cuda:LOCAL_RANK."""
    if d.enabled and device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    return device


def share(d: Dist, items: list) -> list:
    """This rank's share of one step's ``items``: every world_size-th from its rank on.

    Every rank gets the same count (FSDP needs the same number of forwards and backwards on
    every rank, or its collectives hang): when ``len(items)`` is not a multiple of the world
    size, the shorter shares are padded with the step's first items, as torch's
    DistributedSampler pads an epoch. With equal shares, the mean over ranks of each rank's
    mean is the mean over the step.
    """
    if not d.enabled:
        return items
    per_rank = -(-len(items) // d.world_size)
    padded = items + items[: per_rank * d.world_size - len(items)]
    return padded[d.rank::d.world_size]


def share_counted(d: Dist, items: list) -> list[tuple[object, bool]]:
    """:func:`share` for sums that must count each item once (an evaluation): (item, counted),
    False on the padding, which a rank still runs (the collectives) and leaves out."""
    if not d.enabled:
        return [(x, True) for x in items]
    per_rank = -(-len(items) // d.world_size)
    positions = range(d.rank, per_rank * d.world_size, d.world_size)
    return [(items[p % len(items)], p < len(items)) for p in positions]


def sum_across(d: Dist, values: dict[str, float]) -> dict[str, float]:
    """Each key summed over ranks (in float64, every rank gets the same numbers)."""
    if not d.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":  # NCCL reduces CUDA tensors only
        t = t.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def sum_tensor(d: Dist, t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over ranks (a copy; every rank gets the same)."""
    if not d.enabled:
        return t
    out = t.clone()
    if dist.get_backend() == "nccl":
        out = out.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(out)
    return out.to(t.device)


def mean_across(d: Dist, values: dict[str, float]) -> dict[str, float]:
    """Each key averaged over ranks (every rank gets the same numbers: β stays in lock-step)."""
    if not d.enabled:
        return values
    return {k: v / d.world_size for k, v in sum_across(d, values).items()}


def gather_to_main(d: Dist, items: list) -> list:
    """Every rank's ``items`` (picklable), concatenated in rank order on rank 0; [] elsewhere."""
    if not d.enabled:
        return items
    parts = [None] * d.world_size if d.is_main else None
    dist.gather_object(items, parts, dst=0)
    return [x for part in parts for x in part] if d.is_main else []


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
