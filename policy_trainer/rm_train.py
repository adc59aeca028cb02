"""`rm-server train`: fit a reward model on preference pairs with the Bradley-Terry loss.

    rm-server train --data prefs.jsonl --base DIR --out DIR [--center-coef 0.01] [--resume] ...

1. data: parse the JSONL (policy_trainer/prefs.py) and tokenize through the shared Encoder, the
   server's own tokenization; split off an eval set by source line (a ranking stays together).
2. model: ``AutoModelForSequenceClassification`` with one label from ``--base``. A causal-LM
   base gets a scalar head on the last token (InstructGPT), initialized N(0, 1/(H+1)) as in
   Stiennon et al. (2020); a sequence-classification base keeps its head. Weights train in fp32.
   With no pad token, pad = eos on the tokenizer and the config, so the checkpoint scores batches.
3. AdamW (no decay on biases and norms), linear warm-up then cosine/linear decay, gradient
   accumulation over length-sorted micro-batches (the sum over micro-batches equals the batch).
4. the loop: BT loss −log σ(r_w − r_l − m) + c·(r_w + r_l)² (policy_trainer/bt_loss.py); eval on the
   eval split; checkpoints; one row per step in train_log.jsonl.
5. finish: a plain HuggingFace checkpoint in OUT (serve it, or from_pretrained it, as it is),
   reward_stats.json (mean/std of rewards on the eval split, for GetModelInfo), eval.json,
   eval_scores.jsonl (scores of the eval pairs as trained), and the plots eval.png and
   train_curves.png when matplotlib (the ``[plots]`` extra) is installed.

Data order is a pure function of (seed, step): epoch e shuffles the training pairs with a
generator seeded from (seed, e) and step s takes the next ``batch_size`` of them. A checkpoint
(OUT/checkpoints/step-N/: model, tokenizer, optimizer, scheduler, RNG states, data cursor) is
therefore enough for ``--resume`` to continue at step N+1 with the same batches and the same
losses as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from policy_trainer.bt_loss import bradley_terry_loss
from policy_trainer.errors import UserError
from protos.encoding import Encoder
from policy_trainer.rm_eval import (default_max_length, forward_rewards, one_line, pick_device,
                                plot_training, plots_missing, score_pairs, write_report)
from policy_trainer.prefs import EncodedPair, encode_pairs, file_fingerprint, read_preferences

DROPOUT_KEYS = ("dropout", "attention_dropout", "hidden_dropout", "attn_pdrop", "resid_pdrop",
                "embd_pdrop", "summary_first_dropout", "hidden_dropout_prob",
                "attention_probs_dropout_prob", "classifier_dropout")


@dataclass
class TrainConfig:
    data: str
    """Preference JSONL: {prompt, chosen, rejected[, margin]}, chat message lists, or {prompt, ranking}."""
    base: str
    """Base checkpoint: a causal LM (a scalar head is added) or a 1-label sequence-classification model."""
    out: str
    """Output directory: the trained checkpoint, stats, logs, plots, and checkpoints/ for --resume."""
    eval_data: str | None = None
    """Separate preference JSONL for evaluation (default: hold out --eval-fraction of --data)."""
    eval_fraction: float = 0.05
    """Fraction of --data lines held out for evaluation when --eval-data is not given."""
    max_length: int | None = None
    """Maximum tokens per sequence (default: the base's limit, at most its position table)."""
    truncation: Literal["left", "drop", "error"] = "left"
    """Over-long pairs: left keeps the end (the scored token) and counts them; drop skips them; error stops."""
    bad_lines: Literal["error", "skip"] = "error"
    """Malformed lines: error refuses the file (listing line numbers); skip skips and counts them."""
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
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warm-up (to 0 at the last step for cosine and linear)."""
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
    """Write a checkpoint to OUT/checkpoints every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep (0: all)."""
    resume: bool = False
    """Continue from the newest checkpoint in OUT/checkpoints."""
    seed: int = 0
    """Seed for the split, the data order and the head initialization."""
    disable_dropout: bool = True
    """Turn dropout off (common for reward models; makes steps deterministic)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    device: str = "auto"
    """Torch device: auto (cuda if available), cpu, cuda, cuda:1, ..."""
    threads: int | None = None
    """torch CPU threads (default: torch's choice)."""
    progress: bool = True
    """Show a progress bar (only when stderr is a terminal)."""
    log_every: int = 50
    """Print a progress line every N steps when the bar is not shown (0: never)."""


# -- 1. data ------------------------------------------------------------------------------------

def split_by_line(pairs: list[EncodedPair], fraction: float, seed: int):
    """(train, eval): a random ``fraction`` of the source lines, all pairs of a line together."""
    lines = sorted({p.line for p in pairs})
    if fraction <= 0 or len(lines) < 2:
        return pairs, []
    perm = torch.randperm(len(lines), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = min(len(lines) - 1, max(1, round(fraction * len(lines))))
    held = {lines[i] for i in perm[:n_eval]}
    return [p for p in pairs if p.line not in held], [p for p in pairs if p.line in held]


def load_data(cfg: TrainConfig, encoder: Encoder):
    pairs, report = read_preferences(cfg.data, cfg.bad_lines)
    encoded = encode_pairs(pairs, encoder, report, cfg.truncation, cfg.bad_lines)
    reports = {"train": report.summary()}
    if cfg.eval_data:
        eval_pairs, eval_report = read_preferences(cfg.eval_data, cfg.bad_lines)
        eval_set = encode_pairs(eval_pairs, encoder, eval_report, cfg.truncation, cfg.bad_lines)
        reports["eval"] = eval_report.summary()
        return encoded, eval_set, reports
    train_set, eval_set = split_by_line(encoded, cfg.eval_fraction, cfg.seed)
    return train_set, eval_set, reports


def describe(r: dict, max_length: int) -> str:
    return (f"{r['path']}: {r['lines']} lines ({r['blank_lines']} blank, {r['bad_lines']} bad skipped), "
            f"{r['pairs']} pairs ({r['rankings']} rankings expanded), {r['truncated_pairs']} truncated "
            f"to the last {max_length} tokens, {r['dropped_long_pairs']} dropped as too long")


class BatchOrder:
    """Step s -> the indices of its pairs: a fresh shuffle per epoch, seeded by (seed, epoch)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.steps_per_epoch = math.ceil(n / batch_size)
        self._epoch, self._perm = -1, None

    def cursor(self, step: int) -> tuple[int, int]:
        return divmod(step, self.steps_per_epoch)  # (epoch, batch within epoch)

    def __call__(self, step: int) -> list[int]:
        epoch, b = self.cursor(step)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).tolist()
        return self._perm[b * self.batch_size:(b + 1) * self.batch_size]


# -- 2. model -----------------------------------------------------------------------------------

def load_model(path: str | Path, seed: int, disable_dropout: bool):
    """A 1-label sequence-classification model in fp32; (model, names of new head weights)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path)
    archs = config.architectures or []
    if any(a.endswith("ForSequenceClassification") for a in archs) and config.num_labels != 1:
        raise UserError(f"{path} is a classifier with {config.num_labels} labels; a reward model has 1")
    config.num_labels = 1
    config.id2label, config.label2id = {0: "reward"}, {"reward": 0}
    if disable_dropout:
        for obj in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
            for k in DROPOUT_KEYS:
                if isinstance(getattr(obj, k, None), float):
                    setattr(obj, k, 0.0)
    torch.manual_seed(seed)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        path, config=config, dtype=torch.float32, output_loading_info=True)
    prefix = model.base_model_prefix + "."
    missing = sorted(info["missing_keys"])
    backbone = [k for k in missing if k.startswith(prefix) and "pooler" not in k]
    if backbone:
        raise UserError(f"{path}: {len(backbone)} backbone weights missing (e.g. {backbone[0]}): "
                        f"is it a checkpoint of {type(model).__name__}'s architecture?")
    head = [k for k in missing if not k.startswith(prefix)]
    with torch.no_grad():  # Stiennon et al. 2020: reward head ~ N(0, 1/(d_model + 1))
        for name in head:
            p = model.get_parameter(name)
            p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1] + 1)) if p.dim() == 2 else p.zero_()
    if disable_dropout:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    # nn.Embedding(padding_idx=pad) zeroes the gradient of every occurrence of the pad id. A base
    # built with no pad id has none; its checkpoint, saved with pad = eos, would freeze the EOS
    # row that chat templates use mid-sequence, and a resumed run would train differently from
    # an uninterrupted one. Padding sits right of the scored token (causal) or is masked, so it
    # sends no gradient anyway: let every row train, whatever the load path.
    emb = model.get_input_embeddings()
    if getattr(emb, "padding_idx", None) is not None:
        emb.padding_idx = None
    return model, head


