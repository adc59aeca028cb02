"""The throughput dip of a model swap: one server, one load, steady state against the swap.

One `rm-server serve` subprocess (--admin-token-file, --max-versions 2) on --server-cpus; C gRPC
clients on --client-cpus send unary Score requests of S samples of random token ids (lengths
48-80, bench.serve's "short" mix) back to back for the whole run. After a warm-up, --swaps
times: a steady window of --steady seconds, then an admin LoadVersion of the other checkpoint
(make_default; three checkpoints in turn, so that with two resident every swap is a real
load and unloads the oldest), whose swap window runs from the call to its answer plus
--settle seconds (the old version's last batches, the new one's first). Each answer is stamped
with its arrival time and the version of every result in it. Throughput of a window = samples
answered in it / its length; "dip" = the swap window's throughput / the steady window's just
before it; "worst bin" = the slowest --bin seconds inside the swap window / the steady window's
median bin; "lost" = the serving time the swap cost, window x (1 - dip). Every result must come
back (no error) and name one of the versions.

The other checkpoints are the bench model with its score head scaled (a new weights hash, the
same cost), written next to it in the cache.

    python -m bench.swap                               # rm-7m, 16 clients x 1 sample, 3 swaps
    python -m bench.swap --bench-model rm-30m --swaps 5 --steady 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import grpc

from bench.common import DEFAULT_CACHE, MODELS, ensure_model, median, parse_cpus, sample_pool
from protos import reward_pb2 as pb
from protos import reward_pb2_grpc as pb_grpc
from rm_server.launch import start_server

TOKEN = "bench-swap-admin"


def other_version(model_dir: Path, k: int) -> Path:
    """``model_dir`` with the score head scaled by ``k``: another weights hash, the same cost."""
    out = model_dir.parent / f"{model_dir.name}-v{k}"
    if (out / "config.json").is_file():
        return out
    from safetensors.torch import load_file, save_file

    tmp = model_dir.parent / f".{out.name}.tmp{os.getpid()}"
    shutil.copytree(model_dir, tmp)
    weights = load_file(tmp / "model.safetensors")
    weights["score.weight"] = weights["score.weight"] * k
    save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
    os.replace(tmp, out)
    return out


async def client(address: str, requests: list, stop: asyncio.Event, log: list) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RewardServiceStub(channel)
        i = 0
        while not stop.is_set():
            response = await stub.Score(requests[i % len(requests)], timeout=120)
            now = time.perf_counter()
            for r in response.results:
                log.append((now, r.version))
            i += 1


async def operator(address: str, dirs: list[Path], args, stop: asyncio.Event) -> list[dict]:
    """Warm-up, then --swaps of (steady window, swap window); the windows' bounds."""
    windows = []
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    async with grpc.aio.insecure_channel(address) as channel:
        admin = pb_grpc.AdminServiceStub(channel)
        await asyncio.sleep(args.warmup)
        for k in range(args.swaps):
            start = time.perf_counter()
            await asyncio.sleep(args.steady)
            called = time.perf_counter()
            answer = await admin.LoadVersion(pb.LoadVersionRequest(
                path=str(dirs[(k + 1) % len(dirs)]), label=f"swap{k + 1}", make_default=True),
                metadata=metadata, timeout=600)
            answered = time.perf_counter()
            await asyncio.sleep(args.settle)
            windows.append({"steady": (start, called), "swap": (called, answered + args.settle),
                            "load_seconds": answer.version.load_seconds,
                            "call_seconds": answered - called})
    stop.set()
    return windows


def rate(log: list, lo: float, hi: float) -> float:
    return sum(lo <= t < hi for t, _ in log) / (hi - lo)


def bins(log: list, lo: float, hi: float, width: float) -> list[float]:
    n = max(1, int((hi - lo) / width))
    return [rate(log, lo + i * width, lo + (i + 1) * width) for i in range(n)]


