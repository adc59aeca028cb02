"""demo.ensemble's figures: gold against KL per run, over seeds, against the bar.

Per run (a PPO output folder): the final policy's gold on held-out prompts (mean ± its standard
error over the samples), and a curve over the steps from the logged rollouts (64 a step): in
windows of 3 steps, the mean gold (± its SE), KL to the SFT model, the optimized score and the
ensemble members' spread.

Over seeds, per run name: the final gold's mean and its standard error over the seeds
(std / √n); the seed-mean curve, its SE the sampling SE of that mean. The bar (issue 21), at
β = 0, for the worst-case or uncertainty-weighted run:

1. final gold above the single RM's by at least 2 standard errors of the difference, both
   as independent means (√(SE_a² + SE_b²)) and paired by seed (std of the differences / √n);
2. its seed-mean gold never falls more than its SE (at the peak) below its own peak.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from demo import world as gold_world
from demo.evaluate import evaluate_policy, read_prompts

WINDOW = 3
SINGLE = {"ppo_beta0": True, "ppo": False}  # the single RM's runs: β = 0?
CHALLENGERS = ("ens_min_beta0", "ens_uwo_beta0", "ens_uwo_strong_beta0")  # the bar is theirs
STYLE = {"ppo": ("single RM", "black"), "mean": ("ensemble, mean", "tab:green"),
         "min": ("ensemble, min", "tab:blue"), "uwo": ("ensemble, uwo", "tab:red"),
         "uwo_strong": ("ensemble, uwo, large λ", "tab:purple"),
         "centered": ("single RM, centered", "tab:gray")}


def style(name: str) -> tuple[str, str]:
    """(label, color) of a run name."""
    if name in SINGLE:
        return STYLE["ppo"]
    key = name.removesuffix("_beta0").removeprefix("ens_")
    return STYLE[key]


def run_figures(run: Path, world: Path, eval_samples: int, seed: int) -> dict:
    """The final policy's held-out gold and the run's curve over the steps."""
    res = evaluate_policy(str(run), read_prompts(str(world / "heldout_prompts.jsonl")),
                          eval_samples, seed=seed + 1)
    return {"final_gold": res["mean_gold"], "final_gold_se": res["stderr_gold"],
            "parse_rate": res["parse_rate"], "curve": curve(run)}


def curve(run: Path) -> list[dict]:
    """Windows of WINDOW steps: {step (the last), kl, score, member_std, gold, gold_se}."""
    golds: dict[int, list[float]] = {}
    for line in (run / "rollouts.jsonl").read_text().splitlines():
        r = json.loads(line)
        golds.setdefault(r["step"], []).append(gold_world.gold(r["prompt"], r["response"]))
    logs = {r["step"]: r for r in map(json.loads, (run / "train_log.jsonl").read_text()
                                      .splitlines()) if "score" in r}
    steps = [s for s in sorted(golds) if s in logs]
    window = min(WINDOW, len(steps))  # a shortened run (--quick) has fewer steps
    out = []
    for i in range(len(steps) - window + 1):
        w = steps[i:i + window]
        g = [x for s in w for x in golds[s]]
        out.append({"step": w[-1], "kl": statistics.fmean(logs[s]["kl"] for s in w),
                    "score": statistics.fmean(logs[s]["score"] for s in w),
                    "member_std": _mean_or_none([logs[s].get("member_std") for s in w]),
                    "gold": statistics.fmean(g),
                    "gold_se": statistics.pstdev(g) / math.sqrt(len(g))})
    return out


def _mean_or_none(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def _se(xs: list[float]) -> float:
    return statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else math.nan


def _z(diff: float, se: float) -> float:
    """diff in standard errors (nan when there is no SE: one seed)."""
    if math.isnan(se) or se == 0:
        return math.nan if math.isnan(se) or diff == 0 else math.copysign(math.inf, diff)
    return diff / se


def summarize(results: dict, names: list[str]) -> dict:
    """Per run name over the seeds, and the bar."""
    seeds = list(results)
    arms = {}
    for name in names:
        finals = [results[s]["runs"][name]["final_gold"] for s in seeds]
        curves = [results[s]["runs"][name]["curve"] for s in seeds]
        n = min(len(c) for c in curves)
        mean_curve = [{
            "step": curves[0][i]["step"],
            **{k: statistics.fmean(c[i][k] for c in curves) for k in ("kl", "score", "gold")},
            "gold_se": math.sqrt(sum(c[i]["gold_se"] ** 2 for c in curves)) / len(curves),
            "member_std": _mean_or_none([c[i]["member_std"] for c in curves])}
            for i in range(n)]
        arms[name] = {"final_gold": statistics.fmean(finals), "final_gold_se": _se(finals),
                      "final_gold_by_seed": finals, "curve": mean_curve, **fall(mean_curve)}
    for name, arm in arms.items():
        single = "ppo_beta0" if name.endswith("beta0") else "ppo"
        if name in SINGLE:
            continue
        mine = arm["final_gold_by_seed"]
        theirs = arms[single]["final_gold_by_seed"]
        diffs = [a - b for a, b in zip(mine, theirs)]
        se_unpaired = math.hypot(arm["final_gold_se"], arms[single]["final_gold_se"])
        diff = statistics.fmean(diffs)
        arm["vs_single"] = {"diff": diff, "se_unpaired": se_unpaired, "se_paired": _se(diffs),
                            "z_unpaired": _z(diff, se_unpaired), "z_paired": _z(diff, _se(diffs))}
    bar = {name: {"beats_single_by_2se": min(arms[name]["vs_single"]["z_unpaired"],
                                             arms[name]["vs_single"]["z_paired"]) >= 2,
                  "never_below_peak_by_1se": arms[name]["fall_in_se"] <= 1}
           for name in CHALLENGERS if name in arms}
    for b in bar.values():
        b["met"] = b["beats_single_by_2se"] and b["never_below_peak_by_1se"]
    return {"seeds": seeds, "arms": arms, "bar": bar,
            "bar_met": any(b["met"] for b in bar.values()),
            "by_seed": {s: {k: results[s].get(k) for k in ("rm_accuracy", "ensemble", "seconds")}
                        for s in seeds}}


def fall(curve: list[dict]) -> dict:
    """Where the curve's gold peaked, how far below it it went afterwards (and in SEs)."""
    i = max(range(len(curve)), key=lambda j: curve[j]["gold"])
    worst = min(c["gold"] for c in curve[i:])
    drop = curve[i]["gold"] - worst
    return {"peak_gold": curve[i]["gold"], "peak_step": curve[i]["step"],
            "peak_kl": curve[i]["kl"], "end_gold": curve[-1]["gold"], "end_kl": curve[-1]["kl"],
            "fall": drop, "fall_in_se": drop / curve[i]["gold_se"] if curve[i]["gold_se"] else 0}


