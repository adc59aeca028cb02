"""`rm-server eval`: how well a reward model orders held-out preference pairs, and how calibrated.

For each pair, Δ = r_w − r_l. Reported (as JSON, and a PNG when matplotlib, the ``[plots]``
extra, is installed):

- accuracy: the fraction with Δ > 0 (a tie counts one half), and the BT loss −log σ(Δ);
- Δ: mean, std and quantiles, and a histogram of |Δ| (a well-trained RM puts most in [0.5, 4]);
- calibration: under Bradley-Terry the RM claims P(y_w ≻ y_l) = σ(Δ). Folding each pair to its
  confidence σ(|Δ|) ∈ [0.5, 1] and "correct" = (Δ > 0), equal-width bins over [0.5, 1] compare
  the mean confidence with the observed agreement; the expected calibration error is
  ECE = Σ_b (n_b / n) · |acc_b − conf_b| (Guo et al. 2017);
- rewards: mean and std over both responses of every pair (the normalization statistics).

Scoring pads on the right with the checkpoint's ``pad_token_id`` and reads the model's own
``*ForSequenceClassification`` output, so a batch scores exactly what each sequence scores alone
(HF's rule: the last non-pad token). Tokenization is the shared Encoder (protos/encoding.py).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from policy_trainer.prefs import EncodedPair


@dataclass
class EvalConfig:
    model: str
    """Reward-model checkpoint directory (a HuggingFace sequence-classification checkpoint)."""
    data: str
    """Preference JSONL to evaluate on (the same formats `rm-server train` reads)."""
    out: str | None = None
    """Directory for eval.json, eval.png and eval_scores.jsonl; default MODEL/eval-<data name>."""
    max_length: int | None = None
    """Maximum tokens per sequence; default the checkpoint tokenizer's model_max_length."""
    truncation: Literal["left", "drop", "error"] = "left"
    """Over-long pairs: left keeps the end (the scored token) and counts them; drop skips them; error stops."""
    bad_lines: Literal["error", "skip"] = "error"
    """Malformed lines: error refuses the file (listing line numbers); skip skips and counts them."""
    batch_size: int = 32
    """Pairs per forward pass."""
    bins: int = 10
    """Calibration bins over confidence [0.5, 1]."""
    device: str = "auto"
    """Torch device: auto (cuda if available), cpu, cuda, cuda:1, ..."""
    threads: int | None = None
    """torch CPU threads (default: torch's choice)."""
    progress: bool = True
    """Show a progress bar (only when stderr is a terminal)."""


# -- scoring ------------------------------------------------------------------------------------

def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def default_max_length(tokenizer, config) -> int:
    """The tokenizer's model_max_length (train saves the length it used there), capped by the
    model's position table; 1024 when neither says."""
    text = config.get_text_config()
    limits = [getattr(text, k, None) for k in ("max_position_embeddings", "n_positions")]
    limits = [n for n in limits if isinstance(n, int) and n > 0]
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
        limits.append(tok_max)
    return min(limits) if limits else 1024


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest: ids (B, T) and attention mask (B, T) from the true lengths."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


def forward_rewards(model, seqs: list[list[int]], device: torch.device) -> torch.Tensor:
    """Scalar rewards (B,) fp32 of the model's own forward; with grad if grad is enabled."""
    pad_id = model.config.get_text_config().pad_token_id
    if pad_id is None:  # HF refuses batches without a pad id: score one at a time
        return torch.cat([forward_rewards_one(model, s, device) for s in seqs])
    ids, mask = pad_batch(seqs, pad_id)
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device))
    return out.logits[:, 0].float()  # (B,)


def forward_rewards_one(model, seq: list[int], device: torch.device) -> torch.Tensor:
    ids = torch.tensor([seq], dtype=torch.long, device=device)
    return model(input_ids=ids).logits[:, 0].float()


