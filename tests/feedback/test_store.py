"""The store contract, run on both backends (SQLite file; a real PostgreSQL server): idempotent
enqueue, the queue cap, lease order and exclusivity, expiry, exactly-once judgments, double
labeling and agreement, export order, and two writers on one database."""

from __future__ import annotations

import itertools
import random
import threading

import pytest

from feedback.errors import AlreadyAnswered, LeaseExpired, NotFound, QueueFull
from feedback.pairs import Pair
from feedback.store import open_store


def pairs(n, start=0, **kw):
    return [Pair(f"p{i}", f"prompt {i}", f"a {i}", f"b {i}", **kw) for i in range(start, start + n)]


class Labelers:
    """lease/submit with seeded sides and readable lease ids."""

    def __init__(self, store, seed=0):
        self.store, self.rng, self.ids = store, random.Random(seed), itertools.count()
        self.prefix = f"L{seed}-" if seed else "L"

    def lease(self, who, now, count=1, seconds=10.0):
        leases, _ = self.store.lease(who, count, seconds, now,
                                     lambda: "a" if self.rng.random() < 0.5 else "b",
                                     lambda: f"{self.prefix}{next(self.ids)}")
        return leases


@pytest.fixture
def store(store_url):
    s = open_store(store_url)
    yield s
    s.close()


def test_enqueue_is_idempotent_by_pair_id(store):
    first = store.enqueue(pairs(3) + pairs(1), 100, 0.0, 1.0)
    assert first.queued == ["p0", "p1", "p2"] and first.duplicates == ["p0"]
    again = store.enqueue(pairs(4), 100, 0.0, 2.0)
    assert again.queued == ["p3"] and again.duplicates == ["p0", "p1", "p2"]
    assert store.stats(3.0).queue_depth == 4


def test_a_full_queue_refuses_the_whole_call_and_duplicates_need_no_room(store, store_url):
    store.enqueue(pairs(3), 4, 0.0, 1.0)
    with pytest.raises(QueueFull, match="none were queued"):
        store.enqueue(pairs(2, start=3), 4, 0.0, 2.0)
    assert store.stats(2.0).queue_depth == 3
    assert store.enqueue(pairs(3), 3, 0.0, 2.0).duplicates == ["p0", "p1", "p2"]
    lab = Labelers(store)
    (lease,) = lab.lease("ann", 3.0)
    store.submit(lease.lease_id, "left", 3.5)  # a judged pair frees its place
    assert store.enqueue(pairs(1, start=3), 3, 0.0, 4.0).queued == ["p3"]


def test_leases_go_by_priority_then_order_one_labeler_per_pair(store):
    store.enqueue(pairs(2, priority=0.0) + pairs(2, start=2, priority=5.0), 100, 0.0, 1.0)
    lab = Labelers(store)
    assert [x.pair.id for x in lab.lease("ann", 2.0, count=3)] == ["p2", "p3", "p0"]
    assert [x.pair.id for x in lab.lease("bob", 2.0, count=3)] == ["p1"]
    assert lab.lease("cat", 2.0) == []
    again = lab.lease("ann", 2.5, count=1)  # its open lease back, not a new pair
    assert again[0].lease_id == "L0" and again[0].expires_at == 12.0


def test_an_expired_lease_returns_the_pair_and_a_late_answer_is_refused(store):
    store.enqueue(pairs(1), 100, 0.0, 1.0)
    lab = Labelers(store)
    (first,) = lab.lease("ann", 2.0, seconds=5.0)
    assert lab.lease("bob", 6.9) == []  # still held
    (second,) = lab.lease("bob", 7.0)  # expired at 7.0: back in the queue
    assert second.pair.id == "p0" and second.lease_id != first.lease_id
    with pytest.raises(LeaseExpired):
        store.submit(first.lease_id, "left", 7.5)
    store.submit(second.lease_id, "right", 8.0)
    stats = store.stats(9.0)
    assert (stats.queue_depth, stats.done, stats.lease_expiries, stats.judgments) == (
        0, 1, 1, {"bob": 1})


