"""bf16 training with fp32 master weights: what ``--dtype bfloat16`` does to a model, and
gradient checkpointing.

The rule, for every stage:

- **trainable weights stay fp32**: they are the master copy, AdamW's moments are fp32 beside
  them, and a checkpoint holds them exactly (a resumed run continues bit for bit);
- **compute runs in bf16 under** ``torch.autocast``: each matmul casts its fp32 weight to bf16
  on the fly, so activations (the bulk of a long-sequence step's memory) are bf16. Under FSDP2
  the decoder layers also all-gather in bf16 (``sharding.py``);
- **frozen weights are stored in bf16 where autocast would cast them anyway**: the matrices of
  ``nn.Linear`` / GPT-2's ``Conv1D`` layers (PPO's reference, a LoRA base). A matmul under
  autocast gives the same bits from a stored bf16 weight as from the fp32 weight it was rounded
  from, so the frozen reference computes exactly what the policy computed before its first
  update. Embeddings, norms and the LM head stay fp32 in storage, frozen or not;
- **the heads that make the numbers we train on run in fp32**: the LM head and log-softmax of
  PPO's log-probs (``kernels.token_logprobs``, autocast off), the SFT loss's logits, the
  critic's value head and the reward model's score head (:func:`head_in_fp32`).

Why not bf16 weights with a separate fp32 master copy (Megatron's way)? It saves nothing here:
bf16 weights + bf16 grads + fp32 master + fp32 moments is 16 bytes a trainable parameter, the
same as fp32 weights + fp32 grads + fp32 moments. What saves memory is sharding (FSDP2), LoRA
(no moments for frozen weights) and bf16 frozen weights and activations. Autocast keeps one
copy of each trainable weight, exact checkpoints, and the torch/FSDP2 standard recipe.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def autocast(dtype: str, device: torch.device | str):
    """The compute context of ``--dtype``: bf16 autocast, or nothing for float32."""
    device_type = torch.device(device).type
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type, dtype=DTYPES[dtype])


def autocast_methods(module: nn.Module, dtype: str, device: torch.device | str,
                     names: tuple[str, ...] = ("forward",)) -> None:
    """Run ``module``'s methods ``names`` under :func:`autocast` (accelerate's way): the
    trainer calls the module as before and gets bf16 compute. Backward is not in the context
    (autograd replays the recorded casts)."""
    if dtype == "float32":
        return
    module.compute_dtype = dtype  # read by a caller that bypasses these methods (rm_pack.py)
    for name in names:
        method = getattr(module, name)

        @functools.wraps(method)
        def wrapped(*args, _method=method, **kwargs):
            with autocast(dtype, device):
                return _method(*args, **kwargs)
        setattr(module, name, wrapped)


def head_in_fp32(head: nn.Module) -> None:
    """Make ``head`` compute in fp32 whatever the autocast state: its input is upcast and
    autocast is off inside. The LM head's logits feed a log-softmax over the vocabulary and
    the score head's output is the reward: bf16 rounding there (3 significant digits) is
    rounding of the quantity being trained on."""
    forward = head.forward

    @functools.wraps(forward)
    def fp32_forward(x, *args, **kwargs):
        with torch.autocast(x.device.type, enabled=False):
            return forward(x.float(), *args, **kwargs)
    head.forward = fp32_forward


def matmul_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose weights autocast casts to bf16: ``nn.Linear`` and GPT-2's ``Conv1D``."""
    from transformers.pytorch_utils import Conv1D

    return [m for m in model.modules() if isinstance(m, (nn.Linear, Conv1D))]


def store_frozen(model: nn.Module, dtype: str, keep: tuple[nn.Module | None, ...] = ()) -> int:
    """Store the frozen matmul weights of ``model`` in ``dtype`` (bf16), all but ``keep``
    (the LM head): the module docstring's rule. Returns the number of parameters cast."""
    if dtype == "float32":
        return 0
    cast = 0
    for m in matmul_modules(model):
        params = list(m.parameters(recurse=False))
        if any(m is k for k in keep) or not params or any(p.requires_grad for p in params):
            continue
        m.to(DTYPES[dtype])
        cast += sum(p.numel() for p in params)
    return cast


def enable_checkpointing(model) -> None:
    """Gradient (activation) checkpointing of a transformers model: each decoder layer keeps
    only its input and recomputes the rest in the backward pass. Non-reentrant: it needs no
    input that requires grad (a LoRA model's embeddings are frozen) and restores the autocast
    state when it recomputes."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.20
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def checkpoint_in_eval(model: nn.Module) -> None:
    """Keep checkpointing on in a model held in eval mode (PPO: dropout off everywhere).

    transformers checkpoints a layer only when the layer itself is in training mode (and grad
    is on); dropout reads the flag of its own module. So only the layers' own flag is set:
    every dropout stays off, generation (no grad) keeps its KV cache."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    for m in model.modules():
        if isinstance(m, GradientCheckpointingLayer):
            m.training = True
