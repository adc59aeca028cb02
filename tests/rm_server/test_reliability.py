"""The RM service under load, overload, faults, hostile input and a long soak (issue 7).

Every test talks to real `rm-server` subprocesses on 127.0.0.1 with bounded loops. Figures
(latency percentiles, rejection counts, RSS) are printed with a `FIGURE` prefix: run with
`pytest -s tests/rm_server/test_reliability.py` to see them.
"""

from __future__ import annotations

import asyncio
import random
import signal
import threading
import time
import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForSequenceClassification

from protos import reward_pb2 as pb
from protos import reward_pb2_grpc as pb_grpc
from protos.service_name import METHOD_PREFIX
from rm_client import AsyncRewardClient, ScoringError, token_sample
from rm_server.launch import health_status, start_server

N_UNIQUE = 300


@pytest.fixture(scope="module")
def model_dir(rm_dirs):
    return rm_dirs["llama"]


@pytest.fixture(scope="module")
def corpus(model_dir):
    """Unique token sequences and their HF scores, each computed alone (the reference)."""
    rng = random.Random(0)
    seqs = [[rng.randrange(8, 300) for _ in range(rng.randint(4, 48))] for _ in range(N_UNIQUE)]
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        scores = [model(torch.tensor([s])).logits[0, 0].item() for s in seqs]
    return seqs, scores


@pytest.fixture(scope="module")
def server(model_dir):
    s = start_server(model_dir, "--max-batch-size", "32", "--max-wait-ms", "2",
                     "--min-ping-interval-ms", "500")
    yield s
    assert s.stop() == 0, s.log()


def metric(server, name: str, labels: dict | None = None) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics",
                                  timeout=5).read().decode()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                return s.value
    return 0.0


