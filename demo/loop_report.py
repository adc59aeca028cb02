"""demo.loop's figures: frozen RM against the live loop, per seed and over seeds, and the bar.

Per run (a PPO output folder): the final policy's gold on held-out prompts (± its SE over the
samples); gold, KL and the optimized score over the steps (ensemble_report.curve: 3-step windows
of the logged rollouts); for a loop run, the labels used (judgments) as a fraction of the PPO
rollouts and every refresh's decision (refresh_log.jsonl); for every run, at each refresh step
s, the RM's accuracy against the *gold* order on the policy's own samples of the next segment
(steps s+1 .. s+N: same-prompt pairs of the logged rollouts, none of which any RM trained on):
the RM serving before the refresh and the one serving after it (the same for a frozen run).

The bar (issue 20), at β = 0, per seed: the loop's final gold above the frozen RM's by at least
2 standard errors of the difference (√(SE_loop² + SE_frozen²), sampling SEs), with labels on at
most 5% of the rollouts.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from demo import world as gold_world
from demo.ensemble_report import curve
from demo.evaluate import evaluate_policy, read_prompts

MAX_LABEL_FRACTION = 0.05
BATCH = 64  # the demo's rollouts per PPO step (demo/run.py ppo_command)


def run_figures(run: Path, root: Path, cfg, seed: int) -> dict:
    res = evaluate_policy(str(run), read_prompts(str(root / "world" / "heldout_prompts.jsonl")),
                          cfg.eval_samples, seed=seed + 1)
    out = {"final_gold": res["mean_gold"], "final_gold_se": res["stderr_gold"],
           "parse_rate": res["parse_rate"], "curve": curve(run)}
    refreshes = read_jsonl(run / "refresh" / "refresh_log.jsonl")
    stats_path = run / "feedback_stats.json"
    if stats_path.exists():
        stats = json.loads(stats_path.read_text())
        judged = sum((stats.get("judgments") or {}).values())
        out["labels"] = {"judgments": judged, "rollouts": cfg.steps * BATCH,
                         "fraction": judged / (cfg.steps * BATCH), "stats": stats}
        out["refreshes"] = [{k: r.get(k) for k in (
            "refresh", "step", "judgments", "train_judgments", "eval_judgments", "replayed",
            "current_eval", "candidate_eval", "promote", "reason", "seconds")}
            for r in refreshes]
    steps = ([r["step"] for r in refreshes] if refreshes
             else list(range(cfg.refresh_every, cfg.steps, cfg.refresh_every)))
    before_after = {r["step"]: (r["rm_before"], r["current"]) for r in refreshes}
    out["gold_accuracy"] = []
    for s in steps:
        before, after = before_after.get(s, (str(root / "rm"), str(root / "rm")))
        pairs = segment_pairs(run / "rollouts.jsonl", s + 1, s + cfg.refresh_every)
        if not pairs:
            continue
        data = run / "gold_pairs" / f"after-step-{s}.jsonl"
        data.parent.mkdir(exist_ok=True)
        data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
        acc_before = rm_accuracy(Path(before), data, run / "gold_pairs" / f"{s}-before",
                                 cfg.threads)
        acc_after = (acc_before if after == before else
                     rm_accuracy(Path(after), data, run / "gold_pairs" / f"{s}-after",
                                 cfg.threads))
        out["gold_accuracy"].append({"step": s, "pairs": len(pairs), "before": acc_before,
                                     "after": acc_after})
    return out


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def segment_pairs(rollouts: Path, first: int, last: int) -> list[dict]:
    """Same-prompt pairs of the logged rollouts of steps first..last, ordered by the gold
    reward (chosen = higher gold); gold ties left out."""
    by_prompt: dict[str, list[str]] = {}
    for r in read_jsonl(rollouts):
        if first <= r["step"] <= last:
            by_prompt.setdefault(r["prompt"], []).append(r["response"])
    pairs = []
    for prompt, responses in by_prompt.items():
        for a, b in zip(responses[::2], responses[1::2]):
            ga, gb = gold_world.gold(prompt, a), gold_world.gold(prompt, b)
            if a != b and ga != gb:
                chosen, rejected = (a, b) if ga > gb else (b, a)
                pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def rm_accuracy(model: Path, data: Path, out: Path, threads: int) -> float:
    """``policy-trainer rm-eval``'s accuracy of ``model`` on ``data`` (in this process)."""
    import contextlib
    import io

    from policy_trainer import cli

    with contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(["rm-eval", "--model", str(model), "--data", str(data), "--out", str(out),
                       "--no-progress", "--threads", str(threads)])
    if rc != 0:
        raise SystemExit(f"demo: rm-eval of {model} on {data} failed ({rc})")
    return json.loads((out / "eval.json").read_text())["accuracy"]


def _se(xs: list[float]) -> float:
    return statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else math.nan


