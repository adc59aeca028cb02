"""Prefix-aware batching, pure (rm_server/prefix_plan.py and BatchPolicy over it): which samples
share a prefix, what a batch of them costs, that a group stays in one batch and is charged its
prefix once, and that a queue where nothing is shared is batched exactly as the padded policy
did (a verbatim copy of it below is the reference). The model's side: test_model.py."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from rm_server import prefix_plan as plan
from rm_server.batch_policy import BatchPolicy, Pending
from tests.rm_server.test_batch_policy import Sink


# -- the plan ---------------------------------------------------------------------------------
def naive_lcp(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.parametrize("seed", range(20))
def test_common_length_equals_the_obvious_loop(seed):
    rng = random.Random(seed)
    a = [rng.randrange(3) for _ in range(rng.randint(0, 300))]
    b = a[:rng.randint(0, len(a))] + [rng.randrange(3) for _ in range(rng.randint(0, 50))]
    limit = rng.randint(0, 400)
    assert plan.common_length(a, b, limit) == min(naive_lcp(a, b), limit)


def test_groups_and_their_cost():
    p = list(range(10, 40))  # 30 shared tokens
    seqs = [p + [50, 51], p + [52], p[:20] + [99] * 12, [1, 2, 3], p + [53, 54, 55]]
    groups, rest = plan.group_by_prefix(seqs, 16)
    assert groups == [(20, [0, 1, 2, 4])] and rest == [3]
    # the prefix once, the 4 suffixes padded to the longest (33 - 20); the single alone
    assert plan.batch_cost(seqs, 16) == 20 + 4 * (33 - 20) + 3
    assert plan.shared_tokens(seqs, 16) == 3 * 20
    # every member keeps its last token after the prefix; a group below min_prefix is none
    assert plan.group_by_prefix([p, p + [1]], 16) == ([(29, [0, 1])], [])
    assert plan.group_by_prefix([p[:17], p[:17]], 16) == ([(16, [0, 1])], [])
    assert plan.group_by_prefix([p[:16] + [1], p[:16]], 16) == ([], [0, 1])
    # nothing shared: the padded cost
    assert plan.batch_cost([[1] * 40, [2] * 10], 16) == plan.padded_cost([40, 10]) == 80


# -- the policy over it -----------------------------------------------------------------------
def prompt_group(tag, k, prompt, response, t=0.0, client="", version=None):
    """k samples answering one prompt of ``prompt`` tokens with ``response``-token replies."""
    head = [tag] * prompt
    return [Pending(f"{tag}-{j}", head + [10_000 + j] * response, Sink(), t + j / 1000,
                    client=client, version=version) for j in range(k)]


def test_a_group_is_charged_its_prefix_once_and_kept_whole():
    """The issue's load: 8 samples of 256 + 64 tokens cost 2560 padded, 768 shared. The padded
    policy cut them 3, 3, 2 under the CPU's budget of 1024; shared, they run as one batch."""
    group = prompt_group(1, 8, 256, 64)
    shared = BatchPolicy(max_batch_size=16, max_batch_tokens=1024, max_wait=0)
    padded = BatchPolicy(max_batch_size=16, max_batch_tokens=1024, max_wait=0,
                         prefix_sharing=False)
    assert shared.batch_cost(group) == 256 + 8 * 64 and padded.batch_cost(group) == 8 * 320
    assert shared.select(group) == group
    assert len(padded.select(group)) == 3
    assert not shared.is_full(group) and padded.is_full(group)


def test_groups_never_split_when_they_fit():
    """Four groups of 4 (512 each) meet in a queue with singles: each batch holds whole groups."""
    rng = random.Random(0)
    queue = [p for g in range(4) for p in prompt_group(g + 1, 4, 256, 64, t=g, client=f"c{g}")]
    queue += [Pending(f"x{i}", [500 + i] * rng.randint(20, 300), Sink(), 10 + i, client="x")
              for i in range(6)]
    policy = BatchPolicy(max_batch_size=16, max_batch_tokens=1024, max_wait=0)
    while queue:
        batch = policy.select(queue)
        assert policy.batch_cost(batch) <= 1024 or len(batch) == 1
        for g in range(1, 5):
            members = sum(p.sample_id.startswith(f"{g}-") for p in batch)
            assert members in (0, 4)  # all of a group or none of it
        queue = [p for p in queue if p not in batch]


