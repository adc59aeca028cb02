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
        torch.save(self.head.state_dict(), path / VALUE_HEAD_FILE)
        (path / "README.txt").write_text(
            "PPO critic: a transformers backbone (AutoModel.from_pretrained here) plus a scalar "
            f"head in {VALUE_HEAD_FILE} (nn.Linear(hidden, 1) state dict).\n")

    def forward(self, query_responses: torch.Tensor, attention_mask: torch.Tensor,
                context_length: int) -> torch.Tensor:
        hidden = response_hidden(self.backbone, query_responses, attention_mask, context_length)
        return self.head(hidden.float()).squeeze(-1)  # (B, R)


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
