"""The HTTP/JSON door against gRPC: one server, the same load, side by side in one run.

One `rm-server serve --http-port 0` subprocess on loopback (one batcher behind both doors).
For every point (clients x samples per request), each door in turn, in rotating order per
repetition, runs the same closed-loop load: C clients, each on its own connection, send a
request, wait for its answer, send the next; every request carries S samples of random token
ids (lengths uniform in 48-80 tokens, the "short" mix of bench.serve), the same samples for
every door. The doors:

  grpc      RewardService.Score on a raw grpc.aio stub (a ScoreRequest of TokenIds)
  v1/score  POST /v1/score, the same ScoreRequest in the proto's JSON mapping (aiohttp)
  pooling   POST /pooling, vLLM's shape: {"input": [[ids], ...]} (aiohttp)

Requests are built before the clock starts (protobuf messages; JSON bytes) and answers are
decoded in the clock (grpc's deserializer; json.loads). Throughput is samples / wall time from
the first timed send to the last answer, after one untimed request per client; latency is per
request. Server CPU per sample comes from /proc (all its threads). "vs grpc" is the door's
throughput over gRPC's measured in the same repetition, the median over --reps; rates and
latencies are medians too. The server runs on --server-cpus, the clients on --client-cpus.

    python -m bench.http                              # rm-7m, 1 and 16 clients, 1 and 8 samples
    python -m bench.http --clients 16 --samples-per-request 1 --reps 5
    python -m bench.http --model /path/to/rm          # any checkpoint (ids < its vocabulary)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

import aiohttp
import grpc

from bench.common import (
    DEFAULT_CACHE,
    MODELS,
    ensure_model,
    median,
    parse_cpus,
    percentile,
    sample_pool,
)
from protos import reward_pb2 as pb
from protos import reward_pb2_grpc as pb_grpc
from rm_server.launch import start_server

DOORS = ("grpc", "v1/score", "pooling")


def requests_for(pool: list[list[int]], clients: int, per_request: int, n_requests: int):
    """Per client: n_requests lists of ``per_request`` sequences, taken from the pool in order."""
    out, k = [], 0
    for _ in range(clients):
        mine = []
        for _ in range(n_requests):
            mine.append([pool[(k + j) % len(pool)] for j in range(per_request)])
            k += per_request
        out.append(mine)
    return out


def encode(door: str, batch: list[list[int]]):
    """The request as the door sends it: a ScoreRequest, or JSON bytes."""
    if door == "pooling":
        return json.dumps({"input": batch}).encode()
    request = pb.ScoreRequest(samples=[pb.Sample(id=str(i), tokens=pb.TokenIds(ids=ids))
                                       for i, ids in enumerate(batch)])
    if door == "grpc":
        return request
    from google.protobuf import json_format
    return json.dumps(json_format.MessageToDict(request)).encode()


async def grpc_client(address: str, requests: list, start: asyncio.Event,
                      latencies: list[float]) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RewardServiceStub(channel)
        await stub.Score(requests[0], timeout=60)  # warm-up
        await start.wait()
        for request in requests[1:]:
            t = time.perf_counter()
            response = await stub.Score(request, timeout=60)
            latencies.append(time.perf_counter() - t)
            assert len(response.results) == len(request.samples)


async def http_client(url: str, requests: list, start: asyncio.Event,
                      latencies: list[float]) -> None:
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        async with session.post(url, data=requests[0], headers=headers) as r:  # warm-up
            r.raise_for_status()
            await r.read()
        await start.wait()
        for body in requests[1:]:
            t = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as r:
                r.raise_for_status()
                json.loads(await r.read())
            latencies.append(time.perf_counter() - t)


async def run_point(server, door: str, work: list[list]) -> dict:
    """One door under the load ``work`` (per client: its encoded requests, warm-up first)."""
    start, latencies = asyncio.Event(), []
    if door == "grpc":
        clients = [grpc_client(server.address, reqs, start, latencies) for reqs in work]
    else:
        url = f"http://127.0.0.1:{server.http_port}/{door}"
        clients = [http_client(url, reqs, start, latencies) for reqs in work]
    tasks = [asyncio.ensure_future(c) for c in clients]
    await asyncio.sleep(0.5)  # connections up and warm-ups answered
    cpu0, t0 = process_cpu(server.proc.pid), time.perf_counter()
    start.set()
    await asyncio.gather(*tasks)
    wall, cpu = time.perf_counter() - t0, process_cpu(server.proc.pid) - cpu0
    return {"wall": wall, "cpu": cpu, "latencies": latencies}


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(server, pool, args) -> dict:
    """{(clients, per_request, door): [per-rep result]}, doors in rotating order per rep."""
    results: dict = {}
    for rep in range(args.reps):
        for clients in args.clients:
            for per_request in args.samples_per_request:
                n = max(args.min_requests, args.samples // (clients * per_request))
                batches = requests_for(pool, clients, per_request, n + 1)
                doors = DOORS[rep % len(DOORS):] + DOORS[:rep % len(DOORS)]
                for door in doors:
                    work = [[encode(door, b) for b in mine] for mine in batches]
                    r = asyncio.run(run_point(server, door, work))
                    r["samples"] = clients * per_request * n
                    results.setdefault((clients, per_request, door), []).append(r)
                    print(f"rep {rep} C={clients} S={per_request} {door:9s} "
                          f"{r['samples'] / r['wall']:8.0f} samples/s", flush=True)
    return results


def table(results: dict, args) -> str:
    lines = ["| clients | samples/request | door | samples/s | p50 ms | p99 ms | "
             "server CPU ms/sample | vs grpc |", "|---|---|---|---|---|---|---|---|"]
    for clients in args.clients:
        for per_request in args.samples_per_request:
            base = results[(clients, per_request, "grpc")]
            for door in DOORS:
                runs = results[(clients, per_request, door)]
                rate = median([r["samples"] / r["wall"] for r in runs])
                ratio = median([(r["samples"] / r["wall"]) / (b["samples"] / b["wall"])
                                for r, b in zip(runs, base)])
                p50 = median([percentile(r["latencies"], 50) * 1000 for r in runs])
                p99 = median([percentile(r["latencies"], 99) * 1000 for r in runs])
                cpu = median([r["cpu"] / r["samples"] * 1000 for r in runs])
                lines.append(f"| {clients} | {per_request} | {door} | {rate:.0f} | {p50:.2f} | "
                             f"{p99:.2f} | {cpu:.3f} | {ratio:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint directory (default: the --bench-model)")
    p.add_argument("--bench-model", default="rm-7m", choices=sorted(MODELS))
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    p.add_argument("--samples-per-request", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1, 8])
    p.add_argument("--samples", type=int, default=1500, help="samples per point and door")
    p.add_argument("--min-requests", type=int, default=30, help="requests per client at least")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--server-cpus", default="1", help="taskset list for the server ('' = any)")
    p.add_argument("--client-cpus", default="0", help="CPUs of the load generator ('' = any)")
    p.add_argument("--threads", default="1", help="the server's --num-threads")
    args = p.parse_args(argv)

    model_dir = Path(args.model) if args.model else ensure_model(args.bench_model, args.cache)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    pool = sample_pool("short", 512, vocab=vocab)
    server = start_server(model_dir, "--http-port", "0", "--num-threads", args.threads,
                          cpus=args.server_cpus or None)
    try:
        cpus = parse_cpus(args.client_cpus)
        if cpus:
            os.sched_setaffinity(0, cpus)  # grpc's threads, started later, inherit it
        results = measure(server, pool, args)
    finally:
        assert server.stop() == 0, server.log()
    print()
    print(f"model {model_dir.name}, short inputs (48-80 tokens), {args.reps} reps, "
          f"server on CPUs {args.server_cpus or 'any'}, clients on {args.client_cpus or 'any'}")
    print(table(results, args))


if __name__ == "__main__":
    main()