@torch.no_grad()
def score_pairs(model, pairs: list[EncodedPair], device: torch.device, batch_size: int = 32,
                progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected), each (N,) fp32 on the CPU, in the order of ``pairs``.

    Pairs are scored in length-sorted batches (less padding); the order is restored.
    """
    from tqdm.auto import tqdm

    order = sorted(range(len(pairs)), key=lambda i: pairs[i].length)
    r_w, r_l = torch.empty(len(pairs)), torch.empty(len(pairs))
    starts = range(0, len(order), batch_size)
    for s in tqdm(starts, desc="scoring", unit="batch", disable=not progress, leave=False):
        idx = order[s:s + batch_size]
        seqs = [pairs[i].chosen for i in idx] + [pairs[i].rejected for i in idx]
        r = forward_rewards(model, seqs, device).cpu()  # (2m,)
        r_w[idx], r_l[idx] = r[:len(idx)], r[len(idx):]
    return r_w, r_l


# -- metrics (pure) -----------------------------------------------------------------------------

def spearman(x, y) -> float:
    """Spearman rank correlation: Pearson correlation of the ranks (ties get their mean rank)."""
    rx, ry = _ranks(np.asarray(x, dtype=np.float64)), _ranks(np.asarray(y, dtype=np.float64))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def _ranks(a: np.ndarray) -> np.ndarray:
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a))
    ranks[order] = np.arange(len(a), dtype=np.float64)
    _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]  # mean rank within each group of ties


def calibration(delta: np.ndarray, bins: int = 10) -> tuple[float, list[dict]]:
    """ECE of σ(Δ) against observed agreement, folded to confidence σ(|Δ|) ∈ [0.5, 1]."""
    conf = 1.0 / (1.0 + np.exp(-np.abs(delta)))
    correct = np.where(delta > 0, 1.0, np.where(delta == 0, 0.5, 0.0))
    edges = np.linspace(0.5, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        sel = which == b
        n = int(sel.sum())
        row = {"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": n,
               "confidence": float(conf[sel].mean()) if n else None,
               "agreement": float(correct[sel].mean()) if n else None}
        if n:
            ece += n / len(delta) * abs(row["agreement"] - row["confidence"])
        table.append(row)
    return float(ece), table


def pair_metrics(r_chosen, r_rejected, bins: int = 10, hist_bins: int = 20) -> dict:
    """Accuracy, loss, Δ statistics, |Δ| histogram, calibration and reward statistics."""
    r_w, r_l = np.asarray(r_chosen, dtype=np.float64), np.asarray(r_rejected, dtype=np.float64)
    delta = r_w - r_l
    rewards = np.concatenate([r_w, r_l])
    counts, edges = np.histogram(np.abs(delta), bins=hist_bins)
    wrong, _ = np.histogram(np.abs(delta[delta <= 0]), bins=edges)
    ece, table = calibration(delta, bins)
    q = np.quantile(delta, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {
        "pairs": int(len(delta)),
        "accuracy": float(np.mean(np.where(delta > 0, 1.0, np.where(delta == 0, 0.5, 0.0)))),
        "loss": float(np.mean(np.logaddexp(0.0, -delta))),  # −log σ(Δ), no margin
        "delta_mean": float(delta.mean()),
        "delta_std": float(delta.std()),
        "delta_quantiles": {k: float(v) for k, v in zip(("p05", "p25", "p50", "p75", "p95"), q)},
        "abs_delta_in_0.5_4": float(np.mean((np.abs(delta) >= 0.5) & (np.abs(delta) <= 4.0))),
        "abs_delta_histogram": {"edges": edges.tolist(), "counts": counts.tolist(),
                                "counts_wrong": wrong.tolist()},
        "ece": ece,
        "calibration": table,
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()),
    }


# -- plots --------------------------------------------------------------------------------------

def plots_missing() -> str | None:
    """None when matplotlib imports; else the one line that says how to get the plots.

    matplotlib is an extra (``[plots]``): a plain install trains and evaluates all the same,
    and skips only the PNGs, so a missing plotting library never costs a finished run.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return ("plots skipped: matplotlib is not installed "
                "(pip install 'rlhf-rm-service[plots]' to get them)")
    return None