def test_a_group_over_the_budget_is_cut_oldest_first():
    group = prompt_group(1, 8, 256, 64)
    policy = BatchPolicy(max_batch_size=16, max_batch_tokens=600, max_wait=0)
    batch = policy.select(group[::-1], anchor=group[0])
    assert batch == group[:5]  # 256 + 5 * 64 = 576 <= 600 < 640
    small = BatchPolicy(max_batch_size=3, max_batch_tokens=10**6, max_wait=0)
    assert small.select(group) == group[:3]


def test_versions_never_mix_and_fairness_holds():
    a, b = object(), object()
    queue = (prompt_group(1, 4, 100, 20, client="A", version=a)
             + prompt_group(1, 4, 100, 20, t=1, client="B", version=b))
    policy = BatchPolicy(max_batch_size=16, max_batch_tokens=10**6, max_wait=0)
    batch = policy.select(queue)  # same tokens, different versions: two batches
    assert {p.version for p in batch} == {a} and len(batch) == 4
    # a caller with many single samples gets no more than its share while a group waits
    heavy = [Pending(f"h{i}", [700 + i] * 30, Sink(), i, client="H") for i in range(40)]
    group = prompt_group(2, 4, 25, 5, t=100, client="G")
    batch = BatchPolicy(max_batch_size=8, max_batch_tokens=10**6, max_wait=0).select(
        heavy + group)
    assert Counter(p.client for p in batch) == {"H": 4, "G": 4}


class OldPolicy(BatchPolicy):
    """The padded policy's select, verbatim (before prefix-aware batching)."""

    def select(self, pending, anchor=None, keys=None):
        keys = self.fair_keys(pending) if keys is None else keys
        anchor = anchor or min(pending, key=lambda p: p.enqueued)
        pending = [p for p in pending if p.version is anchor.version]
        order = sorted(pending, key=lambda p: (p.length, p.enqueued))
        demand = Counter(keys[id(p)] for p in pending)  # in queue order
        quota = self.quotas(demand, keys[id(anchor)])
        taken = self._old_walk(order, order.index(anchor), keys, quota)
        if len(demand) > 1 and len(taken) < self.max_batch_size:
            chosen = set(map(id, taken))
            if len(chosen) < len(pending):  # second pass without quotas, around the longest
                longest = max(taken, key=lambda p: p.length)
                taken = self._old_walk(order, order.index(longest), keys, None, must=taken)
        return taken

    def _old_walk(self, order, start, keys, quota, must=None):
        taken = list(must) if must else [order[start]]
        per_key = Counter(keys[id(p)] for p in taken)
        longest = max(p.length for p in taken)
        chosen = set(map(id, taken))
        lo, hi = start - 1, start + 1
        while len(taken) < self.max_batch_size:
            while lo >= 0 and id(order[lo]) in chosen:
                lo -= 1
            while hi < len(order) and id(order[hi]) in chosen:
                hi += 1
            n = len(taken)
            options = []  # (added padding, new cost, side)
            if lo >= 0:
                options.append((max(0, longest - order[lo].length),
                                (n + 1) * max(longest, order[lo].length), -1))
            if hi < len(order):
                nxt = order[hi].length
                options.append((max(0, nxt - longest) * n, (n + 1) * max(longest, nxt), 1))
            options = [o for o in options if o[1] <= self.max_batch_tokens]
            if not options:
                break
            _, _, side = min(options)
            i = lo if side < 0 else hi
            if side < 0:
                lo -= 1
            else:
                hi += 1
            p = order[i]
            key = keys[id(p)]
            if quota is not None and per_key[key] >= quota[key]:
                continue  # this key has its share: skip, keep walking
            per_key[key] += 1
            taken.append(p)
            chosen.add(id(p))
            longest = max(longest, p.length)
        return taken


