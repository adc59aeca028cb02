"""Step 7 of a PPO step, epochs x minibatches x micro-batches, and the layout it shares with
the rollout policy's log-probs (step 3b).

The layout: epoch e visits this rank's rollouts in a permutation seeded by (seed, step, rank,
e), cut into minibatches (one optimizer step each) of micro-batches (one forward/backward
each, gradients accumulated). A micro-batch is ``Rollouts.subset`` of its rows: trimmed to
its own padding, so its tensors' shapes depend on which rows it holds.

Why π_old is computed in epoch 0's layout: in bf16 a transformer's output depends, in its
last bits, on the shape of the batch it ran in (matmul blocking, attention over more or fewer
padded columns). Log-probs of the same policy computed for the whole rollout batch and again
for a micro-batch differ by ~1e-3 (measured on a 256-wide model), and that noise is the
ratio's at the first update. Computed micro-batch by micro-batch exactly as epoch 0 will run
them, the forward that makes π_old and the one that makes π at the first minibatch are the
same computation: the ratio is exactly 1 (tested in bf16, ``test_precision.py``). Later epochs
use other permutations; by then the policy has moved and the noise is in the noise.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from policy_trainer import ppo, rollout
from policy_trainer.ppo_config import PPOConfig
from policy_trainer.ppo_nets import Nets
from policy_trainer.rollout import Rollouts
from policy_trainer.scaling import Run


def layout(n: int, cfg: PPOConfig, local_mini_batch_size: int, step: int, rank: int,
           epoch: int) -> list[list[torch.Tensor]]:
    """Epoch ``epoch``'s minibatches, each a list of micro-batches of row indices."""
    g = torch.Generator().manual_seed(rollout.step_seed(cfg.seed, step, rank, -1 - epoch))
    b_inds = torch.randperm(n, generator=g)
    return [[b_inds[s: s + cfg.micro_batch_size]
             for s in range(m, min(m + local_mini_batch_size, n), cfg.micro_batch_size)]
            for m in range(0, n, local_mini_batch_size)]


@torch.no_grad()
def rollout_logprobs(rollouts: Rollouts, nets: Nets, cfg: PPOConfig,
                     micro_batches: list[torch.Tensor]) -> None:
    """3b. log π_old(y_t) of every response token, (B, R), micro-batch by micro-batch in the
    layout of epoch 0 (module docstring), attached to ``rollouts``."""
    out = torch.zeros(rollouts.response.shape, dtype=torch.float32,
                      device=rollouts.response.device)  # (B, R)
    for idx in micro_batches:
        mb = rollouts.subset(idx)
        lp = nets.logprobs(mb.query_responses, mb.attention_mask, mb.context_length,
                           temperature=cfg.temperature)  # (b, R_mb)
        out[idx, : lp.size(1)] = lp
    rollouts.logprobs = out


def micro_step(mb: Rollouts, nets: Nets, cfg: PPOConfig, scale: float) -> dict:
    """Forward and backward of one micro-batch, the policy's then the critic's: clipped policy
    loss and entropy bonus, clipped value loss, the gradients scaled by ``scale`` (accumulated
    over the minibatch). Two backwards instead of one on the sum: the networks share no
    trainable weight, the policy's activations are freed before the critic's exist, and with
    LoRA the critic's backward runs with its adapter active (``ppo_nets.py``)."""
    inputs = (mb.query_responses, mb.attention_mask, mb.context_length)
    new_logprobs, entropy = nets.logprobs(*inputs, temperature=cfg.temperature,
                                          with_entropy=True)  # (B, R) each
    pg_loss, clipfrac, approx_kl = ppo.policy_loss(new_logprobs, mb.logprobs, mb.advantages,
                                                   mb.train_mask, cfg.clip_coef)
    mean_entropy = ppo.masked_mean(entropy, mb.train_mask)
    loss = pg_loss - cfg.ent_coef * mean_entropy if cfg.ent_coef else pg_loss
    (loss * scale).backward()
    with nets.critic_scope():
        new_values = nets.values(*inputs)  # (B, R)
        vf_loss, vf_clipfrac = ppo.value_loss(new_values, mb.values, mb.returns, mb.train_mask,
                                              cfg.vf_clip_coef)
        (cfg.vf_coef * vf_loss * scale).backward()
    return {"pg_loss": pg_loss.item(), "vf_loss": vf_loss.item(), "clipfrac": clipfrac.item(),
            "approx_kl": approx_kl.item(), "vf_clipfrac": vf_clipfrac.item(),
            "entropy": mean_entropy.item()}


def ppo_update(rollouts: Rollouts, nets: Nets, optimizers, cfg: PPOConfig, run: Run,
               step: int, local_mini_batch_size: int) -> dict:
    """7. Epochs x minibatches (one optimizer step each) x micro-batches (accumulated); under
    FSDP2 the gradients are averaged over ranks as each backward finishes."""
    stats = defaultdict(list)
    micro_per_mini = local_mini_batch_size // cfg.micro_batch_size
    policy_params, critic_params = nets.trainable()
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
    for epoch in range(cfg.num_ppo_epochs):
        for minibatch in layout(len(rollouts), cfg, local_mini_batch_size, step, run.dist.rank,
                                epoch):
            for mb_inds in minibatch:
                for k, v in micro_step(rollouts.subset(mb_inds), nets, cfg,
                                       1.0 / micro_per_mini).items():
                    stats[k].append(v)
            stats["grad_norm"].append(run.clip_grad_norm(policy_params, max_norm))
            stats["value_grad_norm"].append(run.clip_grad_norm(critic_params, max_norm))
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
    return {k: sum(v) / len(v) for k, v in stats.items()}
