"""The RewardService servicer: protobuf <-> domain objects, and nothing else.

Requests arrive as raw bytes (the handlers are registered without a deserializer) so that
undecodable bytes become INVALID_ARGUMENT here instead of grpc's UNKNOWN. Validation errors
raise :class:`InvalidArgument` naming the sample id and field; the interceptor maps errors to
status codes. Scoring and batching live in the batcher and the model.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from google.protobuf.message import DecodeError

from protos import reward_pb2 as pb
from rm_server.batcher import Batcher, Pending
from protos.encoding import ChatInput, InputError, TextInput, TokenInput
from rm_server.errors import InvalidArgument, NotReady

MAX_ID_BYTES = 256
SERVICE_NAME = "rlhf.reward.v1.RewardService"


class UnarySink:
    """Collects a unary call's results; the future resolves when every sample is answered
    (in the order batches finished: :meth:`RewardServicer.Score` restores request order)."""

    def __init__(self, n: int):
        self.cancelled = False
        self.results: list[tuple[Pending, float]] = []
        self.n = n
        self.future: asyncio.Future = asyncio.get_running_loop().create_future()

    def deliver(self, results):
        self.results.extend(results)
        if len(self.results) == self.n and not self.future.done():
            self.future.set_result(self.results)

    def fail(self, exc, items):
        if not self.future.done():
            self.future.set_exception(exc)


class StreamSink:
    """Queues a stream's results as batches finish; tracks ids not answered yet."""

    END = object()

    def __init__(self):
        self.cancelled = False
        self.queue: asyncio.Queue = asyncio.Queue()
        self.outstanding: set[str] = set()
        self.input_closed = False

    def deliver(self, results):
        for p, _ in results:
            self.outstanding.discard(p.sample_id)
        self.queue.put_nowait(results)
        self._maybe_end()

    def fail(self, exc, items):
        self.queue.put_nowait(exc)

    def close_input(self):
        self.input_closed = True
        self._maybe_end()

    def _maybe_end(self):
        if self.input_closed and not self.outstanding:
            self.queue.put_nowait(self.END)


def parse(raw: bytes, message_cls):
    try:
        return message_cls.FromString(raw)
    except DecodeError as e:
        raise InvalidArgument(f"request: cannot decode {message_cls.__name__}: {e}") from None


def to_domain(sample: pb.Sample):
    """The sample's input as an encoding input object, or InvalidArgument naming the field."""
    kind = sample.WhichOneof("input")
    if kind == "text":
        return TextInput(sample.text.prompt, sample.text.response)
    if kind == "conversation":
        return ChatInput(tuple((m.role, m.content) for m in sample.conversation.messages))
    if kind == "tokens":
        return TokenInput(tuple(sample.tokens.ids), sample.tokens.prompt_length)
    raise InvalidArgument.for_sample(sample.id, "input", "no input set (one of text, "
                                     "conversation, tokens)")


def _encode_tokens(encoder, tokens: pb.TokenIds):
    """Fast path for token ids: the range check in C (min/max) instead of a Python loop per id.

    Returns None when the ids need the full check (empty, out of range, bad prompt_length),
    so that the encoder raises its usual error naming the field.
    """
    ids = list(tokens.ids)
    plen = tokens.prompt_length
    if not ids or min(ids) < 0 or max(ids) >= encoder.vocab_size or not 0 <= plen <= len(ids):
        return None
    return encoder.truncate(ids, plen, "tokens.ids")


def _invalid(sid: str, e: InputError | InvalidArgument) -> InvalidArgument:
    """The error a client sees for sample ``sid``: InvalidArgument naming its id and field."""
    return e if isinstance(e, InvalidArgument) else InvalidArgument.for_sample(sid, e.field,
                                                                               e.message)


def _encode_all(encoder, inputs) -> list[tuple[int, object]]:
    """Tokenize (position, id, input) triples in order (on the tokenizer thread); the first
    that fails raises InvalidArgument naming its id and field."""
    out = []
    for pos, sid, item in inputs:
        try:
            out.append((pos, encoder.encode(item)))
        except InputError as e:
            raise _invalid(sid, e) from None
    return out


