"""The critic: V(s_t) for every response position, a causal-LM backbone plus a scalar head.

A separate network, a copy of the initial policy's backbone with a scalar head
(zero-initialized, so V = 0 at the start and the first updates move only the head's scale).
Separate networks rather than one backbone with two heads (TRL's old ValueHead model):

- the value loss, whose scale and targets drift as rewards change, cannot disturb the policy's
  features through a shared trunk, and the policy's KL leash is not fought by critic updates
  (Huang et al. 2024, "The N+ implementation details of RLHF with PPO", and cleanrl's RLHF
  PPO keep separate policy and critic networks; so do OpenRLHF and NeMo-Aligner);
- each gets its own optimizer and learning rate;
- InstructGPT initializes the critic from the RM; ours is remote (possibly another tokenizer
  or architecture), so the critic starts from the SFT policy, which reads the same token ids.

The cost is a second backbone in memory and one more forward/backward per micro-batch. A PPO
checkpoint (:class:`PolicyAndValue`) holds the policy at the top and the critic in ``value/``.

With LoRA (``--lora-r``) the critic is its own adapter ("value") and this scalar head on the
policy's frozen base (``ppo_nets.py``): the trunk is frozen, so the value loss still cannot
move the policy (each adapter has its own weights and optimizer), and the second backbone
costs r/H of one instead of a copy. A value head alone on the frozen SFT features would be
cheaper still, but a linear read-out of features nobody trains for value is a weak critic;
one on the policy's adapted features would let the value loss train the policy.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel

from policy_trainer.logprobs import response_hidden

VALUE_HEAD_FILE = "value_head.pt"


class ValueModel(nn.Module):
    """V(s_t) for every response position: a causal-LM backbone plus a scalar head."""

    def __init__(self, backbone: nn.Module, head: nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.get_input_embeddings().weight.shape[1]
        if head is None:
            head = nn.Linear(hidden, 1)
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.head = head

    @classmethod
    def from_policy(cls, policy) -> ValueModel:
        """A copy of the policy's backbone (its own weights from here on) and a zero head."""
        return cls(copy.deepcopy(policy.base_model))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ValueModel:
        path = Path(path)
        backbone = AutoModel.from_pretrained(path, dtype=torch.float32)
        state = torch.load(path / VALUE_HEAD_FILE, map_location="cpu", weights_only=True)
        head = nn.Linear(state["weight"].shape[1], 1)
        head.load_state_dict(state)
        return cls(backbone, head)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.backbone.save_pretrained(path)
        self.write_head(path, self.head.state_dict())

    @staticmethod
    def write_head(path: Path, head_state: dict) -> None:
        """The scalar head beside a saved backbone, and a note saying how to load the two."""
        torch.save(head_state, path / VALUE_HEAD_FILE)
        (path / "README.txt").write_text(
            "PPO critic: a transformers backbone (AutoModel.from_pretrained here) plus a scalar "
            f"head in {VALUE_HEAD_FILE} (nn.Linear(hidden, 1) state dict).\n")

    def forward(self, query_responses: torch.Tensor, attention_mask: torch.Tensor,
                context_length: int) -> torch.Tensor:
        hidden = response_hidden(self.backbone, query_responses, attention_mask, context_length)
        return values_from(self.head, hidden)


def values_from(head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """V = head(h) in fp32, autocast or not: (B, R, H) -> (B, R) (a tensor of its own, not a
    view: FSDP2 hooks a sharded module's outputs)."""
    with torch.autocast(hidden.device.type, enabled=False):
        return head(hidden.float()).squeeze(-1).clone()


class PolicyAndValue:
    """What a checkpoint holds: the policy at the top (AutoModelForCausalLM loads it as it is)
    and the critic in ``value/``. Has the one method ``checkpoint.save_checkpoint`` calls."""

    def __init__(self, policy, critic: ValueModel, meta: dict | None = None):
        self.policy, self.critic, self.meta = policy, critic, meta or {}

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.policy.save_pretrained(path)
        self.critic.save_pretrained(path / "value")
        if self.meta:
            (path / "ppo.json").write_text(json.dumps(self.meta, indent=2) + "\n")
