"""One prepared GPU run: the `gpu` kernel tests, the kernel timings, a 1B RM served; one JSON.

On a machine with one CUDA GPU and nothing installed but this project:

    make gpu-check TORCH=torch                 # .venv with PyPI's torch (a CUDA build), then:
    python -m bench.gpu_check --out out/gpu-check.json
    python -m bench.gpu_check --dry-run --out X.json    # the same on the CPU, tiny, ~30 s

Three parts run one after the other, each in a child process (its own process group) under a
time budget. A part that runs out of time is stopped, keeps what it measured so far and says
"timeout" in the JSON; a part that gets no time is "skipped", with the reason. Seconds, for
the GPU run / the dry run (test: tests/bench/test_gpu_check.py):

  tests     90 / 40   pytest tests/kernels -m gpu: outcome per test, counts
  kernels  180 / 30   bench.kernel_timings.kernel_rows: each Triton kernel against torch eager
                      and torch.compile (the dry run skips compile): ms, GB/s, TFLOP/s and their
                      fraction of the device's peak (bench.kernel_timings.DEVICE_PEAKS: NVIDIA's
                      datasheets, dense BF16; an unknown device gets absolute figures only)
  serve    210 / 90   bench.serve on rm-1b (bench.common: a 990M-parameter Llama built from a
                      config, saved and served in bf16): ours at 64 closed-loop clients against
                      the in-process limit and the naive one-forward-per-request server, with MFU
  total    540 / 150  the cap over all parts (setup included): 9 minutes, 1 under the 10

MFU = 2 · N · tokens_per_s / peak_flops: N = parameters without the input embedding (a lookup,
no FLOPs), tokens = the real (unpadded) tokens scored per second, peak = the device's dense BF16
tensor-core FLOP/s; attention's 4 · layers · context · hidden FLOPs per token are left out
(under 2% of the total for rm-1b at the mixed lengths, 16-512 tokens). The JSON (top level:
schema, dry_run, started, seconds, command, ok, environment, device, budget_s, parts) is
described field by field in bench/RESULTS.md, "GPU run".
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # children run `-m ...` from this checkout
SCHEMA = "rlhf-rm-service/gpu-check/1"
PARTS = ("tests", "kernels", "serve")
# seconds per part: (GPU run, dry run); TOTAL caps everything, setup included
BUDGETS = {"tests": (90, 40), "kernels": (180, 30), "serve": (210, 90)}
TOTAL = (540, 150)
MIN_PART_S = 5  # a part offered less than this is skipped, not started
# kernel shapes: the GPU run uses bench.kernel_timings' defaults (a Llama-3-8B head)
KERNEL_SIZES = {False: dict(dtype="bf16", score_b=64, score_t=2048, score_h=4096,
                            n=8192, v=128256, h=4096),
                True: dict(dtype="fp32", score_b=4, score_t=64, score_h=128, n=256, v=1000, h=64)}
# bench.serve's point: (GPU run, dry run)
SERVE = {False: dict(model="rm-1b", mix="mixed", pool=512, clients=64, reps=3,
                     batch_sizes="1,2,4,8,16,32,64", point_seconds=4, max_cycles=2,
                     device="cuda", dtype="bfloat16", threads=2),
         True: dict(model="rm-7m", mix="short", pool=32, clients=64, reps=1, batch_sizes="1,8",
                    point_seconds=0.5, max_cycles=1, device="cpu", dtype="float32", threads=1)}
MFU_FORMULA = ("MFU = 2 * N * tokens_per_s / peak_flops; N = parameters without the input "
               "embedding; tokens = real (unpadded) tokens scored; peak = dense BF16 tensor-core "
               "FLOP/s of the device; attention FLOPs left out")


# ------------------------------------------------------------------------ children, budgeted
class Child:
    """A command in its own process group, its output collected line by line as it comes."""

    def __init__(self, cmd: list[str]):
        self.stdout: list[str] = []
        self.stderr: collections.deque[str] = collections.deque(maxlen=400)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, start_new_session=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.readers = [threading.Thread(target=self._read, args=(s, sink), daemon=True)
                        for s, sink in ((self.proc.stdout, self.stdout),
                                        (self.proc.stderr, self.stderr))]
        for t in self.readers:
            t.start()

    @staticmethod
    def _read(stream, sink) -> None:
        for line in stream:
            sink.append(line.rstrip("\n"))

    def wait(self, timeout: float) -> tuple[int | None, bool]:
        """(exit code, timed out); out of time (or interrupted), the whole group is stopped."""
        try:
            rc, timed_out = self.proc.wait(max(0.1, timeout)), False
        except subprocess.TimeoutExpired:
            self.stop()
            rc, timed_out = self.proc.poll(), True
        except BaseException:  # Ctrl-C, SIGTERM (main turns it into SystemExit): no orphans
            self.stop()
            raise
        for t in self.readers:
            t.join(5)
        return rc, timed_out

    def stop(self) -> None:
        """SIGTERM to the child and what it started (servers), 10 s, then SIGKILL to all left."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
                time.sleep(1)  # servers finishing their own SIGTERM
            except subprocess.TimeoutExpired:
                pass
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # the group is gone
            pass
        self.proc.wait()


