"""``policy-trainer ppo``: PPO against a reward model served over gRPC (DESIGN §1 stage 3, §2).

    policy-trainer ppo --policy ./sft --rm localhost:50051 --prompts prompts.jsonl --out ./run1

Every step, on every rank (``torchrun --nproc_per_node N`` for several; each takes its share):

 1. generate: sample responses chunk by chunk, cut at EOS / the stop token (rollout.py);
 2. score: each chunk goes to the RM on a ScoreStream as soon as it is generated (scoring.py),
    so the server scores chunk k while we generate chunk k+1 and run step 3;
 3. reference: log-probs of the frozen reference and the rollout policy, and the critic's
    values, for the chunk (logprobs.py, through kernels.token_logprobs);
 4. collect the scores; a rollout the RM finally failed on is masked out of everything below
    (zero weight in every loss and in whitening) and counted, never given a reward;
 5. rewards: R_t = -β·KL_t per token, plus the (normalized, penalized, clipped) score on the
    last response token (ppo.compute_rewards);
 6. advantages: GAE(γ, λ) over the response tokens, then whitened;
 7. train: PPO epochs × minibatches × micro-batches: clipped policy loss, clipped value loss,
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
from policy_trainer.data import batch_indices
from policy_trainer.device import pick_device
from policy_trainer.errors import UserError
from policy_trainer.logprobs import PolicyAndValue, response_logprobs
from policy_trainer.metrics import PHASES, PhaseTimer, PPOMetrics
from policy_trainer.ppo_config import PPOConfig
from policy_trainer.ppo_setup import (
    Models,
    Prompts,
    build_optimizers,
    check_policy_head,
    connect_rm,
    load_models,
    load_prompts,
)
from policy_trainer.runlog import StepLog, progress_bar
from policy_trainer.scoring import Collected, RMError, RMScorer, make_sample

__all__ = ["PPOConfig", "train_ppo"]
log = logging.getLogger("policy_trainer.ppo")


# ---------------------------------------------------------------- steps 1-4

@torch.no_grad()
def rollout_forwards(ro: rollout.Rollouts, m: Models, temperature: float) -> None:
    """3. Reference and rollout-policy log-probs, and values, (B, R) each."""
    qr, am, P = ro.query_responses, ro.attention_mask, ro.context_length
    ro.extra["ref_logprobs"] = response_logprobs(m.reference, qr, am, P, temperature)
    ro.extra["logprobs"] = response_logprobs(m.policy, qr, am, P, temperature)
    ro.extra["values"] = m.critic(qr, am, P)


def rm_samples(ro: rollout.Rollouts, ids: list[str], mode: str, m: Models, prompts: Prompts):
    out = []
    for j, sid in enumerate(ids):
        resp = ro.response[j, : int(ro.lengths[j])].tolist()
        if resp and resp[-1] == m.eos_id:
            resp = resp[:-1]  # the RM is trained on text without EOS (protos.encoding)
        i = ro.prompt_index[j]
        out.append(make_sample(mode, sid, prompts.ids[i], resp, prompts.texts[i], m.tokenizer))
    return out


def generate_and_score(step: int, rows: list[int], m: Models, prompts: Prompts,
                       scorer: RMScorer, mode: str, cfg: PPOConfig, d, device, timer):
    """Steps 1-4 for this rank's ``rows`` -> (rollouts, scores (B,) NaN where failed, collected)."""
    gen_config = rollout.sampling_config(cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                                         cfg.top_p, m.stop_ids, m.pad_id)
    chunks, all_ids, got = [], [], Collected({}, {}, [])
    for c, start in enumerate(range(0, len(rows), cfg.generation_batch_size)):
        idx = rows[start: start + cfg.generation_batch_size]
        with timer("generate"):  # 1.
            ro = rollout.generate(m.policy, [prompts.ids[i] for i in idx], idx, gen_config,
                                  m.stop_ids, m.pad_id,
                                  rollout.step_seed(cfg.seed, step, d.rank, c), device)
        ids = [f"s{step}-r{d.rank}-{start + j}" for j in range(len(idx))]
        scorer.submit(rm_samples(ro, ids, mode, m, prompts))  # 2. out now, answered later
        if not cfg.rm_overlap:  # sequential: wait for this chunk before doing anything else
            with timer("score"):
                got.merge(scorer.collect())
        with timer("reference"):  # 3. while the RM scores
            rollout_forwards(ro, m, cfg.temperature)
        chunks.append(ro)
        all_ids += ids
    with timer("score"):  # 4. only the time spent waiting on the RM
        got.merge(scorer.collect())
    scores = torch.tensor([got.results[i].reward if i in got.results else math.nan
                           for i in all_ids], dtype=torch.float32, device=device)  # (B,)
    return rollout.concat(chunks, m.pad_id), scores, got


