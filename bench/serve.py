"""Serving benchmark: our batched gRPC server against the in-process limit and a naive server.

For every point of a sweep (model x length mix x unary/stream x concurrency), in the same run,
on the same model and the same samples:

  (a) ours   a real `rm-server serve` subprocess on loopback, driven over gRPC by C closed-loop
             clients (each sends a request, waits for its answer, sends the next), each on its
             own connection with its own x-client-id; one or more --variant (flags or source
             tree) measured side by side;
  (b) limit  the same model in-process (`RewardModel.score`) on the same sample pool,
             length-sorted, at every batch size of --limit-batch-sizes (default 1..64, powers
             of two; the winner is reported): no server, no gRPC, no queue;
  (c) naive  bench.naive_server: one HF forward per request as it arrives, no
             cross-request batching (the design of simple RM servers in RLHF frameworks).

Work: the limit scores the whole pool (--pool samples per length mix) at each batch size. A
served point does a fixed amount of work: about --point-seconds at the limit's rate, at least
--min-requests per client, whole requests per client, taken in pool order (a whole pass when
it is the pool's size, so (a), (b) and (c) score the same samples). Throughput is samples / wall
time from the first timed send to the last answer, after one untimed warm-up request per
client. Latency is per request, send to answer. Padding (ours) is 1 - rm_tokens /
rm_batch_tokens over the point, from the server's /metrics; for (b) that of the winning batch
size. Server CPU time per sample comes from /proc (all threads; "model" is the busiest thread
other than the event loop, "loop" the main thread, "other" gRPC's poller and the rest).

Interleaving: per repetition, a limit sweep over the batch sizes, then for each point the
limit again at that repetition's best batch size, each variant of ours and naive, in rotating
order. Ratios are taken within a repetition (a/b: ours over the limit measured next to it),
then the median over --reps; rates and latencies are medians too. "a/b cpu" and "a/c cpu"
are the same ratios in CPU seconds per sample (inverse), which a shared machine disturbs less
than wall time (it does not see idle time, though). Inputs are random token ids (TokenIds),
lengths uniform in short 48-80, long 448-576, mixed 16-512 tokens; 1 sample per request
unless --samples-per-request says otherwise.

Pinning (default, for a 2-core machine): servers and the limit worker start unpinned (faster
loading), then every thread is pinned to --server-cpus with `taskset -a -p`; the load generator
runs on --client-cpus, so the clients' Python does not steal the model's core. Ours, naive and
the limit get the same CPUs and --threads torch threads; --naive-threads 1,2 runs the naive
server at each thread count and compares ours with the best of them (each server at its best).

    python -m bench.serve --quick                         # rm-7m, short, unary, 1 and 64 clients
    python -m bench.serve --models rm-30m --mixes short   # one slice of the full sweep
    python -m bench.serve --variant 'old=@/path/to/old/checkout' --variant 'new='
    python -m bench.serve --compile ...                   # ours and the limit compiled
    python -m bench.serve --device cuda --dtype bfloat16 --server-cpus '' --client-cpus '' ...
    python -m bench.serve --variant 'cpu=--max-batch-size 16 --max-batch-tokens 2048' ...
    python -m bench.serve --json-out a.json ...; python -m bench.serve --table a.json b.json

Models (Llama RMs built from configs, 8k BPE vocabulary) are cached in $RM_BENCH_MODELS
(default /tmp/rm-bench-models). --profile-dir records py-spy (raw, --threads) on our server
for every point (`pip install py-spy`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    DEFAULT_CACHE,
    LENGTHS,
    MODELS,
    delta,
    ensure_model,
    median,
    num_parameters,
    parse_cpus,
    percentile,
    sample_pool,
    scrape,
)
from rm_server.launch import stop_process, wait_serving

ROOT = Path(__file__).resolve().parents[1]  # this checkout: child processes run `-m` from here

SERVICE = "/rlhf.reward.v1.RewardService/"
CLK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------
# (b) the limit: a worker process pinned like the server, answering JSON lines on stdin
# --------------------------------------------------------------------------------------------
def limit_worker(threads: int, compile: bool = False, device: str = "cpu",
                 dtype: str = "float32") -> None:
    import torch

    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library prints go to stderr; stdout carries only our JSON lines
    torch.set_num_threads(threads)
    from rm_server.model import RewardModel

    models: dict[str, RewardModel] = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["model"] not in models:
            m = RewardModel(cmd["model"], dtype=dtype, device=device, compile=compile)
            m.warmup()
            models[cmd["model"]] = m
        if cmd.get("load_only"):
            out.write("{}\n")
            continue
        model = models[cmd["model"]]
        pool = sorted(sample_pool(cmd["mix"], cmd["n"], model.vocab_size, cmd["seed"]), key=len)
        res = {}
        for bs in cmd["batch_sizes"]:
            batches = [pool[i:i + bs] for i in range(0, len(pool), bs)]
            model.score(batches[len(batches) // 2][:1])  # untimed: wakes the caches up
            c0, t0 = time.process_time(), time.perf_counter()
            for b in batches:  # the whole pool, every batch size: the same work as the servers
                model.score(b)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            real = sum(map(len, pool))
            padded = sum(max(map(len, b)) * len(b) for b in batches)
            res[bs] = {"samples": len(pool), "wall": wall, "cpu": cpu, "rate": len(pool) / wall,
                       "cpu_ms": 1000 * cpu / len(pool), "padding": 1 - real / padded}
        out.write(json.dumps(res) + "\n")


class LimitWorker:
    def __init__(self, cpus: str | None, threads: int, compile: bool = False,
                 device: str = "cpu", dtype: str = "float32"):
        cmd = [sys.executable, "-m", "bench.serve", "--limit-worker", "--threads", str(threads),
               "--device", device, "--dtype", dtype, *(["--compile"] if compile else [])]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, bufsize=1,
                                     cwd=ROOT)

    def send(self, **cmd) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def wait(self) -> dict[int, dict]:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("limit worker died")
        return {int(k): v for k, v in json.loads(line).items()}

    def load(self, model: str) -> None:
        self.send(model=model, load_only=True)

    def measure(self, **cmd) -> dict[int, dict]:
        self.send(**cmd)
        return self.wait()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


# --------------------------------------------------------------------------------------------
# servers
# --------------------------------------------------------------------------------------------
class Server:
    def __init__(self, kind: str, proc: subprocess.Popen, port: int, metrics_port, log: Path):
        self.kind, self.proc, self.port, self.metrics_port, self.log = (kind, proc, port,
                                                                         metrics_port, log)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_process(self.proc, timeout=30)

    def thread_cpu(self) -> dict[int, float]:
        """CPU seconds per thread id (utime + stime)."""
        out = {}
        base = f"/proc/{self.proc.pid}/task"
        for tid in os.listdir(base):
            try:
                with open(f"{base}/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                out[int(tid)] = (int(fields[11]) + int(fields[12])) / CLK
            except (OSError, IndexError):
                pass
        return out


def launch(kind: str, model_dir: Path, cpus: str | None, threads: int, extra: list[str],
           root: Path = ROOT, label: str | None = None, env: dict[str, str] | None = None):
    """Start a server process; :func:`ready` waits for it (servers load in parallel).

    ``root``: the source tree our server runs from (another checkout compares two versions);
    ``env``: extra environment variables (bench.prefix_served's old token budget).
    """
    tmp = Path(tempfile.mkdtemp(prefix=f"rmbench-{kind}-"))
    port_file, log = tmp / "ports.json", tmp / "server.log"
    if kind == "ours":
        cmd = [sys.executable, "-m", "rm_server.cli", "serve", "--model", str(model_dir),
               "--port", "0", "--metrics-port", "0", "--port-file", str(port_file),
               "--num-threads", str(threads), "--log-level", "warning", "--no-reflection",
               *extra]
    else:
        cmd = [sys.executable, "-m", "bench.naive_server", "--model", str(model_dir),
               "--port", "0", "--port-file", str(port_file), "--num-threads", str(threads),
               *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", **(env or {})}
    # started unpinned (imports and loading go faster on all cores), pinned once ready
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
                            cwd=root)
    return label or kind, kind, proc, port_file, log, threads


def naive_label(args, threads: int) -> str:
    return "naive" if len(args.naive_threads) == 1 else f"naive-t{threads}"


def pin(pid: int, cpus: str | None) -> None:
    """Pin every thread of ``pid`` (threads it starts later inherit the mask)."""
    if cpus:
        subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], check=True,
                       stdout=subprocess.DEVNULL)


def ready(launched, timeout: float = 300.0) -> Server:
    label, kind, proc, port_file, log, threads = launched
    end = time.monotonic() + timeout
    while not (port_file.exists() and port_file.read_text()):
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            raise RuntimeError(f"{kind} server did not start:\n{log.read_text()}")
        time.sleep(0.05)
    ports = json.loads(port_file.read_text())
    server = Server(kind, proc, ports["port"], ports.get("metrics_port"), log)
    server.label, server.threads = label, threads
    if kind == "ours":
        wait_serving(server.address, max(1.0, end - time.monotonic()), proc)
    return server


# --------------------------------------------------------------------------------------------
# (a), (c) the load generator
# --------------------------------------------------------------------------------------------
def build_requests(pool: list[list[int]], per_request: int):
    from protos import reward_pb2 as pb

    reqs = []
    for i in range(0, len(pool), per_request):
        chunk = pool[i:i + per_request]
        reqs.append(pb.ScoreRequest(samples=[
            pb.Sample(id=f"s{i + j}", tokens=pb.TokenIds(ids=ids))
            for j, ids in enumerate(chunk)]))
    return reqs


async def drive(address: str, mode: str, clients: int, requests: list, work: list[int],
                timeout: float = 900.0) -> dict:
    """Closed loop: client i sends requests[work[i::clients]] one at a time.

    Returns wall seconds (first send of the timed part to last answer), per-request latencies
    and sample count. Each client first sends one untimed warm-up request.
    """
    import grpc

    from protos import reward_pb2 as pb

    opts = [("grpc.use_local_subchannel_pool", 1),  # one connection per client, like trainers
            ("grpc.max_receive_message_length", 16 << 20)]
    channels = [grpc.aio.insecure_channel(address, options=opts) for _ in range(clients)]
    latencies: list[float] = []
    samples = 0
    go = asyncio.Event()
    ready = 0

    async def client(i: int) -> None:
        nonlocal samples, ready
        ch = channels[i]
        md = (("x-client-id", f"bench-{i}"),)
        mine = [requests[k] for k in work[i::clients]]
        warm = requests[work[i % len(work)]]
        call = None
        if mode == "unary":
            score = ch.unary_unary(SERVICE + "Score",
                                   request_serializer=pb.ScoreRequest.SerializeToString,
                                   response_deserializer=pb.ScoreResponse.FromString)

            async def send(req) -> None:
                await score(req, timeout=timeout, metadata=md)
        else:
            stream = ch.stream_stream(SERVICE + "ScoreStream",
                                      request_serializer=pb.ScoreRequest.SerializeToString,
                                      response_deserializer=pb.ScoreResponse.FromString)
            call = stream(timeout=timeout, metadata=md)

            async def send(req) -> None:
                await call.write(req)
                got = 0
                while got < len(req.samples):
                    resp = await call.read()
                    if resp is grpc.aio.EOF:
                        raise RuntimeError("stream ended early")
                    got += len(resp.results)

        await send(warm)
        ready += 1
        if ready == clients:
            go.set()
        await go.wait()
        for req in mine:
            t = time.perf_counter()
            await send(req)
            latencies.append(time.perf_counter() - t)
            samples += len(req.samples)
        if call is not None:
            await call.done_writing()
            if await call.read() is not grpc.aio.EOF:
                raise RuntimeError("unexpected response after the last request")

    tasks = [asyncio.ensure_future(client(i)) for i in range(clients)]
    await go.wait()
    t0 = time.perf_counter()
    try:
        await asyncio.gather(*tasks)
    finally:
        for c in channels:
            await c.close()
    wall = time.perf_counter() - t0
    return {"wall": wall, "samples": samples, "rate": samples / wall,
            "p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
            "requests": len(latencies)}


def measure(server: Server, mode: str, clients: int, requests: list, work: list[int],
            profile: Path | None = None) -> dict:
    before = scrape(server.metrics_port)
    cpu0 = server.thread_cpu()
    spy = None
    if profile is not None:
        profile.parent.mkdir(parents=True, exist_ok=True)
        spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record",
                                "--pid", str(server.proc.pid), "--rate", "250", "--nonblocking",
                                "--threads", "--format", "raw", "--output", str(profile)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # py-spy attaches
    res = asyncio.run(drive(server.address, mode, clients, requests, work))
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(60)
    cpu1 = server.thread_cpu()
    after = scrape(server.metrics_port)
    # CPU of the whole call (warm-up included: a small bias against both servers alike)
    d = {t: cpu1[t] - cpu0.get(t, 0.0) for t in cpu1}
    main = d.pop(server.proc.pid, 0.0)
    model = max(d.values()) if d else 0.0
    other = sum(d.values()) - model
    n = res["samples"] + clients * len(requests[0].samples)  # + warm-up requests
    res.update(cpu_ms=1000 * (main + model + other) / n, cpu_model_ms=1000 * model / n,
               cpu_loop_ms=1000 * main / n, cpu_other_ms=1000 * other / n)
    if after:
        bt = delta(after, before, "rm_batch_tokens_sum")
        tok = delta(after, before, "rm_tokens_total")
        nb = delta(after, before, "rm_batch_size_count")
        res["padding"] = 1 - tok / bt if bt else float("nan")
        res["avg_batch"] = delta(after, before, "rm_batch_size_sum") / nb if nb else float("nan")
        res["batches"] = nb
    return res


# --------------------------------------------------------------------------------------------
# the sweep
# --------------------------------------------------------------------------------------------
T0 = time.perf_counter()


def run(args) -> list[dict]:
    client_cpus = parse_cpus(args.client_cpus)
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)  # threads started later (grpc's) inherit it
    if args.client_idle:  # only cycles the servers leave (threads started later inherit it)
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    rows = []
    limit = LimitWorker(args.server_cpus, args.threads, args.compile, args.device, args.dtype)
    placement = ["--device", args.device, "--dtype", args.dtype]  # every server, the same
    compile_flag = ["--compile"] if args.compile else []
    try:
        for model_name in args.models:
            model_dir = ensure_model(model_name, args.cache)
            launched = [launch("ours", model_dir, args.server_cpus, args.threads,
                               placement + shlex.split(args.server_args) + compile_flag + flags,
                               root, label)
                        for label, root, flags in args.variants]
            if not args.no_naive:
                launched += [launch("naive", model_dir, args.server_cpus, t, placement,
                                    label=naive_label(args, t)) for t in args.naive_threads]
            limit.load(str(model_dir))  # the three processes load at the same time
            servers = {}
            try:
                for item in launched:
                    s = ready(item)
                    servers[s.label] = s
                limit.wait()
                for s in servers.values():
                    pin(s.proc.pid, args.server_cpus)
                pin(limit.proc.pid, args.server_cpus)
                print(f"[{model_name}] servers and limit worker up after "
                      f"{time.perf_counter() - T0:.0f}s", file=sys.stderr, flush=True)
                for mix in args.mixes:
                    rows += run_mix(args, limit, servers, model_name, model_dir, mix)
            finally:
                for _, _, proc, *_ in launched:
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGTERM)
                for _, _, proc, *_ in launched:
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
    finally:
        limit.close()
    return rows


def _fmt(kind: str, r: dict) -> str:
    return (f"{kind:5s} {r['rate']:7.2f}/s"
            + (f" p50 {1000 * r['p50']:6.0f} ms p99 {1000 * r['p99']:6.0f} ms"
               if "p50" in r else "")
            + f" cpu {r['cpu_ms']:5.1f} ms/sample"
            + (f" (model {r['cpu_model_ms']:.1f} loop {r['cpu_loop_ms']:.1f} other "
               f"{r['cpu_other_ms']:.1f})" if "cpu_model_ms" in r else "")
            + (f" pad {r['padding']:.2f}" if "padding" in r else "")
            + (f" batch {r['avg_batch']:.1f}" if "avg_batch" in r else "")
            + (f" bs {r['bs']}" if "bs" in r else "")
            + f" ({r['wall']:.0f}s)")


def run_mix(args, limit: LimitWorker, servers: dict, model_name: str, model_dir: Path,
            mix: str) -> list[dict]:
    n_pool = args.pool.get(mix, 256)
    pool = sample_pool(mix, n_pool, seed=args.seed)
    requests = build_requests(pool, args.samples_per_request)
    points = [(mode, c) for c in args.clients for mode in args.modes]
    variants = [label for label, _, _ in args.variants]
    naives = [k for k in servers if servers[k].kind == "naive"]
    kinds = ["limit", *variants, *naives]
    results: dict = {p: {k: [] for k in kinds} for p in points}
    sweeps = []
    turn = 0
    for rep in range(args.reps):
        if rep < args.sweep_reps or not sweeps:
            t = time.perf_counter()
            sweep = limit.measure(model=str(model_dir), mix=mix, n=n_pool, seed=args.seed,
                                  batch_sizes=args.limit_batch_sizes)
            best = max(sweep, key=lambda bs: sweep[bs]["rate"])
            sweeps.append((best, sweep))
            print(f"[{model_name} {mix} rep {rep}] limit sweep " + " ".join(
                f"bs{bs}={v['rate']:.1f}/s" for bs, v in sweep.items())
                + f" -> best bs{best} ({time.perf_counter() - t:.0f}s)", file=sys.stderr,
                flush=True)
        for mode, clients in points:
            # a fixed amount of work, ~--point-seconds at the limit's rate, a multiple of the
            # clients, at least --min-requests per client, at most --max-cycles passes over the
            # pool (a whole pass when it is the pool's size: the limit's exact samples)
            rate = sweep[best]["rate"]
            want = round(args.point_seconds * rate / args.samples_per_request)
            want = min(max(want, clients * args.min_requests), len(requests) * args.max_cycles)
            if args.whole_passes:  # the limit's exact samples, whatever the concurrency
                want = -(-want // len(requests)) * len(requests)
            per_client = max(1, -(-want // clients))
            work = [(rep * len(requests) // max(1, args.reps) + k) % len(requests)
                    for k in range(per_client * clients)]
            k0 = turn % len(kinds)
            turn += 1
            for kind in kinds[k0:] + kinds[:k0]:  # rotate who goes first
                if kind == "limit":  # the limit again, next to this point, at the best bs
                    r = limit.measure(model=str(model_dir), mix=mix, n=n_pool, seed=args.seed,
                                      batch_sizes=[best])[best]
                    r["bs"] = best
                else:
                    prof = None
                    if args.profile_dir and kind not in naives:
                        prof = (Path(args.profile_dir)
                                / f"{kind}-{model_name}-{mix}-{mode}-c{clients}-r{rep}.txt")
                    r = measure(servers[kind], mode, clients, requests, work, prof)
                    r["threads"] = servers[kind].threads
                results[(mode, clients)][kind].append(r)
                print(f"[{model_name} {mix} rep {rep}] {mode:6s} c={clients:<3d} "
                      + _fmt(kind, r), file=sys.stderr, flush=True)
    rows = []
    best_all = [b for b, _ in sweeps]
    for (mode, clients), res in results.items():
        lim = res["limit"]
        # the naive server at its best thread count, per repetition
        naive = [max((res[k][i] for k in naives), key=lambda r: r["rate"])
                 for i in range(len(lim))] if naives else []
        for variant in variants:
            ours = res[variant]
            row = {
                "model": model_name, "params": num_parameters(model_dir), "mix": mix,
                "lengths": LENGTHS[mix], "mode": mode, "clients": clients, "variant": variant,
                "samples_per_request": args.samples_per_request, "reps": args.reps,
                "ours_rate": median([r["rate"] for r in ours]),
                "ours_p50_ms": 1000 * median([r["p50"] for r in ours]),
                "ours_p99_ms": 1000 * median([r["p99"] for r in ours]),
                "ours_padding": median([r.get("padding", float("nan")) for r in ours]),
                "ours_avg_batch": median([r.get("avg_batch", float("nan")) for r in ours]),
                "ours_cpu_ms": median([r["cpu_ms"] for r in ours]),
                "ours_cpu_model_ms": median([r["cpu_model_ms"] for r in ours]),
                "ours_cpu_loop_ms": median([r["cpu_loop_ms"] for r in ours]),
                "ours_cpu_other_ms": median([r["cpu_other_ms"] for r in ours]),
                "limit_rate": median([r["rate"] for r in lim]),
                "limit_best_bs": max(set(best_all), key=best_all.count),
                "limit_best_bs_all": best_all,
                "limit_padding": median([r["padding"] for r in lim]),
                "limit_cpu_ms": median([r["cpu_ms"] for r in lim]),
                "limit_sweep": {bs: median([sw[bs]["rate"] for _, sw in sweeps])
                                for bs in args.limit_batch_sizes},
                "limit_sweep_cpu_ms": {bs: median([sw[bs]["cpu_ms"] for _, sw in sweeps])
                                       for bs in args.limit_batch_sizes},
                "a_over_b": median([a["rate"] / b["rate"] for a, b in zip(ours, lim)]),
                "a_over_b_cpu": median([b["cpu_ms"] / a["cpu_ms"] for a, b in zip(ours, lim)]),
                "samples_per_point": median([r["samples"] for r in ours]),
                "ours_runs": ours, "limit_runs": lim, "naive_runs": naive,
            }
            if naive:
                row.update({
                    "naive_rate": median([r["rate"] for r in naive]),
                    "naive_p50_ms": 1000 * median([r["p50"] for r in naive]),
                    "naive_p99_ms": 1000 * median([r["p99"] for r in naive]),
                    "naive_cpu_ms": median([r["cpu_ms"] for r in naive]),
                    "naive_threads": [r["threads"] for r in naive],
                    "a_over_c": median([a["rate"] / c["rate"] for a, c in zip(ours, naive)]),
                    "a_over_c_cpu": median([c["cpu_ms"] / a["cpu_ms"]
                                            for a, c in zip(ours, naive)]),
                })
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    head = ("| model | mix | mode | C | server | ours /s | p50 ms | p99 ms | pad | batch "
            "| limit /s (bs) | naive /s | p50 ms | p99 ms | a/b | a/c | a/b cpu | a/c cpu |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    f = lambda x, d=1: "-" if x is None or x != x else f"{x:.{d}f}"  # noqa: E731
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['mix']} | {r['mode']} | {r['clients']} "
            f"| {r.get('variant', 'ours')} | {f(r['ours_rate'])} "
            f"| {f(r['ours_p50_ms'], 0)} | {f(r['ours_p99_ms'], 0)} | {f(r['ours_padding'], 2)} "
            f"| {f(r['ours_avg_batch'])} | {f(r['limit_rate'])} ({r['limit_best_bs']}) "
            f"| {f(r.get('naive_rate'))} | {f(r.get('naive_p50_ms'), 0)} "
            f"| {f(r.get('naive_p99_ms'), 0)} | {f(r['a_over_b'], 2)} | {f(r.get('a_over_c'), 2)} "
            f"| {f(r['a_over_b_cpu'], 2)} | {f(r.get('a_over_c_cpu'), 2)} |")
    return "\n".join(lines)


def point_table(rows: list[dict]) -> str:
    """One line per point, the variants side by side (rate, p50/p99 ms, padding, a/b, a/c)."""
    f = lambda x, d=1: "-" if x is None or x != x else f"{x:.{d}f}"  # noqa: E731
    points: dict = {}
    for r in rows:
        points.setdefault((r["model"], r["mix"], r["mode"], r["clients"]), []).append(r)
    variants = list(dict.fromkeys(r.get("variant", "ours") for r in rows))
    head = ["model", "mix", "mode", "C"]
    for v in variants:
        head += [f"{v} /s", f"{v} p50/p99 ms", f"{v} pad", f"{v} a/b", f"{v} a/c"]
    head += ["limit /s (bs)", "naive /s", "naive p50/p99 ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, rs in points.items():
        by = {r.get("variant", "ours"): r for r in rs}
        cells = [key[0], key[1], key[2], str(key[3])]
        for v in variants:
            r = by.get(v)
            if r is None:
                cells += ["-"] * 5
                continue
            cells += [f(r["ours_rate"]), f"{f(r['ours_p50_ms'], 0)}/{f(r['ours_p99_ms'], 0)}",
                      f(r["ours_padding"], 2), f(r["a_over_b"], 2), f(r.get("a_over_c"), 2)]
        r = rs[0]
        cells += [f"{f(r['limit_rate'])} ({r['limit_best_bs']})", f(r.get("naive_rate")),
                  f"{f(r.get('naive_p50_ms'), 0)}/{f(r.get('naive_p99_ms'), 0)}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def limit_table(rows: list[dict]) -> str:
    seen, lines = set(), []
    for r in rows:
        key = (r["model"], r["mix"])
        if key in seen:
            continue
        seen.add(key)
        by = r["limit_sweep"]
        lines.append(f"limit {r['model']} {r['mix']}: " + ", ".join(
            f"bs {bs}: {v:.1f}/s" for bs, v in by.items())
            + f"; best bs per rep {r['limit_best_bs_all']}; padding at best "
              f"{r['limit_padding']:.2f}; cpu ms/sample by bs: " + ", ".join(
                  f"{bs}: {v:.1f}" for bs, v in r["limit_sweep_cpu_ms"].items()))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--quick", action="store_true",
                    help="rm-7m, short, unary, 1 and 64 clients, 1 rep, short time boxes")
    ap.add_argument("--models", default="rm-7m,rm-30m", help=f"of {sorted(MODELS)}")
    ap.add_argument("--mixes", default="short,mixed,long", help=f"of {sorted(LENGTHS)}")
    ap.add_argument("--modes", default="unary,stream")
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--samples-per-request", type=int, default=1)
    ap.add_argument("--point-seconds", type=float, default=12.0,
                    help="work per point, sized at the limit's rate (wall time is longer below it)")
    ap.add_argument("--min-requests", type=int, default=2, help="per client, per point")
    ap.add_argument("--max-cycles", type=int, default=4,
                    help="at most this many passes over the pool per point")
    ap.add_argument("--pool", default="short=256,mixed=64,long=64",
                    help="samples per length mix: the limit scores the whole pool, length-sorted, "
                    "at every batch size")
    ap.add_argument("--limit-batch-sizes", default="1,2,4,8,16,32,64")
    ap.add_argument("--sweep-reps", type=int, default=1000,
                    help="sweep the limit's batch sizes in the first N repetitions only (later "
                    "ones reuse the last best batch size; the paired limit still runs)")
    ap.add_argument("--whole-passes", action="store_true",
                    help="round every point's work up to whole passes over the pool")
    ap.add_argument("--threads", type=int, default=1, help="torch threads: servers and limit")
    ap.add_argument("--naive-threads", default="",
                    help="torch thread counts to run the naive server at (comma list; default "
                    "--threads); a/c is against the best of them in each repetition")
    ap.add_argument("--server-cpus", default="0", help="taskset CPU list for servers and limit "
                    "('' = no pinning)")
    ap.add_argument("--client-cpus", default="1", help="CPU list for the load generator")
    ap.add_argument("--client-idle", action="store_true",
                    help="run the load generator under SCHED_IDLE: it takes only the CPU the "
                         "servers leave, as trainers on other machines would")
    ap.add_argument("--compile", action="store_true",
                    help="ours (rm-server serve --compile) and the limit run the model under "
                    "torch.compile; the naive server stays eager HF, as simple RM servers run")
    ap.add_argument("--device", default="cpu",
                    help="torch device of ours, the limit and naive: cpu, cuda, cuda:N")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="parameter dtype of ours, the limit and naive")
    ap.add_argument("--server-args", default="", help="extra rm-server serve flags (all variants)")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=[@ROOT] FLAGS",
                    help="one of our servers to measure (repeatable): a label, optionally a source "
                    "tree to run it from (@/path/to/checkout), and its extra serve flags; "
                    "default: one server 'ours' from this checkout with no extra flags")
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--profile-dir", help="py-spy raw profiles of our server, one per point")
    ap.add_argument("--json-out")
    ap.add_argument("--table", nargs="+", metavar="JSON", help="print the tables of saved runs")
    ap.add_argument("--by-point", action="store_true",
                    help="with --table: one line per point, the variants side by side")
    ap.add_argument("--limit-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.limit_worker:
        return limit_worker(args.threads, args.compile, args.device, args.dtype)
    if args.table:
        rows = [r for p in args.table for r in json.loads(Path(p).read_text())["rows"]]
        print(point_table(rows) if args.by_point else table(rows))
        print(limit_table(rows))
        return
    if args.quick:
        args.models, args.mixes, args.clients, args.reps = "rm-7m", "short", "1,64", 1
        args.modes = "unary"
        args.point_seconds, args.min_requests = 1.5, 1
        args.limit_batch_sizes, args.pool = "1,4,16,64", "short=64"
    args.variants = []
    for v in args.variant or ["ours="]:
        label, _, rest = v.partition("=")
        flags = shlex.split(rest)
        root = ROOT
        if flags and flags[0].startswith("@"):
            root = Path(flags.pop(0)[1:]).resolve()
        args.variants.append((label, root, flags))
    args.models = [m for m in args.models.split(",") if m]
    args.mixes = [m for m in args.mixes.split(",") if m]
    args.modes = [m for m in args.modes.split(",") if m]
    args.clients = [int(c) for c in args.clients.split(",")]
    args.limit_batch_sizes = [int(b) for b in args.limit_batch_sizes.split(",")]
    args.naive_threads = [int(t) for t in args.naive_threads.split(",") if t] or [args.threads]
    args.pool = {k: int(v) for k, v in (kv.split("=") for kv in args.pool.split(",") if kv)}
    t0 = time.perf_counter()
    rows = run(args)
    info = {"date": time.strftime("%Y-%m-%d %H:%M"), "argv": sys.argv,
            "seconds": time.perf_counter() - t0, "loadavg": os.getloadavg()}
    print(f"\n{' '.join(shlex.quote(a) for a in sys.argv)}  ({info['seconds']:.0f} s, "
          f"load average {info['loadavg'][0]:.1f})")
    print(table(rows))
    print(limit_table(rows))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"info": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
