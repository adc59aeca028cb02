"""Multi-head reward models (num_labels = K): every head's score equals HF's logits[:, k] for
the sample alone, on the last-token path (shared prefixes included) and the forward path
(an encoder); reward is the configured aggregation (rm_server/heads.py); GetModelInfo and
ScoreResult carry the heads."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from protos import reward_pb2 as pb
from rm_server.batch_policy import Scored
from rm_server.heads import (
    Aggregation,
    aggregate,
    choose_aggregation,
    head_names,
    parse_weights,
    rewards_with_heads,
)
from rm_server.model import RewardModel
from rm_server.service import model_info, result_message
from tests import tiny
from tests.wordpiece import make_bert_pair_rm

LABELS = {0: "helpfulness", 1: "safety", 2: "verbosity"}


def hf_heads(path, seqs) -> list[list[float]]:
    ref = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return [ref(torch.tensor([s])).logits[0].tolist() for s in seqs]


@pytest.fixture(scope="module")
def three_heads(tmp_path_factory, tokenizer):
    path = tiny.make_reward_model("llama", tokenizer, tmp_path_factory.mktemp("h") / "llama",
                                  num_labels=3, id2label=LABELS,
                                  label2id={v: k for k, v in LABELS.items()})
    return path


def batch(vocab: int, shared_prefix: int = 0) -> list[list[int]]:
    rng = random.Random(1)
    prefix = [rng.randrange(8, vocab) for _ in range(shared_prefix)]
    return [prefix + [rng.randrange(8, vocab) for _ in range(rng.randint(1, 30))]
            for _ in range(7)]


@pytest.mark.parametrize("shared_prefix", [0, 24])
def test_every_head_equals_hf_on_the_last_token_path(three_heads, tokenizer, shared_prefix):
    rm = RewardModel(three_heads, head_weights="helpfulness=0.7,safety=0.3")
    assert rm.scoring_path == "last-token" and rm.heads.names == tuple(LABELS.values())
    seqs = batch(len(tokenizer), shared_prefix)
    (rewards, heads), want = rm.score_heads(seqs), hf_heads(three_heads, seqs)
    assert rm.score(seqs) == pytest.approx(rewards, abs=1e-6)
    for r, h, w in zip(rewards, heads, want):
        assert h == pytest.approx(w, abs=1e-5)
        assert r == pytest.approx(0.7 * w[0] + 0.3 * w[1], abs=1e-5)
    spread = [w[k] for w in want for k in range(3)]
    assert max(spread) - min(spread) > 0.1


def test_every_head_equals_hf_on_the_forward_path(tmp_path):
    path = make_bert_pair_rm(tmp_path / "bert3", num_labels=3, id2label=LABELS)
    rm = RewardModel(path, reward_head="safety")
    assert rm.scoring_path == "forward"
    tok = rm.tokenizer
    pairs = [("the movie was", "great fun"), ("i hated it", "the acting was very bad indeed")]
    seqs = [rm.encoder.encode_text(p, r)[0] for p, r in pairs]
    ref = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        want = [ref(**tok(p, r, return_tensors="pt")).logits[0].tolist() for p, r in pairs]
    for r, h, w in zip(*rm.score_heads(seqs), want):
        assert h == pytest.approx(w, abs=1e-5) and r == pytest.approx(w[1], abs=1e-5)


def test_heads_reach_model_info_and_results(three_heads):
    rm = RewardModel(three_heads)  # default: the first head
    info = model_info(rm, 8, "test")
    assert list(info.head_names) == list(LABELS.values())
    assert info.reward_aggregation == "helpfulness"
    [reward], [heads] = rm.score_heads([[5, 6, 7]])
    assert reward == heads[0]

    class P:
        sample_id, length, truncated, aggregation = "a", 3, False, None

    msg = result_message([(P(), Scored(reward, heads))])
    assert list(msg.results[0].head_scores) == pytest.approx(list(heads))
    assert pb.ScoreResponse.FromString(msg.SerializeToString()) == msg


def test_one_head_models_return_plain_floats(rm_dirs):
    rm = RewardModel(rm_dirs["llama"])
    assert rm.heads.names == ("LABEL_0",) and type(rm.score([[5, 6]])[0]) is float
    assert rm.score_heads([[5, 6]])[1] == [()]  # no head scores on the wire for one head
    assert model_info(rm, 8, "t").reward_aggregation == "LABEL_0"


def test_aggregation_is_one_pure_function():
    names = ("a", "b", "c")
    scores = torch.tensor([[1.0, 2.0, 4.0], [0.0, -1.0, 3.0]])
    how = choose_aggregation(names, head_weights="a=0.5, c=2")
    assert how == Aggregation(names, (0.5, 0.0, 2.0))
    assert aggregate(scores, how).tolist() == [8.5, 6.0]
    assert how.describe() == "0.5*a + 2*c"
    assert aggregate(scores, choose_aggregation(names, "b")).tolist() == [2.0, -1.0]
    assert head_names({"0": "x"}, 2) == ("x", "LABEL_1")
    assert parse_weights("x=1,y=-0.5") == {"x": 1.0, "y": -0.5}
    for kw, msg in (({"reward_head": "z"}, "no head named 'z'"),
                    ({"head_weights": "z=1"}, "no head named 'z'"),
                    ({"head_weights": "a"}, "not NAME=WEIGHT"),
                    ({"reward_head": "a", "head_weights": "a=1"}, "not both")):
        with pytest.raises(ValueError, match=msg):
            choose_aggregation(names, **kw)
    rewards, heads = rewards_with_heads(scores, how)
    assert rewards == [8.5, 6.0] and heads == [(1.0, 2.0, 4.0), (0.0, -1.0, 3.0)]
