"""Admission without gRPC or sockets: where tokenization runs, which error a request with several
bad samples gets, the request and id limits, and what a queue entry carries (caller, deadline)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from protos.encoding import ChatInput, Encoder, TextInput, TokenInput
from rm_server.admission import MAX_ID_BYTES, Admission, Caller
from rm_server.errors import InvalidArgument
from rm_server.metrics import Metrics
from rm_server.sinks import StreamSink


class RecordingEncoder(Encoder):
    """The real encoder, noting the thread each text or conversation is tokenized on."""

    def __init__(self, *a):
        super().__init__(*a)
        self.threads = []

    def encode(self, item):
        if not isinstance(item, TokenInput):
            self.threads.append(threading.current_thread().name)
        return super().encode(item)


LOCAL = Caller("t", "ipv4:127.0.0.1")


def admit(tokenizer, samples, caller=LOCAL, taken=(), max_queue=None, admission=None):
    """Run :meth:`Admission.admit` on ``samples`` ((id, input) pairs); (encoder, entries)."""
    async def main():
        adm = admission or Admission()
        encoder = RecordingEncoder(tokenizer, 64, len(tokenizer))
        try:
            return encoder, await adm.admit(samples, encoder, StreamSink(), caller, taken,
                                            max_queue)
        finally:
            adm.close()
    return asyncio.run(main())


def tokens(*ids, prompt_length=0):
    return TokenInput(tuple(ids), prompt_length)


def test_text_is_tokenized_off_the_event_loop(tokenizer):
    enc, items = admit(tokenizer, [("a", tokens(5, 6, 7)), ("b", TextInput("q", " good")),
                                   ("c", ChatInput((("user", "q"), ("assistant", "bad"))))])
    assert len(enc.threads) == 2 and all(t.startswith("rm-tokenize") for t in enc.threads)
    assert [p.sample_id for p in items] == ["a", "b", "c"]  # request order kept
    assert items[0].ids == [5, 6, 7]
    assert items[1].ids == enc.encode(TextInput("q", " good")).ids
    assert items[2].ids == enc.encode(ChatInput((("user", "q"), ("assistant", "bad")))).ids


@pytest.mark.parametrize("samples, first_bad", [
    # a bad text sample before a bad token sample: the text one is reported
    ([("t0", TextInput("", "")), ("k1", tokens(10**9))], "'t0': text"),
    # a bad token sample before a bad text sample: the token one
    ([("k0", tokens(10**9)), ("t1", TextInput("", ""))], "'k0': tokens.ids"),
    # good text, then a duplicate id
    ([("x", TextInput("q", " a")), ("x", TextInput("q", " b"))], "'x': id: duplicate"),
    # a sample that set no input, after a bad text sample: the text one
    ([("t0", TextInput("", "")), ("n1", None)], "'t0': text"),
    # a sample that set no input, before a bad text sample: it is named, with its field
    ([("n0", None), ("t1", TextInput("", ""))], "'n0': input: no input set"),
    # token ids that fail the fast check get the encoder's message naming the field
    ([("p0", tokens(5, 6, prompt_length=3))], "'p0': tokens.prompt_length"),
])
def test_first_bad_sample_in_request_order_is_reported(tokenizer, samples, first_bad):
    with pytest.raises(InvalidArgument, match=first_bad):
        admit(tokenizer, samples)


def test_request_and_id_limits(tokenizer):
    with pytest.raises(InvalidArgument, match="empty request"):
        admit(tokenizer, [])
    three = [(f"s{i}", tokens(5)) for i in range(3)]
    with pytest.raises(InvalidArgument, match="3 samples exceeds max_samples_per_request 2"):
        admit(tokenizer, three, admission=Admission(max_samples=2))
    with pytest.raises(InvalidArgument, match="exceeds .* \\(or max_queue\\)"):
        admit(tokenizer, three, max_queue=2)  # a request larger than the queue never fits
    with pytest.raises(InvalidArgument, match="empty sample id"):
        admit(tokenizer, [("", tokens(5))])
    with pytest.raises(InvalidArgument, match=f"longer than {MAX_ID_BYTES} bytes"):
        admit(tokenizer, [("é" * (MAX_ID_BYTES // 2 + 1), tokens(5))])  # bytes, not characters
    admit(tokenizer, [("é" * (MAX_ID_BYTES // 2), tokens(5))])
    with pytest.raises(InvalidArgument, match="'a': id: duplicate"):
        admit(tokenizer, [("a", tokens(5))], taken={"a"})  # a stream's id not answered yet


def test_entries_carry_the_caller_and_its_deadline(tokenizer):
    metrics = Metrics()
    adm = Admission(metrics=metrics, clock=lambda: 100.0)
    caller = Caller("trainer-1", "id:cert", time_remaining=2.5)
    long_ids = tokens(*range(5, 80))  # 75 tokens, over the encoder's 64
    _, items = admit(tokenizer, [("a", tokens(5, 6)), ("b", long_ids)], caller, admission=adm)
    assert [(p.client, p.peer, p.enqueued, p.deadline) for p in items] == \
        [("trainer-1", "id:cert", 100.0, 102.5)] * 2
    assert [p.truncated for p in items] == [False, True] and len(items[1].ids) == 64
    assert metrics.registry.get_sample_value("rm_truncated_samples_total") == 1
    _, items = admit(tokenizer, [("a", tokens(5))], Caller())
    assert items[0].deadline is None
