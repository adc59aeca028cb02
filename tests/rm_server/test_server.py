"""End to end: a real `rm-server serve` subprocess on loopback, driven over gRPC."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from protos import reward_pb2 as pb
from protos import reward_pb2_grpc as pb_grpc
from protos.encoding import Encoder, TextInput, tokenizer_fingerprint
from protos.service_name import METHOD_PREFIX, SERVICE_NAME
from rm_client import (
    AsyncRewardClient,
    RewardClient,
    ScoringError,
    chat_sample,
    text_sample,
    token_sample,
)
from rm_server.launch import health_status, start_server
from tests.processes import sigterm_until_exit


@pytest.fixture(scope="module")
def model_dir(rm_dirs):
    return rm_dirs["llama"]


@pytest.fixture(scope="module")
def server(model_dir):
    s = start_server(model_dir, "--max-batch-size", "16", "--max-wait-ms", "2")
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture(scope="module")
def reference(model_dir):
    """Independent reference: HF forward on each sample alone, our shared Encoder for ids."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    enc = Encoder(tok, 128, model.config.vocab_size)

    def score_ids(ids):
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0, 0].item()

    def score_text(prompt, response):
        return score_ids(enc.encode(TextInput(prompt, response)).ids)

    score_ids.text = score_text
    score_ids.tokenizer = tok
    return score_ids


@pytest.fixture()
def stub(server):
    with grpc.insecure_channel(server.address) as ch:
        yield pb_grpc.RewardServiceStub(ch)


def scrape(server) -> dict[str, float]:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read()
    out = {}
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}"
                            if s.labels else "")
            out[key] = s.value
    return out


def words(rng, n):
    vocab = "the a movie film great terrible boring wonderful plot acting really not".split()
    return " ".join(rng.choice(vocab) for _ in range(n))


