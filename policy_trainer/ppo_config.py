"""``PPOConfig``: every setting of ``policy-trainer ppo``, one docstring each (they are the
``--help``). Sizes: ``batch_size`` and ``mini_batch_size`` count rollouts across all ranks;
``micro_batch_size`` and ``generation_batch_size`` are per rank. ``--dtype``, ``--lora-*``,
``--gradient-checkpointing`` and FSDP2 under torchrun: ``scaling.py`` and ``ppo_nets.py``.
Defaults follow the common
PPO-RLHF recipe (cleanrl's summarize_from_feedback_details, Huang et al. 2024): clip 0.2,
value clip 0.2, γ = 1, λ = 0.95, 4 epochs, k1 KL, Adam ε = 1e-5 and a linearly annealed
learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from policy_trainer.errors import UserError
from policy_trainer.scaling import ScaleConfig
from rm_client import AddressError, parse_targets


@dataclass
class PPOConfig(ScaleConfig):
    policy: str
    """Initial policy: a causal LM directory (Hugging Face format, with its tokenizer), e.g. the SFT
    output."""
    rm: str
    """Reward service address(es), HOST:PORT[,HOST:PORT...]: several are balanced round-robin with
    failover."""
    prompts: str
    """Prompts JSONL: one {"prompt": str} object per line."""
    out: str
    """Output directory: final policy (+ value/), train_log.jsonl, tensorboard/, checkpoints/."""
    reference: str | None = None
    """Frozen reference model for the KL penalty (default: --policy, the initial policy). Must share
    the policy's tokenizer. With --lora-r the reference is the --policy base, adapters off."""
    rm_input: Literal["auto", "tokens", "text", "chat"] = "auto"
    """What goes on the wire: auto = token ids when the server's tokenizer fingerprint equals ours,
    else text; chat = user/assistant messages."""
    rm_token_file: str | None = None
    """File holding the RM's bearer token (when the server runs with --auth-token-file)."""
    rm_version: str | None = None
    """Pin every reward of the run to one RM version: its weights hash or label (GetModelInfo's
    resident_versions). Default: whatever version the server's default is when each chunk is
    scored (its changes are logged as rm_version_change events). A pinned version the server
    does not hold at start is one line, exit 1; unloaded mid-run, its samples fail."""
    rm_client_id: str | None = None
    """x-client-id sent to the RM, for its fair scheduling and metrics (default: ppo-<out name>)."""
    rm_timeout: float = 60.0
    """Deadline in seconds of each attempt of an RM call (a chunk's ScoreStream included)."""
    rm_chunk_timeout: float = 120.0
    """Seconds one RM call may take in all, every attempt and backoff included: a chunk's stream
    (its unanswered samples then count as failed) and the model info at start. Bounds a hung RM
    (alive, not answering) to this per chunk, not --rm-timeout x --rm-max-attempts."""
    rm_max_attempts: int = 30
    """Attempts per RM call before its samples count as failed (transient errors back off; with
    the default backoff about 1.5 min of RM outage, e.g. a restart, is ridden out, within
    --rm-chunk-timeout)."""
    rm_backoff_max: float = 4.0
    """Longest backoff in seconds between RM retries (exponential with full jitter below it)."""
    rm_chunk_size: int = 64
    """Samples per ScoreRequest message on a stream."""
    rm_overlap: bool = True
    """Score each generation chunk while the next one is generated and the reference runs;
    --no-rm-overlap waits for every chunk's scores before going on (the strictly sequential
    pipeline, for benchmarks and debugging; same results)."""
    max_failed_fraction: float = 0.5
    """Stop the run (exit 1) when more than this fraction of a step's rollouts finally failed to
    score."""
    max_prompt_length: int = 256
    """Prompt tokens at most; longer prompts are cut from the left (counted)."""
    max_new_tokens: int = 64
    """Response tokens at most; a response that reaches it without EOS gets
    --missing-eos-penalty."""
    temperature: float = 1.0
    """Sampling temperature; log-probs for the PPO ratio and KL use the same temperature."""
    top_k: int = 0
    """Sample from the k most likely tokens only (0: off); the behaviour policy then differs
    from pi."""
    top_p: float = 1.0
    """Nucleus sampling (1.0: off). Makes the behaviour policy differ from pi."""
    stop_token: str | None = None
    """A single-token string (e.g. ".") that ends a response like EOS; it is kept and scored."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the RM score of a response that ended without EOS or the stop token."""
    batch_size: int = 64
    """Rollouts per PPO step, all ranks together."""
    mini_batch_size: int = 16
    """Rollouts per optimizer step, all ranks together."""
    micro_batch_size: int = 4
    """Rollouts per forward/backward pass on one rank (gradient accumulation up to the
    minibatch)."""
    generation_batch_size: int = 16
    """Prompts per generate call on one rank; each finished chunk is sent to the RM at once."""
    num_ppo_epochs: int = 4
    """Passes over each rollout batch."""
    max_steps: int | None = None
    """PPO steps in total (sets the lr schedule); default: --epochs passes over the prompts."""
    epochs: float = 1.0
    """Passes over the prompts; ignored when --max-steps is set."""
    kl_coef: float = 0.05
    """KL penalty coefficient beta (the initial one with --adaptive-kl)."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL estimator of the penalty: k1 = log pi - log pi_ref; k3 = e^r - r - 1, r = log
    pi_ref - log pi (>= 0)."""
    adaptive_kl: bool = False
    """Steer beta towards --kl-target (Ziegler et al. 2019) instead of keeping it fixed."""
    kl_target: float = 6.0
    """Target per-sequence KL (nats) of the adaptive controller."""
    kl_horizon: float = 10000.0
    """Horizon (rollouts) of the adaptive controller."""
    reward_aggregation: Literal["mean", "min", "uwo"] | None = None
    """An ensemble RM (results carry its members' scores): the reward to optimize, made here from
    the members: mean, min (worst case) or uwo = mean − λ·std (Coste et al. 2023). Default: the
    server's reward, its own default aggregation (ModelInfo.reward_aggregation)."""
    uncertainty_coef: float = 1.0
    """λ of --reward-aggregation uwo (mean − λ·std over the members)."""
    feedback_url: str | None = None
    """The feedback service (feedback-server serve), e.g. http://127.0.0.1:50055: send it pairs of
    this run's responses to label (feedback_tap.py). Default: off. Never blocks a step: pairs it
    cannot take are counted (feedback_* in the step log) and dropped."""
    feedback_token_file: str | None = None
    """File holding the feedback service's bearer token (its --auth-token-file)."""
    feedback_fraction: float = 0.1
    """Fraction of each step's prompts that get a second response, making a candidate pair."""
    feedback_budget: int = 4
    """Pairs sent per step at most: the candidates the RM is least sure of (smallest reward
    margin; an ensemble's members' disagreement on the order)."""
    feedback_timeout: float = 2.0
    """Seconds per call to the feedback service (on the sender's thread, never the step's)."""
    feedback_buffer: int = 1000
    """Pairs held locally while the service is slow; beyond it pairs are dropped (counted)."""
    normalize_reward: bool = False
    """(score - mean) / std with the server's reward statistics (ModelInfo) before penalties and
    clipping."""
    whiten_rewards: bool = False
    """Divide the per-token rewards by their std over the step's batch, every rank's rollouts
    together, keeping their mean (cleanrl's whiten_rewards)."""
    reward_clip: float | None = None
    """Clip the (normalized, penalized) score to [-c, c] before adding it to the last token."""
    gamma: float = 1.0
    """Discount factor."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    clip_coef: float = 0.2
    """Policy ratio clip epsilon."""
    vf_clip_coef: float = 0.2
    """Value clip: new values stay within this of the rollout values in the clipped loss."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss."""
    ent_coef: float = 0.0
    """Entropy bonus weight (subtracted from the loss)."""
    max_grad_norm: float = 1.0
    """Clip each network's gradient norm to this (0: measure only)."""
    lr: float = 3e-6
    """Peak learning rate of the policy's AdamW."""
    value_lr: float | None = None
    """Peak learning rate of the critic's AdamW (default: --lr)."""
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Decay after the warm-up, over PPO steps (both networks)."""
    warmup_ratio: float = 0.0
    """Fraction of the steps spent warming the lr up linearly."""
    min_lr_ratio: float = 0.0
    """Learning rate at the end of the decay, as a fraction of the peak."""
    weight_decay: float = 0.0
    """AdamW weight decay (matrices only)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-5
    """AdamW epsilon."""
    checkpoint_every: int = 100
    """Write a resumable checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many checkpoints to keep (0 keeps all)."""
    resume: bool = False
    """Continue from the latest checkpoint in OUT/checkpoints (start fresh if there is none)."""
    metrics_port: int | None = None
    """Serve ppo_ Prometheus metrics on this port (0 picks a free one; default: off)."""
    metrics_host: str = "127.0.0.1"
    """Address of the metrics endpoint."""
    tensorboard: bool = True
    """Write TensorBoard events to OUT/tensorboard (needs the tensorboard package)."""
    progress: bool = True
    """Show a progress bar (only when stderr is a terminal)."""
    log_rollouts: int = 64
    """Rollouts per step written as text (prompt, response, score) to OUT/rollouts.jsonl (rank 0's
    first N; 0: none)."""
    log_every: int = 1
    """Log a line every N steps when the progress bar is off."""
    strict: bool = False
    """Make a malformed prompts line fatal instead of reporting and skipping it."""
    seed: int = 0
    """Seed of the prompt order, sampling and minibatch order (per step, so resume is exact)."""
    device: str = "auto"
    """torch device: auto (cuda if available), cpu, cuda, cuda:N; under torchrun ranks use
    cuda:LOCAL_RANK."""
    torch_threads: int | None = None
    """torch.set_num_threads for CPU runs (default: torch's choice)."""

    def validate(self) -> None:
        try:
            parse_targets(self.rm)  # before any model loads: a bad address is a typo, not an outage
        except AddressError as e:
            raise UserError(f"--rm: {e}") from None
        if self.rm_timeout <= 0 or self.rm_chunk_timeout <= 0:
            raise UserError("--rm-timeout and --rm-chunk-timeout must be > 0")
        for name in ("batch_size", "mini_batch_size", "micro_batch_size", "generation_batch_size",
                     "num_ppo_epochs", "max_new_tokens", "max_prompt_length", "rm_chunk_size",
                     "rm_max_attempts"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError("--max-steps must be >= 1")
        if self.max_steps is None and self.epochs <= 0:
            raise UserError("--epochs must be > 0")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise UserError("--temperature must be > 0, --top-p in (0, 1], --top-k >= 0")
        if self.kl_coef < 0 or (self.adaptive_kl and (self.kl_target <= 0 or self.kl_horizon <= 0)):
            raise UserError("--kl-coef must be >= 0; --kl-target and --kl-horizon > 0")
        if self.uncertainty_coef < 0:
            raise UserError("--uncertainty-coef must be >= 0")
        if not 0.0 <= self.feedback_fraction <= 1.0 or self.feedback_budget < 0:
            raise UserError("--feedback-fraction must be in [0, 1], --feedback-budget >= 0")
        if self.feedback_timeout <= 0 or self.feedback_buffer < 1:
            raise UserError("--feedback-timeout must be > 0, --feedback-buffer >= 1")
        if self.reward_clip is not None and self.reward_clip <= 0:
            raise UserError("--reward-clip must be > 0")
        if not 0.0 <= self.max_failed_fraction <= 1.0:
            raise UserError("--max-failed-fraction must be in [0, 1]")
        if not 0.0 <= self.warmup_ratio <= 1.0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserError("--warmup-ratio and --min-lr-ratio must be in [0, 1]")

    def local_sizes(self, world_size: int) -> tuple[int, int]:
        """(rollouts per rank per step, rollouts per rank per minibatch), checked to divide."""
        if self.batch_size % world_size or self.mini_batch_size % world_size:
            raise UserError(f"--batch-size ({self.batch_size}) and --mini-batch-size "
                            f"({self.mini_batch_size}) must be multiples of the {world_size} ranks")
        local_batch, local_mini = self.batch_size // world_size, self.mini_batch_size // world_size
        if local_batch % local_mini:
            raise UserError("--batch-size must be a multiple of --mini-batch-size")
        if local_mini % self.micro_batch_size:
            raise UserError(f"--mini-batch-size per rank ({local_mini}) must be a multiple of "
                            f"--micro-batch-size ({self.micro_batch_size})")
        return local_batch, local_mini
