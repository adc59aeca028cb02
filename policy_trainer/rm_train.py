"""``policy-trainer rm`` (also ``rm-server train``): fit a reward model on preference pairs with
the Bradley-Terry loss.

    policy-trainer rm --data prefs.jsonl --base DIR --out DIR [--center-coef 0.01] [--resume] ...

1. data: parse the JSONL (prefs.py) and tokenize through the shared Encoder, the server's own
   tokenization; split off an eval set by source line (a ranking stays together).
2. model: ``AutoModelForSequenceClassification`` with one label from ``--base`` (rm_model.py:
   a causal-LM base gets a new scalar head), at most the model's max length.
3. AdamW (no decay on biases and norms), linear warm-up then cosine/linear decay (optim.py),
   gradient accumulation over length-sorted micro-batches (the sum over micro-batches equals
   the batch).
4. the loop: BT loss −log σ(r_w − r_l − m) + c·(r_w + r_l)² (bt_loss.py); eval on the eval
   split; checkpoints; one row per step in train_log.jsonl.
5. finish: a plain HuggingFace checkpoint in OUT (serve it, or from_pretrained it, as it is),
   reward_stats.json (mean/std of rewards on the eval split, for GetModelInfo), eval.json,
   eval_scores.jsonl (scores of the eval pairs as trained), and the plots eval.png and
   train_curves.png when matplotlib (the ``[plots]`` extra) is installed.

Data order is a pure function of (seed, step): epoch e visits the training pairs in
``data.epoch_order`` (seeded by (seed, e)) and step s takes the next ``batch_size`` of them,
batches staying within their epoch. A checkpoint (CHECKPOINTS/step-N/: model, tokenizer,
optimizer, scheduler, RNG states) is therefore enough for ``--resume`` to continue at step N+1
with the same batches and the same losses as an uninterrupted run. CHECKPOINTS is
``--checkpoint-dir``, by default OUT.checkpoints beside OUT (OUT holds only what is served); a
run begun by an earlier version, with OUT/checkpoints, resumes and saves there
(:func:`checkpoint.checkpoint_root`).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from policy_trainer import checkpoint
from policy_trainer.bt_loss import bradley_terry_loss
from policy_trainer.data import BadLinePolicy, epoch_batch, max_sequence_length, split_eval
from policy_trainer.device import pick_device
from policy_trainer.errors import UserError
from policy_trainer.optim import Schedule, build_optimizer
from policy_trainer.plots import plot_training, plots_missing
from policy_trainer.prefs import DataReport, EncodedPair, encode_pairs, read_preferences
from policy_trainer.rm_eval import one_line, write_report
from policy_trainer.rm_metrics import agreement, pairwise_accuracy
from policy_trainer.rm_model import (
    ensure_pad,
    forward_rewards,
    load_model,
    recipe_of,
    score_pairs,
    use_recipe,
)
from policy_trainer.runlog import NullLog, RunLog, progress_bar, read_log
from policy_trainer.scaling import Run, ScaleConfig
from protos.encoding import Encoder
from protos.recipes import save_recipe


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
    center_coef: float = 0.0
    """Reward centering: add c·(r_w + r_l)² to the loss (0.01 is TRL's recommendation)."""
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


# -- 1. data ------------------------------------------------------------------------------------

def load_data(cfg: TrainConfig, encoder: Encoder):
    """(train pairs, eval pairs, {"train": report[, "eval": report]})."""
    pairs, report = read_preferences(cfg.data, cfg.bad_lines)
    encoded = encode_pairs(pairs, encoder, report, cfg.truncation)
    reports = {"train": report}
    if cfg.eval_data:
        eval_pairs, eval_report = read_preferences(cfg.eval_data, cfg.bad_lines)
        eval_set = encode_pairs(eval_pairs, encoder, eval_report, cfg.truncation)
        return encoded, eval_set, {**reports, "eval": eval_report}
    train_set, eval_set = split_eval(encoded, cfg.eval_fraction, cfg.seed, lambda p: p.line)
    return train_set, eval_set, reports


def describe(r: DataReport, max_length: int) -> str:
    return (f"{r.path}: {r.lines} lines ({r.blank_lines} blank, {r.bad_lines} bad skipped), "
            f"{r.pairs} pairs ({r.rankings} rankings expanded), {r.truncated_pairs} truncated "
            f"to the last {max_length} tokens, {r.dropped_long_pairs} dropped as too long")


# -- 4. one step --------------------------------------------------------------------------------

def train_step(model, batch: list[EncodedPair], cfg: TrainConfig, micro: int, device) -> dict:
    """Forward/backward over length-sorted micro-batches; gradients sum to the batch mean."""
    n = len(batch)
    batch = sorted(batch, key=lambda p: p.length)
    loss_sum, correct, delta_sum = 0.0, 0.0, 0.0
    for s in range(0, n, micro):
        mb = batch[s:s + micro]
        r = forward_rewards(model, [p.chosen for p in mb] + [p.rejected for p in mb], device)
        r_w, r_l = r[:len(mb)], r[len(mb):]  # (m,), (m,)
        margin = torch.tensor([p.margin for p in mb], device=device) if cfg.use_margin else None
        loss = bradley_terry_loss(r_w, r_l, margin, cfg.center_coef, reduction="sum")
        (loss / n).backward()
        delta = (r_w - r_l).detach()
        loss_sum += loss.item()  # .item() syncs with the device; once per micro-batch is fine
        correct += agreement(delta).sum().item()
        delta_sum += delta.sum().item()
    return {"loss": loss_sum / n, "accuracy": correct / n, "delta_mean": delta_sum / n}


def eval_row(model, pairs: list[EncodedPair], cfg: TrainConfig, device) -> dict:
    model.eval()
    r_w, r_l = score_pairs(model, pairs, device, cfg.eval_batch_size)
    model.train()
    margin = torch.tensor([p.margin for p in pairs]) if cfg.use_margin else None
    return {"loss": bradley_terry_loss(r_w, r_l, margin, cfg.center_coef).item(),
            "accuracy": pairwise_accuracy(r_w, r_l).item(),
            "delta_mean": (r_w - r_l).mean().item()}


# -- the entry point ----------------------------------------------------------------------------

def train(cfg: TrainConfig) -> int:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the load report is replaced by our one-line summary
    hf_logging.disable_progress_bar()  # ours is the only bar
    out, base = Path(cfg.out), Path(cfg.base)
    if not (base / "config.json").is_file():
        raise UserError(f"no checkpoint at --base {base} (config.json missing)")
    if cfg.batch_size < 1 or (cfg.micro_batch_size or 1) < 1:
        raise UserError("--batch-size and --micro-batch-size must be at least 1")
    checkpoints = checkpoint.checkpoint_root(out, cfg.checkpoint_dir)
    resume_from = checkpoint.find_resume_point(out, cfg.resume, fresh_if_none=False,
                                               root=checkpoints)
    run = Run(cfg, pick_device(cfg.device, cfg.threads))  # --dtype, --lora-*, FSDP2: scaling.py
    device = run.device
    source = run.weights_from(resume_from, base)
    tokenizer = AutoTokenizer.from_pretrained(source)

    # 2. model (first: the Encoder needs its vocabulary and limits)
    model, new_head = load_model(source, cfg.seed, cfg.disable_dropout)
    pad_note = ensure_pad(tokenizer, model.config)
    limit = max_sequence_length(model.config, tokenizer)
    max_length = cfg.max_length or limit
    if max_length > limit:
        raise UserError(f"--max-length {max_length} exceeds the model's limit of {limit} tokens")
    tokenizer.model_max_length = max_length  # saved with the tokenizer: serve and eval read it
    if cfg.gradient_checkpointing:
        model.config.use_cache = False
    model = run.prepare(model, "SEQ_CLS").train()  # checkpointing, LoRA, bf16, FSDP2

    # 1. data
    recipe = use_recipe(model, cfg.recipe, source)  # training encodes and scores as served
    encoder = Encoder(tokenizer, max_length, model.config.get_text_config().vocab_size,
                      truncation="left", recipe=recipe)
    train_set, eval_set, reports = load_data(cfg, encoder)
    fingerprint = {"data": reports["train"].file.sha256[:16], "num_train_pairs": len(train_set),
                   "eval_data": reports["eval"].file.sha256[:16] if cfg.eval_data else None,
                   "batch_size": cfg.batch_size, "seed": cfg.seed, "recipe": recipe.name}
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    micro = cfg.micro_batch_size or cfg.batch_size
    for report in reports.values():
        print(f"data: {describe(report, max_length)}")
    print(f"split: {len(train_set)} train pairs, {len(eval_set)} eval pairs")
    print(f"model: {source} as {type(model).__name__}, "
          f"{'new scalar head' if new_head else 'its own head'}, {pad_note}, "
          f"max_length {max_length}, {sum(p.numel() for p in model.parameters()):,} "
          f"parameters on {device}")
    print(f"train: {total_steps} steps of {cfg.batch_size} pairs "
          f"({math.ceil(cfg.batch_size / micro)} micro-batch(es) of ≤ {micro}), "
          f"{steps_per_epoch} steps per epoch; resumable checkpoints in {checkpoints}")

    # 3. optimizer; resume
    opt, sched = build_optimizer(model, total_steps, lr=cfg.lr, schedule=cfg.schedule,
                                 warmup_ratio=cfg.warmup_ratio, weight_decay=cfg.weight_decay)
    run.register("model", model, opt)
    stateful = run.stateful({"optimizer": opt, "scheduler": sched})
    start = 0
    if resume_from is not None:
        state = checkpoint.load_state(resume_from)
        if state["data"] != fingerprint:
            raise UserError(f"--resume: the data, batch size or seed differ from the run in "
                            f"{out} (was {state['data']}, now {fingerprint})")
        run.load_shards(resume_from)
        start = checkpoint.restore(state, stateful)
        print(f"resume: from {source} at step {start}")
    out.mkdir(parents=True, exist_ok=True)
    train_log = (RunLog(out / "train_log.jsonl", start if resume_from else None)
                 if run.dist.is_main else NullLog())

    # 4. the loop
    bar = progress_bar(total_steps, start, "train", cfg.progress)
    t0 = time.time()
    for step in range(start, total_steps):
        epoch, batch_in_epoch = divmod(step, steps_per_epoch)
        batch = epoch_batch(len(train_set), cfg.batch_size, epoch, batch_in_epoch, cfg.seed)
        stats = run.mean(train_step(model, run.share([train_set[i] for i in batch]), cfg, micro,
                                    device))  # each rank its share; FSDP2 averages gradients
        grad_norm = run.clip_grad_norm(model.parameters(), cfg.max_grad_norm)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        train_log.write({"split": "train", "step": done, "epoch": epoch, **stats, "lr": lr,
                         "grad_norm": grad_norm, "time": round(time.time() - t0, 3)})
        end_of_epoch = batch_in_epoch == steps_per_epoch - 1
        due = done % cfg.eval_every == 0 if cfg.eval_every else end_of_epoch
        if eval_set and (due or done == total_steps):
            train_log.write({"split": "eval", "step": done, "epoch": epoch,
                             **eval_row(model, eval_set, cfg, device)})
        if done == total_steps or (cfg.save_every and done % cfg.save_every == 0):
            state = checkpoint.trainer_state(done, stateful, data=fingerprint,
                                             cursor=divmod(done, steps_per_epoch),
                                             config=asdict(cfg))
            run.save_checkpoint(checkpoints, done, model, tokenizer, state,
                                cfg.keep_checkpoints)
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['accuracy']:.2f}")
        if bar.disable and cfg.log_every and done % cfg.log_every == 0:
            print(f"step {done}/{total_steps} loss {stats['loss']:.4f} "
                  f"acc {stats['accuracy']:.3f} lr {lr:.2e}", file=sys.stderr)
    bar.close()
    train_log.close()

    # 5. finish
    finish(cfg, out, model, tokenizer, train_set, eval_set, device,
           {"data": {k: r.summary() for k, r in reports.items()}, "steps": total_steps,
            "max_length": max_length, "seconds": round(time.time() - t0, 1),
            "config": asdict(cfg)}, run)
    run.close()
    return 0


