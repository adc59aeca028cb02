"""The Bradley-Terry loss against hand-computed values: plain, margin, centering, reductions."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from policy_trainer.bt_loss import bradley_terry_loss
from policy_trainer.rm_metrics import pairwise_accuracy


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def test_hand_computed_value():
    # Δ = [1, −1]: −log σ(1) = log(1 + e^−1) = 0.3132617, −log σ(−1) = log(1 + e) = 1.3132617
    loss = bradley_terry_loss(t(2.0, 0.5), t(1.0, 1.5))
    assert loss.item() == pytest.approx((0.31326168751822286 + 1.3132616875182228) / 2, abs=1e-12)


def test_equal_rewards_cost_log2():
    assert bradley_terry_loss(t(3.0), t(3.0)).item() == pytest.approx(math.log(2), abs=1e-12)


def test_margin_shifts_delta():
    # Δ = 1 and m = 1: −log σ(0) = log 2; the margin makes a correct-by-1 pair cost as a tie
    assert bradley_terry_loss(t(2.0), t(1.0), margin=t(1.0)).item() == pytest.approx(math.log(2))
    # per-pair margins: Δ = [2, 2], m = [0, 3] -> [log(1 + e^−2), log(1 + e^1)]
    got = bradley_terry_loss(t(2.0, 2.0), t(0.0, 0.0), margin=t(0.0, 3.0), reduction="none")
    assert got.tolist() == pytest.approx([math.log1p(math.exp(-2)), math.log1p(math.exp(1))])
    # a scalar margin applies to every pair
    assert bradley_terry_loss(t(2.0, 2.0), t(0.0, 0.0), margin=1.0, reduction="none").tolist() == \
        pytest.approx([math.log1p(math.exp(-1))] * 2)


def test_centering_adds_c_times_squared_sum():
    # r_w = 2, r_l = 1, c = 0.01: log(1 + e^−1) + 0.01 · 3² = 0.3132617 + 0.09
    got = bradley_terry_loss(t(2.0), t(1.0), center_coef=0.01)
    assert got.item() == pytest.approx(0.31326168751822286 + 0.09, abs=1e-12)
    # a pair centred on 0 pays nothing extra
    assert bradley_terry_loss(t(0.5), t(-0.5), center_coef=1.0).item() == pytest.approx(
        math.log1p(math.exp(-1.0)))


def test_gradients_match_the_calculus():
    # d/dr_w [−log σ(Δ − m) + c (r_w + r_l)²] = −σ(−(Δ − m)) + 2c (r_w + r_l)
    r_w, r_l = t(0.7).requires_grad_(), t(-0.2).requires_grad_()
    m, c = 0.3, 0.05
    bradley_terry_loss(r_w, r_l, margin=m, center_coef=c).backward()
    z = 0.7 + 0.2 - m
    expected = -1 / (1 + math.exp(z)) + 2 * c * 0.5
    assert r_w.grad.item() == pytest.approx(expected, abs=1e-12)
    assert r_l.grad.item() == pytest.approx(1 / (1 + math.exp(z)) + 2 * c * 0.5, abs=1e-12)


def test_stable_at_large_differences():
    loss = bradley_terry_loss(t(0.0, 1000.0), t(1000.0, 0.0), reduction="none")
    assert loss.tolist() == pytest.approx([1000.0, 0.0])
    assert torch.isfinite(loss).all()


def test_sum_reduction_over_micro_batches_equals_the_batch_mean():
    g = torch.Generator().manual_seed(0)
    r_w, r_l = torch.randn(10, generator=g), torch.randn(10, generator=g)
    m = torch.rand(10, generator=g)
    whole = bradley_terry_loss(r_w, r_l, m, 0.01)
    parts = sum(bradley_terry_loss(r_w[s:s + 3], r_l[s:s + 3], m[s:s + 3], 0.01, reduction="sum")
                for s in range(0, 10, 3)) / 10
    assert parts.item() == pytest.approx(whole.item(), abs=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="shapes differ"):
        bradley_terry_loss(t(1.0, 2.0), t(1.0))
    with pytest.raises(ValueError, match="reduction"):
        bradley_terry_loss(t(1.0), t(0.0), reduction="max")


def test_pairwise_accuracy_counts_ties_half():
    accuracy = pairwise_accuracy(t(1.0, 0.0, 2.0, 5.0), t(0.0, 1.0, 2.0, 4.0))
    assert accuracy.item() == pytest.approx(0.625)


@settings(max_examples=50, deadline=None)
@given(st.floats(-30, 30), st.floats(-30, 30))
def test_swapping_the_pair_changes_the_loss_by_delta(a, b):
    # softplus(−Δ) − softplus(Δ) = −Δ: the BT likelihood of y_w ≻ y_l and y_l ≻ y_w sum to one
    fwd = bradley_terry_loss(t(a), t(b)).item()
    rev = bradley_terry_loss(t(b), t(a)).item()
    assert fwd - rev == pytest.approx(-(a - b), abs=1e-9)
    assert fwd >= 0
