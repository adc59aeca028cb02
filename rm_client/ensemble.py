"""An ensemble's members, as the results carry them: their mean, spread and the conservative
rewards made from them. Pure Python (the client install has no numpy or torch).

A served ensemble (``rm-server train --ensemble K``) answers every sample with its K members'
scores (``ScoreResult.head_scores``); the server's ``reward`` is its default aggregation, and
these are the same aggregations for a client that makes its own (``policy-trainer ppo
--reward-aggregation``) or ranks samples by how much the members disagree (a live loop choosing
which comparisons to ask people for). The server computes the same in rm_server/heads.py;
std is over the K members with 1/K (population), there as here.

- ``mean``: (1/K) Σ_k r_k;
- ``min``: min_k r_k, worst-case optimisation (Coste et al. 2023, WCO);
- ``uwo``: mean − λ·std, uncertainty-weighted optimisation (Coste et al. 2023 penalize the
  variance; the standard deviation keeps λ in the reward's own units).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

AGGREGATIONS = ("mean", "min", "uwo")


def member_mean_std(scores: Sequence[float]) -> tuple[float, float]:
    """(mean, std) over the members; std with 1/K, 0 for one member."""
    k = len(scores)
    if k == 0:
        raise ValueError("no member scores (is the served model an ensemble?)")
    mean = math.fsum(scores) / k
    return mean, math.sqrt(math.fsum((s - mean) ** 2 for s in scores) / k)


def aggregate(scores: Sequence[float], kind: str, uncertainty_coef: float = 1.0) -> float:
    """One reward from the members' scores: ``mean``, ``min`` or ``uwo`` (mean − λ·std)."""
    if kind == "min":
        if not scores:
            raise ValueError("no member scores (is the served model an ensemble?)")
        return min(scores)
    mean, std = member_mean_std(scores)
    if kind == "mean":
        return mean
    if kind == "uwo":
        return mean - uncertainty_coef * std
    raise ValueError(f"unknown aggregation {kind!r} (one of {', '.join(AGGREGATIONS)})")


def disagreement(results: Iterable) -> list[float]:
    """The members' std for each result (``ScoreResult`` or anything with ``head_scores``), in
    order: where an ensemble is least sure, the comparisons worth a person's label."""
    return [member_mean_std(r.head_scores)[1] for r in results]


def most_disputed(results: Sequence, n: int) -> list:
    """The ``n`` results the members disagree on most, most disputed first."""
    spread = disagreement(results)
    order = sorted(range(len(results)), key=lambda i: spread[i], reverse=True)
    return [results[i] for i in order[:n]]
