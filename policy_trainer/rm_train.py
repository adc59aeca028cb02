"""``policy-trainer rm`` (also ``rm-server train``): fit a reward model on preference pairs with
the Bradley-Terry loss.

    policy-trainer rm --data prefs.jsonl --base DIR --out DIR [--center-coef 0.01] [--resume] ...

1. data: parse the JSONL (prefs.py) and tokenize through the shared Encoder, the server's own
   tokenization; split off an eval set by source line (a ranking stays together).
2. model: ``AutoModelForSequenceClassification`` with one label from ``--base`` (rm_model.py:
   a causal-LM base gets a new scalar head), at most the model's max length; with
   ``--ensemble K``, K heads, each member on its own bootstrap resample (rm_ensemble.py).
3. AdamW (fused where the parameters allow; no decay on biases and norms), linear warm-up then
   cosine/linear decay (optim.py), gradient accumulation over length-sorted micro-batches (the
   sum over micro-batches equals the batch).
4. the loop: each micro-batch's pairs packed, a pair's prompt once (rm_pack.py; the padded
   forward where that does not apply), BT loss −log σ(r_w − r_l − m) + c·(r_w + r_l)²
   (bt_loss.py); eval on the eval
   split; checkpoints; one row per step in train_log.jsonl.
5. finish: a plain HuggingFace checkpoint in OUT (serve it, or from_pretrained it, as it is),
   reward_stats.json (mean/std of rewards on the eval split, for GetModelInfo; an
   ensemble's: of the members' mean), eval.json (an ensemble's: with its members' disagreement),
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
from dataclasses import asdict
from pathlib import Path

import torch

from policy_trainer import checkpoint, rm_ensemble
from policy_trainer.bt_loss import bradley_terry_loss
from policy_trainer.data import epoch_batch, max_sequence_length, split_eval
from policy_trainer.device import pick_device
from policy_trainer.errors import UserError
from policy_trainer.optim import build_optimizer
from policy_trainer.plots import plot_training, plots_missing
from policy_trainer.prefs import EncodedPair, encode_pairs, read_preferences
from policy_trainer.rm_config import TrainConfig
from policy_trainer.rm_eval import ensemble_line, one_line, write_report
from policy_trainer.rm_metrics import agreement, ensemble_metrics, pairwise_accuracy
from policy_trainer.rm_model import (
    ensure_pad,
    forward_pair_heads,
    load_model,
    packed_forward_off,
    recipe_of,
    score_pairs,
    use_recipe,
)
from policy_trainer.runlog import NullLog, RunLog, progress_bar, read_log
from policy_trainer.scaling import Run
from protos.encoding import Encoder
from protos.recipes import save_recipe

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


# -- 4. one step --------------------------------------------------------------------------------

def train_step(model, batch: list[EncodedPair], cfg: TrainConfig, micro: int, device,
               counts: torch.Tensor | None = None) -> dict:
    """Forward/backward over length-sorted micro-batches; gradients sum to the batch mean.
    ``counts`` (n, K): an ensemble's bootstrap counts of the batch's pairs (rm_ensemble.py);
    accuracy and Δ are those of the members' mean."""
    n = len(batch)
    order = sorted(range(n), key=lambda i: batch[i].length)
    loss_sum, correct, delta_sum = 0.0, 0.0, 0.0
    for s in range(0, n, micro):
        idx = order[s:s + micro]
        mb = [batch[i] for i in idx]
        r_w, r_l = forward_pair_heads(model, [p.chosen for p in mb], [p.rejected for p in mb],
                                      device, cfg.packed_forward)  # (m, K), (m, K)
        margin = torch.tensor([p.margin for p in mb], device=device) if cfg.use_margin else None
        c = None if counts is None else counts[idx].to(device)  # (m, K)
        loss = rm_ensemble.member_loss(r_w, r_l, c, margin, cfg.centering)
        (loss / n).backward()
        delta = (r_w - r_l).detach().mean(1)  # (m,) the members' mean
        loss_sum += loss.item()  # .item() syncs with the device; once per micro-batch is fine
        correct += agreement(delta).sum().item()
        delta_sum += delta.sum().item()
    return {"loss": loss_sum / n, "accuracy": correct / n, "delta_mean": delta_sum / n}


