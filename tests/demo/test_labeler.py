"""The simulated Bradley-Terry labeler: label frequencies, reproducibility, the Bayes ceiling."""

from __future__ import annotations

import math

import pytest

from demo.labeler import BradleyTerryLabeler, sigmoid


def gold(prompt: str, response: str) -> float:
    return float(response.count("+") - response.count("-"))


def test_probability_is_sigmoid_of_gold_difference():
    lab = BradleyTerryLabeler(gold, seed=0)
    assert lab.p_wins("x", "++", "-") == pytest.approx(1 / (1 + math.exp(-3)))
    assert lab.p_wins("x", "a", "b") == 0.5
    assert sigmoid(-800.0) == pytest.approx(0.0) and sigmoid(800.0) == 1.0


def test_labels_follow_the_probability():
    lab = BradleyTerryLabeler(gold, seed=0)
    n, p = 4000, 1 / (1 + math.exp(-1))  # gold("+") − gold("") = 1
    wins = 0
    for _ in range(n):
        chosen, rejected, p_a = lab.label("x", "+", "")
        assert p_a == pytest.approx(p) and {chosen, rejected} == {"+", ""}
        wins += chosen == "+"
    assert wins / n == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / n))


def test_seeded_labels_are_reproducible():
    pairs = [("x", "+" * i, "-" * (i % 3)) for i in range(20)]
    runs = [[BradleyTerryLabeler(gold, seed=3).record(*t) for t in pairs] for _ in range(2)]
    assert runs[0] == runs[1]
    assert set(runs[0][0]) == {"prompt", "chosen", "rejected"}


def test_bayes_agreement_is_mean_of_max_p():
    lab = BradleyTerryLabeler(gold, seed=0)
    pairs = [("x", "+", ""), ("x", "", "++"), ("x", "a", "b")]
    p1, p2 = 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(-2))
    assert lab.bayes_agreement(pairs) == pytest.approx((p1 + p2 + 0.5) / 3)
    with pytest.raises(ValueError):
        lab.bayes_agreement([])


def test_gold_agreement_reaches_bayes_in_expectation():
    lab = BradleyTerryLabeler(gold, seed=1)
    pairs = [("x", "+" * (i % 4), "-" * (i % 3)) for i in range(3000)]
    labeled = [lab.label(*t)[:2] for t in pairs]
    realized = lab.gold_agreement([("x", c, r) for c, r in labeled])
    assert realized == pytest.approx(lab.bayes_agreement(pairs), abs=0.03)


def test_temperature_scales_the_noise_and_zero_is_the_gold_order():
    warm = BradleyTerryLabeler(gold, seed=0, temperature=2.0)
    assert warm.p_wins("x", "++", "-") == pytest.approx(1 / (1 + math.exp(-1.5)))
    exact = BradleyTerryLabeler(gold, seed=0, temperature=0.0)
    for i in range(200):  # the better response always wins, either side
        a, b = "+" * (i % 5), "-" * (i % 3 + 1)
        assert exact.label("x", a, b)[:2] == (a, b) and exact.label("x", b, a)[:2] == (a, b)
    ties = [exact.label("x", "a", "b")[0] for _ in range(400)]  # a tie is a fair coin
    assert exact.p_wins("x", "a", "b") == 0.5 and 150 < ties.count("a") < 250
    assert exact.bayes_agreement([("x", "+", ""), ("x", "", "+")]) == 1.0
    with pytest.raises(ValueError, match="temperature"):
        BradleyTerryLabeler(gold, temperature=-1.0)
