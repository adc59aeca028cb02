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

The first micro-batch of epoch 0 is not run twice: step 3b runs its forward *with* the graph
(``Primed``), takes π_old from it detached, and the first micro-step of step 7 backpropagates
through that same forward once the advantages exist. Its π_old and its first π are then one
tensor, and the forward it replaces was the same computation anyway; with one micro-batch per
minibatch and one minibatch (TRL's tiny setup), that is the whole of step 3b's policy forward.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

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


@dataclass
class Primed:
    """Epoch 0's first micro-batch forward, run in step 3b with its graph kept: the rows
    ``idx`` and the policy's (log-probs, entropies), (b, R_mb) each, for step 7 to use."""

    idx: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor


def rollout_logprobs(rollouts: Rollouts, nets: Nets, cfg: PPOConfig,
                     micro_batches: list[torch.Tensor], prime: bool = False) -> Primed | None:
    """3b. log π_old(y_t) of every response token, (B, R), micro-batch by micro-batch in the
    layout of epoch 0 (module docstring), attached to ``rollouts``. With ``prime`` the first
    micro-batch runs last, with its graph, and is returned for ``ppo_update`` (after it no
    other policy forward runs before its backward: FSDP2 sees forward then backward)."""
    out = torch.zeros(rollouts.response.shape, dtype=torch.float32,
                      device=rollouts.response.device)  # (B, R)
    with torch.no_grad():
        for idx in micro_batches[1:] if prime else micro_batches:
            mb = rollouts.subset(idx)
            lp = nets.logprobs(mb.query_responses, mb.attention_mask, mb.context_length,
                               temperature=cfg.temperature)  # (b, R_mb)
            out[idx, : lp.size(1)] = lp
    primed = None
    if prime and micro_batches:
        idx = micro_batches[0]
        mb = rollouts.subset(idx)
        lp, entropy = nets.logprobs(mb.query_responses, mb.attention_mask, mb.context_length,
                                    temperature=cfg.temperature, with_entropy=True)
        out[idx, : lp.size(1)] = lp.detach()
        primed = Primed(idx, lp, entropy)
    rollouts.logprobs = out
    return primed


def micro_step(mb: Rollouts, nets: Nets, cfg: PPOConfig, scale: float,
               primed: Primed | None = None) -> dict:
    """Forward and backward of one micro-batch, the policy's then the critic's: clipped policy
    loss and entropy bonus, clipped value loss, the gradients scaled by ``scale`` (accumulated
    over the minibatch). Two backwards instead of one on the sum: the networks share no
    trainable weight, the policy's activations are freed before the critic's exist, and with
    LoRA the critic's backward runs with its adapter active (``ppo_nets.py``). ``primed``: the
    policy's forward of these rows, already run (step 3b). The statistics come back as 0-dim
    tensors (no host sync here)."""
    inputs = (mb.query_responses, mb.attention_mask, mb.context_length)
    if primed is not None:
        new_logprobs, entropy = primed.logprobs, primed.entropy
    else:
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
    return {"pg_loss": pg_loss.detach(), "vf_loss": vf_loss.detach(), "clipfrac": clipfrac,
            "approx_kl": approx_kl, "vf_clipfrac": vf_clipfrac,
            "entropy": mean_entropy.detach()}


def ppo_update(rollouts: Rollouts, nets: Nets, optimizers, cfg: PPOConfig, run: Run,
               step: int, local_mini_batch_size: int, primed: Primed | None = None) -> dict:
    """7. Epochs x minibatches (one optimizer step each) x micro-batches (accumulated); under
    FSDP2 the gradients are averaged over ranks as each backward finishes. ``primed``: the
    first micro-batch's policy forward from step 3b (``rollout_logprobs(prime=True)``). The
    statistics stay on the device until the end: one host sync per update."""
    stats = defaultdict(list)
    micro_per_mini = local_mini_batch_size // cfg.micro_batch_size
    policy_params, critic_params = nets.trainable()
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
    for epoch in range(cfg.num_ppo_epochs):
        for minibatch in layout(len(rollouts), cfg, local_mini_batch_size, step, run.dist.rank,
                                epoch):
            for mb_inds in minibatch:
                first, primed = primed, None
                if first is not None and not torch.equal(first.idx, mb_inds):
                    raise RuntimeError("the primed micro-batch is not epoch 0's first")
                for k, v in micro_step(rollouts.subset(mb_inds), nets, cfg,
                                       1.0 / micro_per_mini, first).items():
                    stats[k].append(v)
            stats["grad_norm"].append(run.clip_grad_norm(policy_params, max_norm, sync=False))
            stats["value_grad_norm"].append(run.clip_grad_norm(critic_params, max_norm,
                                                               sync=False))
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
    # one sync for all of them; float64 holds each fp32 / bf16 value exactly, so the means are
    # the ones summing Python floats of .item() gave
    flat = torch.cat([torch.stack(v).to(torch.float64) for v in stats.values()]).tolist()
    out, at = {}, 0
    for k, v in stats.items():
        out[k] = sum(flat[at:at + len(v)]) / len(v)
        at += len(v)
    return out
