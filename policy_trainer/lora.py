"""LoRA through ``peft``: adapters on a frozen base, switching between them, and merging them
into plain Hugging Face weights.

A LoRA layer computes ``W x + (alpha / r) · B A x`` with W frozen and only A (r x in) and
B (out x r, zero at the start) trained (Hu et al. 2021). The trainer uses it three ways:

- SFT and the reward model: one adapter ("default"; the RM's score head trains whole, as
  peft's SEQ_CLS task does);
- PPO: the policy's adapter ("default"), the critic's own adapter ("value") on the same base,
  and the reference is that base with every adapter disabled: one copy of the base weights
  serves all three (``ppo_nets.py``);
- at the end, :func:`merged_state_dict` folds an adapter into the base weights out of place
  (the base stays usable for the next adapter) and the result is saved as a plain checkpoint
  that ``rm-server serve``, ``policy-trainer`` and ``from_pretrained`` load without ``peft``.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from policy_trainer.errors import UserError

POLICY, VALUE = "default", "value"  # adapter names


def lora_config(cfg, task_type: str | None):
    """peft's ``LoraConfig`` from the ``--lora-*`` flags of ``cfg`` (a ``ScaleConfig``)."""
    from peft import LoraConfig

    targets = list(cfg.lora_target_modules)
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets[0] if targets == ["all-linear"] else targets,
                      task_type=task_type)


def add_lora(model: nn.Module, cfg, task_type: str | None):
    """``model`` wrapped by peft with the trainable adapter "default"; everything else frozen
    (a SEQ_CLS model's score head excepted). Refuses targets that are not linear layers, and
    the LM head (PPO and SFT read its weight as the base's)."""
    try:
        from peft import get_peft_model
    except ImportError:
        raise UserError("--lora-r needs peft: pip install 'rlhf-rm-service[lora]'") from None
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    try:
        peft_model = get_peft_model(model, lora_config(cfg, task_type))
    except ValueError as e:  # no module matched, or a type LoRA does not support
        raise UserError(f"--lora-target-modules {' '.join(cfg.lora_target_modules)}: "
                        f"{str(e).splitlines()[0]}") from None
    for name, m in peft_model.named_modules():
        if isinstance(m, BaseTunerLayer) and not isinstance(m, LoraLinear):
            kind = type(m.get_base_layer()).__name__
            raise UserError(f"--lora-target-modules: {name} is a {kind}; only linear layers "
                            "take an adapter here")
        if head is not None and isinstance(m, BaseTunerLayer) and m.get_base_layer() is head:
            raise UserError("--lora-target-modules: the LM head cannot take an adapter")
    return peft_model


def add_adapter(peft_model, name: str, cfg) -> None:
    """A second trainable adapter ``name`` beside "default" (peft adds it frozen)."""
    peft_model.add_adapter(name, lora_config(cfg, None))
    for pname, p in peft_model.named_parameters():
        if f".{name}." in pname and ".lora_" in pname:
            p.data = p.data.float()  # trainable: fp32, whatever the base is stored in
            p.requires_grad_(True)


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (with its LoRA layers), or ``model``."""
    return model.get_base_model() if is_peft(model) else model


@contextmanager
def active_adapter(peft_model, name: str):
    """Within: the forward runs adapter ``name``. A backward that recomputes layers (gradient
    checkpointing) must run inside the same context: it replays the forward."""
    before = peft_model.active_adapter
    with _grads_kept(peft_model):
        peft_model.base_model.set_adapter(name)
    try:
        yield
    finally:
        with _grads_kept(peft_model):
            peft_model.base_model.set_adapter(before)


@contextmanager
def adapters_off(peft_model):
    """Within: the base alone, every adapter disabled (PPO's reference)."""
    with _grads_kept(peft_model):
        off = peft_model.disable_adapter()
        off.__enter__()
    try:
        yield
    finally:
        with _grads_kept(peft_model):
            off.__exit__(None, None, None)


@contextmanager
def _grads_kept(peft_model):
    """peft's adapter switches also set requires_grad (the active adapter trainable, the
    others frozen); here every adapter stays trainable (each has its own optimizer), so the
    flags are put back as they were."""
    flags = [(p, p.requires_grad) for p in peft_model.parameters()]
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def merged_state_dict(state: dict[str, torch.Tensor], peft_model, adapter: str = POLICY,
                      prefix: str = "", dtype: torch.dtype | None = None
                      ) -> dict[str, torch.Tensor]:
    """The plain transformers state dict of ``peft_model``'s base with ``adapter`` merged:
    ``W + (alpha / r) B A`` for every LoRA layer (transposed for GPT-2's Conv1D), a
    ``modules_to_save`` copy in place of its original, other adapters dropped.

    ``state`` holds the wrapped model's tensors under ``prefix`` + the names
    ``unwrap(peft_model).state_dict()`` uses (a full, gathered state dict under FSDP: the
    merge reads only the modules' scaling and layout, never their sharded weights). Out of
    place: the base in memory is not touched. Tensors come back in ``dtype`` (default: each
    one's own), merged in fp32.
    """
    from peft.tuners.lora import Linear as LoraLinear

    layers = {name: m for name, m in unwrap(peft_model).named_modules()
              if isinstance(m, LoraLinear)}
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        key = key[len(prefix):]
        if ".lora_" in key or ".original_module." in key:
            continue
        if ".modules_to_save." in key:
            head, rest = key.split(".modules_to_save.", 1)
            name, leaf = rest.split(".", 1)
            if name != adapter:
                continue
            key = f"{head}.{leaf}"
        elif ".base_layer." in key:
            module, leaf = key.split(".base_layer.", 1)
            if leaf == "weight" and adapter in layers[module].lora_A:
                value = value.float() + _delta(state, prefix, module, layers[module], adapter)
            key = f"{module}.{leaf}"
        out[key] = value.to(dtype or value.dtype)
    return out


def _delta(state, prefix: str, module: str, layer, adapter: str) -> torch.Tensor:
    a = state[f"{prefix}{module}.lora_A.{adapter}.weight"].float()  # (r, in)
    b = state[f"{prefix}{module}.lora_B.{adapter}.weight"].float()  # (out, r)
    delta = (b @ a) * layer.scaling[adapter]  # (out, in)
    return delta.t() if layer.fan_in_fan_out else delta
