"""Turning inputs into token ids: the one tokenization shared by RM training and serving.

A reward model scores exactly the token ids it was trained on, so training (`rm-server train`),
evaluation and the server all call :class:`Encoder` and nothing else:

- text pair: the prompt tokenized as a single sequence (with the tokenizer's special tokens,
  e.g. BOS), then the response tokenized with no special tokens, concatenated. This is what a
  PPO trainer produces (prompt ids, then generated ids), so token-id and text inputs agree.
- conversation: the tokenizer's chat template; the prompt is everything before the last
  message, rendered with the generation prompt.
- token ids: taken as they are, checked against the vocabulary.

Prompts are tokenized once: k responses to one prompt (PPO, group sampling) share a cached
prompt tokenization (text pairs: the prompt's ids; conversations: the templated length of all
but the last message), an LRU of ``PROMPT_CACHE_SIZE`` prompts per encoder.

Over-long inputs follow ``truncation``: "left" (default) drops tokens from the start and keeps
the end, where the score is read (OpenRLHF cuts the right end and scores the wrong token);
"error" refuses them.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field

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


@dataclass
class Encoded:
    """Token ids ready for the model, after truncation."""

    ids: list[int]
    prompt_length: int
    truncated: bool = False
    original_length: int = field(default=0)


class Encoder:
    """Tokenizes any input form the same way for training, evaluation and serving."""

    def __init__(self, tokenizer, max_length: int, vocab_size: int, truncation: str = "left"):
        if truncation not in TRUNCATION_POLICIES:
            raise ValueError(f"truncation must be one of {TRUNCATION_POLICIES}, got {truncation!r}")
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.vocab_size = int(vocab_size)
        self.truncation = truncation
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self._prompt_ids = functools.lru_cache(PROMPT_CACHE_SIZE)(self._tokenize_prompt)
        self._chat_prompt_length = functools.lru_cache(PROMPT_CACHE_SIZE)(self._template_length)

    def encode(self, item: TextInput | ChatInput | TokenInput) -> Encoded:
        if isinstance(item, TextInput):
            ids, prompt_length = self.encode_text(item.prompt, item.response)
            where = "text"
        elif isinstance(item, ChatInput):
            ids, prompt_length = self.encode_chat(item.messages)
            where = "conversation"
        elif isinstance(item, TokenInput):
            ids, prompt_length = self.check_tokens(item.ids, item.prompt_length)
            where = "tokens.ids"
        else:
            raise InputError("input", "no input set (one of text, conversation, tokens)")
        if not ids:
            raise InputError(where, "empty sequence: nothing to score")
        return self.truncate(ids, prompt_length, where)

    def encode_text(self, prompt: str, response: str) -> tuple[list[int], int]:
        prompt_ids = self._prompt_ids(prompt) if prompt else ()
        response_ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        return list(prompt_ids) + list(response_ids), len(prompt_ids)

    def _tokenize_prompt(self, prompt: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def _template_length(self, messages: tuple[tuple[str, str], ...]) -> int:
        chat = [{"role": r, "content": c} for r, c in messages]
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

    def check_tokens(self, ids, prompt_length: int) -> tuple[list[int], int]:
        ids = list(ids)
        for i, t in enumerate(ids):
            if not 0 <= t < self.vocab_size:
                raise InputError("tokens.ids", f"id {t} at position {i} is outside "
                                 f"[0, {self.vocab_size})")
        if not 0 <= prompt_length <= len(ids):
            raise InputError("tokens.prompt_length", f"{prompt_length} is outside [0, {len(ids)}]")
        return ids, prompt_length

    def truncate(self, ids: list[int], prompt_length: int, where: str = "input") -> Encoded:
        n = len(ids)
        if n <= self.max_length:
            return Encoded(ids, prompt_length, False, n)
        if self.truncation == "error":
            raise InputError(where, f"{n} tokens is longer than max_length {self.max_length}")
        cut = n - self.max_length  # keep the end: the score is read at the last token
        return Encoded(ids[cut:], max(0, prompt_length - cut), True, n)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 (16 hex digits) of the vocabulary, merges, special tokens and chat template."""
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
    return h.hexdigest()[:16]
