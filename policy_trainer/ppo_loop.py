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
 6. whiten the advantages over the step's training tokens, every rank's together
    (ppo.whiten_from_sums);
 7. PPO epochs × minibatches × micro-batches: clipped policy loss, clipped value loss,
    entropy bonus; gradients averaged across ranks, clipped per network; both AdamWs step
    (ppo_update.py);
 8. β update (adaptive KL), log (JSONL, TensorBoard, Prometheus), checkpoint.

Under torchrun the networks are sharded with FSDP2 and each rank trains on its own rollouts;
``--dtype``, ``--lora-*`` and ``--gradient-checkpointing`` are ``scaling.py``'s, the networks
they make ``ppo_nets.py``'s.

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
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from policy_trainer import checkpoint, distributed, feedback_tap, ppo, ppo_nets
from policy_trainer.data import batch_indices
from policy_trainer.device import pick_device
from policy_trainer.errors import UserError
from policy_trainer.experience import generate_and_score, member_sums, rollout_texts
from policy_trainer.metrics import PHASES, PhaseTimer, PPOMetrics
from policy_trainer.ppo_config import PPOConfig
from policy_trainer.ppo_setup import (
    build_nets,
    build_optimizers,
    check_policy_head,
    connect_rm,
    load_models,
    load_prompts,
)
from policy_trainer.ppo_update import layout, ppo_update
from policy_trainer.rollout import Rollouts
from policy_trainer.runlog import StepLog, progress_bar
from policy_trainer.scaling import Run
from policy_trainer.scoring import RMError, RMVersionLog

__all__ = ["PPOConfig", "train_ppo"]
log = logging.getLogger("policy_trainer.ppo")


def train_ppo(cfg: PPOConfig, on_step=None) -> int:
    """The ``policy-trainer ppo`` command. ``on_step(step, tap)``, if given, runs after each
    step (its checkpoint written): the live loop's refresh (loop.py); ``tap`` is the run's
    FeedbackTap, or None."""
    cfg.validate()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    run = Run(cfg, pick_device(cfg.device, cfg.torch_threads))
    closers: list = []  # what the run opened, closed in reverse whatever happens
    try:
        return train(cfg, run, closers, on_step)
    except RMError as e:
        print(f"policy-trainer ppo: error: {e}", file=sys.stderr)
        return 1
    finally:
        for close in reversed(closers):
            close()
        run.close()


