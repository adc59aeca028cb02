"""Admission: the checks a request passes before its samples join the queue (no gRPC here).

The servicer translates a request into ``(sample id, input)`` pairs and a :class:`Caller`;
:meth:`Admission.admit` turns them into queue entries (:class:`Pending`) or raises one
:class:`InvalidArgument` naming the sample id and field:

- the request: 1..N samples, N = ``max_samples_per_request`` (and at most the queue's size,
  or it could never be admitted);
- each id: non-empty, at most ``MAX_ID_BYTES`` bytes, unique among the request's samples and
  the call's samples not answered yet (a stream's ids route its results);
- each input: encoded by the model's encoder (``protos.encoding``), which checks token ids
  (and token type ids) against the vocabulary, applies the scoring recipe, the chat template
  and the truncation policy. Token types (an encoder's pair encoding) become the queue
  entry's ``token_type_ids``. The encoder is the model version's the samples are bound to
  (``version``; rm_server/versions.py).

Token ids are checked on the event loop (a C-speed range check); text, conversations and full
texts go to one tokenizer thread, so that a large text request does not stall every other call
(health included). The error reported is the first bad sample's in request order, as if the samples
were checked one by one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from protos.encoding import (
    ChatInput,
    Encoded,
    Encoder,
    FullTextInput,
    InputError,
    TextInput,
    TokenInput,
)
from rm_server.batch_policy import Pending, Sink
from rm_server.errors import InvalidArgument

MAX_ID_BYTES = 256

Input = TextInput | ChatInput | TokenInput | FullTextInput | None  # None: no input set
TOKENIZED = (TextInput, ChatInput, FullTextInput)  # encoded on the tokenizer thread


@dataclass(frozen=True)
class Caller:
    """Who sent a call, and for how long its results are wanted."""

    client: str = ""
    """The caller's self-declared ``x-client-id``."""
    peer: str = ""
    """Who the caller is for fair scheduling: a verified identity, else its host address."""
    time_remaining: float | None = None
    """Seconds until the call's deadline (None: no deadline)."""


class Admission:
    """Validates and encodes requests; owns the tokenizer thread."""

    def __init__(self, max_samples: int = 1024, metrics=None,
                 clock: Callable[[], float] = time.monotonic):
        self.max_samples = max_samples
        self.metrics = metrics
        self.clock = clock
        # One thread: a tokenizer's truncation/padding state is not safe to share between threads.
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="rm-tokenize")

    def close(self) -> None:
        """Stop the tokenizer thread (once no call is left to use it)."""
        self._tokenizer_thread.shutdown(wait=True)

    async def admit(self, samples: list[tuple[str, Input]], encoder: Encoder, sink: Sink,
                    caller: Caller, taken: Collection[str] = (),
                    max_queue: int | None = None, version: object = None,
                    pinned: bool = False) -> list[Pending]:
        """The request's queue entries, in request order; ``taken``: the call's ids in flight;
        ``version``: the model version ``encoder`` belongs to (``pinned``: named by the
        request)."""
        self._check_count(len(samples), max_queue)
        now = self.clock()
        deadline = now + caller.time_remaining if caller.time_remaining is not None else None
        checked, to_tokenize, error = _check_on_loop(samples, encoder, taken)
        if to_tokenize:
            loop = asyncio.get_running_loop()
            tokenized = await loop.run_in_executor(self._tokenizer_thread, _encode_all, encoder,
                                                   to_tokenize)
            for pos, enc in tokenized:
                checked[pos] = (checked[pos][0], enc)
        if error is not None:  # raised after the thread: an earlier text sample may fail first
            raise error
        items = [Pending(sid, enc.ids, sink, now, deadline, caller.client, enc.truncated,
                         caller.peer, enc.token_type_ids, version, pinned)
                 for sid, enc in checked]
        if self.metrics:
            self.metrics.truncated.inc(sum(p.truncated for p in items))
        return items

    def _check_count(self, n: int, max_queue: int | None) -> None:
        if not n:
            raise InvalidArgument("samples: empty request (1..N samples expected)")
        if n > min(self.max_samples, max_queue or self.max_samples):
            raise InvalidArgument(f"samples: {n} samples exceeds max_samples_per_request "
                                  f"{self.max_samples} (or max_queue)")


def _check_on_loop(samples: list[tuple[str, Input]], encoder: Encoder, taken: Collection[str]
                   ) -> tuple[list[tuple[str, Encoded | None]], list[tuple[int, str, Input]],
                              InvalidArgument | None]:
    """Check ids and encode token ids in request order, up to the first error.

    Returns the checked ``(id, Encoded)`` pairs (``None`` where the tokenizer thread will fill
    it in), the ``(position, id, input)`` triples for that thread, and the first error or None.
    """
    checked: list[tuple[str, Encoded | None]] = []
    to_tokenize: list[tuple[int, str, Input]] = []
    seen: set[str] = set()
    for sid, item in samples:
        try:
            _check_id(sid, seen, taken)
            seen.add(sid)
            enc = None
            if isinstance(item, TOKENIZED):
                to_tokenize.append((len(checked), sid, item))
            else:
                enc = _encode_tokens(encoder, item) or encoder.encode(item)
        except (InputError, InvalidArgument) as e:
            return checked, to_tokenize, _invalid(sid, e)
        checked.append((sid, enc))
    return checked, to_tokenize, None


def _check_id(sid: str, seen: set[str], taken: Collection[str]) -> None:
    if not sid:
        raise InvalidArgument("samples.id: empty sample id")
    if len(sid) * 4 > MAX_ID_BYTES and len(sid.encode()) > MAX_ID_BYTES:  # UTF-8: <= 4 B/char
        raise InvalidArgument(f"samples.id: id longer than {MAX_ID_BYTES} bytes")
    if sid in seen or sid in taken:
        raise InvalidArgument.for_sample(sid, "id", "duplicate id (ids must be unique among "
                                         "the samples not answered yet)")


def _encode_tokens(encoder: Encoder, item: Input) -> Encoded | None:
    """Fast path for token ids: the range check in C (min/max) instead of a Python loop per id.

    Returns None when the ids need the full check (empty, out of range, bad prompt_length,
    token type ids; or not token ids at all), so that the encoder raises its usual error
    naming the field.
    """
    if not isinstance(item, TokenInput) or item.token_type_ids:
        return None
    ids, plen = item.ids, item.prompt_length
    if not ids or min(ids) < 0 or max(ids) >= encoder.vocab_size or not 0 <= plen <= len(ids):
        return None
    return encoder.truncate(list(ids), plen, "tokens.ids")


def _encode_all(encoder: Encoder, inputs: list[tuple[int, str, Input]]
                ) -> list[tuple[int, Encoded]]:
    """Tokenize (position, id, input) triples in order (on the tokenizer thread); the first
    that fails raises InvalidArgument naming its id and field."""
    out = []
    for pos, sid, item in inputs:
        try:
            out.append((pos, encoder.encode(item)))
        except InputError as e:
            raise _invalid(sid, e) from None
    return out


def _invalid(sid: str, e: InputError | InvalidArgument) -> InvalidArgument:
    """The error a client sees for sample ``sid``: InvalidArgument naming its id and field."""
    if isinstance(e, InvalidArgument):
        return e
    return InvalidArgument.for_sample(sid, e.field, e.message)
