"""The lower bound on a batch's model time (rm_server/model_time.py), pure: it refuses work
only on evidence, forgets a slow spell, and never exceeds the true time of a model whose time is
a fixed cost plus costs per token and per token of context. Through the batcher:
test_batcher.py (deadlines)."""

from __future__ import annotations

import random

import pytest

from rm_server.model_time import ModelTimeEstimate


def test_model_time_bound_needs_a_quorum_and_expires():
    est = ModelTimeEstimate(window=8, quorum=3, max_age=10.0)
    est.observe(1, 2, 0.05, now=0.0)
    assert est.lower_bound(16, 60, now=0.0) == 0.0  # one batch is no evidence: run
    est.observe(1, 2, 0.05, now=0.0)
    est.observe(1, 2, 0.05, now=0.0)
    # three short batches prove their own time for a bigger batch, not 480 times it
    assert est.lower_bound(16, 60, now=1.0) == pytest.approx(0.05)
    for _ in range(3):
        est.observe(16, 60, 0.2, now=5.0)
    assert est.lower_bound(16, 60, now=5.0) == pytest.approx(0.2)
    assert est.lower_bound(4, 60, now=5.0) == pytest.approx(0.05)  # a quarter of the rows
    assert est.lower_bound(16, 30, now=5.0) == pytest.approx(0.05)  # half the length, squared
    est.observe(16, 60, 30.0, now=5.0)  # one stall alone refuses nothing more
    assert est.lower_bound(16, 60, now=5.0) == pytest.approx(0.2)
    assert est.lower_bound(16, 60, now=16.0) == 0.0  # a slow spell is forgotten


def true_time(n: int, L: int, a: float, b: float, c: float) -> float:
    """A model's time for ``n`` rows of length ``L``: a fixed cost per call, a cost per token,
    a cost per token per token of context (attention)."""
    return a + n * (b * L + c * L * L)


def test_model_time_bound_never_exceeds_the_time_of_a_real_shape():
    """For any model whose time is a + n * (b * L + c * L**2) (fixed cost, per token,
    attention), the estimate stays below the true time of any batch shape."""
    rng = random.Random(0)
    for _ in range(200):
        abc = rng.uniform(0, 0.1), rng.uniform(0, 1e-4), rng.uniform(0, 1e-6)
        est = ModelTimeEstimate()
        for _ in range(rng.randrange(3, 40)):
            n, L = rng.randrange(1, 64), rng.randrange(1, 2048)
            est.observe(n, L, true_time(n, L, *abc), now=0.0)
        n, L = rng.randrange(1, 64), rng.randrange(1, 2048)
        assert est.lower_bound(n, L, now=0.0) <= true_time(n, L, *abc) * (1 + 1e-9)
