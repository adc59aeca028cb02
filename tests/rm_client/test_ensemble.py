"""rm_client/ensemble.py: an ensemble's aggregations and disagreement from the members' scores
each result carries (pure Python; the live loop's comparison selection uses them)."""

from __future__ import annotations

import math

import pytest

from rm_client import ScoreResult
from rm_client.ensemble import aggregate, disagreement, member_mean_std, most_disputed


def result(i: int, heads) -> ScoreResult:
    return ScoreResult(str(i), 0.0, 3, False, tuple(heads))


def test_mean_min_and_uwo_over_the_members():
    heads = (1.0, 2.0, 4.0)
    mean, std = member_mean_std(heads)
    assert mean == pytest.approx(7 / 3) and std == pytest.approx(math.sqrt(14 / 9))  # 1/K
    assert aggregate(heads, "mean") == pytest.approx(7 / 3)
    assert aggregate(heads, "min") == 1.0
    assert aggregate(heads, "uwo", 2.0) == pytest.approx(7 / 3 - 2 * math.sqrt(14 / 9))
    assert aggregate(heads, "uwo", 0.0) == pytest.approx(aggregate(heads, "mean"))
    assert member_mean_std((0.5,)) == (0.5, 0.0)


def test_no_members_or_an_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="ensemble"):
        aggregate((), "mean")
    with pytest.raises(ValueError, match="ensemble"):
        aggregate((), "min")
    with pytest.raises(ValueError, match="unknown aggregation 'max'"):
        aggregate((1.0, 2.0), "max")


def test_disagreement_ranks_the_results_the_members_dispute_most():
    results = [result(0, (1, 1, 1)), result(1, (0, 2, 4)), result(2, (1, 2, 1))]
    spread = disagreement(results)
    assert spread[0] == 0 and spread[1] > spread[2] > 0
    assert [r.id for r in most_disputed(results, 2)] == ["1", "2"]
