"""A simulated human labeler for synthetic preference data, with a known gold reward.

Given a gold scoring function g(prompt, response), the labeler prefers a over b with the
Bradley-Terry probability

    P(a ≻ b) = σ(g(x, a) − g(x, b))

and draws its label from it (the noise model the RM's loss assumes). Because P is known, so is
the best agreement any reward model can reach on those labels: a model that always picks the
more probable winner agrees with probability max(p, 1 − p) on each pair, so

    bayes_agreement = mean over pairs of max(p, 1 − p)

is the ceiling no RM can beat in expectation (the Bayes-optimal accuracy). Scale g to set the
noise: gold differences of 2–5 give agreement near 0.9; differences near 0 give coin flips.
A ``temperature`` T divides the difference (P = σ((g(a) − g(b)) / T)); T = 0 is the noiseless
labeler, the gold order itself (ties a coin flip): what perfect labels would teach.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable

GoldFn = Callable[[str, str], float]


def sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)  # stable for large negative z
    return e / (1.0 + e)


class BradleyTerryLabeler:
    """Labels (prompt, a, b) with BT noise around ``gold_fn``; seeded, so labels reproduce."""

    def __init__(self, gold_fn: GoldFn, seed: int = 0, temperature: float = 1.0):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.gold_fn = gold_fn
        self.rng = random.Random(seed)
        self.temperature = temperature

    def p_wins(self, prompt: str, a: str, b: str) -> float:
        """P(a ≻ b | prompt) = σ((gold(a) − gold(b)) / T); at T = 0: 1, 0 or ½ (a tie)."""
        d = self.gold_fn(prompt, a) - self.gold_fn(prompt, b)
        if self.temperature == 0:
            return 1.0 if d > 0 else 0.0 if d < 0 else 0.5
        return sigmoid(d / self.temperature)

    def label(self, prompt: str, a: str, b: str) -> tuple[str, str, float]:
        """(chosen, rejected, p_a_wins): one noisy judgment."""
        p = self.p_wins(prompt, a, b)
        return (a, b, p) if self.rng.random() < p else (b, a, p)

    def record(self, prompt: str, a: str, b: str) -> dict:
        """One line of preference JSONL (rm-server train's text format)."""
        chosen, rejected, _ = self.label(prompt, a, b)
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

    def bayes_agreement(self, pairs: Iterable[tuple[str, str, str]]) -> float:
        """Mean of max(p, 1 − p) over (prompt, a, b): the best predictor's expected agreement."""
        ps = [self.p_wins(x, a, b) for x, a, b in pairs]
        if not ps:
            raise ValueError("bayes_agreement of no pairs")
        return sum(max(p, 1.0 - p) for p in ps) / len(ps)

    def gold_agreement(self, labeled: Iterable[tuple[str, str, str]]) -> float:
        """Realized agreement of the gold reward with labels (prompt, chosen, rejected).

        Ties count ½.

        Its expectation is ``bayes_agreement``; on a finite set it is the ceiling actually reached.
        """
        scores = []
        for x, chosen, rejected in labeled:
            d = self.gold_fn(x, chosen) - self.gold_fn(x, rejected)
            scores.append(1.0 if d > 0 else 0.5 if d == 0 else 0.0)
        if not scores:
            raise ValueError("gold_agreement of no pairs")
        return sum(scores) / len(scores)
