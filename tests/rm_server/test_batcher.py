"""The batcher without sockets (rm_server/batcher.py: the queue, one model thread, deadlines,
fairness through the batch policy): a fake model records every batch. The policy alone:
test_batch_policy.py."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from rm_server.batch_policy import BatchPolicy, Pending, Scored
from rm_server.batcher import Batcher
from rm_server.errors import DeadlineExceeded, Overloaded
from rm_server.metrics import Metrics
from rm_server.sinks import UnarySink
from tests.rm_server.test_batch_policy import Sink, flood, item


class FakeModel:
    """Reward = sum of ids / 1000; records batches; optionally slow or failing."""

    def __init__(self, delay=0.0, fail_on=None):
        self.batches, self.delay, self.fail_on = [], delay, fail_on
        self.threads = set()

    def __call__(self, batch):
        seqs = [p.ids for p in batch]
        self.threads.add(threading.current_thread().name)
        self.batches.append([len(s) for s in seqs])
        if self.delay:
            time.sleep(self.delay)
        if self.fail_on is not None and any(len(s) == self.fail_on for s in seqs):
            raise RuntimeError("model fault")
        return [Scored(sum(s) / 1000) for s in seqs]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_lone_calls_skip_the_wait_and_bursts_still_batch():
    """One caller at a time: after a few calls the batcher stops waiting max_wait for company.
    A burst right after still goes out in full batches."""
    async def main():
        model = FakeModel(delay=0.0)
        b = Batcher(model, BatchPolicy(8, 4096, 0.05), max_queue=1000)
        b.start()
        waits = []
        for r in range(8):  # sequential calls, 60 ms apart (> max_wait 50 ms)
            sink = UnarySink(1)
            t = time.monotonic()
            b.submit([Pending(f"a{r}", [1], sink, t)])
            await sink.future
            waits.append(time.monotonic() - t)
            await asyncio.sleep(0.06)
        sinks = []
        for r in range(64):  # then a burst of 64 calls, 1 ms apart
            sinks.append(UnarySink(1))
            b.submit([Pending(f"b{r}", [2, 2], sinks[-1], time.monotonic())])
            await asyncio.sleep(0.001)
        await asyncio.gather(*(s.future for s in sinks))
        await b.stop()
        return waits, model.batches

    waits, batches = run(main())
    assert min(waits[:1]) >= 0.045  # no history yet: the first call waits max_wait
    assert max(waits[3:]) < 0.03  # the gaps are known to exceed max_wait: no waiting
    burst = [bt for bt in batches if bt[0] == 2]
    assert sum(map(len, burst)) == 64 and len(burst) <= 24  # batched, not one by one


def test_every_sample_answered_once_with_its_score():
    async def main():
        model = FakeModel(delay=0.002)
        metrics = Metrics()
        b = Batcher(model, BatchPolicy(8, 4096, 0.002), max_queue=1000, metrics=metrics)
        b.start()
        sinks = []
        for r in range(20):
            sink = UnarySink(5)
            b.submit([Pending(f"r{r}-{j}", [r + 1] * (j + 1), sink, time.monotonic())
                      for j in range(5)])
            sinks.append(sink)
        results = await asyncio.gather(*(s.future for s in sinks))
        await b.stop()
        return model, results, metrics

    model, results, metrics = run(main())
    seen = [(p.sample_id, r.reward) for res in results for p, r in res]
    assert len(seen) == 100 and len({s for s, _ in seen}) == 100
    for sid, r in seen:
        rr, j = sid[1:].split("-")
        assert r == pytest.approx((int(rr) + 1) * (int(j) + 1) / 1000)
    assert all(len(x) <= 8 for x in model.batches)
    assert sum(map(len, model.batches)) == 100
    assert model.threads == {"rm-model_0"}  # one model thread, off the event loop
    assert metrics.samples._value.get() == 100


def test_event_loop_stays_responsive_during_a_long_batch():
    async def main():
        b = Batcher(FakeModel(delay=0.3), BatchPolicy(8, 4096, 0.0))
        b.start()
        sink = UnarySink(1)
        b.submit([Pending("x", [1], sink, time.monotonic())])
        ticks = 0
        t0 = time.monotonic()
        while not sink.future.done():
            await asyncio.sleep(0.01)
            ticks += 1
        await b.stop()
        return ticks, time.monotonic() - t0

    ticks, elapsed = run(main())
    assert elapsed >= 0.25 and ticks >= 10  # the loop ticked while the model thread worked


def test_queue_bound_refuses_at_once():
    async def main():
        metrics = Metrics()
        b = Batcher(FakeModel(), BatchPolicy(8, 4096, 10.0), max_queue=10, metrics=metrics)
        b.submit([item(i, 3) for i in range(8)])
        with pytest.raises(Overloaded) as exc:
            b.submit([item(i, 3) for i in range(8, 11)])  # all-or-nothing
        assert len(b.pending) == 8
        assert dict(exc.value.trailing)["retry-after-ms"]
        return metrics.rejected.labels("queue_full")._value.get()

    assert run(main()) == 3


def test_cancelled_and_expired_samples_never_reach_the_model():
    async def main():
        model = FakeModel(delay=0.2)
        metrics = Metrics()
        b = Batcher(model, BatchPolicy(1, 4096, 0.0), max_queue=100, metrics=metrics)
        b.start()
        first = Sink()
        b.submit([Pending("first", [1] * 5, first, time.monotonic())])
        await asyncio.sleep(0.05)  # the model is busy with "first"
        gone, late = Sink(), Sink()
        b.submit([Pending("gone", [2] * 7, gone, time.monotonic())])
        b.submit([Pending("late", [3] * 9, late, time.monotonic(), time.monotonic() + 0.01)])
        assert b.cancel(gone) == 1
        await asyncio.sleep(0.4)
        await b.stop()
        return model, late, metrics

    model, late, metrics = run(main())
    assert model.batches == [[5]]  # neither the cancelled nor the expired sample ran
    assert isinstance(late.errors[0][0], DeadlineExceeded) and late.errors[0][1] == ["late"]
    assert metrics.rejected.labels("cancelled")._value.get() == 1
    assert metrics.rejected.labels("deadline")._value.get() == 1


def test_model_fault_fails_only_that_batch():
    async def main():
        b = Batcher(FakeModel(fail_on=13), BatchPolicy(1, 4096, 0.0))
        b.start()
        bad, good = UnarySink(1), UnarySink(1)
        b.submit([Pending("bad", [1] * 13, bad, time.monotonic())])
        b.submit([Pending("good", [1] * 4, good, time.monotonic())])
        with pytest.raises(RuntimeError, match="model fault"):
            await bad.future
        res = await good.future
        await b.stop()
        return res

    assert run(main())[0][1].reward == pytest.approx(0.004)


def test_next_batch_forms_while_one_runs():
    """With the model busy, a full batch is formed at once and runs right after."""
    async def main():
        model = FakeModel(delay=0.1)
        b = Batcher(model, BatchPolicy(4, 4096, 0.0))
        b.start()
        s = UnarySink(1)
        b.submit([Pending("a", [1], s, time.monotonic())])
        await asyncio.sleep(0.02)
        rest = UnarySink(4)
        b.submit([Pending(f"b{i}", [1, 1], rest, time.monotonic()) for i in range(4)])
        await asyncio.sleep(0.02)
        formed = len(b._in_flight)  # the running batch + the full one waiting for the thread
        await rest.future
        await b.stop()
        return formed, model.batches

    formed, batches = run(main())
    assert formed == 2 and batches == [[1], [2, 2, 2, 2]]


def test_next_batch_takes_its_samples_when_the_model_frees_up():
    """Late binding: a batch due while the model is busy is chosen from the queue as it is when
    the model frees up, so samples that arrived meanwhile can make a tighter length group."""
    async def main():
        model = FakeModel(delay=0.15)
        b = Batcher(model, BatchPolicy(4, 4096, 0.0))
        b.start()
        sink = UnarySink(7)
        b.submit([Pending("first", [1], UnarySink(1), time.monotonic())])
        await asyncio.sleep(0.03)  # the model is busy with "first"
        t = time.monotonic()
        b.submit([Pending("a", [1] * 5, sink, t)]
                 + [Pending(f"long{i}", [1] * 20, sink, t + 0.001) for i in range(3)])
        await asyncio.sleep(0.03)  # a full batch is queued: the next batch is due
        b.submit([Pending(f"short{i}", [1] * 5, sink, time.monotonic()) for i in range(3)])
        await sink.future
        await b.stop()
        return model.batches

    batches = run(main())
    # early binding would have run [5, 20, 20, 20] then [5, 5, 5]: 45 more padded tokens
    assert batches == [[1], [5, 5, 5, 5], [20, 20, 20]]


def test_next_batch_starts_before_the_finished_calls_resume():
    """The hand-off: once a batch's forward returns, the next batch goes to the model thread
    before the finished batch's callers resume (their responses are built while it runs)."""
    events = []

    async def main():
        b = Batcher(FakeModel(delay=0.05), BatchPolicy(2, 4096, 0.0))
        submit = b._executor.submit
        b._executor.submit = lambda fn, *a: (events.append(("forward", len(a[0]))),
                                             submit(fn, *a))[1]
        b.start()
        first, second = UnarySink(2), UnarySink(2)

        async def caller(name, sink):
            await sink.future
            events.append(("resumed", name))

        b.submit([Pending(f"a{i}", [1], first, time.monotonic()) for i in range(2)])
        waiting = [asyncio.ensure_future(caller("first", first))]
        await asyncio.sleep(0.01)
        b.submit([Pending(f"b{i}", [1, 1], second, time.monotonic()) for i in range(2)])
        waiting.append(asyncio.ensure_future(caller("second", second)))
        await asyncio.gather(*waiting)
        await b.stop()

    run(main())
    assert events == [("forward", 2), ("forward", 2), ("resumed", "first"), ("resumed", "second")]


