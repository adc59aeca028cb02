"""Per-token log-probs of the policy and the reference, and the value function's forward.

Log-probs never build the (B, T, V) logits: the causal LM's backbone gives final hidden
states, and ``kernels.token_logprobs`` takes them with the LM head's weight to fp32 log-probs
(and entropies), one vocabulary chunk at a time, differentiably (DESIGN §2 step 3). With a
vocabulary of 150k and 2k-token rollouts that is the difference between ~1 GB of logits per
sequence and a few MB. ``check_logprob_path`` compares the path against the model's own
forward once at start-up, so an architecture whose head does more than ``W·h + b`` (logit
soft-capping, logit scaling) is refused instead of trained on wrong numbers.

Value function: a separate critic, a copy of the initial policy's backbone with a scalar head
(zero-initialized, so V = 0 at the start and the first updates move only the head's scale).
Separate networks rather than one backbone with two heads (TRL's old ValueHead model):

- the value loss, whose scale and targets drift as rewards change, cannot disturb the policy's
  features through a shared trunk, and the policy's KL leash is not fought by critic updates
  (Huang et al. 2024, "The N+ implementation details of RLHF with PPO", and cleanrl's RLHF
  PPO keep separate policy and critic networks; so do OpenRLHF and NeMo-Aligner);
- each gets its own optimizer and learning rate;
- InstructGPT initializes the critic from the RM; ours is remote (possibly another tokenizer
  or architecture), so the critic starts from the SFT policy, which reads the same token ids.

The cost is a second backbone in memory and one more forward/backward per micro-batch.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel

from kernels import token_logprobs

VALUE_HEAD_FILE = "value_head.pt"


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so a left-padded row sees the same positions
    as the row alone (a plain forward would start every row at 0 and shift Llama's RoPE)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # (B, T)


def response_hidden(backbone: nn.Module, query_responses: torch.Tensor,
                    attention_mask: torch.Tensor, context_length: int) -> torch.Tensor:
    """Final hidden states at the positions that predict the response tokens: (B, R, H)."""
    out = backbone(input_ids=query_responses, attention_mask=attention_mask,
                   position_ids=position_ids(attention_mask), use_cache=False)
    return out.last_hidden_state[:, context_length - 1: -1]  # (B, R, H)


def response_logprobs(model, query_responses: torch.Tensor, attention_mask: torch.Tensor,
                      context_length: int, temperature: float = 1.0,
                      with_entropy: bool = False):
    """log π(response_t | context) per response token, (B, R) fp32; with entropies too.

    ``temperature`` divides the logits as sampling did: the ratio in PPO's loss is between the
    distributions the tokens were actually drawn from (cleanrl: ``logits /= temperature``).
    """
    hidden = response_hidden(model.base_model, query_responses, attention_mask, context_length)
    head = model.get_output_embeddings()
    targets = query_responses[:, context_length:]  # (B, R)
    return token_logprobs(hidden, head.weight, targets, lm_head_bias=head.bias,
                          temperature=temperature, return_entropy=with_entropy)


@torch.no_grad()
def check_logprob_path(model, query_responses: torch.Tensor, attention_mask: torch.Tensor,
                       context_length: int, temperature: float, atol: float = 1e-3) -> float:
    """Max |Δ| between ``response_logprobs`` and log_softmax of the model's own logits on the
    masked positions; raises ValueError above ``atol``."""
    ours = response_logprobs(model, query_responses, attention_mask, context_length, temperature)
    logits = model(input_ids=query_responses, attention_mask=attention_mask,
                   position_ids=position_ids(attention_mask), use_cache=False).logits
    logits = logits[:, context_length - 1: -1].float() / temperature  # (B, R, V)
    targets = query_responses[:, context_length:]
    ref = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]  # (B, R)
    mask = attention_mask[:, context_length:].bool()
    diff = float((ours - ref).abs()[mask].max()) if mask.any() else 0.0
    if not diff <= atol:  # also catches NaN
        raise ValueError(
            f"{type(model).__name__}: log-probs from the backbone + LM head differ from the "
            f"model's own logits by {diff:.2e} (> {atol}); its head is not a plain linear map "
            "(logit soft-capping or scaling?), which this trainer does not support")
    return diff


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
    def from_policy(cls, policy) -> "ValueModel":
        """A copy of the policy's backbone (its own weights from here on) and a zero head."""
        return cls(copy.deepcopy(policy.base_model))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ValueModel":
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
