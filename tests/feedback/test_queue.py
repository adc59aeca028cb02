"""The queue's pure rules (feedback/queue.py) and the pair records' checks (feedback/pairs.py)."""

from __future__ import annotations

import random

import pytest

from feedback import queue
from feedback.errors import AlreadyAnswered, InvalidArgument
from feedback.pairs import Lease, Pair, check_choice, check_labeler, pair_from_json, pair_id_of


def test_labels_wanted_takes_the_asked_share_and_is_stable_per_pair():
    ids = [f"pair-{i}" for i in range(20_000)]
    doubles = sum(queue.labels_wanted(i, 0.1) == 2 for i in ids)
    assert abs(doubles / len(ids) - 0.1) < 0.01
    assert [queue.labels_wanted(i, 0.1) for i in ids[:50]] == [
        queue.labels_wanted(i, 0.1) for i in ids[:50]]
    assert all(queue.labels_wanted(i, 0.0) == 1 for i in ids[:100])
    assert all(queue.labels_wanted(i, 1.0) == 2 for i in ids[:100])


def test_the_left_side_is_a_fair_coin():
    rng = random.Random(0)
    lefts = [queue.draw_left(rng) for _ in range(10_000)]
    assert set(lefts) == {"a", "b"} and abs(lefts.count("a") / 10_000 - 0.5) < 0.02


@pytest.mark.parametrize("left,choice,winner", [
    ("a", "left", "a"), ("a", "right", "b"), ("b", "left", "b"), ("b", "right", "a"),
    ("a", "tie", "tie"), ("b", "skip", "skip")])
def test_the_choice_maps_through_the_drawn_side(left, choice, winner):
    assert queue.winner_of(left, choice) == winner
    pair = Pair("p", "x", "response a", "response b")
    lease = Lease("L", pair, "ann", left, 0.0, 1.0)
    shown = {"left": lease.left_text, "right": lease.right_text}
    if choice in shown:  # the text the labeler picked is the winner's
        assert shown[choice] == {"a": pair.response_a, "b": pair.response_b}[winner]


def test_decide_submit():
    assert queue.decide_submit("open", 10.0, None, "left", 9.9) == "record"
    assert queue.decide_submit("open", 10.0, None, "left", 10.0) == "expire"
    assert queue.decide_submit("expired", 10.0, None, "left", 1.0) == "expire"
    assert queue.decide_submit("answered", 10.0, "tie", "tie", 99.0) == "duplicate"
    with pytest.raises(AlreadyAnswered):
        queue.decide_submit("answered", 10.0, "tie", "left", 5.0)


def test_lease_seconds_within_bounds():
    assert queue.lease_seconds(None, 600, 3600) == 600
    assert queue.lease_seconds(30, 600, 3600) == 30
    assert queue.lease_seconds(1e9, 600, 3600) == 3600


def test_agreement_counts_pairs_with_two_non_skip_answers():
    a = queue.agreement({"p": ["a", "a"], "q": ["a", "b"], "r": ["skip", "a"], "s": ["tie", "tie"],
                         "t": ["b"]})
    assert (a.pairs, a.agreed, a.ratio) == (3, 2, 2 / 3)
    assert queue.agreement({}).ratio is None


def test_pair_from_json_checks_and_names_fields():
    p = pair_from_json({"prompt": "x", "response_a": "1", "response_b": "2", "reward_a": 1,
                        "policy_step": 7, "priority": -0.5, "source": "run"}, 0)
    assert p.id == pair_id_of("x", "1", "2", "run", 7) and p.reward_a == 1.0
    named = {"id": "k", "prompt": "x", "response_a": "1", "response_b": "2"}
    assert pair_from_json(named).id == "k"
    bad = [({"prompt": "x", "response_a": "1"}, "pairs[3].response_b"),
           ({"prompt": "x", "response_a": "1", "response_b": "1"}, "identical"),
           ({"prompt": "x", "response_a": "1", "response_b": "2", "policy_step": 1.5},
            "pairs[3].policy_step"),
           ({"prompt": "x", "response_a": "1", "response_b": "2", "reward_a": float("nan")},
            "pairs[3].reward_a"),
           ({"prompt": "x", "response_a": "1", "response_b": "2", "id": "k" * 200}, "id"),
           ("text", "expected an object")]
    for obj, named in bad:
        with pytest.raises(InvalidArgument, match=named.replace("[", r"\[").replace("]", r"\]")):
            pair_from_json(obj, 3)


def test_labeler_and_choice_checks():
    assert check_labeler("ann.b-2@x") == "ann.b-2@x"
    for name in ("", "a b", "x" * 65, None, "<script>"):
        with pytest.raises(InvalidArgument):
            check_labeler(name)
    with pytest.raises(InvalidArgument, match="left, right, tie, skip"):
        check_choice("A")