def finish(cfg, out: Path, model, tokenizer, train_set, eval_set, device, summary: dict,
           run: Run) -> None:
    """The servable checkpoint, normalization stats, evaluation and plots (every rank scores,
    rank 0 writes)."""
    model.eval()
    split = "eval" if eval_set else "train"
    pairs = eval_set or train_set
    r_w, r_l = score_pairs(model, pairs, device, cfg.eval_batch_size)  # the scores as trained
    rewards = torch.cat([r_w, r_l])
    stats = {"mean": rewards.mean().item(), "std": rewards.std(correction=0).item(),
             "num_samples": rewards.numel(), "split": split}
    run.save_pretrained(model, out)  # plain, the LoRA adapter merged in: servable as it is
    if not run.dist.is_main:
        return
    tokenizer.save_pretrained(out)
    save_recipe(out, recipe_of(model))  # scoring_recipe.json: the server applies the same
    (out / "reward_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    no_plots = plots_missing()  # the checkpoint is written: a missing extra must not crash
    metrics = write_report(out, pairs, r_w, r_l, bins=10, title=f"{out.name} ({split} split)",
                           extra={"split": split}, plot=no_plots is None)
    if no_plots is None:
        plot_training(read_log(out / "train_log.jsonl"), out / "train_curves.png")
    keys = ("pairs", "accuracy", "loss", "delta_mean", "delta_std", "ece")
    (out / "train_summary.json").write_text(json.dumps(
        {**summary, "eval": {k: metrics[k] for k in keys}, "reward_stats": stats},
        indent=2) + "\n")
    print(f"eval ({split} split): {one_line(metrics)}")
    pngs = "" if no_plots else "eval.png, train_curves.png, "
    print(f"wrote {out}: checkpoint, reward_stats.json, eval.json, {pngs}train_log.jsonl")
    if no_plots:
        print(no_plots, file=sys.stderr)
