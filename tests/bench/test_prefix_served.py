"""bench.prefix_served's dry run: two real servers (new and old token budget), the shared,
flat and mixed loads, the ratios and the cache probe at tiny sizes, so the benchmark cannot rot.
Its figures: bench/RESULTS.md (no timing is asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.prefix_served import flat_pool, shared_pool

ROOT = Path(__file__).resolve().parents[2]


def test_loads_share_what_they_say():
    shared = shared_pool(4, 3, prompt=20, response=5, seed=0)
    flat = flat_pool(4, 3, prompt=20, response=5, seed=0)
    assert len(shared) == len(flat) == 12 and {len(s) for s in shared + flat} == {25}
    assert all(s[:20] == shared[0][:20] for s in shared[:4]) and shared[4][:20] != shared[0][:20]
    assert len({tuple(s[:16]) for s in flat}) == 12  # nothing shared


def test_dry_run_writes_ratios_and_the_probe(tmp_path):
    out = tmp_path / "prefix.json"
    proc = subprocess.run([sys.executable, "-m", "bench.prefix_served", "--dry-run",
                           "--cache-probe", "--out", str(out), "--cache", str(tmp_path / "m")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["ratios"]) == {"k=8 shared/flat new", "k=8 shared/flat old",
                                  "k=4 shared/flat new", "k=4 shared/flat old", "mixed new/old"}
    assert all(r > 0 for r in res["ratios"].values())
    assert set(res["cpu_ratios"]) == set(res["ratios"])
    assert all(r > 0 for r in res["cpu_ratios"].values())
    loads = {(r["load"], r["server"]) for r in res["per_rep"]}
    assert loads == {(load, s) for load in ("shared-8", "flat-8", "shared-4", "flat-4", "mixed")
                     for s in ("new", "old")}
    # every request answered: the servers scored what the clients sent
    assert all(r["samples"] == r["requests"] * (1 if r["load"] == "mixed" else
                                                int(r["load"].split("-")[1]))
               for r in res["per_rep"])
    probe = res["cache_probe"]["k=4"]
    assert probe["batches"] >= 1
    for slots in (1, 4, 16):
        hits = probe[f"last {slots} batches"]
        assert hits["prefix_runs"] >= 1 and 0 <= hits["hits"] <= hits["prefix_runs"]


def test_cache_probe_counts_prefixes_seen_in_recent_batches():
    from bench.prefix_served import _hits

    a, b = list(range(100, 120)), list(range(200, 220))  # two 20-token prompts
    batches = [[a + [1], a + [2]], [b + [3], b + [4]], [a + [5], [7] * 25], [a + [6]]]
    # prefixes run: a, b, a and 7s (a single sample longer than the prompt), a
    one = _hits(batches, 1, prompt=20, min_prefix=16)
    assert (one["prefix_runs"], one["hits"]) == (5, 1)  # a in batch 4: batch 3 held it
    two = _hits(batches, 2, prompt=20, min_prefix=16)
    assert two["hits"] == 2  # a in batch 3 too: batch 1 is within the last two
    computed = 21 + 1 + 21 + 1 + 21 + 25 + 21  # each group's prompt once
    assert two["tokens_saved_share"] == 2 * 20 / computed
