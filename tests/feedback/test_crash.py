"""SIGKILL the feedback server while writers stream to it, on both stores: every write it
acknowledged is in the store, nothing is half-written, and after a restart the writers' resends
(the same pair ids, the same lease answers) change nothing that was already there: each pair
once, each lease answered once. SIGTERM, however often, is a clean exit."""

from __future__ import annotations

import threading
import time

from feedback.client import FeedbackClient
from feedback.errors import FeedbackError
from feedback.pairs import Pair
from feedback.store import open_store
from tests.feedback.servers import ProcessServer
from tests.processes import sigterm_until_exit

WRITERS = 3
PER_WRITER = 400


def pair(w, i):
    return Pair(f"w{w}-{i}", f"prompt {w} {i}", f"a {i}", f"b {i}", reward_a=0.1 * i,
                policy_step=i, source=f"writer-{w}")


class Writer(threading.Thread):
    """enqueue one pair, lease one, answer it; again, until the server is gone. Records what
    was acknowledged and what was attempted."""

    def __init__(self, w, url):
        super().__init__(daemon=True)
        self.w, self.client = w, FeedbackClient(url, timeout=5)
        self.acked_pairs: list[str] = []
        self.acked_answers: dict[str, str] = {}  # lease id -> choice
        self.attempted_answers: dict[str, str] = {}

    def run(self):
        try:
            for i in range(PER_WRITER):
                self.client.enqueue([pair(self.w, i)])
                self.acked_pairs.append(pair(self.w, i).id)
                for lease in self.client.lease(f"labeler-{self.w}"):
                    choice = ("left", "right", "tie", "skip")[i % 4]
                    self.attempted_answers[lease.lease_id] = choice
                    self.client.submit(lease.lease_id, choice)
                    self.acked_answers[lease.lease_id] = choice
        except FeedbackError:
            pass  # the server was killed


def check_consistent(store, pairs_expected=None):
    stats = store.stats(time.time())
    rows = list(store.labeled())
    leases = [r.judgment.lease_id for r in rows]
    assert len(leases) == len(set(leases))  # one judgment per lease
    assert stats.done == len(rows)  # judgment and the pair's label count: one transaction
    if pairs_expected is not None:
        assert stats.queue_depth + stats.done == pairs_expected
    return {r.judgment.lease_id: r.judgment.choice for r in rows}, stats


def test_sigkill_loses_no_acknowledged_write_and_resends_duplicate_nothing(store_url, tmp_path):
    server = ProcessServer(store_url, tmp_path)
    writers = [Writer(w, server.url) for w in range(WRITERS)]
    for w in writers:
        w.start()
    deadline = time.monotonic() + 30
    while sum(len(w.acked_answers) for w in writers) < 60 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.kill()  # mid-stream: the writers have calls in flight
    for w in writers:
        w.join(10)
    acked = sum(len(w.acked_answers) for w in writers)
    assert 60 <= acked < WRITERS * PER_WRITER, "the kill did not land mid-stream"

    with open_store(store_url) as store:
        answers, _ = check_consistent(store)
        for w in writers:
            for lease_id, choice in w.acked_answers.items():
                assert answers[lease_id] == choice  # no acknowledged answer is lost

    # The writers start again from the top: the same pairs, the same answers.
    server = ProcessServer(store_url, tmp_path)
    try:
        client = FeedbackClient(server.url, timeout=10)
        for w in writers:
            sent = max(len(w.acked_pairs) + 1, 1)
            done = client.enqueue([pair(w.w, i) for i in range(sent)])
            assert set(w.acked_pairs) <= set(done.duplicates)  # no acknowledged pair is lost
            for lease_id, choice in w.attempted_answers.items():
                judgment, duplicate = client.submit(lease_id, choice)
                assert judgment.choice == choice
                assert duplicate or lease_id not in w.acked_answers
        with open_store(store_url) as store:
            answers, stats = check_consistent(
                store, sum(max(len(w.acked_pairs) + 1, 1) for w in writers))
            attempted = {k: v for w in writers for k, v in w.attempted_answers.items()}
            assert answers == attempted  # every answer once: none lost, none twice
    finally:
        assert server.stop() == 0, server.log()


def test_repeated_sigterms_end_in_a_clean_exit(tmp_path):
    """An impatient supervisor signals again and again, from the moment the server is up: each
    SIGTERM, during the shutdown or the interpreter's teardown after it, is one more request
    to stop, never a kill."""
    server = ProcessServer(str(tmp_path / "feedback.db"), tmp_path)
    assert sigterm_until_exit(server.proc, server.log) == 0, server.log()