# -- fairness --------------------------------------------------------------------------------
def test_flooding_client_does_not_starve_another():
    async def main():
        model = FakeModel(delay=0.005)
        b = Batcher(model, BatchPolicy(8, 10**6, 0.0), max_queue=10_000)
        b.start()
        flood = UnarySink(400)
        b.submit([Pending(f"a{i}", [1] * 5, flood, time.monotonic(), client="A")
                  for i in range(400)])
        await asyncio.sleep(0.02)
        light = UnarySink(40)
        b.submit([Pending(f"b{i}", [2] * 5, light, time.monotonic(), client="B")
                  for i in range(40)])
        await light.future
        a_done = len(flood.results)
        await flood.future
        await b.stop()
        return a_done

    a_done = run(main())
    # B's 40 samples finished while A had done only about as many, not all 400 first.
    assert a_done <= 120


def test_flood_of_fresh_client_ids_does_not_starve_another_peer():
    """Through the batcher (anchors rotate by key): the light peer's 32 samples are all
    served within a few batches of 32, not trickled out behind 200 invented ids."""
    async def main():
        model = FakeModel(delay=0.002)
        b = Batcher(model, BatchPolicy(32, 10**6, 0.0), max_queue=10_000)
        b.start()
        heavy, calm = flood()
        now = time.monotonic()
        for group in (heavy, calm):
            for p in group:
                p.enqueued = now + p.enqueued * 1e-6
        calls = [UnarySink(2) for _ in range(200)]
        for r, sink in enumerate(calls):
            for p in heavy[2 * r:2 * r + 2]:
                p.sink = sink
            b.submit(heavy[2 * r:2 * r + 2])
        light = UnarySink(32)
        for p in calm:
            p.sink = light
        b.submit(calm)
        await light.future
        done = len(model.batches)
        await asyncio.gather(*(s.future for s in calls))
        await b.stop()
        return done

    assert run(main()) <= 5  # 8 slots a batch (see above): 4 batches


