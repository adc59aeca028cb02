"""``policy-trainer sft``: supervised fine-tuning on demonstrations, stage 1 of RLHF.

Next-token cross-entropy on the response tokens only, the prompt masked out, with the EOS
appended to every response and trained on, so the policy learns to stop (Stiennon et al. 2020
§3.4; Ouyang et al. 2022 §3.5). The loss of an optimizer step is the mean over all target
tokens of its micro-batches: each micro-batch's summed loss is divided by the step's token
count, so gradient accumulation gives the gradient of one big batch (averaging per-micro-batch
means would over-weight short sequences). An empty prompt (an unconditional demonstration)
starts from the tokenizer's BOS, so its first response token is trained too
(``sft_data.empty_prompt_ids``).

    policy-trainer sft --data demos.jsonl --base DIR --out DIR [--max-steps N] [--resume] ...
    torchrun --nproc_per_node N -m policy_trainer.cli sft ...   (FSDP2 across N ranks)

Writes OUT/checkpoints/step-N/ (resumable), OUT/train_log.jsonl, and at the end the fine-tuned
model and tokenizer in OUT (``save_pretrained``: loads with AutoModelForCausalLM; with
``--lora-r`` the adapter merged in). ``--dtype``, ``--gradient-checkpointing``, ``--lora-*``
and sharding: ``scaling.py``. Under torchrun each rank trains on its share of every batch
(``--micro-batch-size`` x ``--grad-accum-steps`` examples); the loss is still divided by the
batch's target tokens over all ranks, so N ranks take the step one rank would.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from policy_trainer import checkpoint
from policy_trainer.data import batch_indices, max_sequence_length, read_demos, split_eval
from policy_trainer.device import pick_device
from policy_trainer.distributed import share_counted
from policy_trainer.errors import UserError
from policy_trainer.optim import build_optimizer
from policy_trainer.runlog import NullLog, RunLog, progress_bar
from policy_trainer.scaling import Run, ScaleConfig
from policy_trainer.sft_data import IGNORE_INDEX, Example, collate, encode_demos
from protos.encoding import Encoder

log = logging.getLogger("policy_trainer.sft")


@dataclass
class SFTConfig(ScaleConfig):
    data: str
    """Demonstrations JSONL: one {"prompt": str, "response": str} object per line."""
    base: str
    """Base causal LM directory (Hugging Face format, with its tokenizer)."""
    out: str
    """Output directory: final model + tokenizer, train_log.jsonl, checkpoints/step-N."""
    max_length: int = 512
    """Longest sequence in tokens (prompt + response + EOS); at most what the model takes."""
    truncation: Literal["left", "drop"] = "left"
    """Over-long examples: "left" cuts the prompt from its start and keeps the response whole
    (dropping the example if the response alone does not fit); "drop" drops them. Both counted."""
    eval_fraction: float = 0.05
    """Fraction of the demonstrations held out for the eval loss (0 for none)."""
    micro_batch_size: int = 8
    """Examples per forward/backward pass (on each rank under torchrun)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step (batch size = micro_batch_size * grad_accum_steps,
    times the ranks under torchrun)."""
    epochs: float = 1.0
    """Passes over the training split; ignored when --max-steps is set."""
    max_steps: int | None = None
    """Optimizer steps in total (sets the length of the lr schedule)."""
    lr: float = 2e-5
    """Peak learning rate of AdamW."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after the warm-up."""
    warmup_ratio: float = 0.03
    """Fraction of the steps spent warming the lr up linearly from 0."""
    min_lr_ratio: float = 0.0
    """Learning rate at the end of the decay, as a fraction of --lr."""
    weight_decay: float = 0.0
    """AdamW weight decay, applied to matrices only (not to biases and norms, as in nanoGPT)."""
    adam_beta1: float = 0.9
    """AdamW β1."""
    adam_beta2: float = 0.999
    """AdamW β2."""
    adam_eps: float = 1e-8
    """AdamW ε."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 to turn clipping off)."""
    eval_every: int = 100
    """Evaluate every N steps (0: only at the end)."""
    checkpoint_every: int = 500
    """Write a resumable checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many checkpoints to keep (0 keeps all)."""
    resume: bool = False
    """Continue from the latest checkpoint in OUT/checkpoints (start fresh if there is none)."""
    strict: bool = False
    """Make a malformed data line fatal instead of reporting and skipping it."""
    progress: bool = True
    """Show a progress bar (only when stderr is a terminal)."""
    log_every: int = 10
    """Log a line every N steps when the progress bar is off."""
    seed: int = 0
    """Seed for the eval split, data order and torch."""
    device: str = "auto"
    """torch device ("auto": cuda if available, else cpu)."""
    torch_threads: int | None = None
    """torch.set_num_threads for CPU runs (default: torch's choice)."""

    @property
    def batch_size(self) -> int:
        """Examples per optimizer step on one rank."""
        return self.micro_batch_size * self.grad_accum_steps

    def validate(self) -> None:
        positive = ("max_length", "micro_batch_size", "grad_accum_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise UserError("--eval-fraction must be in [0, 1)")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError("--max-steps must be >= 1")
        if self.max_steps is None and self.epochs <= 0:
            raise UserError("--epochs must be > 0")
        if not 0.0 <= self.warmup_ratio <= 1.0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserError("--warmup-ratio and --min-lr-ratio must be in [0, 1]")


# ---------------------------------------------------------------- pieces

def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy of every target token: position t predicts token t+1."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()  # (B, T-1, V); fp32 for a stable log-softmax
    targets = batch["labels"][:, 1:]  # (B, T-1)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def num_targets(examples: list[Example]) -> int:
    return sum(sum(1 for t in ex.labels[1:] if t != IGNORE_INDEX) for ex in examples)


def micro_batches(examples: list[Example], size: int, pad_id: int, device):
    for i in range(0, len(examples), size):
        yield {k: v.to(device) for k, v in collate(examples[i:i + size], pad_id).items()}


def train_step(model, optimizer, examples: list[Example], cfg: SFTConfig, pad_id: int,
               run: Run) -> tuple[float, float, int]:
    """One optimizer step over ``examples`` (all ranks' together; this rank trains on its
    share); returns (loss, grad_norm, target tokens)."""
    mine = run.share(examples)
    n_tokens = int(run.total({"n": num_targets(mine)})["n"])
    total = 0.0
    for batch in micro_batches(mine, cfg.micro_batch_size, pad_id, run.device):
        loss_sum = token_loss_sum(model, batch)
        # FSDP averages gradients over ranks: times world_size, the step's gradient is the
        # gradient of (the summed loss of every rank) / (every rank's target tokens)
        (loss_sum * (run.dist.world_size / n_tokens)).backward()
        total += loss_sum.item()  # CPU-GPU sync, once per micro-batch
    grad_norm = run.clip_grad_norm(model.parameters(), cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return run.total({"loss": total})["loss"] / n_tokens, grad_norm, n_tokens


@torch.no_grad()
def evaluate(model, examples: list[Example], cfg: SFTConfig, pad_id: int, run: Run) -> float:
    """Mean loss per target token; under torchrun each rank scores its share of the
    micro-batches (a rank short of one runs a padding batch and leaves it out)."""
    model.eval()
    batches = list(micro_batches(examples, cfg.micro_batch_size, pad_id, run.device))
    total = 0.0
    for batch, counted in share_counted(run.dist, batches):
        loss_sum = token_loss_sum(model, batch).item()
        total += loss_sum if counted else 0.0
    model.train()
    return run.total({"loss": total})["loss"] / num_targets(examples)


# ---------------------------------------------------------------- setup

def load_tokenizer_and_model(base: str, weights: Path | None, device):
    """The tokenizer from ``base``, the causal LM from ``weights`` (default ``base``), fp32."""
    if not Path(base).is_dir():
        raise UserError(f"--base {base}: no such directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(weights or base, dtype=torch.float32)
    except OSError as e:
        raise UserError(f"cannot load a causal LM and tokenizer from {weights or base}: "
                        f"{str(e).splitlines()[0]}") from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"the tokenizer in {base} has no EOS token: SFT appends one to responses")
    return tokenizer, model.to(device)


def load_examples(cfg: SFTConfig, tokenizer, vocab_size: int, max_length: int | None = None):
    """(examples, counts for the log, sha256 of the file); ``max_length`` defaults to the
    config's."""
    demos = read_demos(cfg.data, strict=cfg.strict)
    demos.report(log)
    encoder = Encoder(tokenizer, max_length or cfg.max_length, vocab_size)
    examples, stats = encode_demos(encoder, demos.records, tokenizer.eos_token_id, cfg.truncation)
    if stats.dropped:
        log.warning("%s: dropped %d over-long examples (lines %s%s)", cfg.data, stats.dropped,
                    stats.dropped_lines[:10], "..." if stats.dropped > 10 else "")
    if stats.truncated:
        log.info("%s: cut the prompt of %d over-long examples from the left",
                 cfg.data, stats.truncated)
    if stats.no_context:
        log.warning("%s: %d examples have an empty prompt and the tokenizer has no BOS token: "
                    "their first response token has nothing to be predicted from and is not "
                    "trained (give them a prompt, or use a tokenizer with a BOS)",
                    cfg.data, stats.no_context)
    if not examples:
        raise UserError(f"{cfg.data}: no usable demonstrations")
    counts = {"records": len(demos.records), "bad_lines": len(demos.bad),
              "blank_lines": demos.blank,
              "dropped": stats.dropped, "truncated": stats.truncated}
    return examples, counts, demos.sha256


def check_resume(state: dict, cfg: SFTConfig, data_sha256: str) -> None:
    if state["data_sha256"] != data_sha256:
        raise UserError(f"{cfg.data} changed since the checkpoint was written; "
                        "resume needs the same data")
    ignore = {"resume", "progress", "log_every", "torch_threads", "device",
              "gradient_checkpointing"}
    changed = {k: (v, getattr(cfg, k)) for k, v in state["config"].items()
               if k not in ignore and getattr(cfg, k, v) != v}
    if changed:
        log.warning("resuming with a changed config (checkpoint -> now): %s", changed)


# ---------------------------------------------------------------- the run

def train_sft(cfg: SFTConfig) -> int:
    cfg.validate()
    hf_logging.disable_progress_bar()  # per-checkpoint "Writing model shards" bars drown the log
    run = Run(cfg, pick_device(cfg.device, cfg.torch_threads))
    main = run.dist.is_main
    torch.manual_seed(cfg.seed)
    out, ckpt_root = Path(cfg.out), Path(cfg.out) / "checkpoints"
    resume_from = checkpoint.find_resume_point(out, cfg.resume, fresh_if_none=True)

    # 1. model, tokenizer and data (tokenized with the RM's Encoder, at most the model's length)
    tokenizer, model = load_tokenizer_and_model(cfg.base, run.weights_from(resume_from, cfg.base),
                                                run.device)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:  # padding is masked by attention_mask and labels, so any id will do
        pad_id = tokenizer.eos_token_id
    max_length = min(cfg.max_length, max_sequence_length(model.config, tokenizer))
    if max_length < cfg.max_length:
        log.info("--max-length %d is more than the model takes: using %d",
                 cfg.max_length, max_length)
    examples, counts, data_sha256 = load_examples(cfg, tokenizer, model.config.vocab_size,
                                                  max_length)
    train_set, eval_set = split_eval(examples, cfg.eval_fraction, cfg.seed)
    batch_size = cfg.batch_size * run.dist.world_size
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * len(train_set) / batch_size)
    model = run.prepare(model, "CAUSAL_LM")  # checkpointing, LoRA, bf16, FSDP2 (scaling.py)

    # 2. optimizer, schedule and, on resume, their state, the RNG and the data cursor
    optimizer, scheduler = build_optimizer(
        model, total_steps, lr=cfg.lr, schedule=cfg.lr_schedule, warmup_ratio=cfg.warmup_ratio,
        min_lr_ratio=cfg.min_lr_ratio, weight_decay=cfg.weight_decay,
        betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    run.register("model", model, optimizer)
    stateful = run.stateful({"optimizer": optimizer, "scheduler": scheduler})
    step = cursor = 0
    if resume_from is not None:
        state = checkpoint.load_state(resume_from)
        check_resume(state, cfg, data_sha256)
        run.load_shards(resume_from)
        step, cursor = checkpoint.restore(state, stateful), state["cursor"]
        log.info("resumed from %s (step %d)", resume_from, step)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    train_log = (RunLog(out / "train_log.jsonl", step if resume_from else None) if main
                 else NullLog())
    train_log.write({"event": "start", "step": step, "total_steps": total_steps,
                     "n_train": len(train_set), "n_eval": len(eval_set),
                     "world_size": run.dist.world_size, **counts})

    def save(step: int) -> None:
        state = checkpoint.trainer_state(step, stateful, cursor=cursor,
                                         config=dataclasses.asdict(cfg), data_sha256=data_sha256)
        run.save_checkpoint(ckpt_root, step, model, tokenizer, state, cfg.keep_checkpoints)

    # 3. train: one optimizer step per batch of micro_batch_size * grad_accum_steps examples
    # on each rank
    model.train()
    bar = progress_bar(total_steps, step, "sft", cfg.progress and main)
    while step < total_steps:
        t0 = time.perf_counter()
        idx = batch_indices(len(train_set), cursor, batch_size, cfg.seed)
        lr = scheduler.get_last_lr()[0]
        loss, grad_norm, n_tokens = train_step(model, optimizer, [train_set[i] for i in idx],
                                               cfg, pad_id, run)
        scheduler.step()
        step, cursor = step + 1, cursor + len(idx)
        train_log.write({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                         "tokens": n_tokens, "epoch": cursor / len(train_set),
                         "step_s": time.perf_counter() - t0})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if main and bar.disable and cfg.log_every and step % cfg.log_every == 0:
            log.info("step %d/%d loss %.4f lr %.2e", step, total_steps, loss, lr)
        if eval_set and cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
            eval_loss = evaluate(model, eval_set, cfg, pad_id, run)
            train_log.write({"step": step, "eval_loss": eval_loss})
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            save(step)
    bar.close()

    # 4. final eval, checkpoint and model
    if eval_set:
        eval_loss = evaluate(model, eval_set, cfg, pad_id, run)
        train_log.write({"step": step, "eval_loss": eval_loss})
        if main:
            log.info("eval loss %.4f after %d steps", eval_loss, step)
    if checkpoint.latest_checkpoint(ckpt_root) != ckpt_root / f"step-{step}":
        save(step)
    run.save_pretrained(model, out)  # gathered to rank 0, the LoRA adapter merged in
    if main:
        tokenizer.save_pretrained(out)
        log.info("wrote the fine-tuned model to %s", out)
    train_log.close()
    run.close()
    return 0
