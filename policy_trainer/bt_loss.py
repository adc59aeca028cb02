"""The Bradley-Terry pairwise loss for reward models. Pure torch: no files, no logging.

Bradley-Terry (1952) models a preference as P(y_w ≻ y_l | x) = σ(r(x, y_w) − r(x, y_l)); fitting
r by maximum likelihood on (chosen, rejected) pairs is the reward-model objective of Christiano
et al. (2017), Stiennon et al. (2020) and Ouyang et al. (2022):

    Δ_i    = r_w,i − r_l,i
    loss_i = −log σ(Δ_i − m_i)  +  c · (r_w,i + r_l,i)²

- m_i, an optional per-pair margin (Llama 2, Touvron et al. 2023, §3.2.2): the RM must prefer
  y_w by at least m_i before the loss flattens. m_i = 0 is the plain BT loss.
- c, the reward-centering coefficient (Eisenstein et al. 2023; TRL's
  ``center_rewards_coefficient``, 0.01 recommended): BT only sees differences, so the offset of
  r is free; the penalty pins the mean reward of each pair near 0.

−log σ(z) is computed by logsigmoid, stable for large |z| (softplus linearizes above 20).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    center_coef: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Per-pair BT loss with optional margin and centering. r_chosen, r_rejected: (N,).

    ``reduction``: "mean" (over pairs), "sum" (for gradient accumulation: divide the sum of
    every micro-batch by the number of pairs in the whole batch) or "none" ((N,) losses).
    """
    if r_chosen.shape != r_rejected.shape:
        raise ValueError(f"shapes differ: chosen {tuple(r_chosen.shape)}, "
                         f"rejected {tuple(r_rejected.shape)}")
    delta = r_chosen - r_rejected  # (N,)
    if margin is not None:
        delta = delta - margin
    loss = -F.logsigmoid(delta)  # −log σ(Δ − m), (N,)
    if center_coef:
        loss = loss + center_coef * (r_chosen + r_rejected).pow(2)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")