def _part(budget: float, status: str = "ok", reason: str | None = None) -> dict:
    return {"status": status, "reason": reason, "seconds": 0.0, "budget_s": round(budget, 1),
            "commands": []}


def _tail(lines, n: int = 30) -> str:
    return "\n".join(list(lines)[-n:])


def _py(*args: str) -> list[str]:
    return [sys.executable, *args]


# ------------------------------------------------------------------------------------ parts
TEST_LINE = re.compile(r"^(tests/\S+::\S+)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)")
SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")


def part_tests(cfg, budget: float) -> dict:
    """pytest tests/kernels -m gpu; outcomes read from -v lines as they come (kept on timeout)."""
    out = _part(budget)
    cmd = _py("-m", "pytest", "tests/kernels", "-m", "gpu", "-v", "-rs", "-p", "no:cacheprovider")
    out["commands"].append(" ".join(cmd[1:]))
    child = Child(cmd)
    rc, timed_out = child.wait(budget)
    tests = [{"id": m.group(1), "outcome": m.group(2).lower()}
             for m in map(TEST_LINE.match, child.stdout) if m]
    counts = collections.Counter(t["outcome"] for t in tests)
    finals = [ln for ln in child.stdout if ln.startswith("=") and re.search(r" in [\d.]+s", ln)]
    if finals:  # pytest's own summary also counts collection errors and deselected tests
        counts = collections.Counter({k.rstrip("s") if k.startswith("error") else k: int(n)
                                      for n, k in SUMMARY.findall(finals[-1])})
    out.update(counts={k: counts.get(k, 0) for k in
                       ("passed", "failed", "skipped", "error", "deselected")},
               tests=tests, returncode=rc, log_tail=_tail(child.stdout))
    if timed_out:
        out.update(status="timeout", reason=f"stopped after {budget:.0f} s; "
                   f"{len(tests)} tests had finished")
    elif rc == 1:
        out.update(status="failed", reason=f"{counts['failed']} failed, {counts['error']} errors")
    elif rc != 0:
        out.update(status="error", reason=f"pytest exited {rc}")
    elif not counts["passed"]:
        skips = [ln for ln in child.stdout if ln.startswith("SKIPPED")]
        out["reason"] = (f"all {counts['skipped']} selected tests skipped themselves"
                         + (f": {skips[0]}" if skips else ""))
    return out


