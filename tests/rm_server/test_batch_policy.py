"""The batching policy, pure (rm_server/batch_policy.py): when a batch closes, which samples it
takes (length grouping under the size and token budgets), and the fair share of its slots among
callers. The batcher that runs it over a queue and a model thread: test_batcher.py."""

from __future__ import annotations

from rm_server.batch_policy import BatchPolicy, Pending


class Sink:
    """A call's results, recorded."""

    def __init__(self):
        self.cancelled = False
        self.results, self.errors = [], []

    def deliver(self, results):
        self.results.extend(results)

    def fail(self, exc, items):
        self.errors.append((exc, [p.sample_id for p in items]))


def item(i, length, t=0.0, sink=None, deadline=None):
    """Sample ``s{i}`` of ``length`` tokens, queued at ``t``; its first token is its own, so
    no two samples share a prefix (test_prefix_plan.py has those)."""
    return Pending(f"s{i}", [1000 + i] + [7] * (length - 1), sink or Sink(), t, deadline)


def test_closes_on_size_tokens_or_wait():
    p = BatchPolicy(max_batch_size=4, max_batch_tokens=100, max_wait=0.01)
    assert not p.ready([], 0, 0)
    assert not p.ready([item(0, 5)], now=0.005, batches_in_flight=0)  # young, not full
    assert p.ready([item(0, 5)], now=0.02, batches_in_flight=0)  # oldest waited max_wait
    assert p.ready([item(i, 5) for i in range(4)], now=0, batches_in_flight=0)  # size
    assert p.ready([item(0, 60), item(1, 50)], now=0, batches_in_flight=0)  # 2 x 60 >= 100
    # While the model runs a batch, only a full one is formed; a partial waits.
    assert not p.ready([item(0, 5)], now=1.0, batches_in_flight=1)
    assert p.ready([item(i, 5) for i in range(4)], now=0, batches_in_flight=1)
    assert not p.ready([item(i, 5) for i in range(4)], now=0, batches_in_flight=2)


def test_no_wait_when_calls_arrive_further_apart_than_max_wait():
    p = BatchPolicy(max_batch_size=4, max_batch_tokens=100, max_wait=0.01)
    young = [item(0, 5)]
    assert not p.ready(young, now=0.001, batches_in_flight=0, mean_gap=0.005)  # company likely
    assert p.ready(young, now=0.001, batches_in_flight=0, mean_gap=0.05)  # none expected: go
    assert not p.ready(young, now=0.001, batches_in_flight=1, mean_gap=0.05)  # model busy


def test_select_respects_budgets_and_groups_by_length():
    p = BatchPolicy(max_batch_size=3, max_batch_tokens=10_000, max_wait=0)
    pending = [item(0, 50, t=0)] + [item(i, n, t=i) for i, n in
                                    enumerate([3, 49, 100, 51, 4, 48], start=1)]
    batch = p.select(pending)
    assert pending[0] in batch  # the oldest is always taken
    assert max(b.length for b in batch) - min(b.length for b in batch) <= 2  # nearest lengths
    tight = BatchPolicy(max_batch_size=64, max_batch_tokens=120, max_wait=0)
    batch = tight.select([item(i, n, t=i) for i, n in enumerate([40, 10, 41, 42, 90])])
    assert max(b.length for b in batch) * len(batch) <= 120
    assert batch[0].length >= 40 or len(batch) >= 2


def test_select_over_budget_sample_runs_alone():
    p = BatchPolicy(max_batch_size=8, max_batch_tokens=64, max_wait=0)
    batch = p.select([item(0, 500, t=0), item(1, 5, t=1)])
    assert [b.sample_id for b in batch] == ["s0"]


