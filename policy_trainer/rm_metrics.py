"""How well a reward model orders preference pairs, and how calibrated it is. Pure math on
arrays of rewards: no files, no logging, no models.

For a pair, Δ = r_w − r_l (chosen minus rejected). Reported:

- agreement: 1 where the RM agrees with the label (Δ > 0), ½ on a tie, 0 where it disagrees;
  its mean is the pairwise accuracy, and the BT loss −log σ(Δ) goes with it;
- Δ: mean, std and quantiles, and a histogram of |Δ| (a well-trained RM puts most in [0.5, 4]);
- calibration: under Bradley-Terry the RM claims P(y_w ≻ y_l) = σ(Δ). Folding each pair to its
  confidence σ(|Δ|) ∈ [0.5, 1] and "correct" = its agreement, equal-width bins over [0.5, 1]
  compare the mean confidence with the observed agreement; the expected calibration error is
  ECE = Σ_b (n_b / n) · |acc_b − conf_b| (Guo et al. 2017);
- rewards: mean and std over both responses of every pair (the normalization statistics);
- Spearman's rank correlation, for an RM's scores against a known gold reward;
- an ensemble's members (scores (N, K)): each member's accuracy, that of the mean, the min and
  uwo = mean − λ·std, and how much the members disagree on held-out pairs: the std across
  members of Δ (free of the members' offsets), of each response's reward with each member
  centered on its own mean, the share of pairs the members do not all order alike, and the
  members' mean pairwise correlation of Δ.
"""

from __future__ import annotations

import math

import numpy as np


def agreement(delta):
    """Per pair, from Δ = r_w − r_l: 1 (the RM agrees with the label), ½ (a tie) or 0.
    Takes a numpy array or a torch tensor and returns the same kind (float)."""
    return (delta > 0) * 1.0 + (delta == 0) * 0.5


def pairwise_accuracy(r_chosen, r_rejected):
    """Fraction of pairs where the RM agrees with the label; a tie counts one half."""
    return agreement(r_chosen - r_rejected).mean()


def spearman(x, y) -> float:
    """Spearman rank correlation: Pearson correlation of the ranks (ties get their mean rank)."""
    rx, ry = _ranks(np.asarray(x, dtype=np.float64)), _ranks(np.asarray(y, dtype=np.float64))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def _ranks(a: np.ndarray) -> np.ndarray:
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a))
    ranks[order] = np.arange(len(a), dtype=np.float64)
    _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]  # mean rank within each group of ties


def calibration(delta: np.ndarray, bins: int = 10) -> tuple[float, list[dict]]:
    """ECE of σ(Δ) against observed agreement, folded to confidence σ(|Δ|) ∈ [0.5, 1]."""
    conf = 1.0 / (1.0 + np.exp(-np.abs(delta)))
    correct = agreement(delta)
    edges = np.linspace(0.5, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        sel = which == b
        n = int(sel.sum())
        row = {"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": n,
               "confidence": float(conf[sel].mean()) if n else None,
               "agreement": float(correct[sel].mean()) if n else None}
        if n:
            ece += n / len(delta) * abs(row["agreement"] - row["confidence"])
        table.append(row)
    return float(ece), table


def pair_metrics(r_chosen, r_rejected, bins: int = 10, hist_bins: int = 20) -> dict:
    """Accuracy, loss, Δ statistics, |Δ| histogram, calibration and reward statistics."""
    r_w, r_l = np.asarray(r_chosen, dtype=np.float64), np.asarray(r_rejected, dtype=np.float64)
    delta = r_w - r_l
    rewards = np.concatenate([r_w, r_l])
    counts, edges = np.histogram(np.abs(delta), bins=hist_bins)
    wrong, _ = np.histogram(np.abs(delta[delta <= 0]), bins=edges)
    ece, table = calibration(delta, bins)
    q = np.quantile(delta, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {
        "pairs": int(len(delta)),
        "accuracy": float(pairwise_accuracy(r_w, r_l)),
        "loss": float(np.mean(np.logaddexp(0.0, -delta))),  # −log σ(Δ), no margin
        "delta_mean": float(delta.mean()),
        "delta_std": float(delta.std()),
        "delta_quantiles": {k: float(v) for k, v in zip(("p05", "p25", "p50", "p75", "p95"), q)},
        "abs_delta_in_0.5_4": float(np.mean((np.abs(delta) >= 0.5) & (np.abs(delta) <= 4.0))),
        "abs_delta_histogram": {"edges": edges.tolist(), "counts": counts.tolist(),
                                "counts_wrong": wrong.tolist()},
        "ece": ece,
        "calibration": table,
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()),
    }


def ensemble_metrics(r_chosen, r_rejected, uncertainty_coef: float = 1.0) -> dict:
    """The members' accuracies and disagreement; r_chosen, r_rejected: (N, K) member scores.
    std is over the K members (population, 1/K), as the server's aggregation computes it."""
    r_w, r_l = np.asarray(r_chosen, dtype=np.float64), np.asarray(r_rejected, dtype=np.float64)
    delta = r_w - r_l  # (N, K)
    rewards = np.concatenate([r_w, r_l])  # (2N, K)
    centered = rewards - rewards.mean(0)  # each member on its own mean

    def uwo(r):  # rm_server/heads.py and rm_client/ensemble.py define the same
        return r.mean(1) - uncertainty_coef * r.std(1)

    k = delta.shape[1]
    z = delta - delta.mean(0)
    norm = np.sqrt((z * z).sum(0))  # (K,); a member with constant Δ has no correlation
    ok = norm > 0
    corr = (z[:, ok].T @ z[:, ok]) / np.outer(norm[ok], norm[ok])
    off_diagonal = corr[~np.eye(int(ok.sum()), dtype=bool)]
    return {
        "members": int(k),
        "member_accuracy": [float(pairwise_accuracy(r_w[:, j], r_l[:, j])) for j in range(k)],
        "accuracy": {"mean": float(pairwise_accuracy(r_w.mean(1), r_l.mean(1))),
                     "min": float(pairwise_accuracy(r_w.min(1), r_l.min(1))),
                     "uwo": float(pairwise_accuracy(uwo(r_w), uwo(r_l)))},
        "uncertainty_coef": uncertainty_coef,
        "disagreement": {
            "delta_std": float(delta.std(1).mean()),
            "delta_std_p90": float(np.quantile(delta.std(1), 0.9)),
            "reward_std": float(centered.std(1).mean()),
            "reward_std_p90": float(np.quantile(centered.std(1), 0.9)),
            "order_disagreement": float(np.mean((delta > 0).any(1) & (delta < 0).any(1))),
            "delta_correlation": float(off_diagonal.mean()) if off_diagonal.size else 1.0,
        },
    }