def part_kernels(cfg, budget: float) -> dict:
    """bench.kernel_timings.kernel_rows in a child that prints one JSON row per line."""
    out = _part(budget)
    cmd = _py("-m", "bench.gpu_check", "--child-kernels", *(["--dry-run"] if cfg.dry_run else []))
    out["commands"].append(" ".join(cmd[1:]))
    out.update(sizes=KERNEL_SIZES[cfg.dry_run], compile=not cfg.dry_run)
    child = Child(cmd)
    rc, timed_out = child.wait(budget)
    rows = [json.loads(ln) for ln in child.stdout if ln.startswith("{")]
    out["rows"] = rows
    errors = [f"{r['op']} / {r['variant']}: {r['error']}" for r in rows if "error" in r]
    if timed_out:
        out.update(status="timeout", reason=f"stopped after {budget:.0f} s; {len(rows)} rows "
                   "measured")
    elif rc != 0:
        out.update(status="error", reason=f"exited {rc}: {_tail(child.stderr, 8)}")
    elif errors:
        out.update(status="failed", reason="; ".join(errors))
    elif cfg.dry_run:
        out["reason"] = "dry run: CPU torch paths, torch.compile variants skipped"
    return out


def child_kernels(dry_run: bool) -> None:
    import torch

    from bench.kernel_timings import kernel_rows

    args = argparse.Namespace(device="cpu" if dry_run else "cuda", peak_gbps=None,
                              peak_tflops=None, **KERNEL_SIZES[dry_run])
    if dry_run:
        torch.set_num_threads(1)
    for row in kernel_rows(args, compile=not dry_run, keep_going=True):
        print(json.dumps(row), flush=True)


def part_serve(cfg, budget: float, peak_tflops: float | None) -> dict:
    """Build the model (its own child), then one point of bench.serve; MFU from its rates."""
    from bench.common import sample_pool

    s = SERVE[cfg.dry_run]
    out = _part(budget)
    out.update(point={k: s[k] for k in ("model", "mix", "pool", "clients", "reps", "device",
                                        "dtype")}, mfu_formula=MFU_FORMULA, progress=[])
    end = time.monotonic() + budget
    if not build_model(cfg, s, out, end):
        return out
    with tempfile.TemporaryDirectory(prefix="gpu-check-serve-") as tmp:
        row = serve_point(cfg, s, out, end, Path(tmp) / "serve.json")
    if row is None:
        return out
    pool = sample_pool(s["mix"], s["pool"], seed=0)  # bench.serve's pool (its default seed)
    tokens = sum(map(len, pool)) / len(pool)
    out["result"] = serve_result(row, tokens, out["model"]["params_for_mfu"], peak_tflops)
    out["raw"] = {k: v for k, v in row.items() if not k.endswith("_runs")}
    if cfg.dry_run:
        out["reason"] = f"dry run: {s['model']} on the CPU in fp32, no MFU (no peak)"
    return out


def build_model(cfg, s: dict, out: dict, end: float) -> bool:
    """The benchmark model, built (or found in the cache) by a child; out["model"] describes it."""
    from bench.common import num_parameters

    cmd = _py("-m", "bench.gpu_check", "--child-build", s["model"], "--cache", str(cfg.cache),
              "--device", s["device"])
    out["commands"].append(" ".join(cmd[1:]))
    child = Child(cmd)
    rc, timed_out = child.wait(end - time.monotonic())
    if timed_out or rc != 0:
        out.update(status="timeout" if timed_out else "error", reason=(
            f"stopped after {out['budget_s']:.0f} s, building {s['model']}" if timed_out
            else f"building {s['model']}: {_tail(child.stderr, 8)}"))
        return False
    model_dir = Path(child.stdout[-1])
    mcfg = json.loads((model_dir / "config.json").read_text())
    params = num_parameters(model_dir)
    out["model"] = {"name": s["model"], "dir": str(model_dir), "params": params,
                    # the input embedding is a lookup, not a matmul: no FLOPs
                    "params_for_mfu": params - mcfg["vocab_size"] * mcfg["hidden_size"],
                    "config": {k: mcfg[k] for k in (
                        "hidden_size", "intermediate_size", "num_hidden_layers",
                        "num_attention_heads", "num_key_value_heads", "vocab_size")}}
    return True


