"""Which of a PPO step's responses go to people for a label (the live loop, issue 20): pure
functions, no I/O, no torch.

For a chosen fraction of the step's prompts the trainer samples a second response
(feedback_tap.py); each prompt then gives a *candidate* pair, both responses scored by the RM.
A label is worth most where the RM is least sure of the order:

- one reward head: the smallest reward margin |r_a − r_b| (the RM can barely tell them apart);
- an ensemble (results carry the members' scores): the members' disagreement on the order,
  the standard deviation over members k of Δ_k = r_a,k − r_b,k; ties by the smaller margin.

``select`` keeps the ``budget`` most uncertain candidates (the per-step label budget), after
dropping pairs whose two responses are the same text (nothing to compare) or that the RM failed
to score. ``priority`` is what the feedback service orders its queue by (higher first).
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """Two responses to one prompt, as the RM scored them."""

    prompt: str
    response_a: str
    response_b: str
    reward_a: float
    reward_b: float
    heads_a: tuple[float, ...] = ()
    """An ensemble's members' scores of response_a (empty: one head)."""
    heads_b: tuple[float, ...] = ()
    rm_version: str = ""
    """The RM version that scored the pair (the second response's)."""


def chosen_rows(n_rows: int, fraction: float, seed: int, step: int) -> list[int]:
    """The rows (of ``n_rows``) that get a second response this step: a deterministic draw of
    round(fraction · n_rows) rows from (seed, step), at least one when ``fraction`` > 0."""
    if fraction <= 0 or n_rows <= 0:
        return []
    k = min(n_rows, max(1, round(fraction * n_rows)))

    def key(row: int) -> bytes:
        return hashlib.sha256(f"{seed}:{step}:{row}".encode()).digest()

    return sorted(sorted(range(n_rows), key=key)[:k])


def margin(c: Candidate) -> float:
    """|r_a − r_b|: how far apart the RM puts them."""
    return abs(c.reward_a - c.reward_b)


def disagreement(c: Candidate) -> float | None:
    """Std over the members of Δ_k = r_a,k − r_b,k; None for a one-head RM."""
    if len(c.heads_a) < 2 or len(c.heads_a) != len(c.heads_b):
        return None
    return statistics.pstdev(a - b for a, b in zip(c.heads_a, c.heads_b))


def priority(c: Candidate) -> float:
    """Higher is more uncertain: the members' disagreement for an ensemble (less the margin
    over a large factor, to break ties), else −margin."""
    spread = disagreement(c)
    if spread is None:
        return -margin(c)
    return spread - 1e-6 * margin(c)


def usable(c: Candidate) -> bool:
    """Two different, non-empty responses, both scored with finite rewards."""
    return (c.response_a != c.response_b and bool(c.response_a.strip())
            and bool(c.response_b.strip())
            and all(math.isfinite(r) for r in (c.reward_a, c.reward_b)))


def select(candidates: Sequence[Candidate], budget: int) -> list[Candidate]:
    """The ``budget`` most uncertain usable candidates, most uncertain first (stable: equal
    priorities keep their order)."""
    if budget <= 0:
        return []
    kept = [c for c in candidates if usable(c)]
    return sorted(kept, key=priority, reverse=True)[:budget]


def to_pair_json(c: Candidate, step: int, rm_version: str, source: str) -> dict:
    """The feedback service's enqueue record for a selected candidate (feedback/pairs.py)."""
    return {"prompt": c.prompt, "response_a": c.response_a, "response_b": c.response_b,
            "reward_a": c.reward_a, "reward_b": c.reward_b, "rm_version": rm_version,
            "policy_step": step, "priority": priority(c), "source": source}
