"""The trainer's RM round trip (policy_trainer/scoring.py RMScorer) when the RM misbehaves: a
malformed address, an unreachable RM (a line per retry round), a hung RM (alive, never
answering: a chunk's samples fail within --rm-chunk-timeout, never zero-filled). No model:
the hung RM is a gRPC server whose handlers never return; tests/rm_server/test_reliability.py
does the same against a real SIGSTOP'd rm-server."""

from __future__ import annotations

import logging
import re
import threading
import time
from concurrent import futures

import grpc
import pytest

from policy_trainer.scoring import RMError, RMScorer, make_sample
from protos import reward_pb2 as pb
from protos import reward_pb2_grpc as pb_grpc
from rm_client import AddressError


class _Hung(pb_grpc.RewardServiceServicer):
    """Accepts every call and never answers (as a model thread stuck forever would)."""

    def __init__(self, release: threading.Event):
        self.release = release

    def GetModelInfo(self, request, context):
        self.release.wait(60)
        return pb.ModelInfo()

    def Score(self, request, context):
        self.release.wait(60)
        return pb.ScoreResponse()

    def ScoreStream(self, request_iterator, context):
        self.release.wait(60)
        return iter(())


@pytest.fixture
def hung_rm():
    release = threading.Event()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    pb_grpc.add_RewardServiceServicer_to_server(_Hung(release), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    release.set()
    server.stop(0)


def scorer(address: str, **kw) -> RMScorer:
    args = dict(token=None, timeout=1.0, max_attempts=30, backoff_max=0.05, client_id="t",
                chunk_size=2)
    return RMScorer(address, **{**args, **kw})


def samples(prefix: str, n: int) -> list[pb.Sample]:
    return [make_sample("tokens", f"{prefix}{i}", [1, 5], [6], "", None) for i in range(n)]


def waiting_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.getMessage().startswith("waiting for the reward model at")]


@pytest.mark.parametrize("address, why", [
    ("http://127.0.0.1:50051", "no http:// scheme"),
    ("localhost", "no port (gRPC would dial 443)"),
    ("127.0.0.1:5oo51", "not a number in 1..65535"),
    ("127.0.0.1:70000", "not a number in 1..65535"),
    ("127.0.0.1:0", "not a number in 1..65535"),
    ("::1:50051", "IPv6 address goes in brackets"),
    ("rm-0:50051,rm-1", "no port"),
])
def test_a_malformed_address_is_refused_at_construction(address, why):
    """The trainer's scorer refuses what the client's parser refuses (tests/rm_client/
    test_targets.py: the parser and the clients)."""
    t0 = time.perf_counter()
    bad = address.split(",")[-1]
    with pytest.raises(AddressError, match=re.escape(f"'{bad}'") + ".*" + re.escape(why)):
        scorer(address)
    assert time.perf_counter() - t0 < 1.0  # at once, not after a minute of retries


def test_an_unreachable_rm_prints_a_line_per_retry_round(caplog):
    s = scorer("127.0.0.1:9", max_attempts=4, backoff_max=0.01)
    try:
        with caplog.at_level(logging.WARNING, logger="policy_trainer"):
            with pytest.raises(RMError, match="cannot reach the reward model at 127.0.0.1:9"):
                s.model_info()  # the trainer's start
            start = waiting_lines(caplog)
            assert [ln.split(",")[1].split(" in ")[0] for ln in start] == [
                " attempt 2 of 4", " attempt 3 of 4", " attempt 4 of 4"], start
            assert all("(UNAVAILABLE)" in ln for ln in start)
            caplog.clear()
            for k in range(3):  # mid-run: three chunks in flight retry together
                s.submit(samples(f"c{k}-", 2))
            got = s.collect()
        assert got.results == {} and len(got.failed) == 6
        mid = waiting_lines(caplog)
        # One line per round (3 rounds), not one per chunk and round (9).
        assert 3 <= len(mid) < 6, mid
        assert all(r.levelno == logging.WARNING and r.name.startswith("policy_trainer")
                   for r in caplog.records if r.getMessage() in mid)
    finally:
        s.close()


def test_a_hung_rm_fails_each_chunk_within_its_timeout(hung_rm, caplog):
    # 30 attempts x 1 s per attempt would be 30 s per chunk; the chunk's own bound is 2 s.
    s = scorer(hung_rm, chunk_timeout=2.0)
    try:
        t0 = time.perf_counter()
        with pytest.raises(RMError, match="total deadline"):
            s.model_info()
        assert time.perf_counter() - t0 < 2.0 + 2.0
        t0 = time.perf_counter()
        with caplog.at_level(logging.WARNING, logger="policy_trainer"):
            s.submit(samples("a", 3))
            s.submit(samples("b", 3))
            got = s.collect()
        elapsed = time.perf_counter() - t0
    finally:
        s.close()
    assert got.results == {}  # reported as failed, never given a reward
    assert got.failed == {f"{p}{i}": "DEADLINE_EXCEEDED" for p in "ab" for i in range(3)}
    assert elapsed < 2.0 + 2.0, elapsed  # chunks run side by side: about one bound in all
    assert waiting_lines(caplog)  # the retries were announced
    assert any("6 samples" in r.getMessage() or "3 of 3" in r.getMessage()
               for r in caplog.records)
