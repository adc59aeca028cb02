"""``policy-trainer ppo``: PPO against a reward model served over gRPC, stage 3 of RLHF.

    policy-trainer ppo --policy ./sft --rm localhost:50051 --prompts prompts.jsonl --out ./run1

Every step, on every rank (``torchrun --nproc_per_node N`` for several; each takes its share
of the step's prompts), numbered as in the loop below:

 1. generate: sample responses chunk by chunk, cut at EOS / the stop token;
 2. score: each chunk goes to the RM on a ScoreStream as soon as it is generated, so the
    server scores chunk k while we generate chunk k+1 and run step 3;
 3. reference: log-probs of the frozen reference and the rollout policy, and the critic's
    values, for the chunk (1-3: experience.py); then the scores are collected, and a rollout
    the RM finally failed on is masked out of everything below and counted, never rewarded;
 4. rewards: R_t = -β·KL_t per token, plus the (normalized, penalized, clipped) score on the
    last response token (ppo.compute_rewards);
 5. GAE(γ, λ) over the response tokens: advantages and returns (ppo.gae);
 6. whiten the advantages over the batch's training tokens (ppo.masked_whiten);
 7. PPO epochs × minibatches × micro-batches: clipped policy loss, clipped value loss,
    entropy bonus; gradients averaged across ranks, clipped per network; both AdamWs step;
 8. β update (adaptive KL), log (JSONL, TensorBoard, Prometheus), checkpoint.

Randomness is a function of (seed, step, rank): sampling seeds and minibatch permutations are
derived per step, so a run resumed from a checkpoint (policy, critic, optimizers, schedulers,
KL controller, RNG states, prompt cursor) reproduces the metrics of one that ran through.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from policy_trainer import checkpoint, distributed, ppo, rollout
from policy_trainer.critic import PolicyAndValue
from policy_trainer.data import batch_indices
from policy_trainer.device import pick_device
from policy_trainer.errors import UserError
from policy_trainer.experience import generate_and_score, rollout_texts
from policy_trainer.logprobs import response_logprobs
from policy_trainer.metrics import PHASES, PhaseTimer, PPOMetrics
from policy_trainer.ppo_config import PPOConfig
from policy_trainer.ppo_setup import (
    Models,
    build_optimizers,
    check_policy_head,
    connect_rm,
    load_models,
    load_prompts,
)
from policy_trainer.rollout import Rollouts
from policy_trainer.runlog import StepLog, progress_bar
from policy_trainer.scoring import RMError

__all__ = ["PPOConfig", "train_ppo"]
log = logging.getLogger("policy_trainer.ppo")


def train_ppo(cfg: PPOConfig) -> int:
    cfg.validate()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    device = pick_device(cfg.device, cfg.torch_threads)
    dist = distributed.init_from_env(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    closers: list = []  # what run opened, closed in reverse whatever happens
    try:
        return run(cfg, dist, device, closers)
    except RMError as e:
        print(f"policy-trainer ppo: error: {e}", file=sys.stderr)
        return 1
    finally:
        for close in reversed(closers):
            close()
        distributed.shutdown(dist)


def run(cfg: PPOConfig, dist: distributed.Dist, device: torch.device, closers: list) -> int:
    local_batch_size, local_mini_batch_size = cfg.local_sizes(dist.world_size)
    out = Path(cfg.out)
    resume_from = checkpoint.find_resume_point(out, cfg.resume, fresh_if_none=True)

    # 0. models (policy, frozen reference, critic), prompts, the RM; optimizers, schedules and
    # the KL controller; on resume their state, the RNG and the prompt cursor
    models = load_models(cfg, resume_from, device)
    prompts = load_prompts(cfg, models)
    check_policy_head(cfg, models, prompts, device)
    scorer, rm_input, reward_norm = connect_rm(cfg, models)
    closers.append(scorer.close)
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * len(prompts.ids) / cfg.batch_size)
    stateful = build_optimizers(cfg, models, total_steps)
    optimizers = (stateful["optimizer"], stateful["value_optimizer"])
    schedulers = (stateful["scheduler"], stateful["value_scheduler"])
    kl_ctl = stateful["kl_controller"]
    step = cursor = 0
    if resume_from is not None:
        state = checkpoint.load_state(resume_from)
        if state["data_sha256"] != prompts.sha256:
            raise UserError(f"{cfg.prompts} changed since the checkpoint; "
                            "resume needs the same prompts")
        step, cursor = checkpoint.restore(state, stateful), state["cursor"]
        log.info("resumed from %s (step %d)", resume_from, step)
    if dist.is_main:
        step_log, metrics = open_logs(cfg, out, step if resume_from else None, closers)
        step_log.write({"event": "start", "step": step, "total_steps": total_steps,
                        "prompts": len(prompts.ids), "world_size": dist.world_size,
                        "rm_input": rm_input})

    def save(step: int) -> None:
        distributed.check_in_sync(dist, models.policy, models.critic)
        if dist.is_main:
            state = checkpoint.trainer_state(step, stateful, cursor=cursor,
                                             config=dataclasses.asdict(cfg),
                                             data_sha256=prompts.sha256)
            checkpoint.save_checkpoint(out / "checkpoints", step,
                                       PolicyAndValue(models.policy, models.critic),
                                       models.tokenizer, state, cfg.keep_checkpoints)
        distributed.barrier(dist)

    bar = progress_bar(total_steps, step, "ppo", dist.is_main and cfg.progress)
    retries_seen = 0
    while step < total_steps:
        step_start, timer = time.perf_counter(), PhaseTimer(device)
        prompt_rows = batch_indices(len(prompts.ids), cursor, cfg.batch_size, cfg.seed)
        prompt_rows = prompt_rows[dist.rank * local_batch_size:(dist.rank + 1) * local_batch_size]

        # 1-3. generate, score on the RM, reference log-probs and values (chunk by chunk)
        rollouts, scores, scored = generate_and_score(step, prompt_rows, models, prompts, scorer,
                                                      rm_input, cfg, dist.rank, device, timer)
        counts = distributed.sum_across(dist, {
            "rollouts": len(rollouts), "scored": len(scored.results),
            "failed_samples": len(scored.failed),
            "rm_truncated": sum(r.truncated for r in scored.results.values()),
            "rm_retries": scorer.retries})
        if counts["failed_samples"] > cfg.max_failed_fraction * counts["rollouts"]:
            raise RMError(f"step {step + 1}: {int(counts['failed_samples'])} of "
                          f"{int(counts['rollouts'])} rollouts failed to score "
                          f"(> --max-failed-fraction {cfg.max_failed_fraction})")

        # 4-6. rewards with the KL penalty, GAE, whitened advantages
        kl_coef, lr = kl_ctl.value, schedulers[0].get_last_lr()[0]
        sums, explained_var = rewards_and_advantages(rollouts, scores, kl_coef, reward_norm, cfg)
        sums = distributed.sum_across(dist, sums)

        # 7. PPO epochs × minibatches (skipped, never zero-filled, if nothing was scored)
        with timer("train"):
            train_stats = (ppo_update(rollouts, models, optimizers, cfg, dist, step,
                                      local_mini_batch_size) if sums["n_valid"] > 0 else {})
        for scheduler in schedulers:
            scheduler.step()

        # 8. β, logs, checkpoint
        kl_ctl.update(sums["kl"] / max(sums["n_valid"], 1.0), cfg.batch_size)
        step, cursor = step + 1, cursor + cfg.batch_size
        local = {**train_stats, "explained_variance": explained_var,
                 "response_length": float(rollouts.lengths.float().mean()),
                 "eos_fraction": float(rollouts.ended.float().mean()),
                 "rm_latency": sum(scored.latencies) / max(len(scored.latencies), 1),
                 **{f"time/{p}": s for p, s in timer.seconds.items()},
                 "time/step": time.perf_counter() - step_start}
        record = step_record(step, sums, counts, kl_coef, lr,
                             distributed.mean_across(dist, local))
        if dist.is_main:
            step_log.write(record)
            step_log.write_rollouts(rollout_texts(rollouts, scores, step, cfg.log_rollouts,
                                                  models, prompts))
            metrics.observe(record, scored.latencies, record["rm_retries"] - retries_seen)
            retries_seen = record["rm_retries"]
            bar.update(1)
            bar.set_postfix(score=f"{record['score']:.3f}", kl=f"{record['kl']:.3f}")
            if bar.disable and cfg.log_every and step % cfg.log_every == 0:
                log_step(record, total_steps)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            save(step)
    bar.close()

    # the final checkpoint and model
    if checkpoint.latest_checkpoint(out / "checkpoints") != out / "checkpoints" / f"step-{step}":
        save(step)
    if dist.is_main:
        PolicyAndValue(models.policy, models.critic).save_pretrained(out)
        models.tokenizer.save_pretrained(out)
        log.info("wrote the policy to %s (critic in %s)", out, out / "value")
    return 0


# ---------------------------------------------------------------- steps 4-6

def rewards_and_advantages(rollouts: Rollouts, scores: torch.Tensor, kl_coef: float,
                           reward_norm: tuple[float, float], cfg: PPOConfig
                           ) -> tuple[dict, float]:
    """Steps 4-6 on the rows the RM scored, attached to ``rollouts`` (rewards, advantages,
    returns, train_mask); returns (sums over the scored rows for the log, divided once summed
    across ranks; the critic's explained variance)."""
    valid = ~torch.isnan(scores)  # (B,) rows the RM answered
    mask = rollouts.response_mask.bool() & valid[:, None]  # (B, R) the training mask
    logprobs, ref_logprobs, values = rollouts.logprobs, rollouts.ref_logprobs, rollouts.values

    # 4. rewards: the score normalized, less the penalty for a missing EOS, on the last token;
    # -β·KL_t on every token
    score = (scores - reward_norm[0]) / reward_norm[1]
    score = torch.where(rollouts.ended, score, score - cfg.missing_eos_penalty)
    rewards, kl = torch.zeros_like(logprobs), torch.zeros_like(logprobs)  # (B, R)
    if valid.any():
        rewards[valid], kl[valid] = ppo.compute_rewards(
            score[valid], logprobs[valid], ref_logprobs[valid], rollouts.response_mask[valid],
            kl_coef, cfg.kl_estimator, cfg.reward_clip)
    # 5. GAE: advantages, and returns (the value targets)
    advantages, returns = ppo.gae(rewards, values, mask, cfg.gamma, cfg.gae_lambda)
    # 6. whiten the advantages (padding and failed rows stay 0)
    rollouts.rewards, rollouts.returns, rollouts.train_mask = rewards, returns, mask.long()
    rollouts.advantages = ppo.masked_whiten(advantages, mask)

    token_mask = mask.float()

    def row_sum(x: torch.Tensor) -> float:
        return float(x[valid].sum())

    sums = {"n_valid": float(valid.sum()), "score": row_sum(scores.nan_to_num()),
            "score_sq": row_sum(scores.nan_to_num() ** 2), "kl": row_sum(kl.sum(1)),
            "kl_k1": row_sum((ppo.kl_k1(logprobs, ref_logprobs) * token_mask).sum(1)),
            "kl_k3": row_sum((ppo.kl_k3(logprobs, ref_logprobs) * token_mask).sum(1)),
            "non_score_reward": row_sum((-kl_coef * kl).sum(1)),
            "reward": row_sum(rewards.sum(1))}
    return sums, float(ppo.explained_variance(values, returns, mask))


# ---------------------------------------------------------------- step 7

def micro_step(mb: Rollouts, models: Models, cfg: PPOConfig, scale: float) -> dict:
    """Forward and backward of one micro-batch: clipped policy and value losses and the
    entropy bonus, the gradients scaled by ``scale`` (accumulated over the minibatch)."""
    mb_inputs = (mb.query_responses, mb.attention_mask, mb.context_length)
    new_logprobs, entropy = response_logprobs(models.policy, *mb_inputs, cfg.temperature,
                                              with_entropy=True)  # (B, R) each
    new_values = models.critic(*mb_inputs)  # (B, R)
    pg_loss, clipfrac, approx_kl = ppo.policy_loss(new_logprobs, mb.logprobs, mb.advantages,
                                                   mb.train_mask, cfg.clip_coef)
    vf_loss, vf_clipfrac = ppo.value_loss(new_values, mb.values, mb.returns, mb.train_mask,
                                          cfg.vf_clip_coef)
    mean_entropy = ppo.masked_mean(entropy, mb.train_mask)
    loss = pg_loss + cfg.vf_coef * vf_loss
    if cfg.ent_coef:
        loss = loss - cfg.ent_coef * mean_entropy
    (loss * scale).backward()
    return {"pg_loss": pg_loss.item(), "vf_loss": vf_loss.item(), "clipfrac": clipfrac.item(),
            "approx_kl": approx_kl.item(), "vf_clipfrac": vf_clipfrac.item(),
            "entropy": mean_entropy.item()}


def ppo_update(rollouts: Rollouts, models: Models, optimizers, cfg: PPOConfig,
               dist: distributed.Dist, step: int, local_mini_batch_size: int) -> dict:
    """7. Epochs × minibatches (one optimizer step each) × micro-batches (accumulated)."""
    stats = defaultdict(list)
    micro_per_mini = local_mini_batch_size // cfg.micro_batch_size
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
    for epoch in range(cfg.num_ppo_epochs):
        g = torch.Generator().manual_seed(rollout.step_seed(cfg.seed, step, dist.rank, -1 - epoch))
        b_inds = torch.randperm(len(rollouts), generator=g)
        for mini_start in range(0, len(rollouts), local_mini_batch_size):
            for micro_start in range(mini_start, mini_start + local_mini_batch_size,
                                     cfg.micro_batch_size):
                mb_inds = b_inds[micro_start: micro_start + cfg.micro_batch_size]
                mb = rollouts.subset(mb_inds)
                for k, v in micro_step(mb, models, cfg, 1.0 / micro_per_mini).items():
                    stats[k].append(v)
            distributed.all_reduce_grads(dist, models.policy, models.critic)
            for name, net in (("grad_norm", models.policy), ("value_grad_norm", models.critic)):
                stats[name].append(float(torch.nn.utils.clip_grad_norm_(net.parameters(),
                                                                        max_norm)))
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
    return {k: sum(v) / len(v) for k, v in stats.items()}


# ---------------------------------------------------------------- step 8

def open_logs(cfg: PPOConfig, out: Path, resume_step: int | None,
              closers: list) -> tuple[StepLog, PPOMetrics]:
    """Rank 0's JSONL / TensorBoard logs and Prometheus metrics (served with --metrics-port)."""
    out.mkdir(parents=True, exist_ok=True)
    step_log = StepLog(out, resume_step, cfg.tensorboard)
    closers.append(step_log.close)
    metrics = PPOMetrics()
    closers.append(metrics.close)
    if cfg.metrics_port is not None:
        log.info("metrics on http://%s:%d/metrics", cfg.metrics_host,
                 metrics.serve(cfg.metrics_port, cfg.metrics_host))
    return step_log, metrics


def step_record(step: int, sums: dict, counts: dict, kl_coef: float, lr: float,
                means: dict) -> dict:
    """The step's log record: per-rollout means of ``sums`` (summed over the scored rows of
    every rank), ``means`` (averaged over ranks) and ``counts`` (summed)."""
    n_valid = max(sums["n_valid"], 1.0)
    score = sums["score"] / n_valid
    return {"step": step, "score": score,
            "score_std": math.sqrt(max(sums["score_sq"] / n_valid - score ** 2, 0)),
            **{k: sums[k] / n_valid for k in ("kl", "kl_k1", "kl_k3", "non_score_reward",
                                              "reward")},
            "kl_coef": kl_coef, "lr": lr, **means, **{k: int(v) for k, v in counts.items()}}


def log_step(record: dict, total_steps: int) -> None:
    log.info("step %d/%d score %.4f kl %.4f beta %.4g entropy %.3f len %.1f failed %d "
             "retries %d | generate %.2fs score %.2fs reference %.2fs train %.2fs",
             record["step"], total_steps, record["score"], record["kl"], record["kl_coef"],
             record.get("entropy", math.nan), record["response_length"],
             record["failed_samples"], record["rm_retries"],
             *(record[f"time/{p}"] for p in PHASES))
