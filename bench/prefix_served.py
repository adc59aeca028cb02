"""Prefix sharing through the server (issue 22 item 1): k responses to one prompt, served.

    python -m bench.prefix_served --reps 3                  # the issue's bars, ~5 min on 2 cores
    python -m bench.prefix_served --cache-probe             # + would a cross-batch KV cache pay?
    python -m bench.prefix_served --ks '' --reps 5          # the mixed load alone, longer
    python -m bench.prefix_served --dry-run --out f.json    # tiny sizes (the test suite)

Two real `rm-server serve` processes with default flags on the same model (rm-30m), up at the
same time, pinned to --server-cpus like bench.serve's: "new" (prefix-aware batching) and "old"
(RM_SERVER_BUDGET=padded: every sample charged at full length, as before; the same code
otherwise). Loads, each driven by closed-loop gRPC clients (bench.serve.drive):

  shared-k    requests of k samples: one prompt of --prompt tokens (its own per request), k
              responses of --response tokens (the issue: 256 and 64, prompt 4x response)
  flat-k      the same token count with k different prompts (nothing shared)
  mixed       one sample per request, lengths 16-512, --mixed-clients clients (64), nothing shared

Per repetition, every (load, server) pair runs once, the servers in rotating order. The figures
are samples/s medians over --reps, and ratios taken within a repetition, then their median:
shared-k / flat-k per server (the bars: new >= 2.8x at k = 8, >= 1.5x at k = 4) and new / old
on mixed (the bar: >= 1.0, never slower). Printed and written to --out (JSON), with the same
ratios in server CPU time per sample (``cpu_ratios``: less disturbed by other work on a shared
machine).

--cache-probe: would a small cache of prefix keys/values across batches (vLLM's automatic
prefix caching) pay? It runs the server's own Batcher and BatchPolicy in process with the model,
closed-loop clients sending shared-k requests for each k of --probe-ks, records every batch,
and counts the prefixes a batch runs that one of the last --probe-slots batches already ran
(what a cache of those batches' prefixes would have held: hits), and the share of the computed
tokens those hits would have saved.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

from bench.common import (
    DEFAULT_CACHE,
    FIRST_ID,
    VOCAB,
    ensure_model,
    median,
    parse_cpus,
    sample_pool,
)
from bench.serve import build_requests, launch, measure, pin, ready

BUDGET_ENV = "RM_SERVER_BUDGET"  # rm_server.config.batch_policy: "padded" is the old budget


def shared_pool(k: int, n_requests: int, prompt: int, response: int, seed: int
                ) -> list[list[int]]:
    """``n_requests`` x k sequences: per request one prompt, k different responses."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_requests):
        head = [rng.randrange(FIRST_ID, VOCAB) for _ in range(prompt)]
        out += [head + [rng.randrange(FIRST_ID, VOCAB) for _ in range(response)]
                for _ in range(k)]
    return out


def flat_pool(k: int, n_requests: int, prompt: int, response: int, seed: int
              ) -> list[list[int]]:
    """The same token count as :func:`shared_pool`, every sample its own prompt."""
    rng = random.Random(seed + 1)
    return [[rng.randrange(FIRST_ID, VOCAB) for _ in range(prompt + response)]
            for _ in range(n_requests * k)]


def loads(args) -> dict[str, tuple[list, int]]:
    """Load name -> (requests, clients)."""
    out = {}
    for k in args.ks:
        n = args.clients * args.requests
        for name, pool in (("shared", shared_pool), ("flat", flat_pool)):
            seqs = pool(k, n, args.prompt, args.response, args.seed + k)
            out[f"{name}-{k}"] = (build_requests(seqs, k), args.clients)
    mixed = sample_pool("mixed", args.mixed_clients * args.requests, VOCAB, args.seed)
    if args.dry_run:
        mixed = [s[:48] for s in mixed]
    out["mixed"] = (build_requests(mixed, 1), args.mixed_clients)
    return out