def test_sample_that_cannot_finish_before_its_deadline_is_not_computed():
    """After three measured batches of its shape (a quorum: see ModelTimeEstimate), a sample
    whose deadline is closer than their model time is refused with DEADLINE_EXCEEDED instead
    of computed."""
    async def main():
        model = FakeModel(delay=0.1)
        b = Batcher(model, BatchPolicy(1, 4096, 0.0))
        b.start()
        for i in range(3):
            first = UnarySink(1)
            b.submit([Pending(f"warm{i}", [1] * 10, first, time.monotonic())])
            await first.future  # each ~0.1 s: the model needs at least that for 1 x 10
        tight, roomy = Sink(), UnarySink(1)
        now = time.monotonic()
        b.submit([Pending("tight", [1] * 10, tight, now, deadline=now + 0.03)])
        b.submit([Pending("roomy", [1] * 10, roomy, now, deadline=now + 5.0)])
        await roomy.future
        await b.stop()
        return model, tight

    model, tight = run(main())
    assert model.batches == [[10]] * 4  # "tight" never reached the model
    assert isinstance(tight.errors[0][0], DeadlineExceeded)


class FixedCostModel:
    """Model time a + b * padded tokens, as real models (a fixed cost per call dominates small
    batches); records the batches it ran."""

    def __init__(self, per_call=0.05, per_token=1e-5):
        self.per_call, self.per_token, self.batches = per_call, per_token, []

    def __call__(self, batch):
        seqs = [p.ids for p in batch]
        self.batches.append([len(s) for s in seqs])
        time.sleep(self.per_call + self.per_token * len(seqs) * max(map(len, seqs)))
        return [Scored(0.0)] * len(seqs)


