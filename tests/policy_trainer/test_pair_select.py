"""The live loop's pure parts (issue 20): which prompts get a second response, which candidate
pairs go to labelers (the RM's least sure first: small margin; an ensemble's disagreement), and
the refresh's held-out split, replay draw and promotion rule."""

from __future__ import annotations

import math

import pytest

from policy_trainer import pair_select as ps
from policy_trainer.refresh import decide, heldout, replay_sample, split_heldout


def cand(ra, rb, a="x", b="y", ha=(), hb=()) -> ps.Candidate:
    return ps.Candidate("p", a, b, ra, rb, tuple(ha), tuple(hb))


def test_chosen_rows_is_a_deterministic_fraction():
    rows = ps.chosen_rows(64, 0.125, seed=0, step=3)
    assert len(rows) == 8 and rows == sorted(set(rows)) and all(0 <= r < 64 for r in rows)
    assert rows == ps.chosen_rows(64, 0.125, seed=0, step=3)
    assert rows != ps.chosen_rows(64, 0.125, seed=0, step=4)  # another draw per step
    assert rows != ps.chosen_rows(64, 0.125, seed=1, step=3)
    assert ps.chosen_rows(64, 0.0, 0, 0) == [] and ps.chosen_rows(0, 0.5, 0, 0) == []
    assert len(ps.chosen_rows(8, 0.01, 0, 0)) == 1  # at least one when asked for any
    assert ps.chosen_rows(4, 1.0, 0, 0) == [0, 1, 2, 3]


def test_select_keeps_the_smallest_margins_within_the_budget():
    cs = [cand(1.0, 0.0, "a1"), cand(0.5, 0.45, "a2"), cand(-2.0, 2.0, "a3"),
          cand(0.3, 0.2, "a4")]
    chosen = ps.select(cs, budget=2)
    assert [c.response_a for c in chosen] == ["a2", "a4"]
    assert ps.priority(chosen[0]) == pytest.approx(-0.05)
    assert ps.select(cs, budget=0) == [] and len(ps.select(cs, budget=10)) == 4


def test_select_drops_what_cannot_be_compared():
    cs = [cand(0.0, 0.0, "same", "same"), cand(0.1, 0.2, " ", "y"),
          cand(math.nan, 0.2, "a", "b"), cand(0.0, 5.0, "ok", "fine")]
    assert [c.response_a for c in ps.select(cs, 5)] == ["ok"]


def test_an_ensemble_ranks_by_the_members_disagreement_on_the_order():
    agree = cand(0.0, 0.01, "agree", ha=(1.0, 1.0, 1.0), hb=(0.9, 0.9, 0.9))  # margin ~0
    split = cand(2.0, 0.0, "split", ha=(3.0, 1.0, 2.0), hb=(0.0, 2.0, -2.0))  # margin 2
    assert ps.disagreement(agree) == pytest.approx(0.0)
    assert ps.disagreement(split) == pytest.approx(math.sqrt(((3 - 2) ** 2 + (-1 - 2) ** 2
                                                              + (4 - 2) ** 2) / 3))
    assert [c.response_a for c in ps.select([agree, split], 1)] == ["split"]
    assert ps.disagreement(cand(0, 1)) is None  # one head: the margin decides


def test_pair_json_carries_both_rewards_the_version_and_the_step():
    c = cand(0.25, 0.5, "left one", "right one")
    j = ps.to_pair_json(c, step=7, rm_version="abc", source="run1")
    assert j == {"prompt": "p", "response_a": "left one", "response_b": "right one",
                 "reward_a": 0.25, "reward_b": 0.5, "rm_version": "abc", "policy_step": 7,
                 "priority": -0.25, "source": "run1"}
    from feedback.pairs import pair_from_json
    assert pair_from_json(j).policy_step == 7  # the service accepts it as it is


def test_heldout_split_is_by_pair_and_only_fresh_ones_evaluate():
    records = [{"pair_id": f"p{i}", "seq": i} for i in range(1, 401)]
    records += [{"pair_id": "p1", "seq": 401}]  # p1 labeled twice: same side both times
    train, evaluation = split_heldout(records, 0.25, seed=0)
    assert 60 < len(evaluation) < 140 and len(train) + len(evaluation) == 401
    sides = {r["pair_id"]: heldout(r["pair_id"], 0.25, 0) for r in records}
    assert all(not sides[r["pair_id"]] for r in train)
    assert all(sides[r["pair_id"]] for r in evaluation)
    _, fresh = split_heldout(records, 0.25, seed=0, eval_after=300)
    assert fresh and all(r["seq"] > 300 for r in fresh)
    assert split_heldout(records, 0.25, seed=1)[1] != evaluation  # the seed moves the split


def test_replay_sample():
    lines = [str(i) for i in range(10)]
    assert replay_sample(lines, 20, 0) == lines
    got = replay_sample(lines, 4, 0)
    assert len(set(got)) == 4 and got == replay_sample(lines, 4, 0)


def test_decide_promotes_only_when_at_least_as_good_or_forced():
    cur, better = {"accuracy": 0.6, "pairs": 10}, {"accuracy": 0.7, "pairs": 10}
    assert decide(cur, better, False)[0]
    assert decide(cur, dict(cur), False)[0]  # as good: promoted
    ok, why = decide(better, cur, False)
    assert not ok and "0.600 < current 0.700" in why
    assert decide(better, cur, True) == (True, "forced")
    assert decide(None, None, False) == (False, "no held-out judgments to evaluate on")
