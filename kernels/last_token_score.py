"""Last-token scoring: gather the scored row, apply the final norm to it, apply the score head.

Math, for each sequence b with scored position i_b (the last non-pad token):

    x_b = h[b, i_b, :]                                     # (H,)
    RMSNorm:   n_b = x_b / sqrt(mean(x_b^2) + eps) * w       (Llama, Qwen2, Mistral)
    LayerNorm: n_b = (x_b - mean(x_b)) / sqrt(var(x_b) + eps) * w + beta   (GPT-2, GPT-NeoX)
    r_b = W_score @ n_b + b_score                           # (L,)

HF's ``*ForSequenceClassification`` runs the norm and the head over all B*T positions and
then picks one row per sequence; computing only the B picked rows is the same math.
Accumulation is in fp32 and the result is fp32 whatever the input dtype.
"""

from __future__ import annotations

import torch


def last_token_score_reference(
    hidden: torch.Tensor,
    index: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None = None,
    norm: str | None = "rms",
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Torch reference. hidden (B, T, H), index (B,) int -> rewards (B, L) float32.

    ``norm`` is "rms", "layer" or None (hidden states are already normalized).
    """
    rows = hidden[torch.arange(hidden.shape[0], device=hidden.device), index].float()  # (B, H)
    if norm == "rms":
        rows = rows * torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + eps)
    elif norm == "layer":
        mu = rows.mean(-1, keepdim=True)
        var = (rows - mu).pow(2).mean(-1, keepdim=True)
        rows = (rows - mu) * torch.rsqrt(var + eps)
    elif norm is not None:
        raise ValueError(f"norm must be 'rms', 'layer' or None, got {norm!r}")
    if norm is not None:
        if norm_weight is not None:
            rows = rows * norm_weight.float()
        if norm_bias is not None:
            rows = rows + norm_bias.float()
    out = rows @ head_weight.float().t()  # (B, L)
    if head_bias is not None:
        out = out + head_bias.float()
    return out


def last_token_score(hidden, index, head_weight, head_bias=None, norm="rms", norm_weight=None,
                     norm_bias=None, eps=1e-6) -> torch.Tensor:
    """Dispatching entry point (the Triton kernel on CUDA joins with the kernels issue)."""
    return last_token_score_reference(hidden, index, head_weight, head_bias, norm, norm_weight,
                                      norm_bias, eps)
