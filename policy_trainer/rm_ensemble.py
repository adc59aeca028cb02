"""Reward-model ensembles (``rm-server train --ensemble K``): K members as K heads on one
backbone, saved as one ``num_labels = K`` checkpoint marked as an ensemble.

Why heads on one backbone, not K LoRA adapters or K models:

- serving: one forward of the backbone scores every member (the head is a (K, H) matmul on
  the last token), so an ensemble costs what one RM costs (bench/RESULTS.md has the ratio);
  K LoRA adapters change every adapted layer, so each member needs its own forward (K×);
- training: one forward/backward per pair, whatever K (LoRA members: K trainings);
- the checkpoint is a plain ``AutoModelForSequenceClassification`` with K labels: member k is
  ``logits[:, k]``, exactly what ``rm-server serve`` returns per member (rm_server/heads.py).

The price is shared errors: the members read the same features, so where the backbone is
wrong they are wrong together (Eisenstein et al. 2023: pretraining-seed diversity matters
more than fine-tuning-seed diversity). What makes them differ here, cheaply:

1. each member trains on its own bootstrap resample of the training pairs (Efron 1979):
   multinomial counts c_ik, drawn once from (seed, k), weight pair i in member k's loss, so
   a pair the member did not draw sends it no gradient;
2. each member's head row is its own random draw (N(0, 1/(H+1)), rm_model.load_model), and
   nothing pulls the heads together but the data;
3. each member is centered, c·(r_w + r_l)² on its own scores (``--center-coef``, 0.01 by
   default for an ensemble): Bradley-Terry sees only differences, so without it the members'
   free offsets would show up as disagreement everywhere.

The loss of a batch of n pairs is (1/n) Σ_i (1/K) Σ_k c_ik · ℓ_BT(r_k(x_i, y_w), r_k(x_i, y_l)),
the mean over members keeping the backbone's gradient on the scale of one RM's.

``config.json`` carries ``reward_ensemble`` (members, the server's default aggregation and λ,
how the members were made); ``rm-server serve`` reads it.
"""

from __future__ import annotations

from typing import Literal

import torch

from policy_trainer.bt_loss import bradley_terry_loss

ENSEMBLE_KEY = "reward_ensemble"
Aggregation = Literal["mean", "min", "uwo"]
DEFAULT_CENTER_COEF = 0.01  # TRL's recommended centering coefficient


def bootstrap_counts(n: int, members: int, seed: int) -> torch.Tensor:
    """(n, K) float: column k counts how often each of the n pairs is in member k's bootstrap
    resample (n draws with replacement; each column sums to n). A pure function of
    (n, K, seed), so a resumed run trains on the same resamples."""
    counts = torch.empty(n, members)
    for k in range(members):
        g = torch.Generator().manual_seed(seed * 1_000_003 + k)
        draws = torch.randint(n, (n,), generator=g)
        counts[:, k] = torch.bincount(draws, minlength=n).float()
    return counts


def member_loss(r_w: torch.Tensor, r_l: torch.Tensor, counts: torch.Tensor | None,
                margin: torch.Tensor | None, center_coef: float) -> torch.Tensor:
    """Σ_i (1/K) Σ_k c_ik · ℓ_ik over a micro-batch (divide by the batch's pairs, as with
    ``bradley_terry_loss(reduction="sum")``). r_w, r_l: (m, K); counts: (m, K) or None (every
    member sees every pair once: K = 1 is the plain BT loss); margin: (m,) or None."""
    loss = bradley_terry_loss(r_w, r_l, None if margin is None else margin[:, None],
                              center_coef, reduction="none")  # (m, K)
    if counts is not None:
        loss = loss * counts
    return loss.sum() / r_w.shape[1]


def mark(config, members: int, aggregation: Aggregation, uncertainty_coef: float,
         bootstrap: bool, center_coef: float, seed: int) -> None:
    """Mark ``config`` (saved as config.json) as an ensemble of ``members`` heads."""
    setattr(config, ENSEMBLE_KEY, {
        "members": members, "aggregation": aggregation, "uncertainty_coef": uncertainty_coef,
        "made_by": "heads on one backbone", "bootstrap": bootstrap, "center_coef": center_coef,
        "seed": seed})


def ensemble_of(config) -> dict | None:
    """The ``reward_ensemble`` metadata of a checkpoint's config, or None."""
    meta = getattr(config, ENSEMBLE_KEY, None)
    return meta if isinstance(meta, dict) and meta.get("members", 0) >= 2 else None
