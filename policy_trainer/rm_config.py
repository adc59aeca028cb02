"""``TrainConfig``: every setting of ``policy-trainer rm`` (``rm-server train``), one docstring
each (they are the ``--help``); the training itself is ``rm_train.py``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from policy_trainer import rm_ensemble
from policy_trainer.data import BadLinePolicy
from policy_trainer.optim import Schedule
from policy_trainer.scaling import ScaleConfig


@dataclass
class TrainConfig(ScaleConfig):
    data: str
    """Preference data: JSONL, a Parquet file or a saved `datasets` directory; records
    {prompt, chosen, rejected[, margin]}, {chosen, rejected} (implicit prompt), chat message
    lists, or {prompt, ranking}."""
    base: str
    """Base checkpoint: a causal LM (a scalar head is added) or a 1-label sequence-classification
    model."""
    out: str
    """Output directory: the servable checkpoint, stats, logs and plots (the resumable
    checkpoints go to --checkpoint-dir)."""
    eval_data: str | None = None
    """Separate preference data for evaluation (default: hold out --eval-fraction of --data)."""
    eval_fraction: float = 0.05
    """Fraction of --data lines held out for evaluation when --eval-data is not given."""
    max_length: int | None = None
    """Maximum tokens per sequence (default: the base's limit, at most its position table)."""
    recipe: str | None = None
    """Scoring recipe: how pairs become token ids (rm-server, trl, trl-grpo, openrlhf,
    encoder-pair, or a JSON file); stored with the checkpoint (scoring_recipe.json) so that the
    server applies the same. Default: the base's stored recipe, encoder-pair for encoders (BERT,
    DeBERTa, ...), else rm-server."""
    truncation: Literal["left", "drop", "error"] = "left"
    """Over-long pairs: left keeps the end (the scored token) and counts them; drop skips them;
    error stops."""
    bad_lines: BadLinePolicy = "error"
    """Malformed lines: error refuses the file (listing line numbers); skip skips and counts
    them."""
    epochs: int = 1
    """Passes over the training pairs."""
    max_steps: int | None = None
    """Optimizer steps in all (overrides --epochs)."""
    batch_size: int = 32
    """Pairs per optimizer step."""
    micro_batch_size: int | None = None
    """Pairs per forward pass; gradients accumulate over batch_size / micro_batch_size passes."""
    lr: float = 1e-5
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norm weights)."""
    warmup_ratio: float = 0.05
    """Fraction of the steps with a linear learning-rate warm-up from 0."""
    schedule: Schedule = "cosine"
    """Learning-rate decay after warm-up (towards 0 at the last step for cosine and linear)."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0: off)."""
    use_margin: bool = True
    """Use each pair's optional margin m in −log σ(r_w − r_l − m)."""
    center_coef: float | None = None
    """Reward centering: add c·(r_w + r_l)² to the loss (0.01 is TRL's recommendation);
    default 0, or 0.01 for an ensemble (each member's free offset would read as disagreement)."""
    ensemble: int = 1
    """Members of a reward-model ensemble: K > 1 trains K heads on one backbone, each on its own
    bootstrap resample and head initialization, saved as one num_labels = K checkpoint marked as
    an ensemble (rm_ensemble.py); eval.json then reports the members' disagreement."""
    ensemble_bootstrap: bool = True
    """Ensembles: each member trains on its own bootstrap resample of the pairs
    (--no-ensemble-bootstrap: every member on every pair; only the head initializations differ)."""
    ensemble_aggregation: rm_ensemble.Aggregation = "mean"
    """Ensembles: the reward the server returns unless asked otherwise: the members' mean, their
    min, or uwo = mean − λ·std (stored in config.json)."""
    uncertainty_coef: float = 1.0
    """Ensembles: λ of uwo = mean − λ·std, stored with the checkpoint."""
    packed_forward: bool = True
    """Score a pair's shared prompt once, pack pairs instead of padding them, run the score head
    on the scored rows only (policy_trainer/rm_pack.py: same losses and gradients as the padded
    forward). Falls back to the padded forward where it does not apply (FSDP2, encoders,
    families not checked for it); --no-packed-forward: always padded."""
    eval_every: int = 0
    """Evaluate on the eval split every N steps (0: at the end of every epoch)."""
    eval_batch_size: int = 32
    """Pairs per forward pass when evaluating."""
    save_every: int = 500
    """Write a resumable checkpoint to --checkpoint-dir every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep (0: all)."""
    checkpoint_dir: str | None = None
    """Directory for the resumable checkpoints (step-N/: weights, optimizer, RNG; about 3x the
    model); default OUT.checkpoints beside OUT, or OUT/checkpoints for a run begun there."""
    resume: bool = False
    """Continue from the newest checkpoint in --checkpoint-dir."""
    seed: int = 0
    """Seed for the split, the data order and the head initialization."""
    disable_dropout: bool = True
    """Turn dropout off (common for reward models; makes steps deterministic)."""
    device: str = "auto"
    """Torch device: auto (cuda if available), cpu, cuda, cuda:1, ..."""
    threads: int | None = None
    """torch CPU threads (default: torch's choice)."""
    progress: bool = True
    """Show a progress bar (only when stderr is a terminal)."""
    log_every: int = 50
    """Print a progress line every N steps when the bar is not shown (0: never)."""

    @property
    def centering(self) -> float:
        """--center-coef, or its default: 0.01 for an ensemble, else 0."""
        if self.center_coef is not None:
            return self.center_coef
        return rm_ensemble.DEFAULT_CENTER_COEF if self.ensemble > 1 else 0.0