def rollout_texts(b: rollout.Rollouts, scores: torch.Tensor, step: int, n: int, m: Models,
                  prompts: Prompts) -> list[dict]:
    """The first ``n`` rollouts as text for OUT/rollouts.jsonl (score null: the RM failed)."""
    out = []
    for j in range(min(n, len(b))):
        resp = b.response[j, : int(b.lengths[j])].tolist()
        score = float(scores[j])
        out.append({"step": step, "prompt": prompts.texts[b.prompt_index[j]],
                    "response": m.tokenizer.decode(resp, skip_special_tokens=True),
                    "score": None if math.isnan(score) else score, "ended": bool(b.ended[j]),
                    "length": len(resp)})
    return out


# ---------------------------------------------------------------- steps 5-7

def advantages(b: rollout.Rollouts, scores: torch.Tensor, kl_coef: float, norm, cfg: PPOConfig):
    """5-6. Rewards and whitened GAE advantages on the scored rows; per-row stats for logs."""
    valid = ~torch.isnan(scores)  # (B,) rows the RM answered
    mask = b.response_mask.bool() & valid[:, None]  # (B, R) the training mask
    logp, ref, values = b.extra["logprobs"], b.extra["ref_logprobs"], b.extra["values"]
    score = (scores - norm[0]) / norm[1]
    score = torch.where(b.ended, score, score - cfg.missing_eos_penalty)
    rewards, kl = torch.zeros_like(logp), torch.zeros_like(logp)
    if valid.any():
        rewards[valid], kl[valid] = ppo.compute_rewards(
            score[valid], logp[valid], ref[valid], b.response_mask[valid], kl_coef,
            cfg.kl_estimator, cfg.reward_clip)
    adv, returns = ppo.gae(rewards, values, mask, cfg.gamma, cfg.gae_lambda)
    b.extra.update(rewards=rewards, advantages=ppo.masked_whiten(adv, mask), returns=returns,
                   train_mask=mask.long())
    v, m = valid, mask.float()
    row = lambda x: float(x[v].sum())  # noqa: E731  sums over scored rows, divided globally
    return ({"n_valid": float(v.sum()), "score": row(scores.nan_to_num()),
             "score_sq": row(scores.nan_to_num() ** 2), "kl": row(kl.sum(1)),
             "kl_k1": row((ppo.kl_k1(logp, ref) * m).sum(1)),
             "kl_k3": row((ppo.kl_k3(logp, ref) * m).sum(1)),
             "non_score_reward": row((-kl_coef * kl).sum(1)),
             "reward": row(rewards.sum(1))},
            float(ppo.explained_variance(values, returns, mask)))


def micro_step(mb: rollout.Rollouts, m: Models, cfg: PPOConfig, scale: float) -> dict:
    qr, am, P = mb.query_responses, mb.attention_mask, mb.context_length
    mask = mb.extra["train_mask"]
    new_logp, entropy = response_logprobs(m.policy, qr, am, P, cfg.temperature, with_entropy=True)
    new_values = m.critic(qr, am, P)  # (B, R)
    pg_loss, clipfrac, approx_kl = ppo.policy_loss(new_logp, mb.extra["logprobs"],
                                                   mb.extra["advantages"], mask, cfg.clip_coef)
    vf_loss, vf_clipfrac = ppo.value_loss(new_values, mb.extra["values"], mb.extra["returns"],
                                          mask, cfg.vf_clip_coef)
    ent = ppo.masked_mean(entropy, mask)
    loss = pg_loss + cfg.vf_coef * vf_loss
    if cfg.ent_coef:
        loss = loss - cfg.ent_coef * ent
    (loss * scale).backward()
    return {"pg_loss": pg_loss.item(), "vf_loss": vf_loss.item(), "clipfrac": clipfrac.item(),
            "approx_kl": approx_kl.item(), "vf_clipfrac": vf_clipfrac.item(),
            "entropy": ent.item()}


