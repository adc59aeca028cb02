"""FSDP2 across ranks, and checkpoints of sharded (or LoRA) state through
``torch.distributed.checkpoint`` (DCP).

Sharding (``fully_shard``, ZeRO-3 style): every decoder layer is one FSDP unit and the model
is the root unit (embeddings, final norm, heads). Each rank stores 1/N of every weight, its
gradient and its AdamW moments; a unit's full weights exist only while it runs (all-gathered
before its forward and again for its backward, freed after), and its gradients are
reduce-scattered (averaged over ranks) when its backward is done. With ``--dtype bfloat16``
the layers all-gather bf16 copies of the fp32 master shards and reduce gradients in fp32
(``MixedPrecisionPolicy``); the root unit stays fp32, so the heads compute in fp32.

The root unit's forward is the trainer's entry point: for SFT and the reward model the
transformers model's own forward; for PPO a module whose forward is the log-prob path
(``ppo_nets.py``), which reads the LM head's weight directly, so the weight is gathered. A
method other than ``forward`` that runs the model (``generate``) is registered with FSDP; PPO's
``generate`` keeps each layer gathered until the call ends (one all-gather per layer per call,
not per sampled token). A frozen root (PPO's reference) gives its gathered weights back after
its forward.

Every rank must run the same number of forwards and backwards through a sharded model (each
is a collective): ``distributed.share`` gives ranks equal shares, and generation keeps going
on a rank that is done until every rank is (transformers' ``synced_gpus``).

Checkpoints: each rank writes its own shards (DCP's planner, one file per rank, ``.metadata``
beside), so nothing is gathered to save; a LoRA run writes only trainable tensors. The final
model is gathered to rank 0 and written as a plain Hugging Face directory (``scaling.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from policy_trainer.distributed import Dist

DCP_DIR = "dcp"


def decoder_layers(root: nn.Module) -> list[nn.Module]:
    """The repeated blocks under ``root``: the classes transformers names in each model's
    ``_no_split_modules`` (what accelerate's FSDP auto-wrap uses too)."""
    names = set()
    for m in root.modules():
        names |= set(getattr(m, "_no_split_modules", None) or ())
    return [m for m in root.modules() if type(m).__name__ in names]


def shard(root: nn.Module, d: Dist, device: torch.device, dtype: str,
          methods: tuple[str, ...] = ()) -> nn.Module:
    """``fully_shard`` the decoder layers of ``root``, then ``root`` (in place; returned).
    ``methods``: other methods of ``root`` that run the model (``generate``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    mesh = init_device_mesh(device.type, (d.world_size,))
    layers_mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                 if dtype == "bfloat16" else MixedPrecisionPolicy())
    root.to(device)
    for layer in decoder_layers(root):
        fully_shard(layer, mesh=mesh, mp_policy=layers_mp)
    # The root unit keeps its weights gathered from forward to backward (FSDP2's default for a
    # root); a frozen one (PPO's reference) has no backward: it gives them back at once.
    frozen = not any(p.requires_grad for p in root.parameters())
    fully_shard(root, mesh=mesh, reshard_after_forward=frozen)
    for name in methods:
        register_fsdp_forward_method(root, name)
    return root


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def grad_norm(params: list[torch.Tensor], max_norm: float, sync: bool = True):
    """``clip_grad_norm_`` over ``params`` (sharded or not; under FSDP the norm is over the
    whole gradient, every rank the same); returns the norm before clipping, a float, or with
    ``sync=False`` a 0-dim tensor on the device."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):  # a DTensor: the norm of the sharded gradient
        norm = norm.full_tensor()
    return float(norm) if sync else norm  # float(): a CPU-GPU sync


def full_state_dict(root: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of ``root`` on the CPU: gathered to rank 0 under FSDP (empty elsewhere;
    every rank must call it), the module's own state dict otherwise."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_sharded(root):
        return {k: v.detach().cpu() for k, v in root.state_dict().items()}
    return get_model_state_dict(root, options=StateDictOptions(full_state_dict=True,
                                                               cpu_offload=True))


def _options(trainable_only: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # strict=False: a trainable-only state dict leaves the frozen base out on purpose (what
    # the checkpoint lacks of what was asked for, dcp.load refuses itself)
    return StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)


def save_dcp(path: Path, nets: dict[str, tuple[nn.Module, list]], trainable_only: bool) -> None:
    """Write each net's weights and its optimizers' states under ``path`` (every rank its own
    shards; every rank must call it). ``nets``: name -> (module, optimizers)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    state = {}
    for name, (module, optimizers) in nets.items():
        model_sd, optim_sd = get_state_dict(module, optimizers, options=_options(trainable_only))
        state[name] = {"model": model_sd, "optim": optim_sd}
    dcp.save(state, checkpoint_id=str(path))


def load_dcp(path: Path, nets: dict[str, tuple[nn.Module, list]], trainable_only: bool) -> None:
    """Load what :func:`save_dcp` wrote into the nets and optimizers, re-sharded to this run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    state = {}
    for name, (module, optimizers) in nets.items():
        model_sd, optim_sd = get_state_dict(module, optimizers, options=_options(trainable_only))
        state[name] = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    for name, (module, optimizers) in nets.items():
        set_state_dict(module, optimizers, model_state_dict=state[name]["model"],
                       optim_state_dict=state[name]["optim"], options=_options(trainable_only))
