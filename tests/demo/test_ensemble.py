"""demo.ensemble (issue 21): the figures over seeds and the bar, on synthetic run folders (fast);
and a shortened proof end to end (slow): every stage the real CLI, both RMs real servers."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from demo import ensemble_report
from demo.ensemble import ARMS, EnsembleDemoConfig, chosen_arms

GOOD, BAD = "is really great.", "is great great great wonderful great great"


def fake_run(path, golden_until: int, steps: int = 9) -> None:
    """A run whose rollouts are grammatical praise until ``golden_until``, repetition after."""
    path.mkdir(parents=True)
    rows, log = [], []
    for step in range(1, steps + 1):
        response = " " + (GOOD if step <= golden_until else BAD)
        rows += [{"step": step, "prompt": "overall the story", "response": response}] * 4
        log.append({"step": step, "score": step / 10, "kl": float(step),
                    "member_std": 0.05 if "ens" in path.name else None})
    (path / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))


def test_curve_windows_and_the_bar(tmp_path):
    results = {}
    for seed in (0, 1, 2):
        runs = {}
        for name, *_ in ARMS:
            path = tmp_path / f"s{seed}" / name
            fake_run(path, 9 if name.startswith("ens") else 4)  # the single RM gets hacked
            final = ((1.5, 1.6, 1.4) if name.startswith("ens") else (-1.0, -0.8, -1.1))[seed]
            runs[name] = {"final_gold": final, "final_gold_se": 0.05,
                          "curve": ensemble_report.curve(path)}
        results[seed] = {"runs": runs, "rm_accuracy": 0.7, "ensemble": {}, "seconds": 1.0}
    c = results[0]["runs"]["ppo_beta0"]["curve"]
    assert [p["step"] for p in c] == list(range(3, 10)) and c[0]["kl"] == 2.0
    assert c[0]["gold"] > 1 > c[-1]["gold"] and c[0]["gold_se"] == 0  # identical rollouts
    s = ensemble_report.summarize(results, [a[0] for a in ARMS])
    single, wco = s["arms"]["ppo_beta0"], s["arms"]["ens_min_beta0"]
    assert single["fall"] > 1 and wco["fall"] == 0
    vs = wco["vs_single"]
    assert vs["diff"] == pytest.approx(2.5 - 0.1 / 3)
    assert vs["se_unpaired"] == pytest.approx(math.hypot(0.1, 0.152753) / math.sqrt(3), rel=1e-4)
    assert vs["z_unpaired"] > 2 and vs["z_paired"] > 2
    assert s["bar"]["ens_min_beta0"] == {"beats_single_by_2se": True,
                                         "never_below_peak_by_1se": True, "met": True}
    assert s["bar_met"]
    for name in ("ens_min_beta0", "ens_uwo_beta0", "ens_uwo_strong_beta0"):
        results[0]["runs"][name]["final_gold"] = -5.0  # one bad seed: not 2 SE
    assert not ensemble_report.summarize(results, [a[0] for a in ARMS])["bar_met"]
    ensemble_report.print_summary(s)


def test_arms_chooses_runs_and_keeps_the_single_rm():
    assert chosen_arms(EnsembleDemoConfig()) == ARMS
    names = [a[0] for a in chosen_arms(EnsembleDemoConfig(arms=("ens_uwo_beta0", "ens_min")))]
    assert names == ["ppo_beta0", "ens_uwo_beta0", "ppo", "ens_min"]  # ARMS' order
    with pytest.raises(SystemExit, match="unknown"):
        chosen_arms(EnsembleDemoConfig(arms=("ens_max",)))


def test_figures_are_kept_per_run_until_the_policy_changes(tmp_path, monkeypatch):
    from demo import ensemble

    calls = []
    monkeypatch.setattr(ensemble_report, "run_figures",
                        lambda run, world, n, seed: calls.append(n) or {"final_gold": len(calls)})
    run = tmp_path / "ens_min_beta0"
    run.mkdir()
    (run / "config.json").write_text("{}")
    assert ensemble.cached_figures(run, tmp_path, 256, 0) == {"final_gold": 1}
    assert ensemble.cached_figures(run, tmp_path, 256, 0) == {"final_gold": 1}  # kept
    assert ensemble.cached_figures(run, tmp_path, 128, 0) == {"final_gold": 2}  # other settings
    import os
    os.utime(run / "config.json", (1, 1))  # a new policy in the folder
    assert ensemble.cached_figures(run, tmp_path, 128, 0) == {"final_gold": 3}
    assert calls == [256, 128, 128]


@pytest.mark.slow
def test_quick_ensemble_proof_runs_end_to_end(tmp_path):
    out = tmp_path / "ens"
    proc = subprocess.run([sys.executable, "-m", "demo.ensemble", "--quick", "--out", str(out),
                           "--seeds", "0", "--members", "3", "--eval-samples", "32",
                           "--threads", "1"], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads((out / "ensemble.json").read_text())
    assert set(s["arms"]) == {a[0] for a in ARMS} and s["seeds"] == [0]
    assert s["by_seed"]["0"]["ensemble"]["members"] == 3
    for name, arm in s["arms"].items():
        assert math.isfinite(arm["final_gold"]), name
    assert (out / "ensemble.png").stat().st_size > 1000
    assert "bar, ens_uwo_beta0" in proc.stdout