def train(cfg: PPOConfig, run: Run, closers: list, on_step=None) -> int:
    dist, device = run.dist, run.device
    local_batch_size, local_mini_batch_size = cfg.local_sizes(dist.world_size)
    out = Path(cfg.out)
    resume_from = checkpoint.find_resume_point(out, cfg.resume, fresh_if_none=True)

    # 0. models (policy, frozen reference, critic), prompts, the RM; optimizers, schedules and
    # the KL controller; on resume their state, the RNG and the prompt cursor
    models = load_models(cfg, run, resume_from)
    prompts = load_prompts(cfg, models)
    check_policy_head(cfg, models, prompts, device)
    build_nets(cfg, run, models)
    nets = models.nets
    scorer, rm_input, reward_norm = connect_rm(cfg, models)
    closers.append(scorer.close)
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * len(prompts.ids) / cfg.batch_size)
    everything = build_optimizers(cfg, models, total_steps)
    optimizers = (everything["optimizer"], everything["value_optimizer"])
    schedulers = (everything["scheduler"], everything["value_scheduler"])
    kl_ctl = everything["kl_controller"]
    if nets.shared:  # LoRA: one module, both optimizers
        run.register("nets", nets.policy, *optimizers)
    else:
        run.register("policy", nets.policy, optimizers[0])
        run.register("critic", nets.critic, optimizers[1])
    stateful = run.stateful(everything)
    step = cursor = 0
    if resume_from is not None:
        state = checkpoint.load_state(resume_from)
        if state["data_sha256"] != prompts.sha256:
            raise UserError(f"{cfg.prompts} changed since the checkpoint; "
                            "resume needs the same prompts")
        run.load_shards(resume_from)
        step, cursor = checkpoint.restore(state, stateful), state["cursor"]
        log.info("resumed from %s (step %d)", resume_from, step)
    if dist.is_main:
        step_log, metrics = open_logs(cfg, out, step if resume_from else None, closers)
        step_log.write({"event": "start", "step": step, "total_steps": total_steps,
                        "prompts": len(prompts.ids), "world_size": dist.world_size,
                        "rm_input": rm_input, "rm_version": cfg.rm_version})
        rm_versions = RMVersionLog(metrics.registry)  # rank 0's rewards
    tap = None  # rank 0 sends every rank's pairs to the feedback service (--feedback-url)
    if cfg.feedback_url and dist.is_main:
        tap = feedback_tap.FeedbackTap(cfg, metrics.registry)
        closers.append(tap.close)

    def save(step: int) -> None:
        state = checkpoint.trainer_state(step, stateful, cursor=cursor,
                                         config=dataclasses.asdict(cfg),
                                         data_sha256=prompts.sha256)
        run.save_checkpoint(out / "checkpoints", step, ppo_nets.plain_checkpoint(nets),
                            models.tokenizer, state, cfg.keep_checkpoints)

    bar = progress_bar(total_steps, step, "ppo", dist.is_main and cfg.progress)
    retries_seen = 0
    while step < total_steps:
        step_start, timer = time.perf_counter(), PhaseTimer(device)
        prompt_rows = batch_indices(len(prompts.ids), cursor, cfg.batch_size, cfg.seed)
        prompt_rows = prompt_rows[dist.rank * local_batch_size:(dist.rank + 1) * local_batch_size]

        # 1-3. generate, score on the RM, reference log-probs and values (chunk by chunk), the
        # rollout policy's log-probs in the layout of the first PPO epoch (the first
        # micro-batch's forward kept for step 7)
        first_epoch = [mb for mini in layout(local_batch_size, cfg, local_mini_batch_size, step,
                                             dist.rank, 0) for mb in mini]
        rollouts, scores, scored, primed = generate_and_score(
            step, prompt_rows, models, prompts, scorer, rm_input, cfg, dist.rank, device, timer,
            first_epoch)
        counts = distributed.sum_across(dist, {
            "rollouts": len(rollouts), "scored": len(scored.results),
            "failed_samples": len(scored.failed),
            "rm_truncated": sum(r.truncated for r in scored.results.values()),
            "rm_retries": scorer.retries})
        if counts["failed_samples"] > cfg.max_failed_fraction * counts["rollouts"]:
            raise RMError(f"step {step + 1}: {int(counts['failed_samples'])} of "
                          f"{int(counts['rollouts'])} rollouts failed to score "
                          f"(> --max-failed-fraction {cfg.max_failed_fraction})")
        # 3b. the live loop: pairs of the policy's own responses for labeling (never blocks;
        # every rank samples, the sharded generation being a collective; rank 0 sends)
        feedback = {}
        if cfg.feedback_url:
            t0 = time.perf_counter()
            found = distributed.gather_to_main(dist, feedback_tap.candidates(
                cfg, step + 1, dist.rank, rollouts, scores, scored, models, prompts, scorer,
                rm_input, device))
            if tap is not None:
                feedback = tap.step(step + 1, found, time.perf_counter() - t0)

        # 4-6. rewards with the KL penalty, GAE, advantages whitened over every rank's batch
        kl_coef, lr = kl_ctl.value, schedulers[0].get_last_lr()[0]
        sums, explained_var = rewards_and_advantages(rollouts, scores, kl_coef, reward_norm, cfg,
                                                     dist)
        sums = distributed.sum_across(dist, {**sums, **member_sums(scored.results.values())})

        # 7. PPO epochs × minibatches (skipped, never zero-filled, if nothing was scored)
        with timer("train"):
            train_stats = (ppo_update(rollouts, nets, optimizers, cfg, run, step,
                                      local_mini_batch_size, primed)
                           if sums["n_valid"] > 0 else {})
            del primed  # skipped: its graph goes now
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
            for event in rm_versions.observe(step, scored.results.values()):
                step_log.write(event)  # the RM's default changed under the run
            step_log.write({**record, **feedback, "rm_versions": rm_versions.counts})
            step_log.write_rollouts(rollout_texts(rollouts, scores, step, cfg.log_rollouts,
                                                  models, prompts, scored.versions()))
            metrics.observe(record, scored.latencies, record["rm_retries"] - retries_seen)
            retries_seen = record["rm_retries"]
            bar.update(1)
            bar.set_postfix(score=f"{record['score']:.3f}", kl=f"{record['kl']:.3f}")
            if bar.disable and cfg.log_every and step % cfg.log_every == 0:
                log_step(record, total_steps)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            save(step)
        if on_step is not None:
            on_step(step, tap)
    bar.close()

    # the final checkpoint and model
    if checkpoint.latest_checkpoint(out / "checkpoints") != out / "checkpoints" / f"step-{step}":
        save(step)
    ppo_nets.save_pretrained(run, nets, out)  # plain: gathered, adapters merged
    if dist.is_main:
        models.tokenizer.save_pretrained(out)
        log.info("wrote the policy to %s (critic in %s)", out, out / "value")
    return 0