def ensure_pad(tokenizer, config) -> str:
    """Make sure the checkpoint can score batches; returns a note for the summary."""
    text = config.get_text_config()
    note = ""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise UserError("the tokenizer has neither a pad nor an eos token; add a pad token to the base")
        tokenizer.pad_token = tokenizer.eos_token
        note = " (pad = eos, set by train)"
    if text.pad_token_id is None:
        text.pad_token_id = tokenizer.pad_token_id
    return f"pad_token_id {text.pad_token_id}{note}"


# -- 3. optimizer -------------------------------------------------------------------------------

def make_optimizer(model, cfg: TrainConfig, total_steps: int):
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    warmup = round(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


# -- 4. one step, checkpoints -------------------------------------------------------------------

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
        correct += ((delta > 0).float() + 0.5 * (delta == 0).float()).sum().item()
        delta_sum += delta.sum().item()
    return {"loss": loss_sum / n, "accuracy": correct / n, "delta_mean": delta_sum / n}


def eval_row(model, pairs: list[EncodedPair], cfg: TrainConfig, device) -> dict:
    model.eval()
    r_w, r_l = score_pairs(model, pairs, device, cfg.eval_batch_size)
    model.train()
    margin = torch.tensor([p.margin for p in pairs]) if cfg.use_margin else None
    delta = r_w - r_l
    return {"loss": bradley_terry_loss(r_w, r_l, margin, cfg.center_coef).item(),
            "accuracy": ((delta > 0).float() + 0.5 * (delta == 0).float()).mean().item(),
            "delta_mean": delta.mean().item()}


def save_checkpoint(out: Path, step: int, model, tokenizer, opt, sched, state: dict, keep: int) -> None:
    """OUT/checkpoints/step-N, written to a temporary name first so a crash leaves no half checkpoint."""
    root = out / "checkpoints"
    tmp, final = root / f".step-{step}.tmp", root / f"step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({**state, "step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "rng": rng}, tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in list_checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = out / "checkpoints"
    found = [p for p in root.glob("step-*") if (p / "trainer_state.pt").is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def read_log(path: Path, upto_step: int) -> list[dict]:
    """Rows of train_log.jsonl up to a step: rows a crashed run wrote after its last checkpoint go."""
    if not path.is_file():
        return []
    rows = [json.loads(t) for t in path.read_text().splitlines() if t.strip()]
    return [r for r in rows if r["step"] <= upto_step]


# -- the entry point ----------------------------------------------------------------------------

def train(cfg: TrainConfig) -> int:
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the load report is replaced by our one-line summary
    hf_logging.disable_progress_bar()  # ours is the only bar
    out, base = Path(cfg.out), Path(cfg.base)
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"no checkpoint at --base {base} (config.json missing)")
    if cfg.batch_size < 1 or (cfg.micro_batch_size or 1) < 1:
        raise UserError("--batch-size and --micro-batch-size must be at least 1")
    checkpoints = list_checkpoints(out)
    if cfg.resume and not checkpoints:
        raise UserError(f"--resume: no checkpoint in {out / 'checkpoints'}")
    if not cfg.resume and (checkpoints or (out / "config.json").exists()):
        raise UserError(f"{out} already holds a run; pass --resume to continue it, or choose a new --out")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    source = checkpoints[-1] if cfg.resume else base
    tokenizer = AutoTokenizer.from_pretrained(source)

    # 2. model (first: the Encoder needs its vocabulary and limits)
    model, new_head = load_model(source, cfg.seed, cfg.disable_dropout)
    pad_note = ensure_pad(tokenizer, model.config)
    limit = default_max_length(tokenizer, model.config)
    max_length = cfg.max_length or limit
    if max_length > limit and cfg.max_length:
        raise UserError(f"--max-length {max_length} exceeds the model's limit of {limit} tokens")
    tokenizer.model_max_length = max_length  # saved with the tokenizer: serve and eval read it
    model.to(device).train()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False

    # 1. data
    encoder = Encoder(tokenizer, max_length, model.config.get_text_config().vocab_size, truncation="left")
    train_set, eval_set, reports = load_data(cfg, encoder)
    fingerprint = {"data": file_fingerprint(cfg.data), "num_train_pairs": len(train_set),
                   "eval_data": file_fingerprint(cfg.eval_data) if cfg.eval_data else None,
                   "batch_size": cfg.batch_size, "seed": cfg.seed}
    order = BatchOrder(len(train_set), cfg.batch_size, cfg.seed)
    total_steps = cfg.max_steps or cfg.epochs * order.steps_per_epoch
    micro = cfg.micro_batch_size or cfg.batch_size
    print(f"data: {describe(reports['train'], max_length)}")
    if "eval" in reports:
        print(f"data: {describe(reports['eval'], max_length)}")
    print(f"split: {len(train_set)} train pairs, {len(eval_set)} eval pairs")
    print(f"model: {source} as {type(model).__name__}, "
          f"{'new scalar head' if new_head else 'its own head'}, {pad_note}, max_length {max_length}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters on {device}")
    print(f"train: {total_steps} steps of {cfg.batch_size} pairs ({math.ceil(cfg.batch_size / micro)} "
          f"micro-batch(es) of ≤ {micro}), {order.steps_per_epoch} steps per epoch")

    # 3. optimizer; resume
    opt, sched = make_optimizer(model, cfg, total_steps)
    start = 0
    if cfg.resume:
        # on the CPU: RNG states must stay there; load_state_dict moves optimizer state to the params
        state = torch.load(source / "trainer_state.pt", map_location="cpu", weights_only=True)
        if state["data"] != fingerprint:
            raise UserError(f"--resume: the data, batch size or seed differ from the run in {out} "
                            f"(was {state['data']}, now {fingerprint})")
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        restore_rng(state["rng"])
        start = state["step"]
        print(f"resume: from {source} at step {start}")
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.jsonl"
    rows = read_log(log_path, start)
    log_path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    # 4. the loop
    show = cfg.progress and sys.stderr.isatty()
    bar = tqdm(total=total_steps, initial=start, disable=not show, unit="step", desc="train")
    t0 = time.time()
    with log_path.open("a") as log:
        for step in range(start, total_steps):
            epoch, batch_in_epoch = order.cursor(step)
            stats = train_step(model, [train_set[i] for i in order(step)], cfg, micro, device)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            row = {"split": "train", "step": step + 1, "epoch": epoch, **stats,
                   "lr": lr, "grad_norm": grad_norm.item(), "time": round(time.time() - t0, 3)}
            log.write(json.dumps(row) + "\n")
            rows.append(row)
            done = step + 1
            end_of_epoch = batch_in_epoch == order.steps_per_epoch - 1
            due = done % cfg.eval_every == 0 if cfg.eval_every else end_of_epoch
            if eval_set and (due or done == total_steps):
                ev = {"split": "eval", "step": done, "epoch": epoch, **eval_row(model, eval_set, cfg, device)}
                log.write(json.dumps(ev) + "\n")
                rows.append(ev)
            log.flush()
            if done == total_steps or (cfg.save_every and done % cfg.save_every == 0):
                save_checkpoint(out, done, model, tokenizer, opt, sched,
                                {"data": fingerprint, "cursor": order.cursor(done), "config": asdict(cfg)},
                                cfg.keep_checkpoints)
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['accuracy']:.2f}")
            if not show and cfg.log_every and done % cfg.log_every == 0:
                print(f"step {done}/{total_steps} loss {stats['loss']:.4f} acc {stats['accuracy']:.3f} "
                      f"lr {lr:.2e}", file=sys.stderr)
    bar.close()

    # 5. finish
    finish(cfg, out, model, tokenizer, train_set, eval_set, rows, device,
           {"data": reports, "steps": total_steps, "max_length": max_length,
            "seconds": round(time.time() - t0, 1), "config": asdict(cfg)})
    return 0


