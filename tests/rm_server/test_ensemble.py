"""Serving an ensemble (issue 21): one forward of the backbone scores every member, each equal to
HF's ``logits[:, k]`` for the sample alone; every result carries the members' scores, their
mean and std; ``reward`` is the server's aggregation (the checkpoint's own, or
``--reward-aggregation``: mean, min, mean − λ·std), which a request may override (gRPC and
/v1/score); bad overrides are INVALID_ARGUMENT naming the field. The aggregations agree with
the client's (rm_client/ensemble.py)."""

from __future__ import annotations

import json
import math
import random
import urllib.request

import grpc
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from protos import reward_pb2 as pb
from protos import reward_pb2_grpc as pb_grpc
from rm_client import ensemble as client_side
from rm_server.heads import (
    Aggregation,
    aggregate,
    aggregate_one,
    choose_aggregation,
    head_stats,
)
from rm_server.launch import start_server
from rm_server.model import RewardModel
from rm_server.service import model_info
from tests import tiny

K, LAMBDA = 4, 0.5
META = {"members": K, "aggregation": "uwo", "uncertainty_coef": LAMBDA}


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory, tokenizer):
    names = {k: f"member_{k}" for k in range(K)}
    return tiny.make_reward_model("llama", tokenizer, tmp_path_factory.mktemp("e") / "ens",
                                  num_labels=K, id2label=names,
                                  label2id={v: k for k, v in names.items()},
                                  reward_ensemble=META)


def hf_heads(path, seqs) -> list[list[float]]:
    ref = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return [ref(torch.tensor([s])).logits[0].tolist() for s in seqs]


def uwo(heads, coef=LAMBDA) -> float:
    t = torch.tensor(heads)
    return (t.mean() - coef * t.std(correction=0)).item()


def test_server_and_client_aggregate_alike():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(9, K, generator=g)
    for kind in ("mean", "min", "uwo"):
        how = Aggregation(("a",) * K, (0.25,) * K, kind, coef=1.7)
        batch = aggregate(scores, how).tolist()
        for row, want in zip(scores.tolist(), batch):
            assert aggregate_one(tuple(row), how) == pytest.approx(want, abs=1e-6)
            assert client_side.aggregate(row, kind, 1.7) == pytest.approx(want, abs=1e-6)
    mean, std = head_stats((1.0, 3.0))
    assert (mean, std) == (2.0, 1.0) and head_stats(()) == (0.0, 0.0)


def test_choose_aggregation_default_flags_and_errors():
    names = tuple(f"member_{k}" for k in range(K))
    how = choose_aggregation(names, ensemble=META)
    assert (how.kind, how.coef, how.members) == ("uwo", LAMBDA, K)
    assert how.describe() == "mean - 0.5*std of 4 heads"
    assert choose_aggregation(names, kind="min", ensemble=META).kind == "min"
    assert choose_aggregation(names, coef=2.0, ensemble=META).coef == 2.0
    assert choose_aggregation(names, reward_head="member_2", ensemble=META).kind == "weighted"
    assert how.asked("mean").kind == "mean" and how.asked("uwo", 0.0).coef == 0.0
    for kw, msg in (({"kind": "max"}, "'max' is not one of mean, min, uwo"),
                    ({"kind": "uwo", "coef": -1.0}, "must be a number >= 0"),
                    ({"kind": "min", "reward_head": "member_0"}, "not both")):
        with pytest.raises(ValueError, match=msg):
            choose_aggregation(names, **kw)
    with pytest.raises(ValueError, match="one head"):
        choose_aggregation(("LABEL_0",), kind="mean")
    with pytest.raises(ValueError, match="one head"):
        choose_aggregation(("LABEL_0",)).asked("mean")


@pytest.mark.parametrize("shared_prefix", [0, 20])
def test_every_member_equals_hf_alone_and_reward_is_the_stored_aggregation(ensemble, tokenizer,
                                                                             shared_prefix):
    rm = RewardModel(ensemble)
    assert rm.scoring_path == "last-token" and rm.heads.kind == "uwo"
    rng = random.Random(2)
    prefix = [rng.randrange(8, len(tokenizer)) for _ in range(shared_prefix)]
    seqs = [prefix + [rng.randrange(8, len(tokenizer)) for _ in range(rng.randint(1, 25))]
            for _ in range(6)]
    rewards, heads = rm.score_heads(seqs)  # one batch, one backbone forward
    for r, h, want in zip(rewards, heads, hf_heads(ensemble, seqs)):
        assert h == pytest.approx(want, abs=1e-5)
        assert r == pytest.approx(uwo(want), abs=1e-5)
    spread = [head_stats(h)[1] for h in heads]
    assert min(spread) > 0.01  # the members really differ (a trivial parity is no test)
    info = model_info(rm, 8, "t")
    assert info.ensemble_members == K and info.uncertainty_coef == pytest.approx(LAMBDA)
    assert info.reward_aggregation == "mean - 0.5*std of 4 heads"


