"""PPO math for RLHF: rewards with a KL penalty, GAE, whitening, clipped losses, KL controllers.

Pure torch: no I/O, no logging, no gRPC. Names follow the papers and cleanrl's
summarize_from_feedback_details (Huang et al. 2024, "The N+ implementation details of RLHF
with PPO"): ``kl_coef`` (β), ``gae_lambda``, ``lastgaelam``, ``clip_coef``.

Conventions. Tensors are (B, T) over the *response* tokens of B rollouts; ``mask`` is 1 on
real response tokens (the generated EOS included) and 0 on padding. Each row's valid tokens
form one contiguous block (right padding, as generation produces): a 0 ends the episode, and
nothing is bootstrapped or credited past it.

    R_t   = -β·KL_t + [t = last valid token]·score          (Ziegler et al. 2019, eq. 2)
    δ_t   = R_t + γ·V_{t+1} - V_t,   A_t = Σ_l (γλ)^l δ_{t+l}   (Schulman et al. 2016, GAE)
    L^CLIP = E[max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε))],  ρ = π/π_old   (Schulman et al. 2017)
"""

from __future__ import annotations

import math

import torch

# ---------------------------------------------------------------- masked statistics

def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is true (0, not NaN, for an empty mask)."""
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp_min(1.0)
    return (x * m).sum(dim) / m.sum(dim).clamp_min(1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the mask; Bessel-corrected (n / (n-1)) by default, as in cleanrl."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        var = var * n / (n - 1).clamp_min(1.0)  # n = 1 gives var 0 rather than 0/0
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the mask; padding comes back as 0 so it cannot leak into a loss.

    ``shift_mean=False`` rescales but keeps the mean: used for rewards, where the mean carries
    signal (cleanrl; the "whiten rewards" option of Ziegler et al.'s lm-human-preferences).
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


def masked_sums(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(count, Σx, Σx²) over the mask, float64: what whitening needs, summable across ranks."""
    m = mask.to(torch.float64)
    x = x.to(torch.float64)
    return torch.stack([m.sum(), (x * m).sum(), (x * x * m).sum()])  # (3,)


def whiten_from_sums(x: torch.Tensor, mask: torch.Tensor, sums: torch.Tensor,
                     shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """:func:`masked_whiten` with the mean and (Bessel-corrected) variance of ``sums`` from
    :func:`masked_sums`, e.g. summed over every rank's batch: whitening over the global batch,
    the same whatever the number of ranks."""
    n, total, total_sq = sums.tolist()  # CPU-GPU sync: three numbers
    mean = total / max(n, 1.0)
    var = max(total_sq / max(n, 1.0) - mean * mean, 0.0) * n / max(n - 1.0, 1.0)
    whitened = (x - mean) * (var + eps) ** -0.5
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


def first_true_indices(bools: torch.Tensor, dtype=torch.long) -> torch.Tensor:
    """Index of the first True in each row of (B, T); T where a row has none (cleanrl)."""
    row_len = bools.size(-1)
    zero_or_index = row_len * (~bools).type(dtype) + torch.arange(row_len, dtype=dtype,
                                                                   device=bools.device)
    return torch.min(zero_or_index, dim=-1).values  # (B,)


def last_true_indices(bools: torch.Tensor) -> torch.Tensor:
    """Index of the last True in each row of (B, T); -1 where a row has none."""
    row_len = bools.size(-1)
    return row_len - 1 - first_true_indices(bools.flip(-1))  # (B,)


# ---------------------------------------------------------------- KL estimators

def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log π(y) - log π_ref(y): unbiased for KL(π‖π_ref) under y ~ π, but can go negative."""
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = e^r - r - 1 with r = log π_ref - log π: unbiased and always >= 0.

    Schulman, "Approximating KL divergence" (2020). e^r - 1 >= r for all r, so k3 >= 0.
    """
    r = ref_logp - logp
    return torch.expm1(r) - r  # expm1 keeps precision when r ≈ 0, where exp(r) - 1 cancels


KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}


# ---------------------------------------------------------------- rewards and advantages

