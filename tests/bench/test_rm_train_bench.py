"""bench.rm_train's dry run (a few pairs, one epoch): our side of the comparison with TRL 1.16's
RewardTrainer runs end to end through the CLI, with the packed forward, and the quality
evaluator scores it, so the benchmark cannot rot; TRL's side too where its virtual environment
has been made (python -m bench.rm_train makes it; CI has none). The figures are
bench/RESULTS.md's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--pairs", "96", "--heldout", "64", "--epochs", "1", "--reps", "1"]


def run_bench(tmp_path: Path, *extra: str) -> tuple[dict, str]:
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-m", "bench.rm_train", *SMALL, "--work",
                           str(tmp_path / "work"), "--json", str(out), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_our_side_trains_packed_and_is_scored(tmp_path):
    result, _ = run_bench(tmp_path, "--ours-only")
    (ours,) = result["runs"]["ours"]
    assert ours["forward"].startswith("forward: packed pairs")
    assert ours["steps"] == 3 and ours["seconds"] > 0 and ours["cpu_seconds"] > 0
    assert 0.0 <= ours["agreement"] <= 1.0 and -1.0 <= ours["spearman"] <= 1.0
    assert result["runs"]["trl"] == []


def test_profile_times_each_forward_variant(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.rm_train", "--profile",
                           "--profile-steps", "2", "--pairs", "64", "--heldout", "8", "--work",
                           str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for variant in ("padded", "each prompt twice", "prompt once", "attention fn", "scored rows"):
        assert variant in proc.stdout


@pytest.mark.skipif(not (ROOT / ".venv-trl116" / ".installed").is_file(),
                    reason="no TRL 1.16 venv (.venv-trl116: python -m bench.rm_train makes it)")
def test_trl_side_runs_beside_ours(tmp_path):
    result, stdout = run_bench(tmp_path)
    runs, summary = result["runs"], result["summary"]
    for key in ("trl", "trl_group_by_length"):  # TRL's default sampler and its length-grouped one
        (trl,) = runs[key]
        assert trl["trl"] == "1.16.0" and trl["steps"] == 3 and trl["seconds"] > 0
        ratio = runs["ours"][0]["pairs_per_s"] / trl["pairs_per_s"]
        assert summary[f"vs_{key}"]["ratio_pairs_per_s"] == pytest.approx(ratio)
        assert f"vs {key}" in stdout
    fastest = summary["fastest_trl"]
    assert summary["ratio_pairs_per_s"] == summary[f"vs_{fastest}"]["ratio_pairs_per_s"]
    assert summary[f"{fastest}_pairs_per_s"] == max(r[0]["pairs_per_s"] for k, r in runs.items()
                                                    if k.startswith("trl"))