def test_padding_is_lower_than_fifo():
    """Length grouping vs FIFO on a bimodal mix: far less padding."""
    lengths = [8, 120] * 32
    p = BatchPolicy(max_batch_size=8, max_batch_tokens=10**6, max_wait=0)
    pending = [item(i, n, t=i) for i, n in enumerate(lengths)]
    padded = real = 0
    while pending:
        b = p.select(pending)
        pending = [x for x in pending if x not in b]
        padded += max(x.length for x in b) * len(b)
        real += sum(x.length for x in b)
    fifo = sum(max(lengths[i:i + 8]) * 8 for i in range(0, 64, 8))
    assert 1 - real / padded < 0.05 < 1 - real / fifo


def test_fair_share_of_batch_slots():
    """A client with 10x more queued work gets no more than its share while another waits."""
    p = BatchPolicy(max_batch_size=8, max_batch_tokens=10**6, max_wait=0)
    heavy = [Pending(f"a{i}", [1] * 10, Sink(), i, client="A") for i in range(40)]
    light = [Pending(f"b{i}", [1] * 10, Sink(), 100 + i, client="B") for i in range(4)]
    batch = p.select(heavy + light)
    assert sum(x.client == "B" for x in batch) == 4 and len(batch) == 8
    # Work-conserving: when B has only one sample, A fills the rest of the batch.
    batch = p.select(heavy + light[:1])
    assert len(batch) == 8 and sum(x.client == "B" for x in batch) == 1


def flood(heavy_requests=200, per_request=2, light=32):
    """A heavy peer putting a fresh x-client-id on every request, then a light peer's call."""
    heavy = [Pending(f"h{r}-{i}", [1] * 10, Sink(), r + i / 10, client=f"fresh-{r}",
                     peer="ipv4:10.0.0.1") for r in range(heavy_requests)
             for i in range(per_request)]
    calm = [Pending(f"l{i}", [2] * 10, Sink(), 10_000 + i, client="trainer",
                    peer="ipv4:10.0.0.2") for i in range(light)]
    return heavy, calm


def test_fresh_client_ids_do_not_multiply_a_peers_share():
    """Keyed on x-client-id alone, 200 invented ids took 200 of 201 shares and the light
    client none of this batch. A peer holds at most max_ids_per_peer ids (the rest share one
    key): 10 keys here, and the light client gets its max-min share."""
    p = BatchPolicy(max_batch_size=32, max_batch_tokens=10**6, max_wait=0, max_ids_per_peer=8)
    heavy, calm = flood()
    keys = p.fair_keys(heavy + calm)
    assert len(set(keys.values())) == 8 + 1 + 1
    batch = p.select(heavy + calm)  # anchored on the heavy peer's oldest sample
    light = sum(x.client == "trainer" for x in batch)
    # the 8 ids held take their 2 samples each; the folded ids and the light client split 16
    assert len(batch) == 32 and light == 8


def test_quotas_are_max_min_fair_and_sum_to_the_batch():
    p = BatchPolicy(max_batch_size=32)
    q = p.quotas({"a": 2, "b": 100, "c": 3, "d": 100}, first="d")
    assert q == {"a": 2, "c": 3, "d": 14, "b": 13}  # the odd slot goes to the anchor's key
    q = p.quotas({k: 5 for k in range(40)}, first=7)  # more keys than slots
    assert sum(q.values()) == 32 and q[7] == 1
    assert p.quotas({"a": 1}, first="a") == {"a": 1}


def test_a_model_that_shares_nothing_is_charged_padded():
    """Prefix-aware cost only for a version whose model runs a shared prefix once
    (``Version.shares_prefix``; an encoder RM does not): its k responses to one prompt are
    charged at full length and cut by the budget as before."""

    class Version:
        def __init__(self, shares):
            self.shares_prefix = shares

    prompt = [11] * 40
    p = BatchPolicy(max_batch_size=16, max_batch_tokens=100, max_wait=0)
    for shares, cost, taken in ((True, 40 + 4 * 10, 4), (False, 4 * 50, 2)):
        v = Version(shares)
        group = [Pending(f"s{j}", prompt + [20 + j] * 10, Sink(), j, version=v)
                 for j in range(4)]
        assert p.batch_cost(group) == cost
        assert len(p.select(group)) == taken
        assert p.shared_tokens(group) == (3 * 40 if shares else 0)