def test_health_and_reflection(server):
    assert health_status(server.address) == health_pb2.HealthCheckResponse.SERVING
    assert health_status(server.address, SERVICE_NAME) == \
        health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    with grpc.insecure_channel(server.address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        resp = next(iter(stub.ServerReflectionInfo(iter([req]), timeout=5)))
    names = {s.name for s in resp.list_services_response.service}
    assert SERVICE_NAME in names


def test_model_info(stub, reference):
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    assert info.architecture == "LlamaForSequenceClassification"
    assert info.tokenizer_fingerprint == tokenizer_fingerprint(reference.tokenizer)
    assert len(info.version) == 16 and info.max_length == 128 and info.vocab_size == 300
    assert info.scoring_path == "last-token" and info.truncation == "left"
    assert not info.has_reward_stats


def test_each_input_form_scores_like_hf(stub, reference):
    tok = reference.tokenizer
    chat = [{"role": "user", "content": "rate this"},
            {"role": "assistant", "content": "great plot"}]
    chat_ids = list(tok.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"])
    ids = (tok("the movie")["input_ids"]
           + tok(" was wonderful", add_special_tokens=False)["input_ids"])
    req = pb.ScoreRequest(samples=[
        text_sample("t", "the movie", " was wonderful"), chat_sample("c", chat),
        token_sample("k", ids, 3)])
    res = {r.id: r for r in stub.Score(req, timeout=10).results}
    assert set(res) == {"t", "c", "k"}
    assert res["t"].reward == pytest.approx(reference.text("the movie", " was wonderful"), abs=1e-5)
    assert res["k"].reward == pytest.approx(res["t"].reward, abs=1e-6)  # same ids, same score
    assert res["c"].reward == pytest.approx(reference(chat_ids), abs=1e-5)
    assert res["c"].num_tokens == len(chat_ids) and not res["c"].truncated


def test_truncated_inputs_are_flagged(stub, reference):
    long_ids = [10 + i % 200 for i in range(300)]
    r = stub.Score(pb.ScoreRequest(samples=[token_sample("long", long_ids)]), timeout=10).results[0]
    assert r.truncated and r.num_tokens == 128
    assert r.reward == pytest.approx(reference(long_ids[-128:]), abs=1e-5)


def test_unary_results_in_request_order_on_a_raw_stub(stub, reference):
    """The length grouping batches long samples with long ones, out of request order; a raw
    stub (no client library to reorder) still reads result i as sample i's."""
    lengths = [60, 3, 61, 2, 59, 5, 1, 62, 4, 58]
    samples = [token_sample(f"s{i}", [10 + (i * 7 + j) % 250 for j in range(n)])
               for i, n in enumerate(lengths)]
    res = stub.Score(pb.ScoreRequest(samples=samples), timeout=10).results
    assert [r.id for r in res] == [s.id for s in samples]
    assert [r.num_tokens for r in res] == lengths
    assert res[3].reward == pytest.approx(reference(list(samples[3].tokens.ids)), abs=1e-5)


def test_concurrent_stream_clients_every_id_once_with_its_score(server, reference):
    """8 clients x 50 samples over streams, all at once: each id answered exactly once, right."""
    rng = random.Random(0)
    work = {c: [(f"c{c}-{i}", words(rng, 1 + rng.randrange(12)), words(rng, 1 + rng.randrange(30)))
                for i in range(50)] for c in range(8)}

    async def client(c):
        async with AsyncRewardClient(server.address, client_id=f"trainer-{c}") as rm:
            got = []
            async for r in rm.score_stream((text_sample(i, p, s) for i, p, s in work[c]),
                                           chunk_size=7):
                got.append(r)
            return got

    async def main():
        return await asyncio.gather(*(client(c) for c in range(8)))

    before = scrape(server)
    results = asyncio.run(main())
    after = scrape(server)
    for c, got in enumerate(results):
        ids = [r.id for r in got]
        assert sorted(ids) == sorted(i for i, _, _ in work[c]), "lost, duplicated or misrouted"
        expected = {i: reference.text(p, s) for i, p, s in work[c]}
        for r in got:
            assert r.reward == pytest.approx(expected[r.id], abs=1e-5), r.id
    n = 400
    assert after["rm_samples_total"] - before["rm_samples_total"] == n
    assert after["rm_batch_size_sum"] - before["rm_batch_size_sum"] == n
    assert after["rm_queue_wait_seconds_count"] - before["rm_queue_wait_seconds_count"] == n
    assert after["rm_batch_size_count"] - before["rm_batch_size_count"] < n  # batching happened


@pytest.mark.parametrize("sample, field", [
    (pb.Sample(id="nothing"), "'nothing': input"),
    (pb.Sample(id="empty", tokens=pb.TokenIds(ids=[])), "'empty': tokens.ids"),
    (pb.Sample(id="big", tokens=pb.TokenIds(ids=[5, 10**6])), "'big': tokens.ids"),
    (pb.Sample(id="neg", tokens=pb.TokenIds(ids=[5, -3])), "'neg': tokens.ids"),
    (pb.Sample(id="plen", tokens=pb.TokenIds(ids=[5], prompt_length=9)),
     "'plen': tokens.prompt_length"),
    (pb.Sample(id="role", conversation=pb.Conversation(
        messages=[pb.ChatMessage(role="wizard", content="x")])),
     "'role': conversation.messages[0].role"),
    (pb.Sample(id="nomsg", conversation=pb.Conversation()), "'nomsg': conversation.messages"),
    (pb.Sample(id="", text=pb.TextPair(prompt="a", response="b")), "samples.id"),
    (pb.Sample(id="blank", text=pb.TextPair()), "'blank': text"),
])
def test_bad_input_names_sample_and_field(stub, sample, field):
    with pytest.raises(grpc.RpcError) as exc:
        stub.Score(pb.ScoreRequest(samples=[sample]), timeout=5)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in exc.value.details()


def test_request_level_errors(server, stub):
    with pytest.raises(grpc.RpcError) as exc:
        stub.Score(pb.ScoreRequest(), timeout=5)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "samples" in exc.value.details()
    dup = pb.ScoreRequest(samples=[text_sample("d", "a", "b"), text_sample("d", "c", "d")])
    with pytest.raises(grpc.RpcError) as exc:
        stub.Score(dup, timeout=5)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'d': id: duplicate" in exc.value.details()
    many = pb.ScoreRequest(samples=[text_sample(str(i), "a", "b") for i in range(1025)])
    with pytest.raises(grpc.RpcError) as exc:
        stub.Score(many, timeout=5)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with grpc.insecure_channel(server.address) as ch:  # undecodable bytes: not UNKNOWN
        raw = ch.unary_unary(METHOD_PREFIX + "Score")
        with pytest.raises(grpc.RpcError) as exc:
            raw(b"\xff\xff\xff\xff", timeout=5)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "decode" in exc.value.details()
    huge = pb.ScoreRequest(samples=[text_sample("h", "a", "x" * (17 * 1024 * 1024))])
    with grpc.insecure_channel(server.address, [("grpc.max_send_message_length", 64 << 20)]) as ch:
        with pytest.raises(grpc.RpcError) as exc:
            pb_grpc.RewardServiceStub(ch).Score(huge, timeout=10)
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_bad_sample_in_a_stream_aborts_it_and_others_go_on(server, stub):
    def reqs():
        yield pb.ScoreRequest(samples=[text_sample("ok", "a", " b")])
        yield pb.ScoreRequest(samples=[pb.Sample(id="bad", tokens=pb.TokenIds(ids=[10**7]))])
    with pytest.raises(grpc.RpcError) as exc:
        list(stub.ScoreStream(reqs(), timeout=10))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'bad'" in exc.value.details()
    assert health_status(server.address) == health_pb2.HealthCheckResponse.SERVING
    assert stub.Score(pb.ScoreRequest(samples=[text_sample("after", "a", " b")]), timeout=5).results


def test_stream_duplicate_pending_id_is_refused(stub):
    def reqs():
        yield pb.ScoreRequest(samples=[text_sample("same", "a", " b" * 50)])
        yield pb.ScoreRequest(samples=[text_sample("same", "a", " c")])
    try:
        got = [r.id for resp in stub.ScoreStream(reqs(), timeout=10) for r in resp.results]
        assert got == ["same", "same"]  # the first was answered before the second arrived
    except grpc.RpcError as e:  # refused while the first is still pending
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "duplicate" in e.details()


def test_deadline_and_metrics_codes(server, stub):
    before = scrape(server)
    with pytest.raises(grpc.RpcError) as exc:
        stub.Score(pb.ScoreRequest(samples=[text_sample("x", "a", "b")]), timeout=0.0001)
    assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stub.Score(pb.ScoreRequest(samples=[text_sample("y", "a", "b")]), timeout=5)
    with pytest.raises(grpc.RpcError):
        stub.Score(pb.ScoreRequest(), timeout=5)
    time.sleep(0.2)
    after = scrape(server)
    d = lambda k: after.get(k, 0) - before.get(k, 0)  # noqa: E731
    assert d("rm_requests_total{code=OK,method=Score}") == 1
    assert d("rm_requests_total{code=INVALID_ARGUMENT,method=Score}") == 1
    assert d("rm_rejected_total{reason=invalid}") == 1
    for family in ("rm_request_duration_seconds_count{method=Score}", "rm_queue_depth",
                   "rm_inflight_requests", "rm_inference_duration_seconds_count",
                   "rm_batch_tokens_count", "rm_padding_ratio_count", "rm_queue_capacity",
                   "rm_build_info{model=llama,version=0.1.0}"):
        assert family in after, family
    assert after["rm_queue_depth"] == 0 and after["rm_inflight_requests"] == 0


def test_short_requests_do_not_make_full_batches_miss_their_deadline(model_dir):
    """A fresh server's first batch is one token; then 16 x 120-token requests with a 0.5 s
    deadline, milliseconds of model time. A per-token rate learnt from the first batch put
    each full batch at about 1920 times a one-token call (a second or more) and refused them
    all, every round."""
    s = start_server(model_dir, "--max-batch-size", "16", "--max-batch-tokens", "4096")
    try:
        with grpc.insecure_channel(s.address) as ch:
            stub = pb_grpc.RewardServiceStub(ch)
            stub.Score(pb.ScoreRequest(samples=[token_sample("one", [10])]), timeout=10)
            for r in range(5):
                req = pb.ScoreRequest(samples=[
                    token_sample(f"{r}-{i}", [10 + (r + i + j) % 250 for j in range(120)])
                    for i in range(16)])
                assert len(stub.Score(req, timeout=0.5).results) == 16
    finally:
        assert s.stop() == 0, s.log()


def test_sync_client_and_overload(model_dir):
    """A tiny queue under concurrent load: UNAVAILABLE with retry-after-ms, then the client
    library's retries get every sample through."""
    s = start_server(model_dir, "--max-queue", "8", "--max-samples-per-request", "8",
                     "--max-batch-size", "4", "--max-wait-ms", "20")
    try:
        reqs = [pb.ScoreRequest(samples=[token_sample(f"{r}-{i}", [10 + (r * i) % 250] * 100)
                                         for i in range(8)]) for r in range(24)]
        codes = []

        async def raw():
            async with grpc.aio.insecure_channel(s.address) as ch:
                stub = pb_grpc.RewardServiceStub(ch)

                async def one(req):
                    call = stub.Score(req, timeout=30)
                    try:
                        await call
                        codes.append("OK")
                    except grpc.aio.AioRpcError as e:
                        trailing = dict(e.trailing_metadata() or ())
                        codes.append((e.code(), trailing.get("retry-after-ms")))
                await asyncio.gather(*(one(r) for r in reqs))

        asyncio.run(raw())
        refused = [c for c in codes if c != "OK"]
        assert refused and "OK" in codes
        assert scrape(s)["rm_queue_capacity"] == 8  # what RMQueueNearFull divides by
        assert all(c == grpc.StatusCode.UNAVAILABLE and ms for c, ms in refused)

        with RewardClient(s.address, backoff_base=0.02) as rm:
            results = []
            threads = [threading.Thread(target=lambda r=r: results.extend(rm.score(r.samples)))
                       for r in reqs]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert len(results) == 24 * 8 and len({r.id for r in results}) == 24 * 8
            assert rm.retries > 0
            assert rm.model_info().name == "llama"
            with pytest.raises(ScoringError) as exc:
                rm.score([pb.Sample(id="bad")])
            assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        assert s.stop() == 0


def test_sigterm_during_load_drains_and_exits_zero(model_dir):
    s = start_server(model_dir, "--drain-delay-seconds", "1", "--max-batch-size", "4")
    rng = random.Random(1)
    outcome = {}

    async def stream(c):
        async with AsyncRewardClient(s.address, max_attempts=1) as rm:
            samples = [text_sample(f"{c}-{i}", words(rng, 5), words(rng, 40)) for i in range(40)]
            got = await rm.score_all(samples, chunk_size=40)
            outcome[c] = len(got)

    async def main():
        tasks = [asyncio.ensure_future(stream(c)) for c in range(4)]
        await asyncio.sleep(0.15)  # calls are in flight
        s.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        status = health_status(s.address)  # still answering during the drain delay
        await asyncio.gather(*tasks)
        return status

    status = asyncio.run(main())
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert outcome == {c: 40 for c in range(4)}  # every in-flight call finished
    assert s.proc.wait(30) == 0, s.log()


def test_repeated_sigterms_still_end_in_a_clean_exit(model_dir):
    """An impatient supervisor signals again and again: every SIGTERM during the shutdown, and
    during the interpreter's teardown after it, is the same request to stop, never a kill."""
    s = start_server(model_dir, "--max-batch-size", "4")
    assert sigterm_until_exit(s.proc, s.log) == 0, s.log()


def test_model_load_failure_is_one_line_and_nonzero(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rm_server.cli", "serve", "--model",
                           str(tmp_path / "nope"), "--port", "0", "--metrics-port", "-1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    err_lines = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    assert len(err_lines) == 1 and "no config.json" in err_lines[0]