def caller_peer(context) -> str:
    """Who the caller is, for fair scheduling: the fairness key is (this, x-client-id), with a
    bounded number of ids per peer (:meth:`BatchPolicy.fair_keys`).

    The certificate identity when the client authenticated with one (mTLS): verified, and the
    same from any address. Otherwise the caller's host address without its port
    (``ipv4:10.0.0.7``). Not the connection (address with port): a channel is free to open,
    so a caller opening one per request (on purpose, or a script that builds a channel per
    call) would take one share per request again. The cost: callers behind one address (the
    trainers of one host, or everyone behind a NAT or proxy) share that address's
    ``max_ids_per_peer`` ids, told apart by their x-client-id up to that bound; give each its
    own client certificate to tell more apart.
    """
    identities = getattr(context, "peer_identities", lambda: None)()
    if identities:
        return "id:" + b",".join(identities).decode(errors="replace")
    peer = getattr(context, "peer", lambda: "")() or ""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]  # drop the port; the host may hold colons (IPv6)
    return peer  # unix sockets and others: one peer per name


def result_message(results) -> pb.ScoreResponse:
    return pb.ScoreResponse(results=[
        pb.ScoreResult(id=p.sample_id, reward=r, num_tokens=p.length, truncated=p.truncated)
        for p, r in results])