def _figure():
    """A matplotlib Figure on the Agg canvas, without pyplot (no GUI backend, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    return fig


def plot_eval(metrics: dict, path: str | Path, title: str = "") -> None:
    """|Δ| histogram (wrong pairs marked) and the reliability diagram, one PNG."""
    fig = _figure()
    ax1, ax2 = fig.subplots(1, 2)
    h = metrics["abs_delta_histogram"]
    edges = np.asarray(h["edges"])
    right = np.asarray(h["counts"]) - np.asarray(h["counts_wrong"])
    ax1.bar(edges[:-1], right, width=np.diff(edges), align="edge", label="RM agrees", color="tab:blue")
    ax1.bar(edges[:-1], h["counts_wrong"], width=np.diff(edges), align="edge", bottom=right,
            label="RM disagrees", color="tab:red")
    ax1.set(xlabel="|Δ| = |r_w − r_l|", ylabel="pairs",
            title=f"|Δ|: mean Δ {metrics['delta_mean']:.2f} ± {metrics['delta_std']:.2f}")
    ax1.legend()
    rows = [r for r in metrics["calibration"] if r["count"]]
    ax2.plot([0.5, 1.0], [0.5, 1.0], "k--", lw=1, label="perfect calibration")
    ax2.bar([r["lo"] for r in metrics["calibration"]],
            [r["agreement"] or 0.0 for r in metrics["calibration"]],
            width=[r["hi"] - r["lo"] for r in metrics["calibration"]], align="edge",
            alpha=0.35, color="tab:blue", edgecolor="tab:blue", label="observed agreement")
    ax2.plot([r["confidence"] for r in rows], [r["agreement"] for r in rows], "o-", color="tab:blue")
    for r in rows:
        ax2.annotate(str(r["count"]), (r["confidence"], r["agreement"]), fontsize=7,
                     textcoords="offset points", xytext=(0, 5), ha="center")
    ax2.set(xlim=(0.5, 1.0), ylim=(0.0, 1.02), xlabel="confidence σ(|Δ|)", ylabel="agreement",
            title=f"calibration: ECE {metrics['ece']:.3f}")
    ax2.legend(loc="lower right")
    fig.suptitle(f"{title}  accuracy {metrics['accuracy']:.3f} on {metrics['pairs']} pairs".strip())
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_training(rows: list[dict], path: str | Path) -> None:
    """Loss and accuracy against the step, train (per step, smoothed) and eval (points)."""
    train = [r for r in rows if r.get("split") == "train"]
    ev = [r for r in rows if r.get("split") == "eval"]
    fig = _figure()
    axes = fig.subplots(1, 2)
    for ax, key in zip(axes, ("loss", "accuracy")):
        if train:
            x = np.array([r["step"] for r in train])
            y = np.array([r[key] for r in train])
            k = max(1, len(y) // 25)  # moving average over ~4% of the run
            if k > 1:
                ax.plot(x, y, color="tab:blue", alpha=0.25, lw=1)
            ax.plot(x[k - 1:], np.convolve(y, np.ones(k) / k, mode="valid"), color="tab:blue",
                    label=f"train (moving mean of {k} steps)" if k > 1 else "train")
        if ev:
            ax.plot([r["step"] for r in ev], [r[key] for r in ev], "o-", color="tab:orange",
                    label="eval")
        ax.set(xlabel="step", ylabel=key, title=key)
        ax.legend()
    axes[0].axhline(math.log(2), color="gray", ls=":", lw=1)  # chance: −log σ(0)
    axes[1].axhline(0.5, color="gray", ls=":", lw=1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# -- outputs ------------------------------------------------------------------------------------

def write_scores(path: Path, pairs: list[EncodedPair], r_w: torch.Tensor, r_l: torch.Tensor) -> None:
    """One line per pair: source line, rewards, Δ, truncated (for error analysis and parity tests)."""
    with path.open("w") as f:
        for p, a, b in zip(pairs, r_w.tolist(), r_l.tolist()):
            f.write(json.dumps({"line": p.line, "r_chosen": a, "r_rejected": b, "delta": a - b,
                                "margin": p.margin, "truncated": p.truncated}) + "\n")


def write_report(out: Path, pairs, r_w, r_l, bins: int, title: str, extra: dict | None = None,
                 plot: bool = True) -> dict:
    """eval.json, eval_scores.jsonl and (with ``plot``) eval.png in ``out``; returns the metrics."""
    out.mkdir(parents=True, exist_ok=True)
    metrics = pair_metrics(r_w.numpy(), r_l.numpy(), bins=bins)
    metrics.update(extra or {})
    (out / "eval.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_scores(out / "eval_scores.jsonl", pairs, r_w, r_l)
    if plot:
        plot_eval(metrics, out / "eval.png", title)
    return metrics


def one_line(m: dict) -> str:
    return (f"accuracy {m['accuracy']:.3f} on {m['pairs']} pairs, loss {m['loss']:.3f}, "
            f"Δ {m['delta_mean']:.2f} ± {m['delta_std']:.2f}, ECE {m['ece']:.3f}")


def evaluate(cfg: EvalConfig) -> int:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from protos.encoding import Encoder
    from policy_trainer.prefs import encode_pairs, read_preferences

    hf_logging.set_verbosity_error()  # e.g. the tokenizer's over-length warning: we truncate
    hf_logging.disable_progress_bar()
    model_dir = Path(cfg.model)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no checkpoint at {model_dir} (config.json missing)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    pairs, report = read_preferences(cfg.data, cfg.bad_lines)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).to(device).eval()
    if model.config.num_labels != 1:
        raise ValueError(f"{model_dir} has {model.config.num_labels} labels; a reward model has 1")
    max_length = cfg.max_length or default_max_length(tok, model.config)
    encoder = Encoder(tok, max_length, model.config.get_text_config().vocab_size, truncation="left")
    encoded = encode_pairs(pairs, encoder, report, cfg.truncation, cfg.bad_lines)
    show = cfg.progress and sys.stderr.isatty()
    r_w, r_l = score_pairs(model, encoded, device, cfg.batch_size, progress=show)
    out = Path(cfg.out) if cfg.out else model_dir / f"eval-{Path(cfg.data).stem}"
    no_plots = plots_missing()
    metrics = write_report(out, encoded, r_w, r_l, cfg.bins, title=model_dir.name,
                           extra={"data": report.summary(), "max_length": max_length},
                           plot=no_plots is None)
    print(f"eval: {one_line(metrics)}; {report.truncated_pairs} truncated, "
          f"{report.dropped_long_pairs} dropped, {report.bad_lines} bad line(s) skipped")
    print(f"eval: wrote {out / 'eval.json'}" + ("" if no_plots else f", {out / 'eval.png'}"))
    if no_plots:
        print(f"eval: {no_plots}", file=sys.stderr)
    return 0