def test_short_requests_do_not_make_full_batches_look_too_slow():
    """The livelock of a per-token rate: after 2-token requests (50 ms each, nearly all fixed
    cost), a rate of 25 ms per token put 16 x 60 tokens at 24 s and refused every full batch
    with a deadline, for ever (a refused batch never corrects the rate). It runs in ~60 ms:
    with a 0.5 s deadline every round must be answered."""
    async def main():
        model = FixedCostModel()
        b = Batcher(model, BatchPolicy(16, 4096, 0.0))
        b.start()
        for i in range(3):  # a smoke test, or another tenant's short samples
            short = UnarySink(1)
            b.submit([Pending(f"short{i}", [1, 2], short, time.monotonic())])
            await short.future
        errors = []
        for r in range(4):
            full, now = UnarySink(16), time.monotonic()
            b.submit([Pending(f"r{r}-{i}", [3] * 60, full, now, deadline=now + 0.5)
                      for i in range(16)])
            try:
                await full.future
            except DeadlineExceeded as e:
                errors.append(e)
        await b.stop()
        return model.batches, errors

    batches, errors = run(main())
    assert not errors
    assert batches == [[2]] * 3 + [[60] * 16] * 4


def test_a_failed_unary_call_drops_its_other_samples():
    """Once a unary call has failed (here its first batch hit a model fault), its other
    samples are answered to nobody: they are dropped before the model; other calls go on."""
    async def main():
        model = FakeModel(delay=0.05, fail_on=13)
        metrics = Metrics()
        b = Batcher(model, BatchPolicy(1, 4096, 0.0), metrics=metrics)
        b.start()
        call, other = UnarySink(4), UnarySink(1)
        t = time.monotonic()
        b.submit([Pending(f"c{n}", [1] * n, call, t + i * 1e-6)
                  for i, n in enumerate([13, 4, 5, 6])])
        b.submit([Pending("other", [1] * 7, other, t + 1e-3)])
        with pytest.raises(RuntimeError, match="model fault"):
            await call.future
        await other.future
        await b.stop()
        return model.batches, metrics.rejected.labels("cancelled")._value.get()

    batches, cancelled = run(main())
    assert batches == [[13], [7]] and cancelled == 3  # c4, c5, c6 never ran


def test_streams_fill_only_half_the_queue_leaving_room_for_unary_calls():
    async def main():
        b = Batcher(FakeModel(), BatchPolicy(8, 4096, 10.0), max_queue=20)  # model never runs
        stream = Sink()
        await b.submit_when_room([item(i, 3, sink=stream) for i in range(10)], timeout=1.0)
        waiter = asyncio.ensure_future(
            b.submit_when_room([item(i, 3, sink=stream) for i in range(10, 12)], timeout=0.2))
        await asyncio.sleep(0.05)
        b.submit([item(i, 3) for i in range(100, 110)])  # a unary request still fits
        with pytest.raises(Overloaded):
            await waiter  # the stream waited for room below its half, then was refused
        return len(b.pending)

    assert run(main()) == 20