class RewardServicer:
    """Score / ScoreStream / GetModelInfo over a model (set once loaded) and a batcher."""

    def __init__(self, batcher: Batcher | None, max_samples_per_request: int = 1024,
                 metrics=None, stream_admission_timeout: float = 10.0):
        self.model = None  # set by the server once loaded and warmed up
        self.batcher = batcher
        self.max_samples = max_samples_per_request
        self.stream_admission_timeout = stream_admission_timeout
        self.metrics = metrics
        self.info: pb.ModelInfo | None = None
        # text and conversations are tokenized here, off the event loop; one thread, as a
        # tokenizer's truncation/padding state is not safe to share between threads
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="rm-tokenize")

    def close(self) -> None:
        """Stop the tokenizer thread (after the servers stopped: no call is left to use it)."""
        self._tokenizer_thread.shutdown(wait=True)

    def _require_model(self):
        if self.model is None:
            raise NotReady("model is not loaded yet (or the server is draining)")
        return self.model

    async def prepare(self, request: pb.ScoreRequest, sink, context,
                      taken: set[str]) -> list[Pending]:
        """Validate and encode every sample of a request (InvalidArgument names id and field).

        Token ids are checked on the event loop (a C-speed range check); text and
        conversations go to the tokenizer thread, so that a large text request does not stall
        every other call (health included). The error reported is the first sample's in
        request order, as if the samples were checked one by one.
        """
        model = self._require_model()
        if not request.samples:
            raise InvalidArgument("samples: empty request (1..N samples expected)")
        if len(request.samples) > min(self.max_samples, self.batcher.max_queue):
            raise InvalidArgument(f"samples: {len(request.samples)} samples exceeds "
                                  f"max_samples_per_request {self.max_samples} (or max_queue)")
        now = time.monotonic()
        remaining = context.time_remaining()
        deadline = now + remaining if remaining is not None else None
        client = dict(context.invocation_metadata() or ()).get("x-client-id", "")
        peer = caller_peer(context)
        encoder = model.encoder
        encoded: list = []  # Encoded, or None until the tokenizer thread fills it
        to_tokenize: list[tuple[int, str, object]] = []  # (position, id, domain input)
        ids, seen, error = [], set(), None
        for s in request.samples:
            sid = s.id
            try:
                if not sid:
                    raise InvalidArgument("samples.id: empty sample id")
                if len(sid) * 4 > MAX_ID_BYTES and len(sid.encode()) > MAX_ID_BYTES:
                    raise InvalidArgument(f"samples.id: id longer than {MAX_ID_BYTES} bytes")
                if sid in seen or sid in taken:
                    raise InvalidArgument.for_sample(sid, "id", "duplicate id (ids must be "
                                                     "unique among the samples not answered yet)")
                seen.add(sid)
                enc = None
                if s.HasField("tokens"):
                    enc = _encode_tokens(encoder, s.tokens) or encoder.encode(to_domain(s))
                else:
                    to_tokenize.append((len(encoded), sid, to_domain(s)))
            except (InputError, InvalidArgument) as e:
                error = _invalid(sid, e)
                break  # samples before this one may still fail first, in the tokenizer thread
            ids.append(sid)
            encoded.append(enc)
        if to_tokenize:
            loop = asyncio.get_running_loop()
            for pos, enc in await loop.run_in_executor(self._tokenizer_thread, _encode_all,
                                                       encoder, to_tokenize):
                encoded[pos] = enc
        if error is not None:
            raise error
        items = [Pending(sid, enc.ids, sink, now, deadline, client, enc.truncated, peer)
                 for sid, enc in zip(ids, encoded)]
        if self.metrics:
            self.metrics.truncated.inc(sum(p.truncated for p in items))
        return items

    async def Score(self, raw: bytes, context) -> pb.ScoreResponse:
        """All of the request's results, in request order (as TEI and vLLM answer, and as a
        raw stub or grpcurl user reads them), whatever order their batches ran in."""
        request = parse(raw, pb.ScoreRequest)
        sink = UnarySink(len(request.samples))
        items = await self.prepare(request, sink, context, set())
        self.batcher.submit(items)  # full queue: refuse
        try:
            results = await sink.future
        except asyncio.CancelledError:  # client cancelled or deadline: drop queued samples
            self.batcher.cancel(sink)
            raise
        position = {id(p): i for i, p in enumerate(items)}
        return result_message(sorted(results, key=lambda r: position[id(r[0])]))

    async def ScoreStream(self, raw_iterator, context):
        sink = StreamSink()
        reader = asyncio.ensure_future(self._read_stream(raw_iterator, sink, context))
        try:
            while True:
                item = await sink.queue.get()
                if item is StreamSink.END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield result_message(item)
        finally:
            reader.cancel()
            if self.batcher is not None:  # None while the model loads
                self.batcher.cancel(sink)

    async def _read_stream(self, raw_iterator, sink: StreamSink, context) -> None:
        try:
            async for raw in raw_iterator:
                request = parse(raw, pb.ScoreRequest)
                items = await self.prepare(request, sink, context, sink.outstanding)
                sink.outstanding.update(p.sample_id for p in items)
                try:  # a full queue pushes back on the stream before refusing it
                    await self.batcher.submit_when_room(items, self.stream_admission_timeout)
                except Exception:
                    sink.outstanding.difference_update(p.sample_id for p in items)
                    raise
            sink.close_input()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # surfaces on the response side, which maps it to a status
            sink.queue.put_nowait(e)

    async def GetModelInfo(self, raw: bytes, context) -> pb.ModelInfo:
        parse(raw, pb.GetModelInfoRequest)
        self._require_model()
        return self.info


def model_info(model, max_samples: int, server_version: str) -> pb.ModelInfo:
    tok = model.tokenizer
    stats = model.reward_stats
    return pb.ModelInfo(
        name=model.name, version=model.version, architecture=model.architecture,
        max_length=model.max_length, tokenizer_fingerprint=model.tokenizer_fingerprint,
        has_reward_stats=stats is not None,
        reward_mean=stats["mean"] if stats else 0.0, reward_std=stats["std"] if stats else 0.0,
        model_type=model.config.model_type, vocab_size=model.vocab_size, dtype=model.dtype,
        device=str(model.device), truncation=model.encoder.truncation,
        has_chat_template=model.encoder.has_chat_template,
        bos_token_id=_id(tok.bos_token_id), eos_token_id=_id(tok.eos_token_id),
        pad_token_id=_id(model.pad_token_id), max_samples_per_request=max_samples,
        scoring_path=model.scoring_path, num_parameters=model.num_parameters,
        server_version=server_version)


def _id(x) -> int:
    return -1 if x is None else int(x)
