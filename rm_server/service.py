"""The RewardService servicer: protobuf <-> domain objects, and nothing else.

Requests arrive as raw bytes (the handlers are registered without a deserializer) so that
undecodable bytes become INVALID_ARGUMENT here instead of grpc's UNKNOWN. Each RPC translates
its request into domain inputs (``protos.encoding``) and a :class:`Caller` read from the call's
metadata, hands them to :class:`Admission` (validation, rm_server/admission.py) and the
:class:`Batcher`, and translates the results back. Errors are raised, never caught here: the
interceptor maps them to status codes.

Model versions (rm_server/versions.py): a request's samples are encoded for and bound to the
version it pins (``ScoreRequest.version``) or the default; each result names the version that
scored it; ``GetModelInfo`` describes the default, or the version its request names, and lists
the resident ones.
"""

from __future__ import annotations

import asyncio

from google.protobuf.message import DecodeError

from protos import reward_pb2 as pb
from protos.encoding import ChatInput, FullTextInput, TextInput, TokenInput
from rm_server.admission import Admission, Caller, Input
from rm_server.batch_policy import Pending, Scored
from rm_server.batcher import Batcher
from rm_server.errors import InvalidArgument, NotReady, NotResident
from rm_server.heads import aggregate_one, head_stats
from rm_server.sinks import StreamSink, UnarySink


def parse(raw: bytes, message_cls):
    try:
        return message_cls.FromString(raw)
    except DecodeError as e:
        raise InvalidArgument(f"request: cannot decode {message_cls.__name__}: {e}") from None


def to_domain(sample: pb.Sample) -> Input:
    """The sample's input as an encoding input object; None when it set none (admission then
    refuses it, naming the field, in its turn among the request's samples)."""
    kind = sample.WhichOneof("input")
    if kind == "text":
        return TextInput(sample.text.prompt, sample.text.response)
    if kind == "conversation":
        return ChatInput(tuple((m.role, m.content) for m in sample.conversation.messages))
    if kind == "tokens":
        t = sample.tokens
        return TokenInput(tuple(t.ids), t.prompt_length, tuple(t.token_type_ids))
    if kind == "full_text":
        return FullTextInput(sample.full_text.text)
    return None


def caller_of(context) -> Caller:
    """The call's client id (``x-client-id``), peer and remaining time, from its context."""
    client = dict(context.invocation_metadata() or ()).get("x-client-id", "")
    return Caller(client, caller_peer(context), context.time_remaining())


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


def result_message(results: list[tuple[Pending, Scored]]) -> pb.ScoreResponse:
    """The results as protobuf: reward (the request's own aggregation of the heads when it
    asked for one), every head's score with their mean and std (multi-head models), the
    version."""
    out = []
    for p, r in results:
        tag, (mean, std) = r.version, head_stats(r.heads)
        how = p.aggregation
        reward = r.reward if how is None or not r.heads else aggregate_one(r.heads, how)
        out.append(pb.ScoreResult(id=p.sample_id, reward=reward, num_tokens=p.length,
                                  truncated=p.truncated, head_scores=r.heads,
                                  version=tag.hash if tag else "",
                                  version_label=tag.label if tag else "",
                                  head_mean=mean, head_std=std))
    return pb.ScoreResponse(results=out)


class RewardServicer:
    """Score / ScoreStream / GetModelInfo over a model (set once loaded) and a batcher."""

    def __init__(self, batcher: Batcher | None, max_samples_per_request: int = 1024,
                 metrics=None, stream_admission_timeout: float = 10.0):
        self.model = None  # the default version's model, set by the server once warm
        self.versions = None  # rm_server.versions.Versions, set by the server
        self.batcher = batcher
        self.admission = Admission(max_samples_per_request, metrics)
        self.stream_admission_timeout = stream_admission_timeout
        self.info: pb.ModelInfo | None = None

    def close(self) -> None:
        """Stop the tokenizer thread (after the servers stopped: no call is left to use it)."""
        self.admission.close()

    def _require_model(self):
        if self.model is None:
            raise NotReady("model is not loaded yet (or the server is draining)")
        return self.model

    def resolve(self, pin: str = ""):
        """The version a request pinning ``pin`` ("" for none) is bound to (None without a
        registry: one model, no versions)."""
        self._require_model()
        if self.versions is None:
            if pin:
                raise NotResident(f"version {pin!r}: this server holds one unversioned model")
            return None
        return self.versions.resolve(pin)

    async def admit(self, samples, sink, caller, taken, pin: str = "") -> list[Pending]:
        """``(id, input)`` pairs as queue entries bound to the version ``pin`` names (the
        default when empty), encoded by that version (:meth:`Admission.admit`)."""
        version = self.resolve(pin)
        model = version.model if version is not None else self.model
        return await self.admission.admit(samples, model.encoder, sink, caller, taken,
                                          self.batcher.max_queue, version, bool(pin))

    def aggregation(self, asked: pb.RewardAggregation | None, pin: str = ""):
        """A request's own aggregation of the heads (:meth:`heads.Aggregation.asked`), or
        None for the server's."""
        if asked is None or not asked.kind:
            return None
        version = self.resolve(pin)
        model = version.model if version is not None else self.model
        coef = asked.uncertainty_coef if asked.HasField("uncertainty_coef") else None
        try:
            return model.heads.asked(asked.kind, coef)
        except ValueError as e:
            raise InvalidArgument(f"aggregation.{e}") from None

    async def prepare(self, request: pb.ScoreRequest, sink, context,
                      taken: set[str]) -> list[Pending]:
        """The request's samples as queue entries (:meth:`admit`), with its aggregation."""
        samples = [(s.id, to_domain(s)) for s in request.samples]
        how = self.aggregation(request.aggregation, request.version)  # before any is queued
        items = await self.admit(samples, sink, caller_of(context), taken, request.version)
        for p in items:
            p.aggregation = how
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
        request = parse(raw, pb.GetModelInfoRequest)
        version = self.resolve(request.version)
        if not request.version or version is None:
            return self.info
        return versions_info(version, self.versions, self.info.max_samples_per_request,
                             self.info.server_version)


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
        server_version=server_version, recipe=recipe_message(model.recipe),
        recipe_reason=model.recipe_reason, head_names=model.heads.names,
        reward_aggregation=model.heads.describe(), ensemble_members=model.heads.members,
        uncertainty_coef=model.heads.coef,
        accepts_token_type_ids=bool(model.encoder.type_vocab_size))


def versions_info(version, versions, max_samples: int, server_version: str) -> pb.ModelInfo:
    """ModelInfo of ``version`` with the resident versions and the default listed."""
    info = model_info(version.model, max_samples, server_version)
    info.version, info.version_label = version.hash, version.label
    info.default_version = versions.default.hash
    info.resident_versions.extend(version_message(v, versions) for v in versions.listed())
    return info


def version_message(version, versions) -> pb.ModelVersion:
    return pb.ModelVersion(version=version.hash, label=version.label,
                           is_default=version is versions.default, name=version.name,
                           tokenizer_fingerprint=version.fingerprint,
                           loaded_at=version.loaded_at, load_seconds=version.load_seconds)


def recipe_message(recipe) -> pb.ScoringRecipe:
    return pb.ScoringRecipe(name=recipe.name, join=recipe.join,
                            special_tokens=recipe.special_tokens, eos=recipe.eos,
                            chat=recipe.chat, position=recipe.position, summary=recipe.summary)


def _id(x) -> int:
    return -1 if x is None else int(x)