def test_a_judgment_is_recorded_exactly_once(store):
    store.enqueue(pairs(1), 100, 0.0, 1.0)
    (lease,) = Labelers(store).lease("ann", 2.0)
    first = store.submit(lease.lease_id, "tie", 3.0)
    again = store.submit(lease.lease_id, "tie", 4.0)
    assert not first.duplicate and again.duplicate and again.judgment == first.judgment
    with pytest.raises(AlreadyAnswered):
        store.submit(lease.lease_id, "left", 4.0)
    with pytest.raises(NotFound):
        store.submit("no-such-lease", "left", 4.0)
    assert [x.judgment for x in store.labeled()] == [first.judgment]


def test_the_winner_maps_the_shown_side_back_onto_the_pair(store):
    store.enqueue(pairs(40), 100, 0.0, 1.0)
    leases = Labelers(store, seed=3).lease("ann", 2.0, count=40)
    sides = {x.left for x in leases}
    assert sides == {"a", "b"}  # randomised
    for lease in leases:
        assert lease.left_text == (lease.pair.response_a if lease.left == "a"
                                   else lease.pair.response_b)
        store.submit(lease.lease_id, "left", 3.0)
    for row in store.labeled():
        assert row.judgment.winner == row.judgment.left  # "left" wins: the side shown there
        assert row.judgment.choice == "left"


def test_double_labels_come_from_two_labelers_and_give_agreement(store):
    store.enqueue(pairs(3), 100, 1.0, 1.0)  # every pair wants two labels
    lab = Labelers(store)
    ann = lab.lease("ann", 2.0, count=5)
    assert len(ann) == 3 and lab.lease("ann", 2.0, count=5) == ann  # never twice to ann
    bob = lab.lease("bob", 2.0, count=5)
    assert {x.pair.id for x in bob} == {"p0", "p1", "p2"}
    assert lab.lease("cat", 2.0) == []  # both labels leased
    winners = {"p0": ("a", "a"), "p1": ("a", "b"), "p2": ("skip", "a")}
    for who in (ann, bob):
        for lease in who:
            w = winners[lease.pair.id][who is bob]
            choice = w if w == "skip" else ("left" if lease.left == w else "right")
            store.submit(lease.lease_id, choice, 3.0)
    stats = store.stats(4.0)
    assert stats.done == 3 and stats.queue_depth == 0
    assert (stats.agreement.pairs, stats.agreement.agreed) == (2, 1)  # p2 has one skip
    assert stats.judgments == {"ann": 3, "bob": 3}
    assert store.progress("ann") == (0, 3)


def test_labeled_pages_in_sequence_order(store):
    store.enqueue(pairs(5), 100, 0.0, 1.0)
    lab = Labelers(store)
    for lease in lab.lease("ann", 2.0, count=5):
        store.submit(lease.lease_id, "skip", 3.0)
    seqs = [x.judgment.seq for x in store.labeled()]
    assert seqs == sorted(seqs) and len(seqs) == 5
    assert [x.judgment.seq for x in store.labeled(after=seqs[1], limit=2)] == seqs[2:4]


def test_two_writers_on_one_database_never_share_a_lease(store_url):
    stores = [open_store(store_url) for _ in range(3)]
    stores[0].enqueue(pairs(30), 100, 0.0, 1.0)
    got: dict[str, list[str]] = {}
    errors = []

    def work(i):
        try:
            lab = Labelers(stores[i], seed=i + 1)
            while leases := lab.lease(f"w{i}", 2.0):
                got.setdefault(f"w{i}", []).append(leases[0].pair.id)
                stores[i].submit(leases[0].lease_id, "left", 3.0)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    labeled = sorted(p for ids in got.values() for p in ids)
    assert labeled == sorted(f"p{i}" for i in range(30))
    assert len([x for x in stores[0].labeled()]) == 30
    for s in stores:
        s.close()


def test_the_store_survives_reopening(store_url):
    with open_store(store_url) as s:
        s.enqueue(pairs(2), 100, 0.0, 1.0)
        (lease,) = Labelers(s).lease("ann", 2.0)
        s.submit(lease.lease_id, "right", 3.0)
    with open_store(store_url) as s:
        stats = s.stats(4.0)
        assert (stats.queue_depth, stats.done) == (1, 1)
        assert [x.judgment.choice for x in s.labeled()] == ["right"]
