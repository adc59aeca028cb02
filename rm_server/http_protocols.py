"""The HTTP door's JSON shapes: each protocol's request as ``(sample id, input)`` pairs, and the
results as its response. Pure translation (no sockets, no model); rm_server/http.py serves them.

- POST /get_reward (OpenRLHF's remote RM): {"query": [full texts], "prompts", "labels"} ->
  {"rewards": [...], "scores": [...], "extra_logs": {...}}; prompts and labels are not needed.
- POST /pooling, POST /classify (vLLM's pooling API): {"model"?, "input": a text, texts, token
  ids or lists of them, "add_special_tokens"?} or {"messages": [...]} -> {"id", "object":
  "list", "created", "model", "data": [{"index", "object": "pooling", "data": [score]}] or
  [{"index", "label", "probs": [score], "num_classes"}], "usage"}.
- POST /v1/score: a ScoreRequest in the proto's JSON mapping -> a ScoreResponse, proto names.

Token layouts follow each protocol's own server. OpenRLHF's query is the whole decoded text,
its special tokens written out, and OpenRLHF's RM server tokenizes it with
``add_special_tokens=False``: a :class:`FullTextInput`, exact under every scoring recipe. vLLM
tokenizes a text with ``add_special_tokens`` (default true): false is a :class:`FullTextInput`;
true adds the tokenizer's special tokens (BOS, CLS...), which only the "rm-server" recipe's
prompt does exactly (a text pair with an empty response), so under another recipe it is
refused, naming the field, rather than scored on a layout vLLM would not have used.

Scores are raw, every head's (a multi-head model's ``data``/``probs`` hold K scores, in the
order of ``head_names`` in /v1/model_info). vLLM's /classify applies an activation (sigmoid for
one label, softmax for more) unless ``use_activation`` is false; a reward model's score is a
logit, so here ``use_activation`` defaults to false, and true applies vLLM's activation.
"""

from __future__ import annotations

import math
import time
import uuid

from google.protobuf import json_format

from protos import reward_pb2 as pb
from protos.encoding import ChatInput, FullTextInput, TextInput, TokenInput
from protos.recipes import Recipe
from rm_server.admission import Input
from rm_server.batch_policy import Pending, Scored
from rm_server.errors import InvalidArgument
from rm_server.service import result_message, to_domain

Samples = list[tuple[str, Input]]
Results = list[tuple[Pending, Scored]]  # in request order


# -- OpenRLHF: POST /get_reward ------------------------------------------------------------------

def openrlhf_samples(body: dict) -> Samples:
    """``query``: the full texts to score (prompt + response, decoded with special tokens)."""
    queries = _list_of(body, "query", str, "a list of full texts (prompt + response)")
    return [(f"query[{i}]", FullTextInput(q)) for i, q in enumerate(queries)]


def openrlhf_response(results: Results, head_names: tuple[str, ...]) -> dict:
    """OpenRLHF reads ``rewards`` (and ``scores``, else rewards) and logs each ``extra_logs``
    entry as a float tensor: numbers only. A multi-head model's heads are logged too
    (``rm_head_<name>``)."""
    rewards = [r.reward for _, r in results]
    logs = {"rm_num_tokens": [float(p.length) for p, _ in results],
            "rm_truncated": [float(p.truncated) for p, _ in results]}
    if len(head_names) > 1:
        for k, name in enumerate(head_names):
            logs[f"rm_head_{name}"] = [head_scores(r)[k] for _, r in results]
    return {"rewards": rewards, "scores": rewards, "extra_logs": logs}


def head_scores(scored: Scored) -> list[float]:
    """Every head's score; a one-head model's reward."""
    return list(scored.heads) or [scored.reward]


# -- vLLM: POST /pooling and POST /classify ------------------------------------------------------

def vllm_samples(body: dict, recipe: Recipe) -> Samples:
    """``input`` (a text, texts, token ids, or lists of token ids) or ``messages`` (a chat);
    ``recipe``: the served model's scoring recipe."""
    if body.get("encoding_format", "float") != "float":
        raise InvalidArgument("encoding_format: only \"float\" is served")
    if body.get("truncate_prompt_tokens") not in (None, -1):
        raise InvalidArgument("truncate_prompt_tokens: not supported; over-long inputs follow "
                              "the server's --truncation policy (see /v1/model_info)")
    if body.get("messages") is not None:
        if body.get("input") is not None:
            raise InvalidArgument("input, messages: give one of them, not both")
        return [("messages", ChatInput(_messages(body["messages"])))]
    add_special = body.get("add_special_tokens", True)
    if not isinstance(add_special, bool):
        raise InvalidArgument("add_special_tokens: expected true or false")
    items = _vllm_inputs(body.get("input"))
    if add_special and any(isinstance(x, str) for x in items) and not _prompt_is_text(recipe):
        raise InvalidArgument(
            f"add_special_tokens: true (vLLM's default) adds the tokenizer's special tokens, "
            f"which this model's scoring recipe ({recipe.name!r}) does not do for a text alone; "
            "send \"add_special_tokens\": false with the special tokens written in the text")
    text = (lambda x: TextInput(x, "")) if add_special else FullTextInput
    return [(f"input[{i}]", text(x) if isinstance(x, str) else TokenInput(tuple(x), 0))
            for i, x in enumerate(items)]


