"""The reward model's figures (matplotlib): the evaluation (|Δ| histogram and reliability
diagram) and the training curves.

matplotlib is an extra (``[plots]``): a plain install trains and evaluates all the same and
skips only the PNGs, so a missing plotting library never costs a finished run. It is imported
inside the functions that draw, never at module import.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def plots_missing() -> str | None:
    """None when matplotlib imports; else the one line that says how to get the plots."""
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
    ax1.bar(edges[:-1], right, width=np.diff(edges), align="edge", label="RM agrees",
            color="tab:blue")
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
    ax2.plot([r["confidence"] for r in rows], [r["agreement"] for r in rows], "o-",
             color="tab:blue")
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