# ---------------------------------------------------------------- steps 4-6

def rewards_and_advantages(rollouts: Rollouts, scores: torch.Tensor, kl_coef: float,
                           reward_norm: tuple[float, float], cfg: PPOConfig,
                           dist: distributed.Dist | None = None) -> tuple[dict, float]:
    """Steps 4-6 on the rows the RM scored, attached to ``rollouts`` (rewards, advantages,
    returns, train_mask); returns (sums over the scored rows for the log, divided once summed
    across ranks; the critic's explained variance).

    Every statistic that shapes the update is global: the score normalization uses the RM's
    statistics (the same on every rank), and the reward whitening (--whiten-rewards) and the
    advantage whitening use the mean and variance over every rank's training tokens, so N
    ranks compute the advantages one rank would on the whole batch."""
    dist = dist or distributed.Dist()
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
    if cfg.whiten_rewards:
        total = distributed.sum_tensor(dist, ppo.masked_sums(rewards, mask))
        rewards = ppo.whiten_from_sums(rewards, mask, total, shift_mean=False)
    # 5. GAE: advantages, and returns (the value targets)
    advantages, returns = ppo.gae(rewards, values, mask, cfg.gamma, cfg.gae_lambda)
    # 6. whiten the advantages (padding and failed rows stay 0)
    rollouts.rewards, rollouts.returns, rollouts.train_mask = rewards, returns, mask.long()
    total = distributed.sum_tensor(dist, ppo.masked_sums(advantages, mask))
    rollouts.advantages = ppo.whiten_from_sums(advantages, mask, total)

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
            "kl_coef": kl_coef, "lr": lr, **means, **{k: int(v) for k, v in counts.items()},
            **({k: sums[k] / sums["member_scored"] for k in ("member_mean", "member_std")}
               if sums.get("member_scored") else {})}  # an ensemble's members, mean and spread


def log_step(record: dict, total_steps: int) -> None:
    log.info("step %d/%d score %.4f kl %.4f beta %.4g entropy %.3f len %.1f failed %d "
             "retries %d | generate %.2fs score %.2fs reference %.2fs train %.2fs",
             record["step"], total_steps, record["score"], record["kl"], record["kl_coef"],
             record.get("entropy", math.nan), record["response_length"],
             record["failed_samples"], record["rm_retries"],
             *(record[f"time/{p}"] for p in PHASES))