def ppo_update(b: rollout.Rollouts, m: Models, optimizers, cfg: PPOConfig, d, step: int,
               local_mini: int) -> dict:
    """7. Epochs × minibatches (one optimizer step each) × micro-batches (accumulated)."""
    stats, n_micro = defaultdict(list), local_mini // cfg.micro_batch_size
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
    for epoch in range(cfg.num_ppo_epochs):
        g = torch.Generator().manual_seed(rollout.step_seed(cfg.seed, step, d.rank, -1 - epoch))
        perm = torch.randperm(len(b), generator=g)
        for start in range(0, len(b), local_mini):
            for s in range(start, start + local_mini, cfg.micro_batch_size):
                mb = b.subset(perm[s: s + cfg.micro_batch_size])
                for k, v in micro_step(mb, m, cfg, 1.0 / n_micro).items():
                    stats[k].append(v)
            distributed.all_reduce_grads(d, m.policy, m.critic)
            for name, net in (("grad_norm", m.policy), ("value_grad_norm", m.critic)):
                norm = torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm)
                stats[name].append(float(norm))
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
    return {k: sum(v) / len(v) for k, v in stats.items()}


# ---------------------------------------------------------------- the run

def train_ppo(cfg: PPOConfig) -> int:
    cfg.validate()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    device = pick_device(cfg.device, cfg.torch_threads)
    d = distributed.init_from_env(device.type)
    if d.enabled and device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    closers: list = []  # what _run opened, closed in reverse whatever happens
    try:
        return _run(cfg, d, device, closers)
    except RMError as e:
        print(f"policy-trainer ppo: error: {e}", file=sys.stderr)
        return 1
    finally:
        for close in reversed(closers):
            close()
        distributed.shutdown(d)


