"""bench.gpu_check's dry run: the GPU run's JSON, made on the CPU, so the command cannot rot.

The real run needs a CUDA machine (bench/RESULTS.md "GPU run"). The dry run takes the same code
paths at tiny sizes (pytest -m gpu, bench.kernel_timings.kernel_rows, bench.serve with its
limit and naive server, the time budgets) and must write a file of the same schema.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOP = {"schema", "dry_run", "started", "seconds", "command", "ok", "environment", "device",
       "budget_s", "parts"}
PART = {"status", "reason", "seconds", "budget_s", "commands"}
STATUSES = {"ok", "failed", "timeout", "error", "skipped"}
KERNEL_VARIANTS = {
    ("last_token_score", v) for v in
    ("triton", "eager (B rows)", "compile (B rows)", "eager HF-style (B*T rows)")} | {
    (op, v) for op in ("token_logprobs fwd", "token_logprobs fwd+bwd")
    for v in ("triton", "eager naive", "compile naive")}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-models")


def run_check(out: Path, cache: Path, *extra: str):
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(out),
                           "--cache", str(cache), *extra], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert out.is_file(), proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    check_schema(report)
    return proc, report


def check_schema(report: dict) -> None:
    assert TOP <= report.keys()
    assert report["schema"] == "rlhf-rm-service/gpu-check/1" and report["dry_run"] is True
    assert report["device"]["type"] == "cpu" and report["device"]["peaks"] is None
    assert set(report["parts"]) == {"tests", "kernels", "serve"}
    for name, part in report["parts"].items():
        assert PART <= part.keys(), name
        assert part["status"] in STATUSES, name
        assert part["status"] == "ok" or part["reason"], f"{name}: {part['status']}, no reason"
        assert part["seconds"] <= part["budget_s"] + 15, name  # + the stop's grace


def test_dry_run_writes_the_gpu_runs_json_with_every_part(tmp_path, cache):
    proc, report = run_check(tmp_path / "gpu-check.json", cache)
    assert proc.returncode == 0 and report["ok"], proc.stdout
    tests, kernels, serve = (report["parts"][k] for k in ("tests", "kernels", "serve"))

    # the gpu-marked kernel tests were selected and ran (on the CPU they skip themselves)
    assert tests["tests"] and all(t["outcome"] in ("passed", "skipped") for t in tests["tests"])
    assert tests["counts"]["passed"] + tests["counts"]["skipped"] == len(tests["tests"])
    assert tests["counts"]["failed"] == tests["counts"]["error"] == 0

    # every (op, variant) of the GPU run: measured, or skipped with its reason (compile)
    assert {(r["op"], r["variant"]) for r in kernels["rows"]} == KERNEL_VARIANTS
    for r in kernels["rows"]:
        assert r.get("skipped") or (r["ms"] > 0 and r["gbps"] > 0), r
        assert "bw_frac" not in r  # no peak for the CPU: absolute figures only

    # ours, the in-process limit and the naive server on the same samples; MFU needs a peak
    res = serve["result"]
    assert serve["point"]["clients"] == 64
    for who in ("ours", "limit", "naive"):
        assert res[f"{who}_rate"] > 0 and res[f"{who}_tflops"] > 0
        assert res[f"{who}_mfu"] is None
    assert res["a_over_b"] > 0 and res["a_over_c"] > 0 and res["tokens_per_sample"] > 0
    assert 0 < serve["model"]["params_for_mfu"] < serve["model"]["params"]
    assert "2 * N * tokens_per_s" in serve["mfu_formula"]


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(cmdline)
    return found


def test_a_part_out_of_time_is_stopped_with_its_servers_and_says_so(tmp_path, cache):
    proc, report = run_check(tmp_path / "gpu-check.json", cache,
                             "--parts", "serve", "--budget", "serve=6")
    assert proc.returncode == 1 and not report["ok"]
    for name in ("tests", "kernels"):
        part = report["parts"][name]
        assert part["status"] == "skipped" and "--parts" in part["reason"]
    serve = report["parts"]["serve"]
    assert serve["status"] == "timeout" and "stopped after 6 s" in serve["reason"]
    # bench.serve and the servers it started (their command lines name the cache) are gone
    deadline = time.monotonic() + 10
    while _processes_mentioning(str(cache)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _processes_mentioning(str(cache))


# ------------------------------------------------ what only the GPU run computes, checked here

@pytest.mark.parametrize("name, key", [
    ("NVIDIA H200", "H200"), ("NVIDIA H200 NVL", "H200 NVL"), ("NVIDIA H100 80GB HBM3", "H100"),
    ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA A100-SXM4-80GB", "A100-SXM4-80GB"),
    ("NVIDIA A100-SXM4-40GB", "A100"), ("NVIDIA L40S", "L40S"), ("NVIDIA L4", "L4"),
    ("NVIDIA A10G", "A10G"), ("NVIDIA A10", "A10"), ("Tesla T4", None)])
def test_device_peaks_match_the_most_specific_name(name, key):
    from bench.kernel_timings import match_peaks

    found, gbps, tflops = match_peaks(name)
    assert found == key
    assert (gbps is None) == (tflops is None) == (key is None)


def test_mfu_is_model_flops_over_the_peak():
    from bench.gpu_check import serve_result

    row = {"ours_rate": 500.0, "limit_rate": 1000.0, "naive_rate": 100.0, "a_over_b": 0.5,
           "a_over_c": 5.0, "limit_best_bs": 32}
    res = serve_result(row, tokens_per_sample=200.0, n_flop=10**9, peak_tflops=1000.0)
    # 2 * 1e9 FLOPs per token * 500 samples/s * 200 tokens = 200 TFLOP/s = 0.2 of 1000
    assert res["ours_tflops"] == pytest.approx(200.0) and res["ours_mfu"] == pytest.approx(0.2)
    assert res["limit_mfu"] == pytest.approx(0.4) and res["naive_mfu"] == pytest.approx(0.04)
    assert serve_result(row, 200.0, 10**9, None)["ours_mfu"] is None  # unknown device
