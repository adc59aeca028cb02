"""Steps 1-3 of a PPO step, chunk by chunk so the RM never holds the trainer up:

 1. generate: sample a chunk of responses, cut at EOS / the stop token (rollout.py);
 2. score: send the chunk to the RM on its own ScoreStream at once (scoring.py); the server
    scores chunk k while we generate chunk k+1 and run step 3 on chunk k;
 3. reference: log-probs of the frozen reference and the critic's values, for the chunk
    (ppo_nets.py); then, once every chunk is out, the rollout policy's log-probs, in the
    layout the first PPO epoch trains on (ppo_update.py: so the ratio starts at exactly 1),
    while the RM scores the last chunks; the first micro-batch's forward keeps its graph for
    step 7 (``ppo_update.Primed``: not run twice).

Then the scores are collected. A rollout the RM finally failed on gets a NaN score: the loop
masks it out of everything after (zero weight in every loss and in whitening) and counts it;
it is never given a reward. The score is the server's reward, or, with --reward-aggregation, the
aggregation of an ensemble's members that each result carries (rm_client/ensemble.py).
"""

from __future__ import annotations

import math

import torch

from policy_trainer import rollout
from policy_trainer.metrics import PhaseTimer
from policy_trainer.ppo_config import PPOConfig
from policy_trainer.ppo_nets import Nets
from policy_trainer.ppo_setup import Models, Prompts
from policy_trainer.ppo_update import rollout_logprobs
from policy_trainer.rollout import Rollouts
from policy_trainer.scoring import Collected, RMScorer, make_sample
from rm_client import ScoreResult
from rm_client.ensemble import aggregate, member_mean_std


def generate_and_score(step: int, prompt_rows: list[int], models: Models, prompts: Prompts,
                       scorer: RMScorer, rm_input: str, cfg: PPOConfig, rank: int,
                       device: torch.device, timer: PhaseTimer,
                       micro_batches: list[torch.Tensor]):
    """Steps 1-3 for this rank's ``prompt_rows``: (rollouts with log-probs and values,
    scores (B,) with NaN where the RM failed, what the RM answered, the first micro-batch's
    policy forward for ``ppo_update``). ``micro_batches``: the first PPO epoch's layout of
    the rollouts (row indices)."""
    gen_config = rollout.sampling_config(cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                                         cfg.top_p, models.stop_ids, models.pad_id)
    chunks, sample_ids, scored = [], [], Collected({}, {}, [])
    for chunk, start in enumerate(range(0, len(prompt_rows), cfg.generation_batch_size)):
        rows = prompt_rows[start: start + cfg.generation_batch_size]
        with timer("generate"):  # 1.
            seed = rollout.step_seed(cfg.seed, step, rank, chunk)
            rollouts = rollout.generate(models.nets.policy, [prompts.ids[i] for i in rows], rows,
                                        gen_config, models.stop_ids, models.pad_id, seed, device)
        ids = [f"s{step}-r{rank}-{start + j}" for j in range(len(rows))]
        scored.ids += ids  # rollout order: the RM version of each reward (rollout_texts)
        scorer.submit(rm_samples(rollouts, ids, rm_input, models, prompts))  # 2. answered later
        if not cfg.rm_overlap:  # sequential: wait for this chunk before doing anything else
            with timer("score"):
                scored.merge(scorer.collect())
        with timer("reference"):  # 3. while the RM scores
            reference_forwards(rollouts, models.nets, cfg.temperature)
        chunks.append(rollouts)
        sample_ids += ids
    rollouts = rollout.concat(chunks, models.pad_id)
    with timer("reference"):  # 3b. while the RM scores the last chunks
        primed = rollout_logprobs(rollouts, models.nets, cfg, micro_batches, prime=True)
    with timer("score"):  # only the time spent waiting on the RM
        scored.merge(scorer.collect())
    scores = torch.tensor([score_of(scored.results[i], cfg) if i in scored.results else math.nan
                           for i in sample_ids], dtype=torch.float32, device=device)  # (B,)
    return rollouts, scores, scored, primed


def score_of(result: ScoreResult, cfg: PPOConfig) -> float:
    """The reward PPO optimizes: the server's, or the members' aggregation asked for."""
    if cfg.reward_aggregation is None:
        return result.reward
    return aggregate(result.head_scores, cfg.reward_aggregation, cfg.uncertainty_coef)


def member_sums(results) -> dict[str, float]:
    """Sums over the results of their members' mean and std (for the step log; a result without
    members counts in neither)."""
    stats = [member_mean_std(r.head_scores) for r in results if len(r.head_scores) > 1]
    return {"member_scored": float(len(stats)), "member_mean": sum(m for m, _ in stats),
            "member_std": sum(s for _, s in stats)}


def rm_samples(rollouts: Rollouts, sample_ids: list[str], rm_input: str, models: Models,
               prompts: Prompts) -> list:
    """The RM's input for each rollout, in the form ``rm_input`` (tokens, text or chat)."""
    out = []
    for j, sample_id in enumerate(sample_ids):
        response = rollouts.response[j, : int(rollouts.lengths[j])].tolist()
        if response and response[-1] == models.eos_id:
            response = response[:-1]  # the RM is trained on text without EOS (protos.encoding)
        i = rollouts.prompt_index[j]
        out.append(make_sample(rm_input, sample_id, prompts.ids[i], response, prompts.texts[i],
                               models.tokenizer))
    return out


@torch.no_grad()
def reference_forwards(rollouts: Rollouts, nets: Nets, temperature: float) -> None:
    """3. Log-probs of the reference, and the critic's values: (B, R) each."""
    args = (rollouts.query_responses, rollouts.attention_mask, rollouts.context_length)
    rollouts.ref_logprobs = nets.ref_logprobs(*args, temperature=temperature)
    with nets.critic_scope():
        rollouts.values = nets.values(*args)


def rollout_texts(rollouts: Rollouts, scores: torch.Tensor, step: int, n: int, models: Models,
                  prompts: Prompts, versions: list[str | None] | None = None) -> list[dict]:
    """The first ``n`` rollouts as text for OUT/rollouts.jsonl (score null: the RM failed),
    each with the RM version that scored it (``versions``, in rollout order)."""
    out = []
    for j in range(min(n, len(rollouts))):
        response = rollouts.response[j, : int(rollouts.lengths[j])].tolist()
        score = float(scores[j])
        out.append({"step": step, "prompt": prompts.texts[rollouts.prompt_index[j]],
                    "response": models.tokenizer.decode(response, skip_special_tokens=True),
                    "score": None if math.isnan(score) else score,
                    "ended": bool(rollouts.ended[j]), "length": len(response),
                    **({"rm_version": versions[j]} if versions is not None else {})})
    return out