@pytest.mark.parametrize("seed", range(60))
def test_sharing_nothing_forms_the_padded_policys_batches(seed):
    """Property: on random queues where no two samples share 16 leading tokens (mixed lengths,
    clients, peers, versions, ties in length and time), the prefix-aware policy forms exactly
    the batches the padded one did, batch after batch until the queue is empty."""
    rng = random.Random(seed)
    versions = [None, object()][: rng.randint(1, 2)]
    size, tokens = rng.choice([(4, 200), (8, 1024), (16, 1024), (32, 8192), (5, 64)])
    kw = dict(max_batch_size=size, max_batch_tokens=tokens, max_wait=0,
              max_ids_per_peer=rng.randint(1, 4))
    queue = [Pending(f"s{i}", [i] + [rng.randrange(5)] * (rng.randint(1, 400) - 1), Sink(),
                     rng.choice([0.0, float(i)]), client=f"c{rng.randrange(6)}",
                     peer=f"p{rng.randrange(3)}", version=rng.choice(versions))
             for i in range(rng.randint(1, 80))]
    new, old = BatchPolicy(**kw), OldPolicy(**kw)
    assert not plan.group_by_prefix([p.ids for p in queue], new.min_shared_prefix)[0]
    left = list(queue)
    while left:
        anchor = rng.choice(left)
        got, want = new.select(left, anchor), old.select(left, anchor)
        assert [p.sample_id for p in got] == [p.sample_id for p in want]
        assert new.is_full(left) == (len(left) >= size or old.cost(
            [p.length for p in left]) >= tokens)
        left = [p for p in left if p not in got]


# -- through the batcher: one batch, the metric, the model-time shape, the old budget ----------
def test_batcher_runs_a_group_as_one_batch_and_counts_shared_tokens():
    """Two requests answering one prompt meet in the queue: one batch under the CPU budget
    (the padded budget cut them into 3 + 3 + 2), rm_shared_prefix_tokens_total counts the
    prompt's (k - 1) x p tokens, and the model-time estimate sees the batch's shared cost."""
    import asyncio

    from rm_server.batcher import Batcher
    from rm_server.metrics import Metrics
    from tests.rm_server.test_batcher import FakeModel

    def serve(policy):
        async def main():
            model, metrics = FakeModel(), Metrics()
            b = Batcher(model, policy, metrics=metrics)
            b.start()
            group = prompt_group(1, 8, 256, 64)
            b.submit(group[:4])
            b.submit(group[4:])
            await b.drain(5)
            await b.stop()
            return model.batches, metrics.shared_prefix_tokens._value.get(), b.model_time
        return asyncio.run(main())

    batches, shared, estimate = serve(BatchPolicy(16, 1024, 0.05))
    assert batches == [[320] * 8] and shared == 7 * 256
    (rows, length, _, _), = estimate._ran
    assert (rows, length) == ((256 + 8 * 64) / 320, 320)
    batches, shared, _ = serve(BatchPolicy(16, 1024, 0.05, prefix_sharing=False))
    assert sorted(map(len, batches)) == [2, 3, 3] and shared == 0


def test_old_budget_is_an_environment_switch(monkeypatch):
    from rm_server.config import ServeConfig, batch_policy

    cfg = ServeConfig(model="m")
    assert batch_policy(cfg, "cpu").prefix_sharing
    monkeypatch.setenv("RM_SERVER_BUDGET", "padded")  # bench.prefix_served's baseline
    assert not batch_policy(cfg, "cpu").prefix_sharing
    monkeypatch.delenv("RM_SERVER_BUDGET")
    cfg.prefix_sharing = False
    assert not batch_policy(cfg, "cpu").prefix_sharing
