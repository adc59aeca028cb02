"""bench.trl_ppo's dry run (8 prompts, 4 new tokens, 3 steps): our side of the comparison with
TRL 1.12's PPOTrainer runs end to end (real server, the CLI, the CPU probe), so the benchmark
cannot rot; TRL's side too where its virtual environment has been made (python -m
bench.trl_ppo makes it; CI has none). The figures are bench/RESULTS.md's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PHASES = ("generate", "score", "reference", "train")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-models")


def dry_run(tmp_path: Path, cache: Path, *extra: str) -> dict:
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-m", "bench.trl_ppo", "--dry-run", "--cache",
                           str(cache), "--work", str(tmp_path / "work"), "--json-out", str(out),
                           *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "policy-trainer ppo" in proc.stdout  # the table
    return json.loads(out.read_text())


def test_our_side_runs_and_reports_the_step_split(tmp_path, cache):
    result = dry_run(tmp_path, cache, "--ours-only")
    ours = result["ours"]
    assert ours["failed"] == 0
    assert ours["step"] > 0 and ours["generate"] > 0 and ours["train"] > 0
    assert all(ours[p] >= 0 for p in PHASES)
    assert ours["cpu"] > 0 and ours["rm_cpu"] >= 0  # the probe read both processes
    assert "trl" not in result and "ratio" not in result


@pytest.mark.skipif(not (ROOT / ".venv-trl112" / ".installed").is_file(),
                    reason="no TRL 1.12 venv (.venv-trl112: python -m bench.trl_ppo makes it)")
def test_trl_side_runs_with_and_without_its_gc_collect(tmp_path, cache):
    result = dry_run(tmp_path, cache)
    assert result["trl"]["step"] > 0 and result["trl"]["gc"] > 0
    assert result["trl_no_gc"]["gc"] == 0  # gc.collect patched out in the child
    assert result["ratio"] > 0 and result["ratio_cpu"] > 0