def queue_waits(server) -> dict[str, float]:
    """Cumulative rm_queue_wait_seconds bucket counts by their ``le`` label."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics",
                                  timeout=5).read().decode()
    return {s.labels["le"]: s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name == "rm_queue_wait_seconds_bucket"}


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def sample_id(client: int, i: int, k: int) -> str:
    return f"c{client}:i{i}:k{k}"  # k = which corpus sequence: lets us check every score


def test_load_8_clients_x_2000_zero_lost_duplicated_or_misrouted(server, corpus):
    seqs, scores = corpus
    per_client = 2000
    rng = random.Random(1)
    plan = {c: [rng.randrange(N_UNIQUE) for _ in range(per_client)] for c in range(8)}
    latencies: list[float] = []
    calls = {"unary": 0, "stream": 0}

    async def stream_client(c):
        async with AsyncRewardClient(server.address, client_id=f"s{c}") as rm:
            samples = [token_sample(sample_id(c, i, k), seqs[k]) for i, k in enumerate(plan[c])]
            t0 = time.perf_counter()
            got = [r async for r in rm.score_stream(samples, chunk_size=50)]
            print(f"\nFIGURE load: stream of 2000 took {time.perf_counter() - t0:.1f}s")
            calls["stream"] += 1
            return got

    async def unary_client(c):
        async with AsyncRewardClient(server.address, client_id=f"u{c}") as rm:
            got = []
            for start in range(0, per_client, 50):
                chunk = [token_sample(sample_id(c, i, plan[c][i]), seqs[plan[c][i]])
                         for i in range(start, start + 50)]
                t0 = time.perf_counter()
                got += await rm.score(chunk)
                latencies.append(time.perf_counter() - t0)
                calls["unary"] += 1
            return got

    async def main():
        return await asyncio.gather(*(stream_client(c) for c in range(4)),
                                    *(unary_client(c) for c in range(4, 8)))

    samples_before = metric(server, "rm_samples_total")
    ok_before = {m: metric(server, "rm_requests_total", {"method": m, "code": "OK"})
                 for m in ("Score", "ScoreStream")}
    t0 = time.perf_counter()
    results = asyncio.run(main())
    elapsed = time.perf_counter() - t0
    answered = [r for got in results for r in got]
    ids = [r.id for r in answered]
    assert len(ids) == 8 * per_client, "lost samples"
    assert len(set(ids)) == len(ids), "answered twice"
    misrouted = 0
    for r in answered:
        c, i, k = r.id.split(":")
        misrouted += abs(r.reward - scores[int(k[1:])]) > 1e-4
    assert misrouted == 0
    assert metric(server, "rm_samples_total") - samples_before == 8 * per_client
    assert metric(server, "rm_requests_total", {"method": "Score", "code": "OK"}) - \
        ok_before["Score"] == calls["unary"]
    assert metric(server, "rm_requests_total", {"method": "ScoreStream", "code": "OK"}) - \
        ok_before["ScoreStream"] == calls["stream"]
    print(f"\nFIGURE load: 16000 samples in {elapsed:.1f}s ({16000 / elapsed:.0f}/s); latency of "
          f"unary calls of 50 samples p50={pct(latencies, .5) * 1e3:.0f}ms "
          f"p99={pct(latencies, .99) * 1e3:.0f}ms")


def test_overload_2x_capacity_bounded_p99_documented_code_bounded_rss(model_dir, corpus):
    seqs, _ = corpus
    s = start_server(model_dir, "--max-queue", "64", "--max-batch-size", "16",
                     "--max-samples-per-request", "8", "--max-wait-ms", "2")
    try:
        async def call(stub, req, out):
            t0 = time.perf_counter()
            try:
                await stub.Score(req, timeout=30)
                out["ok"].append(time.perf_counter() - t0)
            except grpc.aio.AioRpcError as e:
                md = dict(e.trailing_metadata() or ())
                out["codes"].append((e.code(), "retry-after-ms" in md))

        def req(i):
            return pb.ScoreRequest(samples=[token_sample(f"{i}-{j}", seqs[(i * 8 + j) % N_UNIQUE])
                                            for j in range(8)])

        async def closed_loop(stub, seconds):  # capacity: 6 x 8 samples in flight < queue 64
            out, n, end = {"ok": [], "codes": []}, [0], time.perf_counter() + seconds

            async def worker(w):
                while time.perf_counter() < end:
                    n[0] += 1
                    await call(stub, req(n[0]), out)
            await asyncio.gather(*(worker(w) for w in range(6)))
            assert not out["codes"]
            return 8 * len(out["ok"]) / seconds

        async def open_loop(stub, rate, seconds):  # arrivals at a fixed rate, whatever happens
            out, tasks = {"ok": [], "codes": []}, []
            interval, t_next, i = 8 / rate, time.perf_counter(), 0
            end = t_next + seconds
            while t_next < end:
                tasks.append(asyncio.ensure_future(call(stub, req(i), out)))
                i += 1
                t_next += interval
                await asyncio.sleep(max(0.0, t_next - time.perf_counter()))
            await asyncio.gather(*tasks)
            return out

        async def main():
            async with grpc.aio.insecure_channel(s.address) as ch:
                stub = pb_grpc.RewardServiceStub(ch)
                capacity = await closed_loop(stub, 2.0)
                rss0 = rss_mb(s.proc.pid)
                waits0 = queue_waits(s)
                out = await open_loop(stub, 2 * capacity, 4.0)
                return capacity, rss0, waits0, out

        capacity, rss0, waits0, out = asyncio.run(main())
        waits1, rss1 = queue_waits(s), rss_mb(s.proc.pid)
        refused = out["codes"]
        assert refused, "2x capacity must overflow a 64-sample queue"
        assert all(code == grpc.StatusCode.UNAVAILABLE and hint for code, hint in refused)
        # The guarantee: what is accepted waits about a full queue's drain time, 64 / capacity
        # s (< 0.2 s here), never the growing backlog of an unbounded queue (at 2x for 4 s,
        # an arrival at time t would wait about t: three quarters of them over 1 s).
        # Server-side, from /metrics: at most two queue-fulls of samples waited over 1 s
        # (a stall of the shared host, e.g. CPU steal, can hold up one queue-full, no more).
        n = waits1["+Inf"] - waits0["+Inf"]
        within = waits1["1.0"] - waits0["1.0"]
        assert n >= 8 * len(out["ok"]) and n - within <= 2 * 64, (within, n)
        # Client-side: the median accepted call well under the unbounded queue's ~2 s.
        p99 = pct(out["ok"], .99)
        bound = 0.5 + 5 * 64 / capacity  # drain time with margin: the documented figure
        assert pct(out["ok"], .5) < 1.0
        assert rss1 - rss0 < 100
        print(f"\nFIGURE overload: capacity {capacity:.0f} samples/s; at 2x: "
              f"{len(out['ok'])} accepted (p50 {pct(out['ok'], .5) * 1e3:.0f} ms, "
              f"p99 {p99 * 1e3:.0f} ms, drain-time bound {bound * 1e3:.0f} ms; queue wait "
              f"<= 1 s for {within / n:.1%}), {len(refused)} refused "
              f"UNAVAILABLE+retry-after-ms; RSS {rss0:.0f} -> {rss1:.0f} MB")
    finally:
        assert s.stop() == 0


def test_sigkill_mid_stream_and_restart_every_sample_scored_once(model_dir, corpus):
    seqs, scores = corpus
    s = start_server(model_dir, "--max-batch-size", "8")
    port = s.port
    samples = [token_sample(f"k{i}:{i % N_UNIQUE}", seqs[i % N_UNIQUE]) for i in range(1500)]
    state = {"restarted": None}

    async def main():
        got = []
        async with AsyncRewardClient(s.address, max_attempts=30, backoff_max=1.0) as rm:
            async for r in rm.score_stream(samples, chunk_size=25):
                got.append(r)
                if len(got) == 300:  # mid-stream: kill it, start another on the same port
                    s.proc.send_signal(signal.SIGKILL)
                    s.proc.wait(10)
                    state["restarted"] = await asyncio.to_thread(
                        start_server, model_dir, "--port", str(port), "--max-batch-size", "8")
            return got, rm.retries

    got, retries = asyncio.run(main())
    try:
        ids = [r.id for r in got]
        assert len(ids) == 1500 and len(set(ids)) == 1500
        for r in got:
            assert abs(r.reward - scores[int(r.id.split(":")[1])]) < 1e-4
        assert retries >= 1
        print(f"\nFIGURE sigkill: 1500/1500 scored exactly once across a SIGKILL + restart, "
              f"{retries} retries")
    finally:
        if state["restarted"]:
            assert state["restarted"].stop() == 0


def test_sigstop_is_detected_by_keepalive(model_dir, corpus):
    seqs, _ = corpus
    victim = start_server(model_dir, "--min-ping-interval-ms", "500")
    try:
        async def main():
            async with AsyncRewardClient(victim.address, max_attempts=1, timeout=120,
                                         keepalive_time_ms=1000, keepalive_timeout_ms=1000) as rm:
                await rm.score([token_sample("warm", seqs[0])])
                victim.proc.send_signal(signal.SIGSTOP)
                t0 = time.perf_counter()
                with pytest.raises(ScoringError) as exc:
                    await rm.score([token_sample("x", seqs[1])])
                return time.perf_counter() - t0, exc.value.code

        detected_after, code = asyncio.run(main())
        assert code == grpc.StatusCode.UNAVAILABLE
        # keepalive 1 s + timeout 1 s (+ scheduling), not the 120 s deadline
        assert detected_after < 10
        print("\nFIGURE sigstop: a stopped server detected by keepalive after "
              f"{detected_after:.1f}s")
    finally:
        victim.proc.send_signal(signal.SIGCONT)
        assert victim.stop() == 0


def test_a_sigstopped_rm_fails_each_chunk_within_the_chunk_timeout(model_dir, corpus):
    """A hung RM (alive, not answering) with the trainer's RMScorer: each chunk's samples fail
    (named, never scored) after --rm-chunk-timeout, not after attempts x per-attempt deadline."""
    from policy_trainer.scoring import RMScorer  # the trainer side, over the real server

    seqs, _ = corpus
    victim = start_server(model_dir)
    scorer = RMScorer(victim.address, token=None, timeout=1.0, max_attempts=30,
                      backoff_max=0.05, client_id="hung", chunk_size=4, chunk_timeout=2.0)
    try:
        scorer.model_info()
        victim.proc.send_signal(signal.SIGSTOP)
        t0 = time.perf_counter()
        for c in range(2):
            scorer.submit([token_sample(f"c{c}-{i}", seqs[i]) for i in range(6)])
        got = scorer.collect()
        elapsed = time.perf_counter() - t0
    finally:
        victim.proc.send_signal(signal.SIGCONT)
        scorer.close()
        assert victim.stop() == 0
    assert got.results == {} and len(got.failed) == 12, got
    assert set(got.failed.values()) <= {"DEADLINE_EXCEEDED", "UNAVAILABLE"}
    assert elapsed < 2.0 + 3.0, elapsed  # 30 attempts x 1 s would be 30 s
    print(f"\nFIGURE sigstop: a hung RM failed 2 chunks in {elapsed:.1f}s (bound 2 s each)")


request_strategy = st.builds(
    lambda samples: pb.ScoreRequest(samples=samples),
    st.lists(st.one_of(
        st.builds(lambda i, p, r: pb.Sample(id=i, text=pb.TextPair(prompt=p, response=r)),
                  st.text(max_size=300), st.text(max_size=200), st.text(max_size=200)),
        st.builds(lambda i, ids, pl: pb.Sample(id=i, tokens=pb.TokenIds(ids=ids, prompt_length=pl)),
                  st.text(max_size=20), st.lists(st.integers(-2**31, 2**31 - 1), max_size=300),
                  st.integers(-2**31, 2**31 - 1)),
        st.builds(lambda i, msgs: pb.Sample(id=i, conversation=pb.Conversation(messages=msgs)),
                  st.text(max_size=20),
                  st.lists(st.builds(lambda r, c: pb.ChatMessage(role=r, content=c),
                                     st.sampled_from(["user", "assistant", "system", "tool",
                                                      "", "wizard", "NaN", "\x00"]),
                                     st.one_of(st.text(max_size=100), st.just("nan"),
                                               st.just("x" * 5000))), max_size=5)),
        st.builds(lambda i: pb.Sample(id=i), st.text(max_size=10)),
    ), max_size=12))


def test_fuzzing_gets_only_documented_codes_and_disturbs_nobody(server, corpus):
    seqs, scores = corpus
    allowed = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
               grpc.StatusCode.RESOURCE_EXHAUSTED}
    seen = {}
    stop = threading.Event()
    bystander = {"ok": 0, "bad": 0}

    def steady():  # another client, scoring and checking while the fuzzer runs
        with grpc.insecure_channel(server.address) as ch:
            stub = pb_grpc.RewardServiceStub(ch)
            i = 0
            while not stop.is_set():
                k = i % N_UNIQUE
                request = pb.ScoreRequest(samples=[token_sample(f"b{i}", seqs[k])])
                r = stub.Score(request, timeout=30)
                bystander["ok" if abs(r.results[0].reward - scores[k]) < 1e-4 else "bad"] += 1
                i += 1

    t = threading.Thread(target=steady)
    t.start()
    ch = grpc.insecure_channel(server.address)
    stub = pb_grpc.RewardServiceStub(ch)
    raw = ch.unary_unary(METHOD_PREFIX + "Score")

    def code_of(fn):
        try:
            fn()
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(request_strategy, st.binary(max_size=200))
    def fuzz(request, junk):
        for code in (code_of(lambda: stub.Score(request, timeout=30)),
                     code_of(lambda: raw(junk, timeout=30)),
                     code_of(lambda: list(stub.ScoreStream(iter([request, request]), timeout=30)))):
            seen[code] = seen.get(code, 0) + 1
            assert code in allowed, code

    try:
        fuzz()
        # oversized message at the raw-bytes level
        assert code_of(lambda: raw(b"\n" + b"\xff" * (17 << 20), timeout=30)) in allowed
    finally:
        stop.set()
        t.join(30)
        ch.close()
    assert health_status(server.address) == health_pb2.HealthCheckResponse.SERVING
    assert bystander["bad"] == 0 and bystander["ok"] > 0
    print(f"\nFIGURE fuzz: {sum(seen.values())} calls, codes "
          f"{ {c.name: n for c, n in seen.items()} }; bystander {bystander['ok']} correct, 0 wrong")


def test_batch_invariance_over_the_wire(server, corpus):
    seqs, scores = corpus
    target = 5
    with grpc.insecure_channel(server.address) as ch:
        stub = pb_grpc.RewardServiceStub(ch)
        alone = stub.Score(pb.ScoreRequest(samples=[token_sample("t", seqs[target])]), timeout=10)
        full = stub.Score(pb.ScoreRequest(samples=[token_sample("t", seqs[target])] + [
            token_sample(f"o{k}", seqs[k]) for k in range(40, 71)]), timeout=10)
        longs = [k for k in range(N_UNIQUE) if len(seqs[k]) > 40][:10]
        mixed = stub.Score(pb.ScoreRequest(samples=[token_sample("t", seqs[target])] + [
            token_sample(f"l{k}", seqs[k]) for k in longs]), timeout=10)
    for resp in (alone, full, mixed):
        r = next(x for x in resp.results if x.id == "t")
        assert abs(r.reward - scores[target]) < 1e-5


def test_memory_soak_20000_samples_with_error_paths(server, corpus):
    seqs, _ = corpus
    pid = server.proc.pid

    async def main():
        async with grpc.aio.insecure_channel(server.address) as ch:
            stub = pb_grpc.RewardServiceStub(ch)

            async def good(i):
                await stub.Score(pb.ScoreRequest(samples=[
                    token_sample(f"{i}-{j}", seqs[(i + j) % N_UNIQUE]) for j in range(50)]),
                    timeout=60)

            async def bad(i):
                for req in (pb.ScoreRequest(), pb.ScoreRequest(samples=[pb.Sample(id=f"x{i}")])):
                    with pytest.raises(grpc.aio.AioRpcError):
                        await stub.Score(req, timeout=10)

            async def cancelled(i):
                call = stub.Score(pb.ScoreRequest(samples=[
                    token_sample(f"c{i}-{j}", seqs[j]) for j in range(20)]), timeout=10)
                await asyncio.sleep(0)
                call.cancel()

            async def rounds(n, start):
                for i in range(start, start + n, 8):
                    await asyncio.gather(*(good(i + w) for w in range(8)), bad(i), cancelled(i))

            await rounds(40, 0)  # warm-up: 2,000 samples
            rss_warm = rss_mb(pid)
            await rounds(400, 1000)  # the soak: 20,000 samples
            return rss_warm

    rss_warm = asyncio.run(main())
    time.sleep(0.5)
    rss_end = rss_mb(pid)
    assert rss_end - rss_warm < 64, f"RSS grew {rss_end - rss_warm:.0f} MB"
    print(f"\nFIGURE soak: RSS {rss_warm:.0f} MB after warm-up -> {rss_end:.0f} MB after "
          f"20,000 samples + 100 invalid + 50 cancelled calls (bound 64 MB)")