async def run(address: str, dirs: list[Path], pool: list, args) -> tuple[list, list]:
    requests = [pb.ScoreRequest(samples=[
        pb.Sample(id=str(j), tokens=pb.TokenIds(ids=pool[(i * args.samples_per_request + j)
                                                        % len(pool)]))
        for j in range(args.samples_per_request)]) for i in range(64)]
    stop, log = asyncio.Event(), []
    clients = [client(address, requests, stop, log) for _ in range(args.clients)]
    *_, windows = await asyncio.gather(*clients, operator(address, dirs, args, stop))
    return log, windows


def report(log: list, windows: list, args) -> list[dict]:
    rows = []
    for k, w in enumerate(windows):
        steady, swap = rate(log, *w["steady"]), rate(log, *w["swap"])
        steady_bin = median(bins(log, *w["steady"], args.bin))
        worst = min(bins(log, *w["swap"], args.bin))
        window = w["swap"][1] - w["swap"][0]
        rows.append({"swap": k + 1, "steady": steady, "during": swap, "dip": swap / steady,
                     "worst_bin": worst / steady_bin, "load_seconds": w["load_seconds"],
                     "window": window, "lost_seconds": window * (1 - swap / steady)})
        print(f"swap {k + 1}: steady {steady:6.0f} samples/s, during the swap {swap:6.0f} "
              f"({swap / steady:.2f}x; worst {args.bin:g} s bin {worst / steady_bin:.2f}x), "
              f"load + warm-up {w['load_seconds']:.2f} s, window {window:.2f} s, lost "
              f"{rows[-1]['lost_seconds']:+.2f} s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint directory (default: the --bench-model)")
    p.add_argument("--bench-model", default="rm-7m", choices=sorted(MODELS))
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--samples-per-request", type=int, default=1)
    p.add_argument("--swaps", type=int, default=3)
    p.add_argument("--warmup", type=float, default=3.0, help="seconds before the first window")
    p.add_argument("--steady", type=float, default=5.0, help="seconds of each steady window")
    p.add_argument("--settle", type=float, default=0.5, help="seconds after a load's answer")
    p.add_argument("--bin", type=float, default=0.25, help="seconds per bin (worst bin)")
    p.add_argument("--server-cpus", default="1", help="taskset list for the server ('' = any)")
    p.add_argument("--client-cpus", default="0", help="CPUs of the load generator ('' = any)")
    p.add_argument("--threads", default="1", help="the server's --num-threads")
    p.add_argument("--json", type=Path, help="write the rows here as JSON")
    args = p.parse_args(argv)

    model_dir = Path(args.model) if args.model else ensure_model(args.bench_model, args.cache)
    dirs = [model_dir, other_version(model_dir, 2), other_version(model_dir, 3)]
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    pool = sample_pool("short", 512, vocab=vocab)
    token_dir = Path(tempfile.mkdtemp(prefix="bench-swap-"))
    (token_dir / "admin.token").write_text(TOKEN)
    server = start_server(model_dir, "--admin-token-file", str(token_dir / "admin.token"),
                          "--max-versions", "2", "--num-threads", args.threads,
                          cpus=args.server_cpus or None)
    try:
        cpus = parse_cpus(args.client_cpus)
        if cpus:
            os.sched_setaffinity(0, cpus)  # grpc's threads, started later, inherit it
        log, windows = asyncio.run(run(server.address, dirs, pool, args))
    finally:
        assert server.stop() == 0, server.log()
        shutil.rmtree(token_dir, ignore_errors=True)
    versions = {v for _, v in log}
    assert len(versions) == min(3, args.swaps + 1), f"results named {versions}"
    print(f"\nmodel {model_dir.name}, {args.clients} clients x {args.samples_per_request} "
          f"samples, server on CPUs {args.server_cpus or 'any'} ({args.threads} thread), "
          f"clients on {args.client_cpus or 'any'}; {len(log)} samples, 0 errors")
    rows = report(log, windows, args)
    print(f"median dip {median([r['dip'] for r in rows]):.2f}x, median worst bin "
          f"{median([r['worst_bin'] for r in rows]):.2f}x, median lost "
          f"{median([r['lost_seconds'] for r in rows]):.2f} s of serving per swap")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
