"""The demo's evaluation, table and plots: gold (hidden) against RM score (learned), per policy
and over PPO steps."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from demo import world as gold_world
from demo.evaluate import evaluate_policy, read_prompts


def rm_scores(address: str, samples: list[dict]) -> list[float]:
    from rm_client import RewardClient, text_sample
    with RewardClient(address, client_id="demo-eval") as rm:
        res = rm.score_all([text_sample(str(i), s["prompt"], s["response"])
                            for i, s in enumerate(samples)])
    return [r.reward for r in res]


def last_mean(log: list[dict], key: str, n: int = 3) -> float | None:
    vals = [r[key] for r in log[-n:] if r.get(key) is not None]
    return statistics.fmean(vals) if vals else None


def evaluate_all(cfg, world: Path, sft: Path, rm: Path, ppo: Path, ppo0: Path | None,
                 address: str) -> dict:
    prompts = read_prompts(str(world / "heldout_prompts.jsonl"))
    policies = {"base": world / "base", "sft": sft, "ppo": ppo}
    if ppo0 is not None:
        policies["ppo_beta0"] = ppo0
    out = {"policies": {}}
    for name, path in policies.items():
        res = evaluate_policy(str(path), prompts, cfg.eval_samples, seed=cfg.seed + 1)
        scores = rm_scores(address, res["samples"])
        for s, r in zip(res["samples"], scores):
            s["rm"] = r
        out["policies"][name] = {
            "gold": res["mean_gold"], "gold_stderr": res["stderr_gold"],
            "parse_rate": res["parse_rate"], "rm_score": statistics.fmean(scores),
            "samples": res["samples"][:6]}
        print(f"  evaluated {name}: gold {res['mean_gold']:+.3f} ± {res['stderr_gold']:.3f}, "
              f"RM {statistics.fmean(scores):+.3f}", flush=True)
    for name, path in (("ppo", ppo), ("ppo_beta0", ppo0)):
        if path is not None:
            log = [json.loads(x) for x in (path / "train_log.jsonl").read_text().splitlines() if x]
            kl_records = [r for r in log if "kl" in r]
            out["policies"][name]["kl_to_reference"] = last_mean(kl_records, "kl")
    rm_eval = json.loads((rm / "eval.json").read_text())
    w = json.loads((world / "world.json").read_text())
    bayes = w.get("bayes_agreement") or w.get("labels", {}).get("bayes_agreement")
    out["rm"] = {"accuracy": rm_eval.get("accuracy"), "bayes_agreement": bayes}
    p = out["policies"]
    out["ppo_minus_sft_gold"] = p["ppo"]["gold"] - p["sft"]["gold"]
    out["ppo_minus_sft_in_stderr"] = out["ppo_minus_sft_gold"] / max(
        1e-9, (p["ppo"]["gold_stderr"] ** 2 + p["sft"]["gold_stderr"] ** 2) ** 0.5)
    return out


def print_summary(summary: dict) -> None:
    pol = summary["policies"]
    print("\n" + "=" * 78)
    print(f"{'policy':<12}{'gold (hidden)':>20}{'RM score':>12}{'KL to SFT':>12}{'parses':>10}")
    for name, p in pol.items():
        kl = p.get("kl_to_reference")
        print(f"{name:<12}{p['gold']:>+12.3f} ± {p['gold_stderr']:.3f}{p['rm_score']:>12.3f}"
              f"{'' if kl is None else f'{kl:.3f}':>12}{p['parse_rate']:>10.2f}")
    rm = summary["rm"]
    print(f"\nreward model: held-out accuracy {rm['accuracy']:.3f} vs Bayes ceiling "
          f"{rm['bayes_agreement']:.3f} (the labels are noisy: no RM can beat the ceiling)")
    print(f"PPO - SFT gold: {summary['ppo_minus_sft_gold']:+.3f} "
          f"({summary['ppo_minus_sft_in_stderr']:.1f} standard errors)")
    m = summary.get("server_metrics") or {}
    if m.get("rm_batch_size_count"):
        padding = m["rm_padding_ratio_sum"] / max(1, m["rm_padding_ratio_count"])
        wait_s = m["rm_queue_wait_seconds_sum"] / max(1, m["rm_queue_wait_seconds_count"])
        print(f"rm-server /metrics: {m['rm_samples_total']:.0f} samples scored in "
              f"{m['rm_batch_size_count']:.0f} batches (mean batch "
              f"{m['rm_batch_size_sum'] / m['rm_batch_size_count']:.1f}, mean padding "
              f"{padding:.0%}, mean queue wait {1e3 * wait_s:.1f} ms)")
    o = summary.get("overoptimization")
    if o:
        print(f"beta = 0 over PPO steps (rollouts, 3-step means): gold peaked at "
              f"{o['peak_gold']:+.2f} (step {o['peak_step']}, KL {o['peak_kl']:.1f}, RM "
              f"{o['peak_score']:+.2f}) and ended at {o['final_gold']:+.2f} (KL "
              f"{o['final_kl']:.1f}) while the RM score rose to {o['final_score']:+.2f}")
    print("\nsamples (held-out prompts):")
    for name in ("sft", "ppo", "ppo_beta0"):
        if name in pol:
            for s in pol[name]["samples"][:3]:
                print(f"  {name:<10} gold {s['gold']:+.2f} RM {s['rm']:+.2f} | {s['prompt']} "
                      f"|{s['response']}")


def gold_by_step(rollouts: Path) -> dict[int, float]:
    """Mean gold of each PPO step's rollouts (the trainer logs them; gold is computed here)."""
    per: dict[int, list[float]] = {}
    if rollouts.exists():
        for line in rollouts.read_text().splitlines():
            r = json.loads(line)
            per.setdefault(r["step"], []).append(gold_world.gold(r["prompt"], r["response"]))
    return {k: statistics.fmean(v) for k, v in sorted(per.items())}