def run(args) -> dict:
    client_cpus = parse_cpus(args.client_cpus)
    if client_cpus:  # the load generator off the servers' CPUs (threads started later inherit)
        os.sched_setaffinity(0, client_cpus)
    model_dir = ensure_model(args.model, args.cache)
    work = loads(args)
    flags = ["--num-threads", str(args.threads)]
    launched = [launch("ours", model_dir, args.server_cpus, args.threads, flags, label="new"),
                launch("ours", model_dir, args.server_cpus, args.threads, flags, label="old",
                       env={BUDGET_ENV: "padded"})]
    servers = {}
    rows: list[dict] = []
    try:
        for item in launched:
            s = ready(item)
            servers[s.label] = s
            pin(s.proc.pid, args.server_cpus)
        labels = list(servers)
        for rep in range(args.reps):
            for i, (load, (requests, clients)) in enumerate(work.items()):
                order = labels[(rep + i) % 2:] + labels[:(rep + i) % 2]  # rotating
                for label in order:
                    res = measure(servers[label], "unary", clients, requests,
                                  list(range(len(requests))))
                    rows.append({"rep": rep, "load": load, "server": label, **res})
                    print(f"[rep {rep}] {load:10s} {label}: {res['rate']:7.1f} samples/s, "
                          f"{res.get('avg_batch', float('nan')):.1f} per batch",
                          file=sys.stderr, flush=True)
    finally:
        for s in servers.values():
            s.stop()
        for _, _, proc, *_ in launched:
            if proc.poll() is None:
                proc.kill()
    return summarize(args, rows)


def summarize(args, rows: list[dict]) -> dict:
    rate = {(r["rep"], r["load"], r["server"]): r["rate"] for r in rows}
    reps = sorted({r["rep"] for r in rows})
    out: dict = {"rates": {}, "ratios": {}}
    for load in dict.fromkeys(r["load"] for r in rows):
        for label in ("new", "old"):
            out["rates"][f"{load}/{label}"] = median([rate[rep, load, label] for rep in reps])
    for k in args.ks:
        for label in ("new", "old"):
            out["ratios"][f"k={k} shared/flat {label}"] = median(
                [rate[rep, f"shared-{k}", label] / rate[rep, f"flat-{k}", label] for rep in reps])
    out["ratios"]["mixed new/old"] = median(
        [rate[rep, "mixed", "new"] / rate[rep, "mixed", "old"] for rep in reps])
    # the same ratios in server CPU seconds per sample (inverse): a shared machine's other
    # work slows the wall clock of whichever server it meets, not the CPU time of its batches
    cpu = {(r["rep"], r["load"], r["server"]): r["cpu_ms"] for r in rows}
    out["cpu_ratios"] = {
        **{f"k={k} shared/flat {label}": median(
            [cpu[rep, f"flat-{k}", label] / cpu[rep, f"shared-{k}", label] for rep in reps])
           for k in args.ks for label in ("new", "old")},
        "mixed new/old": median([cpu[rep, "mixed", "old"] / cpu[rep, "mixed", "new"]
                                 for rep in reps])}
    out["per_rep"] = rows
    return out


# --------------------------------------------------------------------------------------------
# --cache-probe: the server's batcher in process, every batch recorded
# --------------------------------------------------------------------------------------------
class _Sink:
    def __init__(self, fut: asyncio.Future):
        self.cancelled, self.fut = False, fut

    def deliver(self, results):
        if not self.fut.done():
            self.fut.set_result(results)

    def fail(self, exc, items):
        if not self.fut.done():
            self.fut.set_exception(exc)


async def _probe_one(model, policy, k: int, args) -> list[list[list[int]]]:
    """Closed-loop clients through a real Batcher; returns the batches' ids as they ran."""
    from rm_server.batch_policy import Pending, Scored
    from rm_server.batcher import Batcher

    batches: list[list[list[int]]] = []

    def score(batch):
        batches.append([p.ids for p in batch])
        return [Scored(r) for r in model.score([p.ids for p in batch])]

    batcher = Batcher(score, policy)
    batcher.start()
    seqs = shared_pool(k, args.clients * args.probe_requests, args.prompt, args.response,
                       args.seed + 100 + k)
    requests = [seqs[i:i + k] for i in range(0, len(seqs), k)]

    async def client(c: int) -> None:
        for r, req in enumerate(requests[c::args.clients]):
            fut = asyncio.get_running_loop().create_future()
            sink = _Sink(fut)
            batcher.submit([Pending(f"{c}-{r}-{j}", ids, sink, time.monotonic(),
                                    client=f"c{c}") for j, ids in enumerate(req)])
            await fut

    await asyncio.gather(*(client(c) for c in range(args.clients)))
    await batcher.stop()
    return batches