def compute_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                    mask: torch.Tensor, kl_coef: float, kl_estimator: str = "k1",
                    reward_clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards R_t = -β·KL_t, plus the RM score on each row's last valid token.

    The score goes on the last *valid* token (the EOS the policy generated), not on the first
    pad after it (TRL's bug, which credits a token the policy never chose and drops the score
    for full-length rows). ``reward_clip`` clips the score to [-c, c] before it is added.
    Returns (rewards, kl), both (B, T) and 0 on padding.
    """
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {sorted(KL_ESTIMATORS)}, "
                         f"got {kl_estimator!r}")
    m = mask.to(logprobs.dtype)
    kl = KL_ESTIMATORS[kl_estimator](logprobs, ref_logprobs) * m  # (B, T)
    rewards = -kl_coef * kl  # (B, T)
    last = last_true_indices(mask.bool())  # (B,)
    if bool((last < 0).any()):  # CPU-GPU sync; an empty response would silently lose its score
        raise ValueError("compute_rewards: a row has no valid response token")
    if reward_clip is not None:
        scores = scores.clamp(-reward_clip, reward_clip)
    rows = torch.arange(rewards.size(0), device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        gae_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016), backwards over T.

    ``next_m`` (is t+1 a valid token?) zeroes both the bootstrap V_{t+1} and the carried
    ``lastgaelam`` at the end of a response, so no value is read past the last valid token:
    the episode ends there (the terminal value is 0). Returns (advantages, returns), (B, T),
    0 on padding; returns = advantages + values are the value-function targets.
    """
    m = mask.to(values.dtype)
    B, T = values.shape
    advantages = torch.zeros_like(values)
    lastgaelam = torch.zeros(B, dtype=values.dtype, device=values.device)  # (B,)
    for t in reversed(range(T)):
        if t + 1 < T:
            next_m = m[:, t + 1]  # (B,)
            nextvalues = values[:, t + 1] * next_m
        else:  # past the end of the sequence: terminal
            next_m = nextvalues = torch.zeros_like(lastgaelam)
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]  # (B,)
        lastgaelam = delta + gamma * gae_lambda * next_m * lastgaelam
        advantages[:, t] = lastgaelam * m[:, t]
    returns = (advantages + values) * m
    return advantages, returns


# ---------------------------------------------------------------- losses

def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_coef: float):
    """Clipped surrogate loss (PPO, Schulman et al. 2017, eq. 7), as a loss to minimize.

    Returns (loss, clipfrac, approx_kl); the last two are detached diagnostics: the fraction
    of tokens where the clip was active, and the k3 estimate of KL(π_old‖π) = E[(ρ-1) - log ρ].
    """
    logratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(logratio)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef)
    loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
    with torch.no_grad():
        clipfrac = masked_mean((pg_losses2 > pg_losses).to(logprobs.dtype), mask)
        approx_kl = masked_mean((ratio - 1) - logratio, mask)
    return loss, clipfrac, approx_kl


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip_coef_v: float):
    """Clipped value loss 0.5·max((V - R)², (V_clip - R)²), V_clip within ±ε_v of V_old.

    As in OpenAI baselines' ppo2 and cleanrl. Returns (loss, vf_clipfrac), the latter detached.
    """
    vpredclipped = old_values + torch.clamp(values - old_values, -clip_coef_v, clip_coef_v)
    vf_losses1 = (values - returns) ** 2  # (B, T)
    vf_losses2 = (vpredclipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    with torch.no_grad():
        vf_clipfrac = masked_mean((vf_losses2 > vf_losses1).to(values.dtype), mask)
    return loss, vf_clipfrac


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim, H = logsumexp(z) - Σ p·z:
    (B, T, V) -> (B, T)."""
    pd = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (pd * logits).sum(-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[R - V] / Var[R] over the mask: 1 is a perfect critic, <= 0 no better than a
    constant. NaN when the returns have no variance (as in cleanrl)."""
    var_y = masked_var(returns, mask)
    if float(var_y) == 0.0:  # CPU-GPU sync; a diagnostic only
        return torch.tensor(math.nan, dtype=values.dtype, device=values.device)
    return 1.0 - masked_var(returns - values, mask) / var_y


# ---------------------------------------------------------------- KL controllers

class FixedKLController:
    """A constant β."""

    def __init__(self, value: float):
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. 2019 (§2.2): steer β so the policy's KL to the reference tracks a target.

        e = clip(KL / target - 1, -0.2, 0.2);   β ← β · (1 + e · n_steps / horizon)

    ``n_steps`` is the number of rollouts since the last update (the batch size);
    ``horizon`` sets how many rollouts the correction takes (defaults: init 0.2, target 6,
    horizon 10000 in lm-human-preferences).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got {target} and {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        mult = 1.0 + proportional_error * n_steps / self.horizon
        self.value *= mult

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])