def eval_row(model, pairs: list[EncodedPair], cfg: TrainConfig, device) -> dict:
    model.eval()
    r_w, r_l = score_pairs(model, pairs, device, cfg.eval_batch_size, heads=True)  # (N, K)
    model.train()
    margin = torch.tensor([p.margin for p in pairs])[:, None] if cfg.use_margin else None
    row = {"loss": bradley_terry_loss(r_w, r_l, margin, cfg.centering).item(),
           "accuracy": pairwise_accuracy(r_w.mean(1), r_l.mean(1)).item(),
           "delta_mean": (r_w - r_l).mean().item()}
    if cfg.ensemble > 1:  # the members' disagreement on Δ (offset-free)
        row["member_delta_std"] = (r_w - r_l).std(1, correction=0).mean().item()
    return row


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
    if cfg.ensemble < 1:
        raise UserError("--ensemble must be at least 1")
    model, new_head = load_model(source, cfg.seed, cfg.disable_dropout, cfg.ensemble)
    if cfg.ensemble > 1:  # config.json says so: the server's default aggregation, how made
        rm_ensemble.mark(model.config, cfg.ensemble, cfg.ensemble_aggregation,
                         cfg.uncertainty_coef, cfg.ensemble_bootstrap, cfg.centering, cfg.seed)
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
                   "batch_size": cfg.batch_size, "seed": cfg.seed, "recipe": recipe.name,
                   **({"ensemble": cfg.ensemble} if cfg.ensemble > 1 else {})}
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    micro = cfg.micro_batch_size or cfg.batch_size
    counts = (rm_ensemble.bootstrap_counts(len(train_set), cfg.ensemble, cfg.seed)
              if cfg.ensemble > 1 and cfg.ensemble_bootstrap else None)  # (N, K)
    for report in reports.values():
        print(f"data: {report.describe(max_length)}")
    print(f"split: {len(train_set)} train pairs, {len(eval_set)} eval pairs")
    print(f"model: {source} as {type(model).__name__}, "
          f"{'its own head' if not new_head else f'{cfg.ensemble} new head(s)'}, {pad_note}, "
          f"max_length {max_length}, {sum(p.numel() for p in model.parameters()):,} "
          f"parameters on {device}")
    off = packed_forward_off(model) if cfg.packed_forward else "--no-packed-forward"
    print("forward: " + ("packed pairs (a pair's prompt once, no padding, the head on the "
                         "scored rows)" if off is None else f"padded ({off})"))
    print(f"train: {total_steps} steps of {cfg.batch_size} pairs "
          f"({math.ceil(cfg.batch_size / micro)} micro-batch(es) of ≤ {micro}), "
          f"{steps_per_epoch} steps per epoch; resumable checkpoints in {checkpoints}")

    # 3. optimizer; resume
    opt, sched = build_optimizer(model, total_steps, lr=cfg.lr, schedule=cfg.schedule,
                                 warmup_ratio=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
                                 fused=True)  # where it applies (HF Trainer's default too)
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
        mine = run.share(batch)  # each rank its share; FSDP2 averages gradients
        stats = run.mean(train_step(model, [train_set[i] for i in mine], cfg, micro, device,
                                    None if counts is None else counts[mine]))
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
    r_w, r_l = score_pairs(model, pairs, device, cfg.eval_batch_size, heads=True)  # (N, K)
    rewards = torch.cat([r_w, r_l]).mean(1)  # the scores as trained (an ensemble: the mean)
    stats = {"mean": rewards.mean().item(), "std": rewards.std(correction=0).item(),
             "num_samples": rewards.numel(), "split": split}
    run.save_pretrained(model, out)  # plain, the LoRA adapter merged in: servable as it is
    if not run.dist.is_main:
        return
    tokenizer.save_pretrained(out)
    save_recipe(out, recipe_of(model))  # scoring_recipe.json: the server applies the same
    (out / "reward_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    no_plots = plots_missing()  # the checkpoint is written: a missing extra must not crash
    extra = {"split": split}
    if cfg.ensemble > 1:  # the members' disagreement on these held-out pairs
        extra["ensemble"] = ensemble_metrics(r_w.numpy(), r_l.numpy(), cfg.uncertainty_coef)
    metrics = write_report(out, pairs, r_w.mean(1), r_l.mean(1), bins=10, extra=extra,
                           title=f"{out.name} ({split} split)", plot=no_plots is None)
    if no_plots is None:
        plot_training(read_log(out / "train_log.jsonl"), out / "train_curves.png")
    keys = ("pairs", "accuracy", "loss", "delta_mean", "delta_std", "ece")
    (out / "train_summary.json").write_text(json.dumps(
        {**summary, "eval": {k: metrics[k] for k in keys}, "reward_stats": stats},
        indent=2) + "\n")
    print(f"eval ({split} split): {one_line(metrics)}")
    if cfg.ensemble > 1:
        print(f"ensemble ({split} split): {ensemble_line(extra['ensemble'])}")
    pngs = "" if no_plots else "eval.png, train_curves.png, "
    print(f"wrote {out}: checkpoint, reward_stats.json, eval.json, {pngs}train_log.jsonl")
    if no_plots:
        print(no_plots, file=sys.stderr)