def serve_point(cfg, s: dict, out: dict, end: float, result_file: Path) -> dict | None:
    """bench.serve's row for the point, or None (out says why); its progress lines kept."""
    cmd = _py("-m", "bench.serve", "--models", s["model"], "--mixes", s["mix"],
              "--modes", "unary", "--clients", str(s["clients"]), "--reps", str(s["reps"]),
              "--pool", f"{s['mix']}={s['pool']}", "--limit-batch-sizes", s["batch_sizes"],
              "--point-seconds", str(s["point_seconds"]), "--max-cycles", str(s["max_cycles"]),
              "--min-requests", "1", "--whole-passes", "--sweep-reps", "1",
              "--threads", str(s["threads"]),
              "--server-cpus", "", "--client-cpus", "", "--device", s["device"],
              "--dtype", s["dtype"], "--cache", str(cfg.cache), "--json-out", str(result_file))
    out["commands"].append(" ".join(repr(a) if a == "" else a for a in cmd[1:]))
    child = Child(cmd)
    rc, timed_out = child.wait(end - time.monotonic())
    out["progress"] = [ln for ln in child.stderr if ln.startswith("[")]  # bench.serve's lines
    if timed_out:
        out.update(status="timeout", reason=f"stopped after {out['budget_s']:.0f} s; "
                   "progress holds what was measured")
    elif rc != 0 or not result_file.is_file():
        out.update(status="error", reason=f"bench.serve exited {rc}: {_tail(child.stderr, 8)}")
    else:
        return json.loads(result_file.read_text())["rows"][0]
    return None


def serve_result(row: dict, tokens_per_sample: float, n_flop: int,
                 peak_tflops: float | None) -> dict:
    """Rates of ours, the limit and naive, the ratios, and each one's TFLOP/s and MFU."""
    res = {"tokens_per_sample": tokens_per_sample, "limit_best_bs": row["limit_best_bs"],
           "a_over_b": row["a_over_b"], "a_over_c": row.get("a_over_c")}
    for who in ("ours", "limit", "naive"):
        rate = row.get(f"{who}_rate")
        tflops = None if rate is None else 2 * n_flop * rate * tokens_per_sample / 1e12
        res.update({f"{who}_rate": rate, f"{who}_tflops": tflops,
                    f"{who}_mfu": tflops / peak_tflops if tflops and peak_tflops else None})
    for key in ("ours_p50_ms", "ours_p99_ms", "naive_p50_ms", "naive_p99_ms", "ours_padding",
                "ours_avg_batch", "limit_padding"):
        res[key] = row.get(key)
    return res


# ------------------------------------------------------------------------------ the report
def environment() -> dict:
    from importlib import metadata

    def version(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    import torch
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or None
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "triton": version("triton"), "transformers": version("transformers"),
            "git_commit": commit}


def device_info(dry_run: bool) -> dict:
    import torch

    from bench.kernel_timings import PEAKS_SOURCE, match_peaks

    if dry_run or not torch.cuda.is_available():
        return {"type": "cpu", "name": "cpu", "peaks": None}
    p = torch.cuda.get_device_properties(0)
    key, gbps, tflops = match_peaks(p.name)
    return {"type": "cuda", "name": p.name, "memory_gib": p.total_memory / 2**30,
            "multiprocessors": p.multi_processor_count, "capability": f"{p.major}.{p.minor}",
            "count": torch.cuda.device_count(),
            "peaks": {"key": key, "hbm_gbps": gbps, "bf16_tflops": tflops,
                      "source": PEAKS_SOURCE} if key else None}


