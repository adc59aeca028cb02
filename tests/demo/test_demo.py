"""A shortened `make demo` end to end: every stage is the real CLI, the RM a real server."""

import json
import math
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quick_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "demo.run", "--quick", "--out", str(out),
                           "--eval-samples", "64", "--threads", "1"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    pol = summary["policies"]
    assert set(pol) == {"base", "sft", "ppo", "ppo_beta0"}
    for name, p in pol.items():
        assert math.isfinite(p["gold"]) and 0 < p["gold_stderr"] < 1, name
        assert math.isfinite(p["rm_score"]) and 0 <= p["parse_rate"] <= 1, name
        assert p["samples"] and all("response" in s for s in p["samples"])
    assert pol["ppo"]["kl_to_reference"] >= 0 and pol["ppo_beta0"]["kl_to_reference"] >= 0
    assert 0.5 <= summary["rm"]["accuracy"] <= 1 and 0.5 < summary["rm"]["bayes_agreement"] < 1
    assert summary["server_metrics"]["rm_samples_total"] > 0  # the PPO runs went over gRPC
    for png in ("ppo_curves.png", "overoptimization.png", "rm/eval.png", "rm/train_curves.png"):
        assert (out / png).stat().st_size > 1000, png
    assert "PPO - SFT gold" in proc.stdout and "reward model: held-out accuracy" in proc.stdout