def request(seqs, kind: str | None = None, coef: float | None = None, first: int = 0):
    agg = None
    if kind is not None:
        agg = pb.RewardAggregation(kind=kind)
        if coef is not None:
            agg.uncertainty_coef = coef
    return pb.ScoreRequest(samples=[pb.Sample(id=str(first + i), tokens=pb.TokenIds(ids=s))
                                    for i, s in enumerate(seqs)], aggregation=agg)


@pytest.fixture(scope="module")
def served(ensemble):
    server = start_server(ensemble, "--num-threads", "1", "--http-port", "0")
    yield server
    server.stop()


def test_results_carry_members_mean_std_and_a_request_may_override(served, ensemble):
    seqs = [[5, 9, 30, 41], [7, 8], [12, 60, 61, 62, 63, 64]]
    want = hf_heads(ensemble, seqs)
    with grpc.insecure_channel(served.address) as channel:
        stub = pb_grpc.RewardServiceStub(channel)
        info = stub.GetModelInfo(pb.GetModelInfoRequest())
        assert info.ensemble_members == K and len(info.head_names) == K
        cases = {None: uwo, "mean": lambda h: sum(h) / K, "min": min}
        for kind, expect in cases.items():
            for r, w in zip(stub.Score(request(seqs, kind)).results, want):
                assert list(r.head_scores) == pytest.approx(w, abs=1e-5)
                assert r.head_mean == pytest.approx(sum(w) / K, abs=1e-5)
                assert r.head_std == pytest.approx(torch.tensor(w).std(correction=0).item(),
                                                   abs=1e-5)
                assert r.reward == pytest.approx(expect(w), abs=1e-5), kind
        [r] = stub.Score(request(seqs[:1], "uwo", 2.0)).results
        assert r.reward == pytest.approx(uwo(want[0], 2.0), abs=1e-5)
        # a stream: each request's samples get that request's aggregation
        got = {r.id: r.reward for resp in stub.ScoreStream(iter(
            [request(seqs, "min"), request(seqs, None, first=10)])) for r in resp.results}
        for i, w in enumerate(want):
            assert got[str(i)] == pytest.approx(min(w), abs=1e-5)
            assert got[str(10 + i)] == pytest.approx(uwo(w), abs=1e-5)
        for kind, coef, msg in (("max", None, "aggregation.kind: 'max'"),
                                ("uwo", -1.0, "aggregation.uncertainty_coef")):
            with pytest.raises(grpc.RpcError) as err:
                stub.Score(request(seqs, kind, coef))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert msg in err.value.details()


def test_v1_score_takes_the_same_override(served, ensemble):
    seqs = [[5, 9, 30, 41], [7, 8]]
    body = {"samples": [{"id": str(i), "tokens": {"ids": s}} for i, s in enumerate(seqs)],
            "aggregation": {"kind": "min"}}
    req = urllib.request.Request(f"http://127.0.0.1:{served.http_port}/v1/score",
                                 json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    results = json.loads(urllib.request.urlopen(req, timeout=30).read())["results"]
    for r, w in zip(results, hf_heads(ensemble, seqs)):
        assert r["reward"] == pytest.approx(min(w), abs=1e-5)
        assert math.isclose(r["head_mean"], sum(w) / K, abs_tol=1e-5)


def test_the_flag_overrides_the_stored_default_and_one_head_refuses(ensemble, rm_dirs):
    rm = RewardModel(ensemble, reward_aggregation=("min", None))
    [r], [h] = rm.score_heads([[5, 6, 7]])
    assert r == pytest.approx(min(h)) and rm.heads.describe() == "min of 4 heads"
    one = start_server(rm_dirs["llama"], "--num-threads", "1")
    try:
        with grpc.insecure_channel(one.address) as channel:
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.RewardServiceStub(channel).Score(request([[5, 6]], "mean"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "the model has one head" in err.value.details()
    finally:
        one.stop()
