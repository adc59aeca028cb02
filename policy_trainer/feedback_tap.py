"""Comparison pairs from PPO's own rollouts to the feedback service (``--feedback-url``; the
live loop, issue 20).

Each step, for ``--feedback-fraction`` of the step's prompts, a second response is sampled from
the current policy (its own seed, so the step's rollouts and RNG are untouched) and scored on the
RM; each such prompt gives a candidate pair (the step's rollout, the second response). Under
torchrun every rank samples for its own rollouts (:func:`candidates`: the sharded policy's
generation is a collective, so all ranks take part) and rank 0 gathers them. Of all the
step's candidates ``pair_select.select`` keeps the ``--feedback-budget`` the RM is least sure of,
and rank 0 sends them to the service with both rewards, the RM version and the policy step
through ``feedback.sender.PairSender``: a bounded buffer and a background thread, so a slow or dead
service never holds a step up. Pairs the service refuses (its queue is full, ``--max-queue``:
the cap) or that cannot be delivered are dropped and counted; the counts go into the step log
(``feedback_*``) and Prometheus (``ppo_feedback_pairs_total{outcome}``), and a failure streak
is logged once (feedback/sender.py).

The second responses cost one more generation and RM call for ``fraction × batch`` prompts
(timed as ``time/feedback``); they train nothing.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from feedback.client import FeedbackClient
from feedback.sender import COUNTS, PairSender
from policy_trainer import pair_select, rollout
from policy_trainer.experience import rm_samples, score_of

log = logging.getLogger("policy_trainer.feedback")


class FeedbackTap:
    def __init__(self, cfg, registry=None):
        self.cfg = cfg
        self.source = cfg.rm_client_id or f"ppo-{Path(cfg.out).resolve().name}"
        client = FeedbackClient(cfg.feedback_url, token_file=cfg.feedback_token_file,
                                timeout=cfg.feedback_timeout)
        self.sender = PairSender(client, max_buffer=cfg.feedback_buffer)
        self.offered = 0  # pairs selected and handed to the sender
        self._seen: dict[str, int] = {}  # counts already added to the Prometheus counter
        self._counter = None
        if registry is not None:
            from prometheus_client import Counter

            self._counter = Counter("ppo_feedback_pairs", "Comparison pairs for the feedback "
                                    "service by outcome: offered (selected), sent (queued), "
                                    "duplicates, refused (queue full), failed (service down "
                                    "or erroring), dropped (local buffer full)", ["outcome"],
                                    registry=registry)
            for outcome in ("offered", *COUNTS):
                self._counter.labels(outcome)

    def step(self, step: int, found: list[pair_select.Candidate], seconds: float = 0.0) -> dict:
        """Select and offer the pairs of step ``step`` (numbered as the step log numbers it,
        from 1) from ``found`` (:func:`candidates` of every rank); the step-log fields
        (``seconds``: the sampling's, for time/feedback)."""
        t0 = time.perf_counter()
        chosen = pair_select.select(found, self.cfg.feedback_budget)
        pairs = [pair_select.to_pair_json(c, step, c.rm_version, self.source) for c in chosen]
        if pairs:
            self.sender.offer(pairs)
            self.offered += len(pairs)
        counts = self.counts()
        if self._counter is not None:
            for key, n in counts.items():
                outcome = key.removeprefix("feedback_")
                self._counter.labels(outcome).inc(max(0, n - self._seen.get(outcome, 0)))
                self._seen[outcome] = n
        return {**counts, "feedback_candidates": len(found),
                "time/feedback": seconds + time.perf_counter() - t0}

    def counts(self) -> dict[str, int]:
        """Totals so far: offered, and the sender's sent / duplicates / refused / failed /
        dropped."""
        return {"feedback_offered": self.offered,
                **{f"feedback_{k}": v for k, v in self.sender.counts().items()}}

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for what was offered to be delivered (the loop does, before
        a refresh; a step never does)."""
        return self.sender.flush(timeout)

    def close(self) -> None:
        counts = self.sender.close(timeout=min(5.0, self.cfg.feedback_timeout * 2))
        log.info("feedback: %d pairs offered; %s", self.offered,
                 ", ".join(f"{k} {v}" for k, v in counts.items()))


def candidates(cfg, step: int, rank: int, rollouts, scores, scored, models, prompts, scorer,
               rm_input, device) -> list[pair_select.Candidate]:
    """This rank's candidate pairs of step ``step``: a second response for the chosen rows,
    scored on the RM."""
    rows = pair_select.chosen_rows(len(rollouts), cfg.feedback_fraction, cfg.seed, step)
    if not rows:
        return []
    gen = rollout.sampling_config(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                                  models.stop_ids, models.pad_id)
    index = [rollouts.prompt_index[j] for j in rows]
    seed = rollout.step_seed(cfg.seed, step, rank, 1_000_003)  # not a generation chunk's
    second = rollout.generate(models.nets.policy, [prompts.ids[i] for i in index], index, gen,
                              models.stop_ids, models.pad_id, seed, device)
    ids = [f"fb{step}-{rank}-{j}" for j in rows]
    scorer.submit(rm_samples(second, ids, rm_input, models, prompts))
    got = scorer.collect()
    out = []
    for k, j in enumerate(rows):
        a, b = scored.results.get(scored.ids[j]), got.results.get(ids[k])
        if a is None or b is None or math.isnan(float(scores[j])):
            continue
        out.append(pair_select.Candidate(
            prompt=prompts.texts[index[k]], response_a=decode(rollouts, j, models),
            response_b=decode(second, k, models), reward_a=float(scores[j]),
            reward_b=score_of(b, cfg), heads_a=tuple(a.head_scores),
            heads_b=tuple(b.head_scores), rm_version=b.version))
    return out


def decode(rollouts, j: int, models) -> str:
    response = rollouts.response[j, : int(rollouts.lengths[j])].tolist()
    return models.tokenizer.decode(response, skip_special_tokens=True)

