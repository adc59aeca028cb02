"""Turning inputs into token ids: the one tokenization shared by RM training and serving.

A reward model scores exactly the token ids it was trained on, so training (`rm-server train`),
evaluation and the server all call :class:`Encoder` and nothing else. How text and
conversations become ids is the encoder's :class:`~protos.recipes.Recipe` (protos/recipes.py:
this project's own layout, TRL's, TRL GRPO's, OpenRLHF's, an encoder's pair encoding). The
default, "rm-server":

- text pair: the prompt tokenized as a single sequence with the tokenizer's special tokens
  (e.g. BOS; an empty prompt too, so a whole transcript sent as the response keeps its BOS),
  then the response tokenized with no special tokens, concatenated. This is what a PPO trainer
  produces (prompt ids, then generated ids), so token-id and text inputs agree.
- conversation: the tokenizer's chat template; the prompt is everything before the last
  message, rendered with the generation prompt.

Whatever the recipe, token ids are taken as they are (checked against the vocabulary; with
``token_type_ids`` for models that have token types), and a full text (the model's own special
tokens written out, e.g. a templated transcript) is tokenized as it is, with no special tokens
added. Ids that come with token types are a :class:`TypedIds` (a list carrying them), so they
travel wherever ids travel.

Prompts are tokenized once: k responses to one prompt (PPO, group sampling) share a cached
prompt tokenization (text pairs: the prompt's ids; conversations: the templated length of all
but the last message), an LRU of ``PROMPT_CACHE_SIZE`` prompts per encoder.

Over-long inputs follow ``truncation``: "left" (default) drops tokens from the start and keeps
the end, where the score is read (OpenRLHF cuts the right end and scores the wrong token);
for a pair recipe the first token (the encoder's pooled [CLS]) is kept too; "error" refuses
them.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field

from protos.recipes import DEFAULT_RECIPE, Recipe, recipe_digest

ROLES = frozenset({"system", "user", "assistant", "tool"})
TRUNCATION_POLICIES = ("left", "error")
PROMPT_CACHE_SIZE = 4096


class InputError(ValueError):
    """A sample that cannot be scored; ``field`` names the offending field (e.g. "tokens.ids")."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class TextInput:
    prompt: str
    response: str


@dataclass(frozen=True)
class ChatInput:
    messages: tuple[tuple[str, str], ...]  # (role, content) pairs


@dataclass(frozen=True)
class TokenInput:
    ids: tuple[int, ...]
    prompt_length: int = 0
    token_type_ids: tuple[int, ...] = ()  # empty: none given


@dataclass(frozen=True)
class FullTextInput:
    """A whole text as the model sees it, its special tokens written out; tokenized as is."""

    text: str


class TypedIds(list):
    """Token ids (a plain ``list`` of ints) that also carry their ``token_type_ids``: they go
    wherever ids go (queues, batches, training pairs) and the model reads them at the end."""

    def __init__(self, ids, token_type_ids):
        super().__init__(ids)
        self.token_type_ids = list(token_type_ids)


def with_types(ids: list[int], token_type_ids) -> list[int]:
    """``ids`` carrying ``token_type_ids`` when there are any, else ``ids`` as they are."""
    return TypedIds(ids, token_type_ids) if token_type_ids is not None else ids


@dataclass
class Encoded:
    """Token ids ready for the model, after truncation."""

    ids: list[int]
    prompt_length: int
    truncated: bool = False
    original_length: int = field(default=0)

    @property
    def token_type_ids(self) -> list[int] | None:
        return getattr(self.ids, "token_type_ids", None)