def _clean(x):
    """NaN and inf -> None: the file is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_clean(report), indent=1, allow_nan=False))
    os.replace(tmp, path)


def check(cfg) -> dict:
    t0, end = time.monotonic(), time.monotonic() + cfg.total
    report = {"schema": SCHEMA, "dry_run": cfg.dry_run,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": None,
              "command": " ".join(["python -m bench.gpu_check", *cfg.argv]), "ok": False,
              "environment": environment(), "device": device_info(cfg.dry_run),
              "budget_s": {**cfg.budgets, "total": cfg.total}, "parts": {}}
    peaks = report["device"]["peaks"] or {}
    env = report["environment"]
    no_gpu = (not cfg.dry_run and report["device"]["type"] != "cuda" and (
        f"no CUDA device: torch {env['torch']} is a CPU build (make clean; make gpu-check "
        "TORCH=torch)" if env["torch_cuda"] is None else
        f"no CUDA device: torch.cuda.is_available() is False (torch {env['torch']}, CUDA "
        f"{env['torch_cuda']}; driver? CUDA_VISIBLE_DEVICES?)"))
    for name in PARTS:
        budget = min(cfg.budgets[name], end - time.monotonic() - 5)  # 5 s to write the file
        if name not in cfg.parts:
            part = _part(0, "skipped", "not selected (--parts)")
        elif no_gpu:
            part = _part(0, "skipped", no_gpu)
        elif budget < MIN_PART_S:
            part = _part(max(budget, 0), "skipped", "no time left of the total budget")
        else:
            print(f"[gpu-check] {name}: up to {budget:.0f} s", file=sys.stderr, flush=True)
            p0 = time.monotonic()
            part = (part_tests(cfg, budget) if name == "tests" else
                    part_kernels(cfg, budget) if name == "kernels" else
                    part_serve(cfg, budget, peaks.get("bf16_tflops")))
            part["seconds"] = time.monotonic() - p0
        report["parts"][name] = part
        report["seconds"] = time.monotonic() - t0
        write(report, cfg.out)  # after every part: a killed run still leaves its file
    report["ok"] = all(p["status"] == "ok" for p in report["parts"].values())
    report["seconds"] = time.monotonic() - t0
    write(report, cfg.out)
    return report


def summary(report: dict) -> str:
    lines = [f"gpu-check on {report['device']['name']}: {report['seconds']:.0f} s, "
             f"{'ok' if report['ok'] else 'NOT ok'}"]
    for name, p in report["parts"].items():
        lines.append(f"  {name:8s} {p['status']:8s} {p['seconds']:6.1f} s"
                     + (f"  {p['reason']}" if p["reason"] else ""))
    r = report["parts"].get("serve", {}).get("result")
    if r:
        f = lambda x, d=1: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
        lines.append(f"  served: ours {f(r['ours_rate'])}/s, limit {f(r['limit_rate'])}/s, "
                     f"naive {f(r['naive_rate'])}/s; ours/limit {f(r['a_over_b'], 2)}, "
                     f"ours/naive {f(r['a_over_c'], 2)}; MFU ours {f(r['ours_mfu'], 3)}, "
                     f"limit {f(r['limit_mfu'], 3)}, naive {f(r['naive_mfu'], 3)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--out", type=Path, default=Path("out/gpu-check.json"))
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, tiny sizes, short budgets: the same JSON (what the tests run)")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma list of " + ", ".join(PARTS))
    ap.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS",
                    help="override one part's time budget (repeatable)")
    ap.add_argument("--total", type=float, help="override the cap over all parts (seconds)")
    ap.add_argument("--cache", type=Path, help="model cache (default: bench.common's)")
    ap.add_argument("--child-kernels", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-build", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    cfg = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through Child.wait
    if cfg.child_kernels:
        return child_kernels(cfg.dry_run) or 0
    from bench.common import DEFAULT_CACHE, ensure_model

    cfg.cache = cfg.cache or DEFAULT_CACHE
    if cfg.child_build:
        print(ensure_model(cfg.child_build, cfg.cache, cfg.device))
        return 0
    cfg.argv = argv
    cfg.parts = [p for p in cfg.parts.split(",") if p]
    unknown = set(cfg.parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    cfg.budgets = {k: v[cfg.dry_run] for k, v in BUDGETS.items()}
    for item in cfg.budget:
        k, _, v = item.partition("=")
        if k not in PARTS:
            ap.error(f"--budget {item}: unknown part {k!r}")
        cfg.budgets[k] = float(v)
    cfg.total = cfg.total or TOTAL[cfg.dry_run]
    report = check(cfg)
    print(summary(report))
    print(f"wrote {cfg.out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