def summarize(results: dict, arms: list[tuple[str, float, bool]]) -> dict:
    seeds = list(results)
    out = {"seeds": seeds, "by_seed": {}, "arms": {}}
    for seed in seeds:
        runs = results[seed]["runs"]
        row = {"seconds": results[seed].get("seconds")}
        for name, _beta, loop in arms:
            if not loop:
                continue
            frozen = runs[name.replace("loop", "frozen")]
            mine = runs[name]
            diff = mine["final_gold"] - frozen["final_gold"]
            se = math.hypot(mine["final_gold_se"], frozen["final_gold_se"])
            fraction = mine.get("labels", {}).get("fraction", math.nan)
            row[name] = {"diff": diff, "se": se, "z": diff / se if se else math.nan,
                         "label_fraction": fraction,
                         "met": diff >= 2 * se and fraction <= MAX_LABEL_FRACTION}
        out["by_seed"][seed] = row
    for name, *_ in arms:
        finals = [results[s]["runs"][name]["final_gold"] for s in seeds]
        curves = [results[s]["runs"][name]["curve"] for s in seeds]
        n = min(len(c) for c in curves)
        out["arms"][name] = {
            "final_gold": statistics.fmean(finals), "final_gold_se": _se(finals),
            "final_gold_by_seed": finals,
            "final_gold_se_by_seed": [results[s]["runs"][name]["final_gold_se"] for s in seeds],
            "curve": [{"step": curves[0][i]["step"],
                       **{k: statistics.fmean(c[i][k] for c in curves)
                          for k in ("kl", "score", "gold")},
                       "gold_se": math.sqrt(sum(c[i]["gold_se"] ** 2 for c in curves))
                       / len(curves)} for i in range(n)],
            "curves_by_seed": curves,
            "gold_accuracy_by_seed": [results[s]["runs"][name]["gold_accuracy"] for s in seeds],
            "labels_by_seed": [results[s]["runs"][name].get("labels") for s in seeds],
            "refreshes_by_seed": [results[s]["runs"][name].get("refreshes") for s in seeds]}
    bar_rows = [out["by_seed"][s]["loop_beta0"] for s in seeds]
    out["bar"] = {"loop_beta0_beats_frozen_by_2se_every_seed": all(r["met"] for r in bar_rows)}
    return out


def print_summary(s: dict) -> None:
    print("\n" + "=" * 100)
    print(f"frozen RM vs the live loop, seeds {s['seeds']}: final gold on held-out prompts "
          "(± SE over the samples)")
    names = list(s["arms"])
    for i, seed in enumerate(s["seeds"]):
        parts = [f"{n} {s['arms'][n]['final_gold_by_seed'][i]:+.3f} ± "
                 f"{s['arms'][n]['final_gold_se_by_seed'][i]:.3f}" for n in names]
        print(f"seed {seed}: " + ", ".join(parts))
        for name, row in s["by_seed"][seed].items():
            if isinstance(row, dict):
                print(f"   {name} − frozen: {row['diff']:+.3f} ({row['z']:.1f} SE), labels "
                      f"{100 * row['label_fraction']:.1f}% of rollouts -> "
                      f"{'MET' if row['met'] else 'not met'}")
    for name, a in s["arms"].items():
        print(f"{name:<14} mean over seeds {a['final_gold']:+.3f} ± {a['final_gold_se']:.3f}; "
              f"curve end gold {a['curve'][-1]['gold']:+.2f} at KL {a['curve'][-1]['kl']:.1f}")
        for i, acc in enumerate(a["gold_accuracy_by_seed"]):
            text = ", ".join(f"s{x['step']}: {x['before']:.2f}→{x['after']:.2f} ({x['pairs']})"
                             for x in acc)
            print(f"   seed {s['seeds'][i]} RM accuracy vs gold on the next segment's samples: "
                  f"{text}")
    print(f"bar (β = 0, every seed, ≥ 2 SE, ≤ 5% labels): "
          f"{'MET' if s['bar']['loop_beta0_beats_frozen_by_2se_every_seed'] else 'not met'}")


def plot(s: dict, path: Path) -> bool:
    """Gold and KL over the steps, frozen vs loop, per seed (thin) and seed mean (thick)."""
    from policy_trainer.plots import plots_missing

    if (missing := plots_missing()) is not None:
        print(missing)
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"frozen_beta0": "black", "loop_beta0": "tab:red", "frozen": "gray",
              "loop": "tab:orange"}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for name, a in s["arms"].items():
        color = colors.get(name, "tab:blue")
        for c in a["curves_by_seed"]:
            axes[0].plot([p["step"] for p in c], [p["gold"] for p in c], color=color, alpha=0.25,
                         lw=1)
            axes[1].plot([p["step"] for p in c], [p["kl"] for p in c], color=color, alpha=0.25,
                         lw=1)
        c = a["curve"]
        axes[0].errorbar([p["step"] for p in c], [p["gold"] for p in c],
                         [p["gold_se"] for p in c], color=color, lw=2, capsize=2, label=name)
        axes[1].plot([p["step"] for p in c], [p["kl"] for p in c], color=color, lw=2, label=name)
        axes[2].plot([p["kl"] for p in c], [p["gold"] for p in c], "o-", ms=3, color=color,
                     label=name)
    refresh_steps = sorted({x["step"] for a in s["arms"].values()
                            for acc in a["gold_accuracy_by_seed"] for x in acc})
    for ax in axes[:2]:
        for x in refresh_steps:
            ax.axvline(x, color="tab:red", ls=":", lw=0.8)
    axes[0].set(title="gold reward (hidden) over PPO steps", xlabel="step", ylabel="gold")
    axes[1].set(title="KL(policy || SFT)", xlabel="step", ylabel="nats")
    axes[2].set(title="gold against KL (seed means)", xlabel="KL, nats", ylabel="gold")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"frozen RM vs the live loop (refreshes dotted), seeds {s['seeds']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
