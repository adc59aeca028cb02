"""Per-token log-probs of the policy and the reference; the hidden states the critic reads.

Log-probs never build the (B, T, V) logits: the causal LM's backbone gives final hidden
states, and ``kernels.token_logprobs`` takes them with the LM head's weight to fp32 log-probs
(and entropies), one vocabulary chunk at a time, differentiably (step 3 of a PPO step). With a
vocabulary of 150k and 2k-token rollouts that is the difference between ~1 GB of logits per
sequence and a few MB. ``check_logprob_path`` compares the path against the model's own
forward once at start-up, so an architecture whose head does more than ``W·h + b`` (logit
soft-capping, logit scaling) is refused instead of trained on wrong numbers.

In bf16 (``--dtype bfloat16``) the backbone runs under autocast, and the head does not: the
kernel runs with autocast off, hidden states in the head weight's dtype (fp32: trainable
weights and LM heads are stored fp32, ``precision.py``) and fp32 accumulation, so the
log-softmax over the vocabulary never sees a bf16 logit. What rounding is left comes from the
backbone, and depends on the batch's layout (rows, padding): the PPO step computes the
rollout policy's log-probs in the layout its first epoch trains on (``ppo_update.py``), so
the ratio at the first minibatch is exactly 1.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import token_logprobs


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
    with torch.autocast(hidden.device.type, enabled=False):  # the head in its own dtype
        return token_logprobs(hidden.to(head.weight.dtype), head.weight, targets,
                              lm_head_bias=head.bias, temperature=temperature,
                              return_entropy=with_entropy)


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
