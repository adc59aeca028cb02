"""AdamW and its learning-rate schedule, one recipe for every network trained here: the SFT
policy, the reward model, and PPO's policy and critic (each with its own optimizer).

- Weight decay on matrices only: biases and norm weights (1-D parameters) are not decayed
  (nanoGPT; GPT-2/3 practice).
- The schedule is a linear warm-up over ``warmup_ratio`` of the steps, from 0 at the first
  step, then ``cosine`` or ``linear`` decay reaching ``min_lr_ratio`` of the peak after the
  last step, or ``constant``. It is transformers' warm-up/stable/decay schedule with no stable
  phase (``get_wsd_schedule``; with ``min_lr_ratio`` > 0 its warm-up starts from that floor),
  and ``get_constant_schedule_with_warmup``: a ``LambdaLR`` whose state resumes with the run.
"""

from __future__ import annotations

from typing import Literal

import torch
from transformers import get_constant_schedule_with_warmup, get_wsd_schedule

Schedule = Literal["cosine", "linear", "constant"]


def build_optimizer(model, total_steps: int, *, lr: float,
                    schedule: Schedule, warmup_ratio: float, min_lr_ratio: float = 0.0,
                    weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8, fused: bool = False):
    """(AdamW over the trainable parameters of ``model`` (a module, or the parameters
    themselves: PPO's LoRA policy and critic share one module), its per-step lr schedule).
    ``fused``: torch's fused AdamW kernel where every parameter is a plain fp32 tensor (not an
    FSDP2 DTensor): one kernel per parameter instead of ~10 ops (see :func:`can_fuse`)."""
    found = model.parameters() if isinstance(model, torch.nn.Module) else model
    params = [p for p in found if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=lr, betas=betas, eps=eps, **({"fused": True} if fused and can_fuse(params) else {}))
    return optimizer, lr_schedule(optimizer, total_steps, schedule, warmup_ratio, min_lr_ratio)


def can_fuse(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW takes these: plain fp32 tensors on the CPU or CUDA. On the
    CPU the for-loop AdamW costs ~7 ops per parameter tensor, a tiny model's step is those ops."""
    return bool(params) and all(type(p) is torch.nn.Parameter and p.dtype == torch.float32
                                and p.device.type in ("cpu", "cuda") for p in params)


def lr_schedule(optimizer: torch.optim.Optimizer, total_steps: int, schedule: Schedule,
                warmup_ratio: float, min_lr_ratio: float = 0.0):
    """Step it once per optimizer step; ``get_last_lr()`` is the lr of the next step."""
    warmup = round(warmup_ratio * total_steps)
    if schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    return get_wsd_schedule(optimizer, num_warmup_steps=warmup, num_stable_steps=0,
                            num_decay_steps=total_steps - warmup, decay_type=schedule,
                            min_lr_ratio=min_lr_ratio)