class Encoder:
    """Tokenizes any input form the same way for training, evaluation and serving.

    ``recipe``: how text and conversations become ids (protos/recipes.py; default
    "rm-server"). ``type_vocab_size``: the model's number of token types, for models that take
    ``token_type_ids`` (encoders); None: token ids must come without them.
    """

    def __init__(self, tokenizer, max_length: int, vocab_size: int, truncation: str = "left",
                 recipe: Recipe | None = None, type_vocab_size: int | None = None):
        if truncation not in TRUNCATION_POLICIES:
            raise ValueError(f"truncation must be one of {TRUNCATION_POLICIES}, got {truncation!r}")
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.vocab_size = int(vocab_size)
        self.truncation = truncation
        self.recipe = recipe or DEFAULT_RECIPE
        self.type_vocab_size = type_vocab_size
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self._prompt_ids = functools.lru_cache(PROMPT_CACHE_SIZE)(self._tokenize_prompt)
        self._chat_prompt_length = functools.lru_cache(PROMPT_CACHE_SIZE)(self._template_length)

    def encode(self, item: TextInput | ChatInput | TokenInput | FullTextInput) -> Encoded:
        if isinstance(item, TextInput):
            if not item.prompt and not item.response:
                raise InputError("text", "empty prompt and response: nothing to score")
            ids, prompt_length = self.encode_text(item.prompt, item.response)
            where = "text"
        elif isinstance(item, ChatInput):
            ids, prompt_length = self.encode_chat(item.messages)
            where = "conversation"
        elif isinstance(item, TokenInput):
            ids, prompt_length = self.check_tokens(item.ids, item.prompt_length,
                                                   item.token_type_ids)
            where = "tokens.ids"
        elif isinstance(item, FullTextInput):
            ids, prompt_length = self._tokenize(item.text, False), 0
            where = "full_text"
        else:
            raise InputError("input", "no input set (one of text, conversation, tokens, "
                             "full_text)")
        if not ids:
            raise InputError(where, "empty sequence: nothing to score")
        return self.truncate(ids, prompt_length, where)

    # -- text pairs: the recipe's join --------------------------------------------------------
    def encode_text(self, prompt: str, response: str) -> tuple[list[int], int]:
        join = self.recipe.join
        if join == "ids":  # the prompt gets its special tokens even when empty (BOS, CLS)
            prompt_ids = self._prompt_ids(prompt)
            response_ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
            return list(prompt_ids) + list(response_ids), len(prompt_ids)
        if join == "pair":
            out = self.tokenizer(prompt, response)
            ids, types = list(out["input_ids"]), out.get("token_type_ids")
            return with_types(ids, types), _common_prefix(self._prompt_ids(prompt), ids)
        eos = getattr(self.tokenizer, "eos_token", None)
        ids = self._tokenize(self.recipe.join_text(prompt, response, eos),
                             self.recipe.special_tokens)
        return ids, _common_prefix(self._prompt_ids(prompt), ids)

    def _tokenize(self, text: str, special_tokens: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special_tokens)["input_ids"])

    def _tokenize_prompt(self, prompt: str) -> tuple[int, ...]:
        return tuple(self._tokenize(prompt, self.recipe.special_tokens))

    # -- conversations: the chat template ----------------------------------------------------
    def _template_length(self, messages: tuple[tuple[str, str], ...]) -> int:
        chat = [{"role": r, "content": c} for r, c in messages]
        if self.recipe.chat == "text":
            return len(self._tokenize(self._render(chat, True), False))
        return len(self._apply_template(chat, add_generation_prompt=True))

    def encode_chat(self, messages) -> tuple[list[int], int]:
        if not self.has_chat_template:
            raise InputError("conversation", "this model's tokenizer has no chat template")
        if not messages:
            raise InputError("conversation.messages", "no messages")
        for i, (role, _content) in enumerate(messages):
            if role not in ROLES:
                raise InputError(f"conversation.messages[{i}].role",
                                 f"unknown role {role!r} (expected one of {sorted(ROLES)})")
        chat = [{"role": r, "content": c} for r, c in messages]
        if self.recipe.chat == "text":  # rendered, the EOS rule, tokenized as a text
            text = self.recipe.finish_text(self._render(chat, False),
                                           getattr(self.tokenizer, "eos_token", None))
            ids = self._tokenize(text, False)
        else:
            ids = self._apply_template(chat, add_generation_prompt=False)
        prompt_length = 0
        if len(chat) > 1:
            prompt_length = self._chat_prompt_length(tuple(map(tuple, messages[:-1])))
        return ids, min(prompt_length, len(ids))

    def _apply_template(self, chat, add_generation_prompt: bool) -> list[int]:
        try:
            out = self.tokenizer.apply_chat_template(
                chat, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True)
        except Exception as e:  # a template may raise on content it does not accept
            raise InputError("conversation", f"chat template failed: {e}") from None
        return list(out["input_ids"])

    def _render(self, chat, add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as e:
            raise InputError("conversation", f"chat template failed: {e}") from None

    # -- token ids ---------------------------------------------------------------------------
    def check_tokens(self, ids, prompt_length: int, token_type_ids=()) -> tuple[list[int], int]:
        ids = list(ids)
        for i, t in enumerate(ids):
            if not 0 <= t < self.vocab_size:
                raise InputError("tokens.ids", f"id {t} at position {i} is outside "
                                 f"[0, {self.vocab_size})")
        if not 0 <= prompt_length <= len(ids):
            raise InputError("tokens.prompt_length", f"{prompt_length} is outside [0, {len(ids)}]")
        if token_type_ids:
            ids = TypedIds(ids, self._check_types(token_type_ids, len(ids)))
        return ids, prompt_length

    def _check_types(self, types, n: int) -> list[int]:
        where = "tokens.token_type_ids"
        if not self.type_vocab_size:
            raise InputError(where, "this model takes no token type ids")
        if len(types) != n:
            raise InputError(where, f"{len(types)} type ids for {n} token ids")
        bad = [t for t in types if not 0 <= t < self.type_vocab_size]
        if bad:
            raise InputError(where, f"type id {bad[0]} is outside [0, {self.type_vocab_size})")
        return list(types)

    def truncate(self, ids: list[int], prompt_length: int, where: str = "input") -> Encoded:
        n = len(ids)
        if n <= self.max_length:
            return Encoded(ids, prompt_length, False, n)
        if self.truncation == "error":
            raise InputError(where, f"{n} tokens is longer than max_length {self.max_length}")
        cut = n - self.max_length  # keep the end: the score is read at the last token
        keep = slice(cut, n)
        if self.recipe.join == "pair":  # ... and an encoder's first token, the one it pools
            keep = [0, *range(cut + 1, n)]
        types = getattr(ids, "token_type_ids", None)
        new = _take(ids, keep)
        new = with_types(new, _take(types, keep) if types is not None else None)
        return Encoded(new, max(0, prompt_length - cut), True, n)


def _take(seq: list[int], keep) -> list[int]:
    return list(seq[keep]) if isinstance(keep, slice) else [seq[i] for i in keep]


def _common_prefix(prompt_ids, ids) -> int:
    """How many leading ``ids`` are the prompt's own tokenization (informational)."""
    n = 0
    for a, b in zip(prompt_ids, ids):
        if a != b:
            break
        n += 1
    return n


def tokenizer_fingerprint(tokenizer, recipe: Recipe | None = None) -> str:
    """sha256 (16 hex digits) of the vocabulary, merges, special tokens, chat template and the
    scoring recipe's rules (default "rm-server", the PPO trainer's own layout): equal
    fingerprints mean the same token ids, laid out the same way, get the same score."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = {k: getattr(tokenizer, k, None)
                for k in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")}
    h.update(json.dumps(specials, sort_keys=True).encode())
    h.update((getattr(tokenizer, "chat_template", None) or "").encode())
    h.update(recipe_digest(recipe or DEFAULT_RECIPE))
    return h.hexdigest()[:16]