def _hits(batches: list[list[list[int]]], slots: int, prompt: int, min_prefix: int) -> dict:
    """Prefixes run, those among the last ``slots`` batches' prefixes (hits), and the share of
    the computed tokens the hits would have saved."""
    from rm_server.prefix_plan import group_by_prefix

    recent: list[set] = []
    runs = hits = saved = computed = 0
    for batch in batches:
        groups, rest = group_by_prefix(batch, min_prefix)
        heads = {tuple(batch[m[0]][:p]) for p, m in groups}
        heads |= {tuple(batch[i][:prompt]) for i in rest if len(batch[i]) > prompt}
        for h in heads:
            runs += 1
            if any(h in old for old in recent):
                hits, saved = hits + 1, saved + len(h)
        computed += sum(map(len, batch)) - sum((len(m) - 1) * p for p, m in groups)
        recent = (recent + [heads])[-slots:]
    return {"prefix_runs": runs, "hits": hits, "hit_rate": hits / runs if runs else 0.0,
            "tokens_saved_share": saved / computed if computed else 0.0}


def cache_probe(args) -> dict:
    """Per k: the prefixes batches ran, those an LRU of the last ``probe_slots`` batches'
    prefixes held (hits), and the share of the computed tokens a hit would have saved."""
    import torch

    from rm_server.batch_policy import BatchPolicy
    from rm_server.config import BATCH_DEFAULTS
    from rm_server.model import RewardModel

    torch.set_num_threads(args.threads)
    model = RewardModel(ensure_model(args.model, args.cache))
    size, tokens = BATCH_DEFAULTS["cpu"]
    policy = BatchPolicy(size, tokens, 0.005)
    out = {}
    for k in args.probe_ks:
        batches = asyncio.run(_probe_one(model, policy, k, args))
        out[f"k={k}"] = {"batches": len(batches)}
        for slots in args.probe_slots:
            out[f"k={k}"][f"last {slots} batches"] = _hits(batches, slots, args.prompt,
                                                           policy.min_shared_prefix)
        print(f"[probe] k={k}: {out[f'k={k}']}", file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--model", default="rm-30m")
    ap.add_argument("--ks", default="8,4", help="responses per prompt (comma list)")
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    ap.add_argument("--response", type=int, default=64, help="response tokens")
    ap.add_argument("--clients", type=int, default=8, help="clients of the shared/flat loads")
    ap.add_argument("--requests", type=int, default=2, help="timed requests per client")
    ap.add_argument("--mixed-clients", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    ap.add_argument("--server-cpus", default="0", help="taskset CPU list of the servers")
    ap.add_argument("--client-cpus", default="1", help="CPU list of the load generator")
    ap.add_argument("--cache-probe", action="store_true")
    ap.add_argument("--probe-ks", default="4,8,16,32")
    ap.add_argument("--probe-requests", type=int, default=2, help="per client, per k")
    ap.add_argument("--probe-slots", default="1,4,16",
                    help="how many past batches' prefixes a cache would hold (comma list)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny sizes (rm-7m, 1 rep, short prompts): the test suite's run")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.model, args.reps, args.prompt, args.response = "rm-7m", 1, 24, 6
        args.clients, args.requests, args.mixed_clients = 2, 1, 4
        args.probe_ks, args.probe_requests = "4", 1
    args.ks = [int(k) for k in args.ks.split(",") if k]  # --ks '': the mixed load alone
    args.probe_ks = [int(k) for k in str(args.probe_ks).split(",")]
    args.probe_slots = [int(k) for k in str(args.probe_slots).split(",")]
    t0 = time.perf_counter()
    result = {"command": " ".join(["python -m bench.prefix_served", *(argv or sys.argv[1:])]),
              "settings": {k: getattr(args, k) for k in ("model", "reps", "ks", "prompt",
                                                         "response", "clients", "requests",
                                                         "mixed_clients", "threads",
                                                         "server_cpus", "client_cpus",
                                                         "dry_run")},
              **run(args)}
    if args.cache_probe:
        result["cache_probe"] = cache_probe(args)
    result["seconds"] = time.perf_counter() - t0
    print(json.dumps({k: v for k, v in result.items() if k != "per_rep"}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