def print_summary(s: dict) -> None:
    n = len(s["seeds"])
    print("\n" + "=" * 100)
    print(f"PPO against one RM vs an ensemble, {n} seed(s) {s['seeds']}: final gold on held-out "
          f"prompts (mean over seeds ± SE over seeds); seed-mean curve of the logged rollouts")
    print(f"{'run':<22}{'final gold':>18}{'vs single (z unpaired/paired)':>32}"
          f"{'peak (KL)':>16}{'end (KL)':>16}{'fall/SE':>9}{'spread':>8}")
    for name, a in s["arms"].items():
        vs = a.get("vs_single")
        vs_text = (f"{vs['diff']:+.3f} ({vs['z_unpaired']:.1f}/{vs['z_paired']:.1f})"
                   if vs else "")
        spread = a["curve"][-1]["member_std"]
        print(f"{name:<22}{a['final_gold']:>+11.3f} ± {a['final_gold_se']:.3f}{vs_text:>32}"
              f"{a['peak_gold']:>+9.2f} ({a['peak_kl']:4.1f}){a['end_gold']:>+9.2f} "
              f"({a['end_kl']:4.1f}){a['fall_in_se']:>9.1f}"
              f"{'' if spread is None else f'{spread:.3f}':>8}")
    for seed, b in s["by_seed"].items():
        e = b["ensemble"]
        if e:
            print(f"seed {seed}: single RM accuracy {b['rm_accuracy']:.3f}; ensemble "
                  f"{e['members']} members, mean {e['accuracy']['mean']:.3f}, std of Δ across "
                  f"members {e['disagreement']['delta_std']:.3f}, Δ correlation "
                  f"{e['disagreement']['delta_correlation']:.3f}")
    for name, b in s["bar"].items():
        print(f"bar, {name}: beats the single RM by ≥ 2 SE: {b['beats_single_by_2se']}; never "
              f"more than 1 SE below its peak: {b['never_below_peak_by_1se']} -> "
              f"{'MET' if b['met'] else 'not met'}")


def plot(s: dict, path: Path) -> bool:
    """Gold against KL, seed means, β = 0 and the demo's β side by side."""
    from policy_trainer.plots import plots_missing

    if (missing := plots_missing()) is not None:
        print(missing)
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    for name, a in s["arms"].items():
        ax = axes[0] if name.endswith("beta0") else axes[1]
        label, color = style(name)
        c = a["curve"]
        ax.errorbar([p["kl"] for p in c], [p["gold"] for p in c], [p["gold_se"] for p in c],
                    marker="o", ms=3, capsize=2, color=color, label=f"{label} (gold)")
        ax.plot([p["kl"] for p in c], [p["score"] for p in c], ":", color=color,
                alpha=0.6, label=f"{label} (optimized score)")
    axes[0].set(title="β = 0", xlabel="KL(policy || SFT), nats", ylabel="reward")
    axes[1].set(title="the demo's β", xlabel="KL(policy || SFT), nats")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Gold reward against KL, mean over seeds {s['seeds']} (3-step windows ± SE)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