def _run(cfg: PPOConfig, d, device, closers: list) -> int:
    local_batch, local_mini = cfg.local_sizes(d.world_size)
    out, ckpt_root = Path(cfg.out), Path(cfg.out) / "checkpoints"
    resume_from = checkpoint.find_resume_point(out, cfg.resume, fresh_if_none=True)

    # 0. models (policy, frozen reference, critic), prompts, the RM connection
    m = load_models(cfg, resume_from, device)
    prompts = load_prompts(cfg, m)
    check_policy_head(cfg, m, prompts, device)
    scorer, mode, norm = connect_rm(cfg, m)
    closers.append(scorer.close)
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * len(prompts.ids) / cfg.batch_size)

    # 0'. optimizers, lr schedules, KL controller; on resume their state, RNG and prompt cursor
    stateful = build_optimizers(cfg, m, total_steps)
    policy_opt, value_opt = stateful["optimizer"], stateful["value_optimizer"]
    policy_sched, value_sched = stateful["scheduler"], stateful["value_scheduler"]
    kl_ctl = stateful["kl_controller"]
    step = cursor = 0
    if resume_from is not None:
        state = checkpoint.load_state(resume_from)
        if state["data_sha256"] != prompts.sha256:
            raise UserError(f"{cfg.prompts} changed since the checkpoint; "
                            "resume needs the same prompts")
        step, cursor = checkpoint.restore(state, stateful), state["cursor"]
        log.info("resumed from %s (step %d)", resume_from, step)
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        step_log = StepLog(out, step if resume_from else None, cfg.tensorboard)
        closers.append(step_log.close)
        step_log.write({"event": "start", "step": step, "total_steps": total_steps,
                        "prompts": len(prompts.ids), "world_size": d.world_size, "rm_input": mode})
        metrics = PPOMetrics()
        closers.append(metrics.close)
        if cfg.metrics_port is not None:
            log.info("metrics on http://%s:%d/metrics", cfg.metrics_host,
                     metrics.serve(cfg.metrics_port, cfg.metrics_host))

    def save(step: int) -> None:
        distributed.check_in_sync(d, m.policy, m.critic)
        if d.is_main:
            state = checkpoint.trainer_state(step, stateful, cursor=cursor,
                                             config=dataclasses.asdict(cfg),
                                             data_sha256=prompts.sha256)
            checkpoint.save_checkpoint(ckpt_root, step, PolicyAndValue(m.policy, m.critic),
                                       m.tokenizer, state, cfg.keep_checkpoints)
        distributed.barrier(d)

    bar = progress_bar(total_steps, step, "ppo", d.is_main and cfg.progress)
    retries_seen = 0
    while step < total_steps:
        t0, timer = time.perf_counter(), PhaseTimer(device)
        rows = batch_indices(len(prompts.ids), cursor, cfg.batch_size, cfg.seed)
        rows = rows[d.rank * local_batch: (d.rank + 1) * local_batch]  # this rank's share

        # 1-4. generate, stream to the RM, reference log-probs and values, collect the scores
        b, scores, got = generate_and_score(step, rows, m, prompts, scorer, mode, cfg, d,
                                            device, timer)
        counts = distributed.sum_across(d, {
            "rollouts": len(b), "scored": len(got.results), "failed_samples": len(got.failed),
            "rm_truncated": sum(r.truncated for r in got.results.values()),
            "rm_retries": scorer.retries})
        if counts["failed_samples"] > cfg.max_failed_fraction * counts["rollouts"]:
            raise RMError(f"step {step + 1}: {int(counts['failed_samples'])} of "
                          f"{int(counts['rollouts'])} rollouts failed to score "
                          f"(> --max-failed-fraction {cfg.max_failed_fraction})")

        # 5-6. rewards with the KL penalty, GAE, whitening
        kl_coef, lr = kl_ctl.value, policy_sched.get_last_lr()[0]
        sums, ev = advantages(b, scores, kl_coef, norm, cfg)
        sums = distributed.sum_across(d, sums)

        # 7. PPO epochs × minibatches (skipped, never zero-filled, if nothing was scored)
        with timer("train"):
            train = (ppo_update(b, m, (policy_opt, value_opt), cfg, d, step, local_mini)
                     if sums["n_valid"] > 0 else {})
        policy_sched.step()
        value_sched.step()

        # 8. β, logs, checkpoint
        n = max(sums["n_valid"], 1.0)
        kl_ctl.update(sums["kl"] / n, cfg.batch_size)
        step, cursor = step + 1, cursor + cfg.batch_size
        local = {**train, "explained_variance": ev,
                 "response_length": float(b.lengths.float().mean()),
                 "eos_fraction": float(b.ended.float().mean()),
                 "rm_latency": sum(got.latencies) / max(len(got.latencies), 1),
                 **{f"time/{p}": s for p, s in timer.seconds.items()},
                 "time/step": time.perf_counter() - t0}
        record = {"step": step, "score": sums["score"] / n,
                  "score_std": math.sqrt(max(sums["score_sq"] / n - (sums["score"] / n) ** 2, 0)),
                  **{k: sums[k] / n
                     for k in ("kl", "kl_k1", "kl_k3", "non_score_reward", "reward")},
                  "kl_coef": kl_coef, "lr": lr, **distributed.mean_across(d, local),
                  **{k: int(v) for k, v in counts.items()}}
        if d.is_main:
            step_log.write(record)
            step_log.write_rollouts(rollout_texts(b, scores, step, cfg.log_rollouts, m, prompts))
            metrics.observe(record, got.latencies, record["rm_retries"] - retries_seen)
            retries_seen = record["rm_retries"]
            bar.update(1)
            bar.set_postfix(score=f"{record['score']:.3f}", kl=f"{record['kl']:.3f}")
            if bar.disable and cfg.log_every and step % cfg.log_every == 0:
                log.info("step %d/%d score %.4f kl %.4f beta %.4g entropy %.3f len %.1f "
                         "failed %d retries %d | generate %.2fs score %.2fs reference %.2fs "
                         "train %.2fs", step, total_steps, record["score"], record["kl"],
                         kl_coef, record.get("entropy", math.nan), record["response_length"],
                         record["failed_samples"], record["rm_retries"],
                         *(record[f"time/{p}"] for p in PHASES))
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            save(step)
    bar.close()

    # 9. final checkpoint and model
    if checkpoint.latest_checkpoint(ckpt_root) != ckpt_root / f"step-{step}":
        save(step)
    if d.is_main:
        PolicyAndValue(m.policy, m.critic).save_pretrained(out)
        m.tokenizer.save_pretrained(out)
        log.info("wrote the policy to %s (critic in %s)", out, out / "value")
    return 0
