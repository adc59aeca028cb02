"""The feedback service's API end to end over loopback (a server on a thread, its clock moved
by the test): auth, enqueue (idempotent, capped), lease -> submit exactly once, expiry, stats,
metrics (checked by promtool), the page's headers, and the non-blocking sender."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from feedback.client import FeedbackClient
from feedback.errors import (
    AlreadyAnswered,
    InvalidArgument,
    LeaseExpired,
    NotFound,
    QueueFull,
    Unauthenticated,
    Unreachable,
)
from feedback.pairs import Pair
from feedback.sender import PairSender
from tests.feedback.servers import Clock, ThreadServer

TOKEN = "feedback-test-token"


def pairs(n, start=0, **kw):
    return [Pair(f"p{i}", f"prompt {i}", f"a {i}", f"b {i}", **kw) for i in range(start, start + n)]


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def server(tmp_path, clock):
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    s = ThreadServer(str(tmp_path / "f.db"), clock, auth_token_file=str(token), max_queue=5,
                     lease_seconds=60, double_label_fraction=0.0, seed=1)
    yield s
    s.stop()


@pytest.fixture
def client(server):
    return FeedbackClient(server.url, token=TOKEN)


def scrape(url) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def value(text, name) -> float:
    line = next(x for x in text.splitlines() if x.startswith(name + " ") or
                x.startswith(name + "{") and x.split(" ")[0] == name)
    return float(line.rsplit(" ", 1)[1])


def test_a_wrong_or_missing_token_is_refused_but_page_and_health_are_public(server):
    for token in (None, "wrong"):
        with pytest.raises(Unauthenticated):
            FeedbackClient(server.url, token=token).stats()
    basic = urllib.request.Request(server.url + "/v1/stats", headers={
        "Authorization": "Basic " + __import__("base64").b64encode(
            f"x:{TOKEN}".encode()).decode()})
    with urllib.request.urlopen(basic, timeout=10) as r:
        assert json.loads(r.read())["queue_depth"] == 0
    for path in ("/", "/healthz"):
        with urllib.request.urlopen(server.url + path, timeout=10) as r:
            assert r.status == 200


def test_enqueue_is_idempotent_and_capped(client):
    assert client.enqueue(pairs(3)).queued == ["p0", "p1", "p2"]
    again = client.enqueue(pairs(3) + pairs(1, start=3))
    assert again.queued == ["p3"] and again.duplicates == ["p0", "p1", "p2"]
    with pytest.raises(QueueFull, match="none were queued"):
        client.enqueue(pairs(2, start=4))  # 4 pending + 2 > --max-queue 5
    assert client.stats()["queue_depth"] == 4
    with pytest.raises(InvalidArgument, match=r"pairs\[0\]\.response_b"):
        client.enqueue([{"prompt": "x", "response_a": "y"}])


def test_lease_and_submit_exactly_once_then_expiry(client, clock):
    client.enqueue(pairs(2))
    (first,) = client.lease("ann")
    assert client.lease("ann") == [first]  # asked again: the same lease
    judgment, duplicate = client.submit(first.lease_id, "right")
    assert not duplicate
    assert judgment.winner == ("a" if first.right == f"a {first.pair_id[1:]}" else "b")
    assert client.submit(first.lease_id, "right") == (judgment, True)
    with pytest.raises(AlreadyAnswered):
        client.submit(first.lease_id, "left")
    with pytest.raises(NotFound):
        client.submit("nope", "left")
    (second,) = client.lease("ann", lease_seconds=5)
    clock.now += 6
    with pytest.raises(LeaseExpired):
        client.submit(second.lease_id, "left")
    (again,) = client.lease("bob")
    assert again.pair_id == second.pair_id and again.lease_id != second.lease_id
    stats = client.stats()
    assert stats["lease_expiries"] == 1 and stats["judgments"] == {"ann": 1}


def test_the_winner_is_the_response_the_labeler_saw_on_the_chosen_side(client):
    client.enqueue(pairs(5))
    texts = {}
    for lease in client.lease("ann", count=5):
        texts[lease.pair_id] = lease.left
        client.submit(lease.lease_id, "left")
    rows, last = client.judgments()
    assert last == 5 and len(rows) == 5
    for judgment, pair in rows:
        won = pair.response_a if judgment.winner == "a" else pair.response_b
        assert won == texts[pair.id]


def test_metrics_count_the_work_and_pass_promtool(server, client, clock):
    client.enqueue(pairs(3))
    with pytest.raises(QueueFull):
        client.enqueue(pairs(3, start=3))
    leases = client.lease("ann", count=2, lease_seconds=5)
    client.submit(leases[0].lease_id, "tie")
    clock.now += 10
    text = scrape(server.metrics_url)  # a scrape refreshes the store's gauges (and expiries)
    assert value(text, 'feedback_pairs_total{result="queued"}') == 3
    assert value(text, 'feedback_pairs_total{result="refused"}') == 3
    assert value(text, 'feedback_judgments_total{choice="tie",labeler="ann"}') == 1
    assert value(text, "feedback_lease_expiries_total") == 1
    assert value(text, "feedback_queue_depth") == 2
    assert value(text, "feedback_leases_open") == 0
    assert value(text, 'feedback_requests_total{code="RESOURCE_EXHAUSTED",'
                       'method="POST /v1/pairs"}') == 1
    if shutil.which("promtool"):
        done = subprocess.run(["promtool", "check", "metrics"], input=text, text=True,
                              capture_output=True)
        assert done.returncode == 0, done.stdout + done.stderr


def test_agreement_on_doubly_labeled_pairs(tmp_path, clock):
    s = ThreadServer(str(tmp_path / "d.db"), clock, double_label_fraction=1.0)
    try:
        c = FeedbackClient(s.url)
        c.enqueue(pairs(2))
        for who, picks in (("ann", {"p0": "a", "p1": "a"}), ("bob", {"p0": "a", "p1": "b"})):
            for lease in c.lease(who, count=2):
                wanted = f"{picks[lease.pair_id]} {lease.pair_id[1:]}"  # the text of a or b
                c.submit(lease.lease_id, "left" if lease.left == wanted else "right")
        assert c.stats()["agreement"] == {"pairs": 2, "agreed": 1, "ratio": 0.5}
        text = scrape(s.metrics_url)
        assert value(text, "feedback_agreement_ratio") == 0.5
        assert value(text, "feedback_agreement_pairs") == 2
    finally:
        s.stop()


def test_the_page_fetches_nothing_from_elsewhere(server):
    with urllib.request.urlopen(server.url + "/", timeout=10) as r:
        html, csp = r.read().decode(), r.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "unsafe-inline" not in csp  # the inline script and style are allowed by hash only
    for needle in ("http://", "https://", "src=", "href=", "@import", "url("):
        assert needle not in html


def test_the_sender_never_blocks_and_counts_every_pair(server, client):
    down = PairSender(FeedbackClient("http://127.0.0.1:9", timeout=0.5), max_buffer=4, batch=2)
    start = time.perf_counter()
    assert down.offer(pairs(6)) == 4  # two over the buffer: dropped at once
    assert time.perf_counter() - start < 0.05
    assert down.close(timeout=5) == {"sent": 0, "duplicates": 0, "refused": 0, "failed": 4,
                                     "dropped": 2}
    with pytest.raises(Unreachable):
        FeedbackClient("http://127.0.0.1:9", timeout=0.5).stats()
    up = PairSender(client, batch=3)
    up.offer(pairs(4))
    assert up.flush(10)
    up.offer(pairs(1))  # p0 again
    assert up.flush(10)
    up.offer(pairs(3, start=4))  # 4 pending + 3 > --max-queue 5: the batch is refused whole
    assert up.close(timeout=10) == {"sent": 4, "duplicates": 1, "refused": 3, "failed": 0,
                                    "dropped": 0}


def test_errors_are_json_with_a_code(server):
    req = urllib.request.Request(server.url + "/v1/leases", data=b"not json",
                                 headers={"Authorization": f"Bearer {TOKEN}"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 400
    assert json.loads(e.value.read())["error"]["code"] == "INVALID_ARGUMENT"