def _prompt_is_text(recipe: Recipe) -> bool:
    """Whether a text pair (text, "") is ``tokenizer(text, add_special_tokens=True)``: the
    prompt tokenized alone with the special tokens, nothing appended."""
    return recipe.join == "ids" and recipe.special_tokens


def use_activation(body: dict) -> bool:
    value = body.get("use_activation")
    if value is not None and not isinstance(value, bool):
        raise InvalidArgument("use_activation: expected true, false or null")
    return bool(value)


def vllm_response(kind: str, model: str, results: Results, activation: bool,
                  head_names: tuple[str, ...]) -> dict:
    """``kind``: "pooling" (data: every head's score) or "classify" (probs: every head's score,
    the label of the highest, num_classes); ``activation``: vLLM's (sigmoid for one head,
    softmax over several)."""
    scores = [_activate(head_scores(r)) if activation else head_scores(r) for _, r in results]
    if kind == "pooling":
        data = [{"index": i, "object": "pooling", "data": s} for i, s in enumerate(scores)]
        prefix = "pool"
    else:
        data = [{"index": i, "label": head_names[max(range(len(s)), key=s.__getitem__)],
                 "probs": s, "num_classes": len(s)} for i, s in enumerate(scores)]
        prefix = "classify"
    tokens = sum(p.length for p, _ in results)
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
            "model": model, "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                      "prompt_tokens_details": None}}


def _vllm_inputs(value) -> list:
    what = "a text, a list of texts, a list of token ids, or a list of lists of token ids"
    if value is None:
        raise InvalidArgument(f"input: missing ({what}; or messages)")
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise InvalidArgument(f"input: expected {what}" + ("; got []" if value == [] else ""))
    if _is_int(value[0]):
        return [_token_ids(value, "input")]
    return [x if isinstance(x, str) else _token_ids(x, f"input[{i}]") for i, x in enumerate(value)]


def _token_ids(value, field: str) -> list[int]:
    if not isinstance(value, list) or not all(_is_int(t) for t in value):
        raise InvalidArgument(f"{field}: expected a text or a list of integer token ids")
    return value


def _messages(value) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise InvalidArgument("messages: expected a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise InvalidArgument(f"messages[{i}]: expected an object {{role, content}}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise InvalidArgument(f"messages[{i}].{key}: expected a string")
        out.append((m["role"], m["content"]))
    return tuple(out)


# -- ours: POST /v1/score, GET /v1/model_info, GET /v1/models ------------------------------------

def score_samples(body: dict) -> tuple[Samples, str, pb.RewardAggregation | None]:
    """A ScoreRequest in the proto's JSON mapping (proto or lowerCamel field names), translated
    as the gRPC servicer translates it: its samples, the version it pins ("" for none) and the
    aggregation it asks for (None: the server's)."""
    try:
        request = json_format.ParseDict(body, pb.ScoreRequest())
    except json_format.ParseError as e:
        raise InvalidArgument("request: " + " ".join(str(e).split())) from None
    asked = request.aggregation if request.HasField("aggregation") else None
    return [(s.id, to_domain(s)) for s in request.samples], request.version, asked


def score_response(results: Results) -> dict:
    return proto_json(result_message(results))


def model_info_json(info: pb.ModelInfo) -> dict:
    return proto_json(info)


def models_json(info: pb.ModelInfo, created: int) -> dict:
    """The OpenAI-style model list that vLLM clients read the served model's name from."""
    return {"object": "list", "data": [
        {"id": info.name, "object": "model", "created": created, "owned_by": "rm-server",
         "root": info.name, "parent": None, "max_model_len": info.max_length}]}


def error_json(code: str, message: str, retry_after_ms: int | None = None) -> dict:
    error = {"code": code, "message": message}
    if retry_after_ms is not None:
        error["retry_after_ms"] = int(retry_after_ms)
    return {"error": error}


def proto_json(message) -> dict:
    """Field names as in the .proto, zero values printed, int64 as numbers."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True,
                                     unquote_int64_if_possible=True)


def _list_of(body: dict, field: str, kind: type, what: str) -> list:
    value = body.get(field)
    if value is None:
        raise InvalidArgument(f"{field}: missing ({what})")
    if not isinstance(value, list):
        raise InvalidArgument(f"{field}: expected {what}, got {type(value).__name__}")
    for i, x in enumerate(value):
        if not isinstance(x, kind):
            raise InvalidArgument(f"{field}[{i}]: expected {kind.__name__}, got "
                                  f"{type(x).__name__}")
    return value


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _activate(scores: list[float]) -> list[float]:
    """vLLM's classify activation: sigmoid of a single score, softmax over several."""
    if len(scores) == 1:
        x = scores[0]
        return [1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))]
    top = max(scores)
    exps = [math.exp(x - top) for x in scores]
    return [e / sum(exps) for e in exps]
