"""The networks of a PPO step behind one interface: the policy's log-probs (and sampling), the
frozen reference's log-probs, the critic's values; how they are built, and written out.

Two layouts:

- **full fine-tuning** (``--lora-r 0``): three networks. The policy; the critic, a copy of the
  policy's backbone with a scalar head (``critic.py``); the reference, frozen, its matmul
  weights stored in bf16 under ``--dtype bfloat16`` (``precision.py``);
- **LoRA**: one base, frozen, in memory once. The policy is the base with adapter "default",
  the critic the base with adapter "value" and the scalar head, the reference the base with
  every adapter disabled (peft's ``with model.disable_adapter():``). At the start the reference *is*
  the SFT model, bit for bit, because it is the very same weights.

Each network the trainer calls is one ``nn.Module`` whose ``forward`` is PPO's (log-probs
through the fused kernel, or values), so FSDP2's hooks gather the LM head's weight, which the
kernel reads directly (``sharding.py``); ``generate`` is registered the same way.

A critic's backward must run inside :meth:`Nets.critic_scope`: with LoRA the scope makes the
"value" adapter the active one, and gradient checkpointing replays layers in the backward
with whatever adapter is active then.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from policy_trainer import distributed, lora, precision
from policy_trainer.critic import PolicyAndValue, ValueModel, values_from
from policy_trainer.logprobs import response_hidden, response_logprobs
from policy_trainer.scaling import Run, prefix_of


class LMForward(nn.Module):
    """A causal LM (or its peft wrapper) with PPO's forward: (B, R) log-probs of the response
    tokens as ``role`` "policy" or "reference" (adapters off), or values as "value" (LoRA:
    ``value_head`` on the base, inside the critic's scope). ``generate`` samples from it."""

    def __init__(self, lm: nn.Module, value_head: nn.Linear | None = None):
        super().__init__()
        self.lm = lm
        self.value_head = value_head
        self.synced_generation = False  # sharded: every rank keeps stepping until all are done

    def forward(self, query_responses: torch.Tensor, attention_mask: torch.Tensor,
                context_length: int, role: str = "policy", temperature: float = 1.0,
                with_entropy: bool = False):
        hf = lora.unwrap(self.lm)
        if role == "value":
            hidden = response_hidden(hf.base_model, query_responses, attention_mask,
                                     context_length)
            return values_from(self.value_head, hidden)
        off = role == "reference" and lora.is_peft(self.lm)
        with lora.adapters_off(self.lm) if off else nullcontext():
            out = response_logprobs(hf, query_responses, attention_mask, context_length,
                                    temperature, with_entropy)
        # not views of the kernel's flat output: FSDP2 hooks a module's outputs for its
        # backward, and an in-place op on a view would lose the hook
        return tuple(t.clone() for t in out) if with_entropy else out.clone()

    def generate(self, **kwargs):
        hf = lora.unwrap(self.lm)
        if not self.synced_generation:
            return hf.generate(**kwargs)
        # Sharded: each layer is gathered once for the whole generation, not once per token
        # (the bf16 compute copy of the policy stays resident meanwhile), and every rank keeps
        # stepping until all are done.
        from torch.distributed.fsdp import FSDPModule

        self.set_reshard_after_forward(False)
        try:
            return hf.generate(synced_gpus=True, **kwargs)
        finally:
            self.set_reshard_after_forward(True)
            self.set_reshard_after_forward(False, recurse=False)  # the root's own default
            for m in self.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()

    @property
    def generation_config(self):
        return lora.unwrap(self.lm).generation_config

    @generation_config.setter
    def generation_config(self, value):
        lora.unwrap(self.lm).generation_config = value


@dataclass
class Nets:
    policy: LMForward   # trained: forward = log-probs
    critic: nn.Module   # ValueModel, or the policy itself (LoRA: role "value")
    reference: nn.Module  # a frozen LMForward, or the policy itself (LoRA: adapters off)
    shared: bool        # LoRA: one base, the roles by adapter

    def logprobs(self, *inputs, temperature: float, with_entropy: bool = False):
        return self.policy(*inputs, temperature=temperature, with_entropy=with_entropy)

    def ref_logprobs(self, *inputs, temperature: float) -> torch.Tensor:
        return self.reference(*inputs, role="reference", temperature=temperature)

    def values(self, *inputs) -> torch.Tensor:
        return self.policy(*inputs, role="value") if self.shared else self.critic(*inputs)

    def critic_scope(self):
        """Wraps a critic forward and its backward (module docstring)."""
        return lora.active_adapter(self.policy.lm, lora.VALUE) if self.shared else nullcontext()

    def trainable(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(the policy's trainable parameters, the critic's)."""
        if not self.shared:
            return ([p for p in self.policy.parameters() if p.requires_grad],
                    [p for p in self.critic.parameters() if p.requires_grad])
        policy, critic = [], []
        for name, p in self.policy.named_parameters():
            if p.requires_grad:
                value = name.startswith("value_head.") or f".{lora.VALUE}." in name
                (critic if value else policy).append(p)
        return policy, critic


def build(cfg, run: Run, lm: nn.Module, reference_lm: nn.Module | None,
          critic_dir: Path | None) -> Nets:
    """The networks from the loaded fp32 models (``reference_lm`` None with LoRA), prepared by
    ``run`` (``scaling.py``); ``critic_dir``: a plain checkpoint's critic to resume."""
    generate = ("forward", "generate")
    if cfg.lora:
        hidden = lm.get_input_embeddings().weight.shape[1]
        lm = run.prepare_lm(lm, "CAUSAL_LM")  # adapter "default"; the base frozen (bf16)
        lora.add_adapter(lm, lora.VALUE, cfg)
        head = nn.Linear(hidden, 1)  # zero: V = 0 at the start (critic.py)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        policy = _eval(LMForward(lm, head), cfg)
        policy = run.wrap_root(policy, generate)
        policy.synced_generation = run.dist.enabled
        return Nets(policy, policy, policy, shared=True)
    critic = (ValueModel.from_pretrained(critic_dir) if critic_dir
              else ValueModel.from_policy(lm))  # a copy, before anything wraps the policy
    if cfg.gradient_checkpointing:
        precision.enable_checkpointing(critic.backbone)
    policy = _eval(LMForward(run.prepare_lm(lm, "CAUSAL_LM")), cfg)
    reference_lm.requires_grad_(False)
    head = reference_lm.get_output_embeddings()
    precision.store_frozen(reference_lm, cfg.dtype, keep=(head,))
    if cfg.dtype != "float32":
        precision.head_in_fp32(head)
    policy = run.wrap_root(policy, generate)
    policy.synced_generation = run.dist.enabled
    return Nets(policy, run.wrap_root(_eval(critic, cfg)),
                run.wrap_root(LMForward(reference_lm).eval()), shared=False)


def _eval(module: nn.Module, cfg) -> nn.Module:
    """Eval mode (PPO: dropout off in rollouts and updates alike), checkpointing kept on."""
    module.eval()
    if cfg.gradient_checkpointing:
        precision.checkpoint_in_eval(module)
    return module


def plain_checkpoint(nets: Nets) -> PolicyAndValue:
    """What a one-process full run's checkpoint saves: the policy, the critic in value/."""
    return PolicyAndValue(nets.policy.lm, nets.critic)


def save_pretrained(run: Run, nets: Nets, out: Path) -> None:
    """The final policy in ``out`` and the critic in ``out/value``, plain (adapters merged,
    gathered to rank 0); every rank must call it."""
    if not run.dcp:
        if run.dist.is_main:
            plain_checkpoint(nets).save_pretrained(out)
        return
    hf = lora.unwrap(nets.policy.lm)
    run.save_pretrained(nets.policy, out, hf=hf, adapter=lora.POLICY)
    critic_root = nets.policy if nets.shared else nets.critic
    state = run.gather(critic_root)
    if state is not None:
        if nets.shared:
            backbone = hf.base_model
            merged = lora.merged_state_dict(state, nets.policy.lm, lora.VALUE,
                                            prefix_of(nets.policy, hf))
            sub = f"{hf.base_model_prefix}."
            head = {k[len("value_head."):]: v for k, v in state.items()
                    if k.startswith("value_head.")}
        else:
            backbone, merged, sub = nets.critic.backbone, state, "backbone."
            head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
        value = out / "value"
        run.write_pretrained(backbone, {k[len(sub):]: v for k, v in merged.items()
                                        if k.startswith(sub)}, value)
        ValueModel.write_head(value, {k: v.float() for k, v in head.items()})
    distributed.barrier(run.dist)
