"""The servicer in-process (no sockets): requests translated into admission's domain inputs and
the caller read from the call's context, who a caller is for fair scheduling, and the order of a
unary call's results. Admission itself: test_admission.py."""

from __future__ import annotations

import asyncio
import time

import pytest

from protos import reward_pb2 as pb
from protos.encoding import ChatInput, Encoder, TextInput
from rm_server.batch_policy import BatchPolicy, Scored
from rm_server.batcher import Batcher
from rm_server.errors import InvalidArgument
from rm_server.service import RewardServicer, caller_peer
from rm_server.sinks import StreamSink


class Context:
    def __init__(self, client="t", peer="ipv4:127.0.0.1:50000", identities=None, remaining=None):
        self.client, self._peer, self.identities = client, peer, identities
        self.remaining = remaining

    def time_remaining(self):
        return self.remaining

    def invocation_metadata(self):
        return (("x-client-id", self.client),)

    def peer(self):
        return self._peer

    def peer_identities(self):
        return self.identities


class Model:
    def __init__(self, tokenizer):
        self.encoder = Encoder(tokenizer, 64, len(tokenizer))


def text(sid, prompt, response):
    return pb.Sample(id=sid, text=pb.TextPair(prompt=prompt, response=response))


def tokens(sid, ids):
    return pb.Sample(id=sid, tokens=pb.TokenIds(ids=ids))


def prepare(tokenizer, *samples, context=None):
    async def main():
        svc = RewardServicer(Batcher(lambda batch: [Scored(0.0)] * len(batch), BatchPolicy()))
        svc.model = Model(tokenizer)
        try:
            return svc.model.encoder, await svc.prepare(pb.ScoreRequest(samples=samples),
                                                        StreamSink(), context or Context(), set())
        finally:
            svc.close()
    return asyncio.run(main())


def test_each_input_form_is_translated_and_the_caller_read_from_the_call(tokenizer):
    chat = pb.Sample(id="c", conversation=pb.Conversation(messages=[
        pb.ChatMessage(role="user", content="q"), pb.ChatMessage(role="assistant", content="ok")]))
    t0 = time.monotonic()
    enc, items = prepare(tokenizer, tokens("a", [5, 6, 7]), text("b", "q", " good"), chat,
                         context=Context("trainer-3", "ipv4:10.0.0.9:41000", remaining=30.0))
    assert [p.sample_id for p in items] == ["a", "b", "c"]  # request order kept
    assert items[0].ids == [5, 6, 7]
    assert items[1].ids == enc.encode(TextInput("q", " good")).ids
    assert items[2].ids == enc.encode(ChatInput((("user", "q"), ("assistant", "ok")))).ids
    assert {(p.client, p.peer) for p in items} == {("trainer-3", "ipv4:10.0.0.9")}
    assert all(t0 + 30.0 <= p.deadline == p.enqueued + 30.0 <= time.monotonic() + 30.0
               for p in items)


@pytest.mark.parametrize("samples, first_bad", [
    # a bad text sample before a bad token sample: the text one is reported
    ([text("t0", "", ""), tokens("k1", [10**9])], "'t0': text"),
    # a bad token sample before a bad text sample: the token one
    ([tokens("k0", [10**9]), text("t1", "", "")], "'k0': tokens.ids"),
    # good text, then a duplicate id
    ([text("x", "q", " a"), text("x", "q", " b")], "'x': id: duplicate"),
    # a sample with no input set is named with its field, in its turn
    ([pb.Sample(id="n0"), text("t1", "", "")], "'n0': input: no input set"),
])
def test_first_bad_sample_in_request_order_is_reported(tokenizer, samples, first_bad):
    with pytest.raises(InvalidArgument, match=first_bad):
        prepare(tokenizer, *samples)


def test_caller_peer_is_the_verified_identity_or_the_host_without_port():
    assert caller_peer(Context(peer="ipv4:10.1.2.3:53412")) == "ipv4:10.1.2.3"
    assert caller_peer(Context(peer="ipv4:10.1.2.3:53999")) == "ipv4:10.1.2.3"  # any connection
    assert caller_peer(Context(peer="ipv6:[::1]:53412")) == "ipv6:[::1]"
    assert caller_peer(Context(peer="ipv6:%5B::1%5D:53412")) == "ipv6:%5B::1%5D"
    assert caller_peer(Context(peer="unix:/run/rm.sock")) == "unix:/run/rm.sock"
    assert caller_peer(Context(peer="ipv4:10.1.2.3:1", identities=[b"trainer-7"])) == \
        "id:trainer-7"  # mTLS: the certificate, from any address
    assert caller_peer(object()) == ""  # a context that knows nothing: one anonymous peer


class Recorder:
    """A fake model: records the batches (each sample's first id) it ran."""

    def __init__(self):
        self.batches = []

    def __call__(self, batch):
        self.batches.append([p.ids[0] for p in batch])
        time.sleep(0.002)
        return [Scored(float(p.length)) for p in batch]


def serve(tokenizer, calls, policy):
    """Run ``calls`` ((context, request) pairs) through ``Score`` concurrently; the responses
    and the batches the model ran."""
    async def main():
        model = Recorder()
        svc = RewardServicer(Batcher(model, policy, max_queue=10_000))
        svc.model = Model(tokenizer)
        svc.batcher.start()
        out = await asyncio.gather(*(svc.Score(req.SerializeToString(), ctx)
                                     for ctx, req in calls))
        await svc.batcher.stop()
        return out, model.batches
    return asyncio.run(main())


def test_a_fresh_client_id_per_request_does_not_starve_another_caller(tokenizer):
    """A heavy caller sends 200 requests, each on a new connection with a fresh x-client-id;
    a light caller on another host sends 32 samples after them. Keyed on x-client-id, the
    light call trickled out over many batches of 32 behind the 200 invented ids; keyed on
    the peer with bounded ids, it is done within a few."""
    calls = [(Context(f"fresh-{r}", f"ipv4:10.0.0.1:{40000 + r}"),
              pb.ScoreRequest(samples=[tokens(f"h{r}-{i}", [1] + [5] * 9) for i in range(2)]))
             for r in range(200)]
    calls.append((Context("trainer", "ipv4:10.0.0.2:5555"),
                  pb.ScoreRequest(samples=[tokens(f"l{i}", [2] + [5] * 9) for i in range(32)])))
    _, batches = serve(tokenizer, calls, BatchPolicy(32, 10**6, 0.0))
    light_done = max(i for i, b in enumerate(batches) if 2 in b) + 1
    assert sum(b.count(2) for b in batches) == 32 and light_done <= 5


def test_unary_results_come_back_in_request_order(tokenizer):
    """The length grouping runs long samples with long ones: the batch order differs from the
    request order, the response does not."""
    lengths = [40, 5, 41, 3, 40, 7, 2, 39]
    req = pb.ScoreRequest(samples=[tokens(f"s{i}", [i + 1] * n) for i, n in enumerate(lengths)])
    (resp,), batches = serve(tokenizer, [(Context(), req)], BatchPolicy(4, 10**6, 0.0))
    ran = [first_id for b in batches for first_id in b]
    assert ran != sorted(ran)  # the model saw them out of request order
    assert [r.id for r in resp.results] == [f"s{i}" for i in range(8)]
    assert [r.num_tokens for r in resp.results] == lengths
