"""``policy-trainer loop``: the live RLHF loop in one command (issue 20).

    policy-trainer loop --policy ./sft --rm 127.0.0.1:50051 --prompts prompts.jsonl --out ./run \
        --max-steps 24 --feedback-url http://127.0.0.1:50055 --rm-model ./rm \
        --replay prefs.jsonl --admin-token-file admin.token --refresh-every 6

PPO (every ``policy-trainer ppo`` flag) sends pairs of its own responses to the feedback service
(feedback_tap.py) while labelers answer them; every ``--refresh-every`` steps, in the same
process, between two steps:

1. wait up to ``--label-wait`` seconds for what was sent to be delivered and labeled (the
   service's queue empty, no lease open): labels that come later count at the next refresh;
2. refresh (refresh.py): fresh judgments + replay → a candidate from the current RM, evaluated
   against it on held-out fresh judgments, loaded into the reward server as its new default
   version when at least as good (OUT/refresh/refresh_log.jsonl says why, each time);
3. PPO goes on: its next chunks are scored by whatever the server's default is (the swap is
   the server's, between two batches; the step log records an ``rm_version_change``).

The policy never stops being the run's: PPO runs in this process from start to end (a resumed
loop resumes PPO from its checkpoint with ``--resume``; refreshes then continue from
``--rm-model``, so pass the last promoted candidate there). One process only (no torchrun).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from feedback.client import FeedbackClient
from feedback.errors import FeedbackError
from policy_trainer.errors import UserError
from policy_trainer.ppo_config import PPOConfig
from policy_trainer.refresh import refresh_once
from policy_trainer.refresh_config import RefreshConfig, RefreshOptions
from rm_client import parse_targets

log = logging.getLogger("policy_trainer.loop")


@dataclass(kw_only=True)
class LoopConfig(PPOConfig, RefreshOptions):
    rm_model: str
    """The reward model checkpoint the server at --rm serves at the start: the first refresh
    continues training it."""
    refresh_every: int = 6
    """PPO steps between refreshes (none after the last step)."""
    label_wait: float = 120.0
    """Seconds to wait before a refresh for the pairs sent to be labeled (queue empty)."""

    def validate(self) -> None:
        super().validate()
        self.validate_options()
        if not self.feedback_url:
            raise UserError("--feedback-url: the loop needs the feedback service")
        if self.max_steps is None:
            raise UserError("--max-steps: the loop's length, in PPO steps")
        if self.refresh_every < 1 or self.label_wait < 0:
            raise UserError("--refresh-every must be >= 1, --label-wait >= 0")
        if not (Path(self.rm_model) / "config.json").is_file():
            raise UserError(f"--rm-model {self.rm_model}: no checkpoint (config.json)")


def run_loop(cfg: LoopConfig) -> int:
    from policy_trainer.ppo_loop import train_ppo

    cfg.validate()
    return train_ppo(cfg, on_step=Refresher(cfg))


class Refresher:
    """The hook PPO calls after each step: a refresh every ``refresh_every`` steps."""

    def __init__(self, cfg: LoopConfig):
        self.cfg = cfg
        self.current = cfg.rm_model
        self.last_seq = 0  # the last judgment the previous refresh read
        self.count = 0
        options = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(RefreshOptions)}
        options["rm_admin"] = cfg.rm_admin or parse_targets(cfg.rm)[0]
        options["refresh_threads"] = cfg.refresh_threads or cfg.torch_threads
        self.options = options
        self.client = FeedbackClient(cfg.feedback_url, token_file=cfg.feedback_token_file,
                                     timeout=cfg.feedback_timeout)

    def __call__(self, step: int, tap) -> None:
        if step % self.cfg.refresh_every or step >= self.cfg.max_steps:
            return
        waited = self.wait_for_labels(tap)
        decision = refresh_once(RefreshConfig(
            **self.options, feedback_url=self.cfg.feedback_url, current=self.current,
            out=str(Path(self.cfg.out) / "refresh"),
            feedback_token_file=self.cfg.feedback_token_file, eval_after=self.last_seq,
            policy_step=step, seed=self.cfg.seed), index=self.count)
        self.count += 1
        self.current = decision.get("current", self.current)
        self.last_seq = decision.get("last_seq", self.last_seq)
        log.info("step %d: refresh %d (%.0f s waiting for labels): %s", step, self.count,
                 waited, "promoted" if decision.get("promote") else "kept the current RM")

    def wait_for_labels(self, tap) -> float:
        """Deliver what was offered, then wait until the service's queue is empty and no lease
        is open, at most ``label_wait`` s in all; the seconds waited."""
        t0 = time.monotonic()
        deadline = t0 + self.cfg.label_wait
        if tap is not None:
            tap.flush(self.cfg.label_wait)
        while time.monotonic() < deadline:
            try:
                stats = self.client.stats()
                if stats["queue_depth"] == 0 and stats["leased"] == 0:
                    break
            except FeedbackError as e:
                log.warning("feedback service: %s; refreshing with the labels it has", e)
                break
            time.sleep(0.5)
        return time.monotonic() - t0
