"""Benchmarks for kernels/: each op against the math it replaces, measured side by side.

CPU (no GPU needed):
    python -m bench.kernel_timings --device cpu
  - peak memory of token_logprobs (chunked torch path) against log_softmax(h @ W.T).gather(...),
    forward (the frozen reference) and forward + backward (the policy); every variant runs in
    a fresh process and reports its peak RSS over its inputs (VmHWM after a reset);
  - time of the same, interleaved, median of --repeats;
  - last_token_score on B rows against HF's norm + head over all B*T positions, then a pick.

GPU:
    python -m bench.kernel_timings --device cuda [--peak-gbps 3350 --peak-tflops 989]
  - each Triton kernel against torch eager and torch.compile of the same math: median time,
    achieved bandwidth as a fraction of the device's peak, TFLOP/s, and peak memory
    (torch.cuda.max_memory_allocated over the inputs). ``kernel_rows`` yields these rows one
    at a time (bench.gpu_check streams them; its --dry-run runs them on the CPU, tiny).

Prints one line per measurement and, with --json, a JSON list at the end.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from kernels import last_token_score, last_token_score_reference, token_logprobs
from kernels.dispatch import use_triton

ROOT = Path(__file__).resolve().parents[1]  # the children run `-m bench.kernel_timings` from here

# Substring of torch.cuda.get_device_name() -> (memory bandwidth GB/s, dense BF16 tensor-core
# TFLOP/s with FP32 accumulation, no 2:4 sparsity). Source: NVIDIA's product datasheets (H200,
# H200 NVL, H100 SXM5/PCIe/NVL, A100 40/80 GB, L40S, L40, L4, A10) and the Ada architecture
# whitepaper (RTX 4090); A10G (AWS's A10 variant) from AWS's G5 documentation. The datasheets
# quote sparse FLOP/s as well: the dense figure is half of it. Matched first key first, so
# the specific names (H100 PCIe, A100 80GB PCIe, L40S, A10G) come before their prefixes.
DEVICE_PEAKS = {"H200 NVL": (4800, 835), "H200": (4800, 989),
                "H100 NVL": (3900, 835), "H100 PCIe": (2000, 756), "H100": (3350, 989),
                "A100-SXM4-80GB": (2039, 312), "A100 80GB PCIe": (1935, 312),
                "A100": (1555, 312), "L40S": (864, 362), "L40": (864, 181), "L4": (300, 121),
                "A10G": (600, 70), "A10": (600, 125), "RTX 4090": (1008, 165)}
PEAKS_SOURCE = ("NVIDIA datasheets (dense BF16 tensor-core FLOP/s, memory bandwidth); "
                "bench/kernel_timings.py DEVICE_PEAKS")


def match_peaks(name: str) -> tuple[str | None, float | None, float | None]:
    """(table key, GB/s, TFLOP/s) for a device name; (None, None, None) when unknown."""
    for key, (gbps, tflops) in DEVICE_PEAKS.items():
        if key in name:
            return key, gbps, tflops
    return None, None, None


def naive_logprobs(h, w, y):
    """The baseline of the issue: log_softmax(h @ W.T).gather(...)."""
    return torch.log_softmax(h.float() @ w.float().t(), dim=-1).gather(-1, y[:, None])[:, 0]


def hf_style_score(hidden, index, w, norm_w, eps=1e-6):
    """What *ForSequenceClassification does: RMSNorm and head over all B*T rows, then pick."""
    x = hidden.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_w.float()  # (B, T, H)
    logits = x @ w.float().t()  # (B, T, L)
    return logits[torch.arange(hidden.shape[0], device=hidden.device), index]


# ---------------------------------------------------------------- CPU: peak memory per process

def _vm(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(variant, n, v, h, threads):
    """Runs in a fresh process: one variant once, after a tiny warm-up; prints the peak."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    hid, w = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g).mul_(0.05)
    y = torch.randint(0, v, (n,), generator=g)
    backward = variant.endswith("+bwd")
    fn = token_logprobs if variant.startswith("chunked") else naive_logprobs

    def run(a, b, t):
        if backward:
            a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
        out = fn(a, b, t)
        if backward:
            out.sum().backward()
        return out

    run(hid[:8], w[:300], y[:8] % 300)  # libraries and thread pools, not counted
    base = _vm("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    t0 = time.perf_counter()
    run(hid, w, y)
    seconds = time.perf_counter() - t0
    print(json.dumps({"peak_bytes": _vm("VmHWM:") - base, "seconds": seconds}))


def measure_in_child(variant, args):
    cmd = [sys.executable, "-m", "bench.kernel_timings", "--child", variant, "--n", str(args.n),
           "--v", str(args.v), "--h", str(args.h), "--threads", str(args.threads)]
    env = dict(os.environ, RLHF_KERNELS="torch")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_time(fn, repeats, sync=lambda: None):
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_cpu(args):
    torch.set_num_threads(args.threads)
    rows = []
    for pair in (("naive", "chunked"), ("naive+bwd", "chunked+bwd")):
        # interleave the variants, fresh process each time; median peak and time per variant
        runs = {v: [] for v in pair}
        for _ in range(args.mem_repeats):
            for v in pair:
                runs[v].append(measure_in_child(v, args))
        for v in pair:
            peak = statistics.median(r["peak_bytes"] for r in runs[v])
            sec = statistics.median(r["seconds"] for r in runs[v])
            rows.append(dict(op="token_logprobs", variant=v, n=args.n, v=args.v, h=args.h,
                             peak_mib=peak / 2**20, seconds=sec))
        base, ours = rows[-2], rows[-1]
        rows[-1]["peak_ratio_vs_naive"] = ours["peak_mib"] / base["peak_mib"]
        rows[-1]["time_ratio_vs_naive"] = ours["seconds"] / base["seconds"]
    # last-token scoring: B rows against all B*T positions (in-process, interleaved)
    B, T, H = 8, 512, 1024
    g = torch.Generator().manual_seed(0)
    hidden, w = torch.randn(B, T, H, generator=g), torch.randn(1, H, generator=g)
    nw, index = torch.rand(H, generator=g) + 0.5, torch.randint(0, T, (B,), generator=g)
    variants = {"all positions (HF)": lambda: hf_style_score(hidden, index, w, nw),
                "scored rows only": lambda: last_token_score_reference(
                    hidden, index, w, None, "rms", nw)}
    times = {k: [] for k in variants}
    for _ in range(args.repeats):
        for k, fn in variants.items():
            times[k].append(median_time(fn, 5))
    for k in variants:
        rows.append(dict(op="last_token_score", variant=k, b=B, t=T, h=H,
                         seconds=statistics.median(times[k])))
    rows[-1]["speedup_vs_hf"] = rows[-2]["seconds"] / rows[-1]["seconds"]
    return rows


# ---------------------------------------------------------------------------------------- GPU

def device_peaks(args):
    name = torch.cuda.get_device_name() if args.device != "cpu" else "cpu"
    _, gbps, tflops = match_peaks(name)
    return name, args.peak_gbps or gbps, args.peak_tflops or tflops


def gpu_measure(fn):
    """Median ms (triton's do_bench) and peak memory over what is allocated now."""
    from triton.testing import do_bench

    fn()  # compile / autotune outside the timed region
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
    return ms, peak


def cpu_measure(fn, repeats=5):
    """Median ms over ``repeats`` calls after one untimed call; no peak memory (None)."""
    fn()
    return 1000 * median_time(fn, repeats), None


def kernel_rows(args, compile=True, keep_going=False):
    """Yields one row per (op, variant) as soon as it is measured.

    ``args``: dtype, score_b/t/h, n/v/h, peak_gbps/peak_tflops and device ("cuda"; "cpu" runs
    the same variants, the ops on their torch paths, timed by ``cpu_measure``: the dry run of
    bench.gpu_check). ``compile=False`` yields the torch.compile variants as skipped rows;
    ``keep_going`` turns a variant that raises (a compile failure, OOM) into a row with
    ``error`` instead of ending the run.
    """
    device = args.device
    measure = gpu_measure if device != "cpu" else cpu_measure
    name, peak_gbps, peak_tflops = device_peaks(args)
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]

    def row(op, variant, fn, nbytes, flops=None, **shape):
        out = dict(op=op, variant=variant, device=name, dtype=args.dtype, **shape)
        if fn is None:
            return {**out, "skipped": "torch.compile not run (compile=False)"}
        try:
            ms, peak = measure(fn)
        except Exception as e:
            if not keep_going:
                raise
            return {**out, "error": f"{type(e).__name__}: {str(e)[:500]}"}
        out.update(ms=ms, peak_mib=None if peak is None else peak / 2**20,
                   gbps=nbytes / ms / 1e6)
        if peak_gbps:
            out["bw_frac"] = out["gbps"] / peak_gbps
        if flops:
            out["tflops"] = flops / ms / 1e9
            if peak_tflops:
                out["flops_frac"] = out["tflops"] / peak_tflops
        return out

    # last_token_score: B sequences of T tokens, H hidden, L = 1
    B, T, H = args.score_b, args.score_t, args.score_h
    hidden = torch.randn(B, T, H, device=device, dtype=dt)
    w, nw = torch.randn(1, H, device=device, dtype=dt), torch.rand(H, device=device, dtype=dt)
    index = torch.randint(0, T, (B,), device=device)
    # bytes the op must move: B rows (x3 passes hit cache, counted once), head, norm weight
    nbytes = (B * H + H + H) * hidden.element_size() + B * 4
    ref = lambda: last_token_score_reference(hidden, index, w, None, "rms", nw)  # noqa: E731
    compiled = torch.compile(last_token_score_reference) if compile else None
    backend = "triton" if use_triton(hidden) else "torch"  # the CPU runs the torch path
    for variant, fn in {
        "triton": lambda: last_token_score(hidden, index, w, None, "rms", nw),
        "eager (B rows)": ref,
        "compile (B rows)": (lambda: compiled(hidden, index, w, None, "rms", nw)) if compile
        else None,
        "eager HF-style (B*T rows)": lambda: hf_style_score(hidden, index, w, nw),
    }.items():
        extra = {"backend": backend} if variant == "triton" else {}
        yield row("last_token_score", variant, fn, nbytes, b=B, t=T, h=H, **extra)

    # token_logprobs: forward (reference model) and forward + backward (policy)
    N, V, H = args.n, args.v, args.h
    h = torch.randn(N, H, device=device, dtype=dt)
    wl = torch.randn(V, H, device=device, dtype=dt) * H**-0.5
    y = torch.randint(0, V, (N,), device=device)
    nbytes = (N * H + V * H) * h.element_size() + N * 12

    def fwd_bwd(f):
        def run():
            a, b = h.detach().requires_grad_(), wl.detach().requires_grad_()
            f(a, b, y).sum().backward()
        return run

    variants = {"triton": token_logprobs, "eager naive": naive_logprobs,
                "compile naive": torch.compile(naive_logprobs) if compile else None}
    for variant, f in variants.items():
        extra = {"backend": backend} if variant == "triton" else {}
        fwd = None if f is None else (lambda f=f: f(h, wl, y))
        yield row("token_logprobs fwd", variant, fwd, nbytes, 2 * N * V * H, n=N, v=V, h=H,
                  **extra)
        # useful flops: 6NVH (ours does 8: recompute)
        yield row("token_logprobs fwd+bwd", variant, None if f is None else fwd_bwd(f),
                  3 * nbytes, 6 * N * V * H, n=N, v=V, h=H, **extra)


def bench_gpu(args):
    return list(kernel_rows(args))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--n", type=int, help="tokens (rows) for token_logprobs [CPU 4096, GPU 8192]")
    p.add_argument("--v", type=int, help="vocabulary size [CPU 32000, GPU 128256]")
    p.add_argument("--h", type=int, help="hidden size for token_logprobs [CPU 512, GPU 4096]")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--repeats", type=int, default=5, help="timing repeats (median)")
    p.add_argument("--mem-repeats", type=int, default=3, help="fresh processes per variant")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="GPU only")
    p.add_argument("--score-b", type=int, default=64)
    p.add_argument("--score-t", type=int, default=2048)
    p.add_argument("--score-h", type=int, default=4096)
    p.add_argument("--peak-gbps", type=float, default=None, help="override the device table")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the device table")
    p.add_argument("--json", action="store_true", help="also print all rows as JSON")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child, args.n, args.v, args.h, args.threads)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    defaults = (8192, 128256, 4096) if cuda else (4096, 32000, 512)  # GPU: a Llama-3-8B head
    for name, value in zip(("n", "v", "h"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.device = "cuda" if cuda else "cpu"
    rows = bench_gpu(args) if cuda else bench_cpu(args)
    for row in rows:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in row.items()))
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
