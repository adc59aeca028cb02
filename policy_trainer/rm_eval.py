"""``policy-trainer rm-eval`` (also ``rm-server eval``): how well a reward model orders held-out
preference pairs, and how calibrated it is (the metrics: :mod:`policy_trainer.rm_metrics`).

    policy-trainer rm-eval --model DIR --data prefs.jsonl [--out DIR] ...

An ensemble (``--ensemble K``, rm_ensemble.py) is evaluated as its members' mean, and eval.json
adds the members' accuracies and disagreement (``rm_metrics.ensemble_metrics``).

Writes eval.json (the metrics), eval_scores.jsonl (one line per pair) and, when matplotlib
(the ``[plots]`` extra) is installed, eval.png, into an output directory of their own:
``--out``, by default ``rm-eval-<model name>-<data name>`` in the current directory (never
inside the model directory, which may be a read-only mount or a served checkpoint).
Tokenization is the shared Encoder (protos/encoding.py), the server's own; scoring is
:func:`rm_model.score_pairs`, which scores a batch exactly as each sequence alone.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from policy_trainer.data import BadLinePolicy, max_sequence_length
from policy_trainer.device import pick_device
from policy_trainer.errors import UserError
from policy_trainer.plots import plot_eval, plots_missing
from policy_trainer.prefs import EncodedPair, encode_pairs, read_preferences
from policy_trainer.rm_ensemble import ensemble_of
from policy_trainer.rm_metrics import ensemble_metrics, pair_metrics
from policy_trainer.rm_model import score_pairs, use_recipe


@dataclass
class EvalConfig:
    model: str
    """Reward-model checkpoint directory (a HuggingFace sequence-classification checkpoint)."""
    data: str
    """Preference data to evaluate on (the formats and files `rm-server train` reads)."""
    out: str | None = None
    """Directory for eval.json, eval.png and eval_scores.jsonl; default
    ./rm-eval-<model name>-<data name>."""
    recipe: str | None = None
    """Scoring recipe (rm-server, trl, trl-grpo, openrlhf, encoder-pair, or a JSON file);
    default: the one stored in the checkpoint, encoder-pair for encoders, else rm-server."""
    max_length: int | None = None
    """Maximum tokens per sequence; default what the model takes (its position table, capped by
    the tokenizer's model_max_length, where `rm` saves the length it trained with)."""
    truncation: Literal["left", "drop", "error"] = "left"
    """Over-long pairs: left keeps the end (the scored token) and counts them; drop skips them;
    error stops."""
    bad_lines: BadLinePolicy = "error"
    """Malformed lines: error refuses the file (listing line numbers); skip skips and counts
    them."""
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


def write_scores(path: Path, pairs: list[EncodedPair], r_w: torch.Tensor,
                 r_l: torch.Tensor) -> None:
    """One line per pair: source line, rewards, Δ, truncated (for error analysis and parity
    tests)."""
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


def default_out(model_dir: Path, data: str) -> Path:
    """``rm-eval-<model name>-<data name>`` in the current directory."""
    return Path(f"rm-eval-{model_dir.resolve().name}-{Path(data).stem}")


def one_line(m: dict) -> str:
    return (f"accuracy {m['accuracy']:.3f} on {m['pairs']} pairs, loss {m['loss']:.3f}, "
            f"Δ {m['delta_mean']:.2f} ± {m['delta_std']:.2f}, ECE {m['ece']:.3f}")


def ensemble_line(e: dict) -> str:
    d, acc = e["disagreement"], e["accuracy"]
    return (f"{e['members']} members, accuracy {min(e['member_accuracy']):.3f}–"
            f"{max(e['member_accuracy']):.3f} each, mean {acc['mean']:.3f}, min {acc['min']:.3f}, "
            f"uwo {acc['uwo']:.3f}; disagreement: std of Δ across members {d['delta_std']:.3f} "
            f"(p90 {d['delta_std_p90']:.3f}), of rewards {d['reward_std']:.3f}, pairs ordered "
            f"differently {d['order_disagreement']:.1%}, "
            f"Δ correlation {d['delta_correlation']:.3f}")


def evaluate(cfg: EvalConfig) -> int:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from protos.encoding import Encoder

    hf_logging.set_verbosity_error()  # e.g. the tokenizer's over-length warning: we truncate
    hf_logging.disable_progress_bar()
    model_dir = Path(cfg.model)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"no checkpoint at {model_dir} (config.json missing)")
    device = pick_device(cfg.device, cfg.threads)
    pairs, report = read_preferences(cfg.data, cfg.bad_lines)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).to(device).eval()
    ensemble = ensemble_of(model.config)
    if model.config.num_labels != 1 and ensemble is None:
        raise UserError(f"{model_dir} has {model.config.num_labels} labels and is not an "
                        "ensemble (config.json reward_ensemble); a reward model has 1")
    max_length = cfg.max_length or max_sequence_length(model.config, tok)
    recipe = use_recipe(model, cfg.recipe, model_dir)
    encoder = Encoder(tok, max_length, model.config.get_text_config().vocab_size,
                      truncation="left", recipe=recipe)
    encoded = encode_pairs(pairs, encoder, report, cfg.truncation)
    show = cfg.progress and sys.stderr.isatty()
    r_w, r_l = score_pairs(model, encoded, device, cfg.batch_size, progress=show, heads=True)
    out = Path(cfg.out) if cfg.out else default_out(model_dir, cfg.data)
    no_plots = plots_missing()
    extra = {"data": report.summary(), "max_length": max_length}
    if ensemble:  # the report is the members' mean's, and their disagreement
        extra["ensemble"] = ensemble_metrics(r_w.numpy(), r_l.numpy(),
                                             ensemble["uncertainty_coef"])
    metrics = write_report(out, encoded, r_w.mean(1), r_l.mean(1), cfg.bins, extra=extra,
                           title=model_dir.name, plot=no_plots is None)
    print(f"eval: {one_line(metrics)}; {report.truncated_pairs} truncated, "
          f"{report.dropped_long_pairs} dropped, {report.bad_lines} bad line(s) skipped")
    if ensemble:
        print(f"eval: ensemble: {ensemble_line(extra['ensemble'])}")
    print(f"eval: wrote {out / 'eval.json'}" + ("" if no_plots else f", {out / 'eval.png'}"))
    if no_plots:
        print(f"eval: {no_plots}", file=sys.stderr)
    return 0
