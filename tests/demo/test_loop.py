"""demo.loop (issue 20): the report's pieces on synthetic runs (fast): gold-ordered same-prompt
pairs of a segment, the per-seed bar (≥ 2 SE of the difference, ≤ 5% labels); and the shortened
proof end to end (slow): the demo's quick world, frozen and loop arms, a refresh between steps,
the simulated labeler answering through the labeling API; demo.spread's paired differences over
PPO seeds."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from demo import loop_report, refresh_probe, spread
from demo import world as gold_world
from demo.loop import LoopDemoConfig, arms

GOOD, BAD = " is really great.", " is great great great wonderful great great"


def test_segment_pairs_are_same_prompt_pairs_ordered_by_gold(tmp_path):
    rows = [{"step": 1, "prompt": "overall the story", "response": GOOD},
            {"step": 2, "prompt": "overall the story", "response": BAD},
            {"step": 2, "prompt": "the plot", "response": GOOD},  # alone: no pair
            {"step": 3, "prompt": "overall the story", "response": BAD},  # another segment
            {"step": 1, "prompt": "the acting", "response": GOOD},
            {"step": 2, "prompt": "the acting", "response": GOOD}]  # same text: no pair
    path = tmp_path / "rollouts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = loop_report.segment_pairs(path, 1, 2)
    assert gold_world.gold("overall the story", GOOD) > gold_world.gold("overall the story", BAD)
    assert pairs == [{"prompt": "overall the story", "chosen": GOOD, "rejected": BAD}]


def test_probe_pairs_and_rank_correlation():
    rows = [{"step": st, "prompt": p, "response": y} for st, p, y in (
        (1, "p", GOOD), (2, "p", BAD), (2, "q", GOOD), (2, "q", GOOD), (3, "p", GOOD))]
    assert refresh_probe.same_prompt_pairs(rows, 1, 2) == [("p", GOOD, BAD)]
    assert refresh_probe.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert refresh_probe.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties get average ranks (0.5, 0.5, 2, 3) against (0, 1, 2, 3): 4.5 / sqrt(4.5 * 5)
    assert refresh_probe.spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833)


def run(final: float, se: float, fraction: float | None = None) -> dict:
    out = {"final_gold": final, "final_gold_se": se, "gold_accuracy": [],
           "curve": [{"step": s, "kl": s / 2, "score": s / 10, "gold": final, "gold_se": se}
                     for s in (3, 4, 5)]}
    if fraction is not None:
        out["labels"] = {"fraction": fraction, "judgments": 1, "rollouts": 1}
    return out


def test_the_bar_is_per_seed_two_standard_errors_with_few_labels():
    names = arms(LoopDemoConfig())
    assert [a[0] for a in names] == ["frozen_beta0", "loop_beta0"]
    results = {s: {"runs": {"frozen_beta0": run(0.2, 0.06), "loop_beta0": run(0.6, 0.08, 0.047)}}
               for s in (0, 1, 2)}
    s = loop_report.summarize(results, names)
    row = s["by_seed"][0]["loop_beta0"]
    assert row["diff"] == pytest.approx(0.4) and row["se"] == pytest.approx(0.1)
    assert row["z"] == pytest.approx(4.0) and row["met"]
    assert s["bar"]["loop_beta0_beats_frozen_by_2se_every_seed"]
    results[1]["runs"]["loop_beta0"] = run(0.35, 0.08, 0.047)  # 1.5 SE on one seed
    assert not loop_report.summarize(results, names)["bar"][
        "loop_beta0_beats_frozen_by_2se_every_seed"]
    results[1]["runs"]["loop_beta0"] = run(0.9, 0.08, 0.06)  # far ahead, but 6% labels
    s = loop_report.summarize(results, names)
    assert not s["by_seed"][1]["loop_beta0"]["met"]
    assert s["arms"]["loop_beta0"]["final_gold"] == pytest.approx((0.6 + 0.9 + 0.6) / 3)
    loop_report.print_summary(s)


def test_spread_pairs_runs_and_takes_the_se_over_ppo_seeds():
    diffs = [0.5, -0.1, 0.3, 0.7]
    d = spread.paired(diffs)
    mean = sum(diffs) / 4
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 3)  # sample SD, by hand
    assert d["n"] == 4 and d["mean"] == pytest.approx(mean)
    assert d["se"] == pytest.approx(sd / 2) and d["z"] == pytest.approx(mean / (sd / 2))
    assert math.isnan(spread.paired([0.2])["se"])


def first_step(run) -> list[str]:
    rows = [json.loads(x) for x in (run / "rollouts.jsonl").read_text().splitlines()]
    return [r["response"] for r in rows if r["step"] == 1]


@pytest.mark.slow
def test_quick_loop_proof_runs_end_to_end(tmp_path):
    out = tmp_path / "loop"
    proc = subprocess.run([sys.executable, "-m", "demo.loop", "--quick", "--out", str(out),
                           "--seeds", "0", "--threads", "1"], capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads((out / "loop.json").read_text())
    assert set(s["arms"]) == {"frozen_beta0", "loop_beta0"} and s["seeds"] == [0]
    loop = s["arms"]["loop_beta0"]
    [labels] = loop["labels_by_seed"]
    assert 0 < labels["judgments"] <= 3 * 4 and labels["fraction"] <= 0.05
    [refreshes] = loop["refreshes_by_seed"]
    assert [r["step"] for r in refreshes] == [2]  # every 2 of 4 steps, none after the last
    for name, arm in s["arms"].items():
        assert math.isfinite(arm["final_gold"]), name
    assert (out / "loop.png").stat().st_size > 1000
    assert "bar (β = 0" in proc.stdout
    # the refresh probe on the same seed's frozen run: a refresh at step 2, judged on 3..4
    proc = subprocess.run([sys.executable, "-m", "demo.refresh_probe", "--quick", "--out",
                           str(out), "--seeds", "0", "--settings", "loop:5e-4:2:2",
                           "--labels", "4"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [row] = json.loads((out / "refresh_probe.json").read_text())["seeds"]["0"]
    [refresh] = row["refreshes"]
    assert refresh["step"] == 2 and 0 < refresh["labels"] <= 4
    for side in ("before", "after"):
        assert -1 <= refresh[side]["rho"] <= 1 and refresh[side]["samples"] > 0
    # the noiseless labeler: every fresh label is the gold order (ties aside)
    proc = subprocess.run([sys.executable, "-m", "demo.refresh_probe", "--quick", "--out",
                           str(out), "--seeds", "0", "--settings", "exact:5e-4:1:0",
                           "--labels", "4", "--labeler-temperature", "0"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "refresh_probe-t0.json").exists()
    fresh = [json.loads(x) for x in (out / "seed-0" / "refresh_probe" / "exact-t0" /
                                     "train-2.jsonl").read_text().splitlines()]
    assert 0 < len(fresh) <= 4  # replay ratio 0: the fresh labels alone
    assert all(gold_world.gold(r["prompt"], r["chosen"])
               >= gold_world.gold(r["prompt"], r["rejected"])
               for r in fresh)
    # demo.spread: one more PPO seed on the same world; the world's own pair reused
    proc = subprocess.run([sys.executable, "-m", "demo.spread", "--quick", "--out", str(out),
                           "--seeds", "0", "--reps", "1", "--threads", "1"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    w = json.loads((out / "spread.json").read_text())["worlds"]["0"]
    assert [r["ppo_seed"] for r in w["runs"]] == [0, 100]
    own = w["runs"][0]
    assert own["frozen"] == pytest.approx(s["arms"]["frozen_beta0"]["final_gold"])
    assert own["loop"] == pytest.approx(s["arms"]["loop_beta0"]["final_gold"])
    assert w["loop_minus_frozen"]["mean"] == pytest.approx(
        sum(r["loop"] - r["frozen"] for r in w["runs"]) / 2)
    seed = out / "seed-0"  # same PPO seed: the arms' first step is the same; another: not
    assert first_step(seed / "frozen_beta0_ppo100") == first_step(seed / "loop_beta0_ppo100")
    assert first_step(seed / "frozen_beta0_ppo100") != first_step(seed / "frozen_beta0")