def plots(out: Path, log: list[dict], log0: list[dict]) -> bool:
    """ppo_curves.png (and overoptimization.png with ``log0``); False, with one line saying how
    to get them, when matplotlib (the [plots] extra) is not installed."""
    from policy_trainer.plots import plots_missing

    if (missing := plots_missing()) is not None:
        print(missing)
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log, log0 = ([r for r in lg if "score" in r] for lg in (log, log0))  # skip event records
    gold = gold_by_step(out / "ppo" / "rollouts.jsonl")
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    steps = [r["step"] for r in log]
    axes[0].plot(list(gold), list(gold.values()), "o-", color="tab:green")
    axes[0].set(title="gold reward (hidden) of rollouts", xlabel="PPO step")
    axes[1].plot(steps, [r["score"] for r in log], "o-", color="tab:blue")
    axes[1].set(title="RM score of rollouts", xlabel="PPO step")
    axes[2].plot(steps, [r["kl"] for r in log], "o-", color="tab:red")
    axes[2].set(title="KL(policy || SFT), nats per sequence", xlabel="PPO step")
    fig.tight_layout()
    fig.savefig(out / "ppo_curves.png", dpi=100)
    plt.close(fig)
    if not log0:
        return True
    gold0 = gold_by_step(out / "ppo_beta0" / "rollouts.jsonl")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for lg, gd, label, style in ((log, gold, "beta > 0", "-"), (log0, gold0, "beta = 0", "--")):
        kl = {r["step"]: r["kl"] for r in lg}
        xs = [kl[s] for s in gd if s in kl]
        ax.plot(xs, [gd[s] for s in gd if s in kl], "o" + style, color="tab:green",
                label=f"gold, {label}")
        ax.plot([r["kl"] for r in lg], [r["score"] for r in lg], "s" + style, color="tab:blue",
                label=f"RM score, {label}")
    ax.set(xlabel="KL(policy || SFT), nats", ylabel="reward",
           title="Reward over-optimization: RM score vs hidden gold as KL grows")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "overoptimization.png", dpi=100)
    plt.close(fig)
    return True


def overoptimization(run: Path, window: int = 3) -> dict | None:
    """Where the beta = 0 run's gold peaked and where it ended, with the RM score and KL there:
    means over ``window`` consecutive steps of the logged rollouts (one step's 64 are noisy)."""
    gold = gold_by_step(run / "rollouts.jsonl")
    logs = {}
    if (run / "train_log.jsonl").exists():
        for line in (run / "train_log.jsonl").read_text().splitlines():
            r = json.loads(line)
            if "score" in r:
                logs[r["step"]] = r
    steps = [s for s in gold if s in logs]
    if len(steps) < window:
        return None

    def mean_at(i: int) -> dict:
        w = steps[i: i + window]
        return {"step": w[-1], "gold": statistics.fmean(gold[s] for s in w),
                "kl": statistics.fmean(logs[s]["kl"] for s in w),
                "score": statistics.fmean(logs[s]["score"] for s in w)}

    points = [mean_at(i) for i in range(len(steps) - window + 1)]
    peak, last = max(points, key=lambda p: p["gold"]), points[-1]
    return {"peak_step": peak["step"], "peak_gold": peak["gold"], "peak_kl": peak["kl"],
            "peak_score": peak["score"], "final_gold": last["gold"], "final_kl": last["kl"],
            "final_score": last["score"]}
