"""The cost of serving an ensemble: K members (heads on one backbone, ``rm-server train
--ensemble K``) against the same backbone with one head, on the same load.

Two checkpoints of one benchmark model (default rm-7m): its own one-head RM, and the same
weights with a K-row score head (member 0 is the one head) marked as an ensemble whose default
aggregation is uwo, so every result also carries K member scores, their mean and std. Both are
measured side by side, the order alternating per repetition:

  model     in-process ``RewardModel.score`` on the same batches (B samples of the short mix,
            48-80 tokens): the model's time per batch;
  served    one ``rm-server serve`` per checkpoint on loopback, C closed-loop gRPC clients
            sending Score requests of S samples (bench/http.py's load): samples per second,
            and the server's CPU time per sample (all its threads, from /proc: the steadier
            figure on a shared machine).

"ratio" is the ensemble's cost over the single head's (time over time, CPU over CPU; rate
over rate, inverted), the median over --reps of the ratios within a repetition.

    python -m bench.ensemble                       # rm-7m, K = 5
    python -m bench.ensemble --members 8 --reps 7
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

import torch

from bench.common import DEFAULT_CACHE, MODELS, ensure_model, median, parse_cpus, sample_pool
from bench.http import encode, requests_for, run_point
from rm_server.launch import start_server


def ensemble_checkpoint(single: Path, members: int, out: Path) -> Path:
    """``single``'s weights with a ``members``-row head (row 0 = its head), an ensemble."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if (out / "config.json").exists():
        return out
    model = AutoModelForSequenceClassification.from_pretrained(single)
    head = model.score
    wide = torch.nn.Linear(head.in_features, members, bias=False)
    with torch.no_grad():
        wide.weight.normal_(0.0, head.in_features ** -0.5, generator=torch.Generator()
                            .manual_seed(0))
        wide.weight[0] = head.weight[0]
    model.score = wide
    names = [f"member_{k}" for k in range(members)]
    model.config.num_labels = members
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {n: k for k, n in enumerate(names)}
    model.config.reward_ensemble = {"members": members, "aggregation": "uwo",
                                    "uncertainty_coef": 1.0}
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(single).save_pretrained(out)
    return out


def model_times(dirs: dict[str, Path], pool: list[list[int]], batch: int, reps: int,
                threads: int) -> dict[str, list[float]]:
    """Seconds per batch of ``batch`` samples, per checkpoint, in alternating order."""
    from rm_server.model import RewardModel

    torch.set_num_threads(threads)
    models = {k: RewardModel(d) for k, d in dirs.items()}
    batches = [pool[i:i + batch] for i in range(0, len(pool) - batch + 1, batch)]
    out: dict[str, list[float]] = {k: [] for k in dirs}
    for rep in range(reps + 1):  # the first repetition warms up
        order = list(dirs) if rep % 2 == 0 else list(dirs)[::-1]
        for name in order:
            t = time.perf_counter()
            for b in batches:
                models[name].score(b)
            if rep:
                out[name].append((time.perf_counter() - t) / len(batches))
    return out


def served_rates(dirs: dict[str, Path], pool, args) -> dict[str, list[tuple[float, float]]]:
    """(samples per second, server CPU ms per sample) of each checkpoint's server under the
    same closed-loop load."""
    servers = {k: start_server(d, "--num-threads", str(args.threads),
                               cpus=args.server_cpus or None) for k, d in dirs.items()}
    out: dict[str, list[tuple[float, float]]] = {k: [] for k in dirs}
    try:
        cpus = parse_cpus(args.client_cpus)
        if cpus:
            os.sched_setaffinity(0, cpus)
        n = max(args.min_requests, args.samples // (args.clients * args.per_request))
        batches = requests_for(pool, args.clients, args.per_request, n + 1)
        work = [[encode("grpc", b) for b in mine] for mine in batches]
        for rep in range(args.reps):
            order = list(dirs) if rep % 2 == 0 else list(dirs)[::-1]
            for name in order:
                r = asyncio.run(run_point(servers[name], "grpc", work))
                samples = args.clients * args.per_request * n
                out[name].append((samples / r["wall"], r["cpu"] / samples * 1e3))
                print(f"rep {rep} served {name:8s} {out[name][-1][0]:8.0f} samples/s "
                      f"{out[name][-1][1]:.2f} CPU ms/sample", flush=True)
    finally:
        for s in servers.values():
            s.stop()
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bench-model", default="rm-7m", choices=sorted(MODELS))
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--members", type=int, default=5)
    p.add_argument("--batch", type=int, default=32, help="samples per in-process batch")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--per-request", type=int, default=8, help="samples per Score request")
    p.add_argument("--samples", type=int, default=2000, help="samples per served point")
    p.add_argument("--min-requests", type=int, default=30, help="per client per point, at least")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (server and model)")
    p.add_argument("--server-cpus", default="1", help="taskset list for the servers ('' = any)")
    p.add_argument("--client-cpus", default="0", help="CPUs of the load generator ('' = any)")
    args = p.parse_args(argv)

    single = ensure_model(args.bench_model, args.cache)
    dirs = {"one head": single, f"{args.members} heads": ensemble_checkpoint(
        single, args.members, args.cache / f"{args.bench_model}-ens{args.members}")}
    vocab = json.loads((single / "config.json").read_text())["vocab_size"]
    pool = sample_pool("short", 512, vocab=vocab)
    one, many = dirs
    times = model_times(dirs, pool, args.batch, args.reps, args.threads)
    print(f"in-process ms/batch of {args.batch}: {one} {median(times[one]) * 1e3:.2f}, {many} "
          f"{median(times[many]) * 1e3:.2f}", flush=True)
    rates = served_rates(dirs, pool, args)
    print(f"\n{args.bench_model}, short inputs (48-80 tokens), {args.reps} reps, "
          f"{args.threads} thread(s); served: {args.clients} clients x {args.per_request} "
          f"samples/request, server on CPUs {args.server_cpus or 'any'}")
    print(f"| measure | {one} | {many} | cost ratio ({many} / {one}) |\n|---|---|---|---|")
    print(f"| model ms/batch of {args.batch} | {median(times[one]) * 1e3:.2f} | "
          f"{median(times[many]) * 1e3:.2f} | "
          f"{median([b / a for a, b in zip(times[one], times[many])]):.3f} |")
    for i, what in ((0, "served samples/s"), (1, "served server CPU ms/sample")):
        a, b = [r[i] for r in rates[one]], [r[i] for r in rates[many]]
        ratio = [y / x for x, y in zip(a, b)] if i else [x / y for x, y in zip(a, b)]
        digits = 2 if i else 0
        print(f"| {what} | {median(a):.{digits}f} | {median(b):.{digits}f} | "
              f"{median(ratio):.3f} |")


if __name__ == "__main__":
    main()
