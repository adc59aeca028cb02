"""The settings of ``policy-trainer refresh`` (refresh.py) and of the refreshes of
``policy-trainer loop`` (loop.py): one docstring each, their ``--help``.

``RefreshOptions`` holds what both take (keyword-only, so ``LoopConfig`` can add them to
``PPOConfig``); ``RefreshConfig`` adds what the loop supplies itself (the feedback service and
the current RM come from its PPO flags and from the previous refresh).
"""

from __future__ import annotations

from dataclasses import dataclass

from policy_trainer.errors import UserError


@dataclass(kw_only=True)
class RefreshOptions:
    replay: str | None = None
    """The original preference JSONL to replay beside the fresh judgments (without it the RM
    trains on fresh judgments alone and may forget what it knew)."""
    replay_ratio: float = 4.0
    """Replayed original lines per fresh training judgment."""
    heldout_fraction: float = 0.25
    """Fraction of the labeled pairs held out to evaluate candidate against current."""
    min_judgments: int = 4
    """Fewer training judgments than this: no candidate is trained (logged)."""
    refresh_lr: float = 3e-4
    """Learning rate of the continued RM training."""
    refresh_epochs: int = 2
    """Passes over the fresh judgments and the replay."""
    refresh_batch_size: int = 16
    """Pairs per optimizer step of the continued training."""
    refresh_threads: int | None = None
    """torch CPU threads of the RM training and evaluation (default: torch's choice)."""
    refresh_device: str = "auto"
    """Torch device of the RM training and evaluation."""
    force: bool = False
    """Promote the candidate whatever its evaluation."""
    rm_admin: str | None = None
    """The reward server's address for the admin API (LoadVersion); default: the (first) RM
    address. Versions are per server: one address."""
    admin_token_file: str | None = None
    """File holding the reward server's admin token (its --admin-token-file)."""
    label_prefix: str = "refresh-"
    """A promoted candidate's version label: this plus the refresh's number."""

    def validate_options(self) -> None:
        if not 0.0 < self.heldout_fraction < 1.0:
            raise UserError("--heldout-fraction must be in (0, 1)")
        if self.replay_ratio < 0 or self.min_judgments < 0:
            raise UserError("--replay-ratio and --min-judgments must be >= 0")
        if self.refresh_lr <= 0 or self.refresh_epochs < 1 or self.refresh_batch_size < 1:
            raise UserError("--refresh-lr must be > 0, --refresh-epochs and "
                            "--refresh-batch-size >= 1")
        if self.admin_token_file is None:
            raise UserError("--admin-token-file: promoting a candidate needs the reward "
                            "server's admin token (rm-server serve --admin-token-file)")


@dataclass(kw_only=True)
class RefreshConfig(RefreshOptions):
    feedback_url: str
    """The feedback service holding the judgments, e.g. http://127.0.0.1:50055."""
    current: str
    """The reward model checkpoint the server serves now: the candidate continues from it."""
    out: str
    """Output directory: refresh-N/ per refresh, refresh_log.jsonl (one line per decision)."""
    feedback_token_file: str | None = None
    """File holding the feedback service's bearer token."""
    feedback_timeout: float = 30.0
    """Seconds per call to the feedback service."""
    eval_after: int = 0
    """Evaluate only on held-out judgments with a sequence number above this (the loop passes
    the last one of its previous refresh: the policy's current samples)."""
    policy_step: int | None = None
    """The policy step the refresh happens at (recorded in the log)."""
    seed: int = 0
    """Seed of the held-out split, the replay draw and the training."""

    def validate(self) -> None:
        self.validate_options()
        if self.rm_admin is None:
            raise UserError("--rm-admin: the reward server to load a promoted candidate into")