def finish(cfg, out: Path, model, tokenizer, train_set, eval_set, rows, device, summary: dict) -> None:
    """The servable checkpoint, normalization stats, evaluation and plots."""
    model.eval()
    split = "eval" if eval_set else "train"
    pairs = eval_set or train_set
    r_w, r_l = score_pairs(model, pairs, device, cfg.eval_batch_size)  # the scores as trained
    rewards = torch.cat([r_w, r_l])
    stats = {"mean": rewards.mean().item(), "std": rewards.std(correction=0).item(),
             "num_samples": rewards.numel(), "split": split}
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "reward_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    no_plots = plots_missing()  # the checkpoint is written: a missing extra must not crash
    metrics = write_report(out, pairs, r_w, r_l, bins=10, title=f"{out.name} ({split} split)",
                           extra={"split": split}, plot=no_plots is None)
    if no_plots is None:
        plot_training(rows, out / "train_curves.png")
    (out / "train_summary.json").write_text(json.dumps({**summary, "eval": {
        k: metrics[k] for k in ("pairs", "accuracy", "loss", "delta_mean", "delta_std", "ece")},
        "reward_stats": stats}, indent=2) + "\n")
    print(f"eval ({split} split): {one_line(metrics)}")
    pngs = "" if no_plots else "eval.png, train_curves.png, "
    print(f"wrote {out}: checkpoint, reward_stats.json, eval.json, {pngs}train_log.jsonl")
    if no_plots:
        print(no_plots, file=sys.stderr)
