"""Data parallelism for the PPO trainer: torchrun's environment, gradient all-reduce, means.

Under ``torchrun --nproc_per_node N`` (RANK / WORLD_SIZE / LOCAL_RANK set) each process is one
rank: it generates its share of the step's prompts, streams them to the shared RM, and trains
on its own rollouts; gradients are averaged across ranks before each optimizer step, so every
rank holds the same weights. Gloo on the CPU, NCCL on CUDA.

Why not ``DistributedDataParallel``: our forward is the backbone plus ``token_logprobs`` on the
LM head weight, outside the module's ``forward``, and a minibatch spans several micro-batches.
One flat all-reduce per network per optimizer step is simpler to see correct (DDP's buckets
would overlap it with the backward, which matters on GPUs at scale, not here).
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


def all_reduce_grads(d: Dist, *modules: torch.nn.Module) -> None:
    """Average the gradients of ``modules`` across ranks (one flat buffer per module)."""
    if not d.enabled:
        return
    for m in modules:
        params = [p for p in m.parameters() if p.requires_grad]
        for p in params:  # a parameter unused on this rank still takes part: zeros
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= d.world_size
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset: offset + n].view_as(p.grad))
            offset += n


def sum_across(d: Dist, values: dict[str, float]) -> dict[str, float]:
    """Each key summed over ranks (in float64, every rank gets the same numbers)."""
    if not d.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def mean_across(d: Dist, values: dict[str, float]) -> dict[str, float]:
    """Each key averaged over ranks (every rank gets the same numbers: β stays in lock-step)."""
    if not d.enabled:
        return values
    return {k: v / d.world_size for k, v in sum_across(d, values).items()}


@torch.no_grad()
def check_in_sync(d: Dist, *modules: torch.nn.Module) -> None:
    """Raise if the ranks' weights diverged (a missed all-reduce would do it silently)."""
    if not d.enabled:
        return
    local = torch.tensor([float(sum(p.double().sum() for p in m.parameters())) for m in modules],
                         dtype=torch.float64)
    lo, hi = local.clone(), local.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError(f"rank {d.rank}: weights differ across ranks (checksums {lo.tolist()} "
                           f"to {hi.tolist()})")


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
