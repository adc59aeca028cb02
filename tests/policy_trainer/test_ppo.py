"""PPO math against naive loops and hand-computed values (policy_trainer/ppo.py)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from policy_trainer import ppo


def ragged_mask(lengths, T):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # (B, T) bool


# ---------------------------------------------------------------- GAE

def naive_gae(rewards, values, lengths, gamma, lam):
    """A_t = Σ_{l=0}^{L-1-t} (γλ)^l δ_{t+l}, δ_t = r_t + γ·V_{t+1}·[t+1 < L] - V_t (row by row)."""
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        L = lengths[b]
        delta = [rewards[b, t].item() + gamma * (values[b, t + 1].item() if t + 1 < L else 0.0)
                 - values[b, t].item() for t in range(L)]
        for t in range(L):
            adv[b, t] = sum((gamma * lam) ** k * delta[t + k] for k in range(L - t))
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_naive_double_loop_on_ragged_rows(gamma, lam):
    g = torch.Generator().manual_seed(0)
    lengths, T = [6, 3, 1, 5, 6], 6
    mask = ragged_mask(lengths, T)
    rewards = torch.randn(5, T, generator=g, dtype=torch.float64)
    values = torch.randn(5, T, generator=g, dtype=torch.float64)
    # Garbage on padding must not leak into any valid position (no bootstrap past the end).
    rewards[~mask], values[~mask] = 1e6, -1e6
    adv, ret = ppo.gae(rewards, values, mask, gamma, lam)
    expected = naive_gae(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(adv, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ret, (expected + values) * mask, rtol=1e-10, atol=1e-10)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_gae_lambda_one_gamma_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.1, 9.0]])
    mask = ragged_mask([3], 4)
    adv, ret = ppo.gae(rewards, values, mask, 1.0, 1.0)
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.8, 0.9, 0.0]]))


# ---------------------------------------------------------------- whitening

def test_masked_whiten_gives_mean_zero_var_one_over_the_mask():
    g = torch.Generator().manual_seed(1)
    mask = ragged_mask([7, 2, 5], 7)
    x = torch.randn(3, 7, generator=g, dtype=torch.float64) * 3 + 2
    x[~mask] = 1e4  # padding must not move the statistics
    w = ppo.masked_whiten(x, mask)
    assert abs(ppo.masked_mean(w, mask).item()) < 1e-9
    assert abs(ppo.masked_var(w, mask).item() - 1.0) < 1e-6
    assert (w[~mask] == 0).all()
    vals = x[mask]
    assert abs(ppo.masked_var(x, mask).item() - vals.var(unbiased=True).item()) < 1e-9


def test_masked_whiten_without_shift_keeps_the_mean():
    g = torch.Generator().manual_seed(2)
    mask = ragged_mask([4, 6], 6)
    x = torch.randn(2, 6, generator=g, dtype=torch.float64) + 5.0
    w = ppo.masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(ppo.masked_mean(w, mask), ppo.masked_mean(x, mask))
    assert abs(ppo.masked_var(w, mask).item() - 1.0) < 1e-6


def test_masked_mean_of_empty_mask_is_zero_not_nan():
    x = torch.ones(2, 3)
    assert ppo.masked_mean(x, torch.zeros(2, 3, dtype=torch.bool)).item() == 0.0


def test_first_and_last_true_indices():
    b = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert ppo.first_true_indices(b).tolist() == [1, 4, 0]
    assert ppo.last_true_indices(b).tolist() == [2, -1, 3]


# ---------------------------------------------------------------- policy and value losses

def test_policy_loss_hand_computed_inside_and_outside_the_clip():
    clip = 0.2
    # token: (ratio, advantage) -> per-token loss, clipped?
    cases = [
        (1.1, 2.0, -2.2, False),    # inside the range: plain -A·ρ
        (1.5, 1.0, -1.2, True),     # A > 0, ρ above 1+ε: clipped at 1.2
        (0.5, -1.0, 0.8, True),     # A < 0, ρ below 1-ε: clipped at 0.8
        (1.5, -1.0, 1.5, False),    # A < 0, ρ above 1+ε: pessimistic max keeps the unclipped term
    ]
    ratios = torch.tensor([[c[0] for c in cases] + [7.0]], dtype=torch.float64)
    adv = torch.tensor([[c[1] for c in cases] + [100.0]], dtype=torch.float64)  # last is padding
    mask = ragged_mask([4], 5)
    old = torch.zeros(1, 5, dtype=torch.float64)
    logp = torch.log(ratios).requires_grad_(True)
    loss, clipfrac, approx_kl = ppo.policy_loss(logp, old, adv, mask, clip)
    assert loss.item() == pytest.approx(sum(c[2] for c in cases) / 4)
    assert clipfrac.item() == pytest.approx(0.5)
    k3 = [(r - 1) - math.log(r) for r, *_ in cases]
    assert approx_kl.item() == pytest.approx(sum(k3) / 4)
    loss.backward()
    # d/dlogp of -A·ρ is -A·ρ/4 where unclipped; 0 where the clip is active or on padding.
    expected_grad = [0.0 if c[3] else -c[1] * c[0] / 4 for c in cases] + [0.0]
    torch.testing.assert_close(logp.grad, torch.tensor([expected_grad], dtype=torch.float64))
    assert not clipfrac.requires_grad and not approx_kl.requires_grad


def test_value_loss_hand_computed():
    values = torch.tensor([[1.5, 0.5, 1.1, 50.0]])
    old = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 2.0, 0.0]])
    mask = ragged_mask([3], 4)
    loss, vf_clipfrac = ppo.value_loss(values, old, returns, mask, 0.2)
    # 1: V_clip = 1.2 -> max(0.25, 0.64); 2: V_clip = 0.8 -> max(0.25, 0.64); 3: inside -> 0.81
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.64 + 0.81) / 3)
    assert vf_clipfrac.item() == pytest.approx(2 / 3)


# ---------------------------------------------------------------- KL estimators

def test_k1_k3_hand_computed():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert ppo.kl_k1(logp, ref).item() == pytest.approx(math.log(2))
    assert ppo.kl_k3(logp, ref).item() == pytest.approx(0.5 + math.log(2) - 1)  # e^r - r - 1
    assert ppo.kl_k3(ref, ref).item() == 0.0


def test_k1_and_k3_are_unbiased_for_the_exact_kl():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    kl = (p * (p / q).log()).sum()
    for est in (ppo.kl_k1, ppo.kl_k3):
        assert (p * est(p.log(), q.log())).sum().item() == pytest.approx(kl.item())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(-30, 0), st.floats(-30, 0)), min_size=1, max_size=16))
def test_k3_is_never_negative(pairs):
    logp = torch.tensor([a for a, _ in pairs], dtype=torch.float32)
    ref = torch.tensor([b for _, b in pairs], dtype=torch.float32)
    assert (ppo.kl_k3(logp, ref) >= 0).all()


# ---------------------------------------------------------------- rewards

def test_compute_rewards_puts_the_score_on_the_last_valid_token():
    lengths, T = [3, 5, 1], 5
    mask = ragged_mask(lengths, T)
    g = torch.Generator().manual_seed(3)
    logp = torch.randn(3, T, generator=g)
    ref = torch.randn(3, T, generator=g)
    scores = torch.tensor([1.0, 2.0, -3.0])
    rewards, kl = ppo.compute_rewards(scores, logp, ref, mask, kl_coef=0.1)
    expected_kl = (logp - ref) * mask
    torch.testing.assert_close(kl, expected_kl)
    expected = -0.1 * expected_kl
    for b, L in enumerate(lengths):
        expected[b, L - 1] += scores[b]  # on the EOS, not on the pad after it (TRL's bug)
    torch.testing.assert_close(rewards, expected)
    assert (rewards[~mask] == 0).all()


def test_compute_rewards_k3_and_reward_clip():
    mask = ragged_mask([2, 1], 3)
    logp, ref = torch.zeros(2, 3), torch.full((2, 3), -1.0)
    rewards, kl = ppo.compute_rewards(torch.tensor([10.0, -10.0]), logp, ref, mask,
                                      kl_coef=0.5, kl_estimator="k3", reward_clip=4.0)
    k3 = math.exp(-1) + 1 - 1
    torch.testing.assert_close(kl, torch.tensor([[k3, k3, 0.0], [k3, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.5 * k3, 4 - 0.5 * k3, 0.0],
                                                      [-4 - 0.5 * k3, 0.0, 0.0]]))


def test_compute_rewards_refuses_an_empty_row():
    mask = ragged_mask([2, 0], 3)
    with pytest.raises(ValueError, match="no valid response token"):
        ppo.compute_rewards(torch.zeros(2), torch.zeros(2, 3), torch.zeros(2, 3), mask, 0.1)


# ---------------------------------------------------------------- diagnostics

def test_entropy_from_logits_matches_categorical():
    logits = torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(4))
    expected = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(ppo.entropy_from_logits(logits), expected)


def test_explained_variance():
    mask = ragged_mask([3, 2], 3)
    returns = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]])
    assert ppo.explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    mean = ppo.masked_mean(returns, mask)
    assert ppo.explained_variance(torch.full_like(returns, mean.item()), returns,
                                  mask).item() == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(ppo.explained_variance(returns, torch.ones(2, 3), mask).item())


# ---------------------------------------------------------------- KL controllers

def test_adaptive_kl_controller_moves_beta_toward_the_target():
    up = ppo.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    up.update(current_kl=7.2, n_steps=100)  # error 0.2 (exactly at the clip)
    assert up.value == pytest.approx(0.2 * (1 + 0.2 * 100 / 10000))
    down = ppo.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    down.update(current_kl=4.5, n_steps=100)  # error -0.25 -> clipped to -0.2
    assert down.value == pytest.approx(0.2 * (1 - 0.2 * 100 / 10000))
    mid = ppo.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    mid.update(current_kl=6.6, n_steps=100)  # error 0.1, inside the clip
    assert mid.value == pytest.approx(0.2 * (1 + 0.1 * 100 / 10000))


def test_adaptive_kl_controller_clips_the_error_at_0_2():
    a = ppo.AdaptiveKLController(1.0, target=1.0, horizon=10)
    a.update(current_kl=1000.0, n_steps=10)
    assert a.value == pytest.approx(1.2)
    a.update(current_kl=0.0, n_steps=10)
    assert a.value == pytest.approx(1.2 * 0.8)


def test_kl_controllers_round_trip_their_state():
    a = ppo.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    a.update(9.0, 512)
    b = ppo.AdaptiveKLController(1.0, target=1.0, horizon=1.0)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    f = ppo.FixedKLController(0.05)
    f.update(100.0, 512)
    assert f.value == 0.05
    g = ppo.FixedKLController(1.0)
    g.load_state_dict(f.state_dict())
    assert g.value == 0.05
