"""JSONL readers for demonstrations and prompts; SFT examples (ids + labels), split and order.

Files are JSONL, one object per line:

- demonstrations (``policy-trainer sft``): ``{"prompt": str, "response": str}``
- prompts (``policy-trainer ppo``): ``{"prompt": str}``

Other keys are allowed and ignored. Blank lines are not records: they are counted and skipped.
Every other line that is not a valid record (bad UTF-8, bad JSON, not an object, a missing or
non-string field, an empty response or prompt) is a *bad line*: collected with its line
number, reported, counted; with ``strict`` the first one is fatal. Nothing is dropped silently.

Tokenization goes through :class:`protos.encoding.Encoder`, the one the reward model is
trained and served with, so the policy and the RM see the same ids for the same text.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from policy_trainer.errors import UserError
from protos.encoding import Encoder

IGNORE_INDEX = -100  # label of a position that is not trained on (torch's cross_entropy default)


@dataclass(frozen=True)
class Demo:
    prompt: str
    response: str
    line: int  # 1-based line number in the file, for messages


@dataclass(frozen=True)
class Prompt:
    prompt: str
    line: int


@dataclass(frozen=True)
class BadLine:
    line: int
    reason: str


@dataclass
class JsonlFile:
    """What reading a JSONL file found: the records, the bad lines and the blank ones."""

    path: str
    records: list = field(default_factory=list)
    bad: list[BadLine] = field(default_factory=list)
    blank: int = 0
    sha256: str = ""  # of the raw bytes: a resumed run checks it is reading the same data

    def report(self, log: logging.Logger, limit: int = 20) -> None:
        for b in self.bad[:limit]:
            log.warning("%s:%d: skipped bad line: %s", self.path, b.line, b.reason)
        if len(self.bad) > limit:
            log.warning("%s: ... and %d more bad lines", self.path, len(self.bad) - limit)
        log.info("%s: %d records, %d bad lines, %d blank lines",
                 self.path, len(self.records), len(self.bad), self.blank)


def _string_field(obj: dict, key: str, allow_empty: bool) -> str:
    if key not in obj:
        raise ValueError(f"missing key {key!r}")
    value = obj[key]
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"empty {key!r}")
    return value


def parse_demo(obj: dict, line: int) -> Demo:
    # An empty prompt is allowed (an unconditional demonstration); an empty response would
    # teach the policy to stop at once, which is almost always a data bug.
    return Demo(_string_field(obj, "prompt", allow_empty=True),
                _string_field(obj, "response", allow_empty=False), line)


def parse_prompt(obj: dict, line: int) -> Prompt:
    return Prompt(_string_field(obj, "prompt", allow_empty=False), line)


def read_jsonl(path: str | Path, parse: Callable[[dict, int], object],
               strict: bool = False) -> JsonlFile:
    """Read ``path`` line by line with ``parse``; bad lines are collected (or fatal if strict)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    result, digest = JsonlFile(str(path)), hashlib.sha256()
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            digest.update(raw)
            try:
                text = raw.decode("utf-8")
                if not text.strip():
                    result.blank += 1
                    continue
                obj = json.loads(text)
                if not isinstance(obj, dict):
                    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
                result.records.append(parse(obj, lineno))
            except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
                if strict:
                    raise UserError(f"{path}:{lineno}: {e}") from None
                result.bad.append(BadLine(lineno, str(e)))
    result.sha256 = digest.hexdigest()
    return result


def read_demos(path: str | Path, strict: bool = False) -> JsonlFile:
    return read_jsonl(path, parse_demo, strict)


def read_prompts(path: str | Path, strict: bool = False) -> JsonlFile:
    return read_jsonl(path, parse_prompt, strict)


# ---------------------------------------------------------------- SFT examples

@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens; the response and its EOS are trained on
    truncated: bool = False
    no_context: bool = False  # no prompt and no BOS: the first response token is not trained


@dataclass
class EncodeStats:
    examples: int = 0
    truncated: int = 0  # prompt cut from the left to fit max_length
    dropped: int = 0    # too long to train on (see encode_demo)
    dropped_lines: list[int] = field(default_factory=list)
    no_context: int = 0  # empty prompt and no BOS: the first response token is not trained


def empty_prompt_ids(tokenizer) -> list[int]:
    """What an empty prompt becomes: the context the first response token is predicted from.

    The Encoder tokenizes a prompt with the tokenizer's special tokens, but an empty prompt with
    none at all (``encode_text`` skips it), which would leave the first response token with no
    position to be predicted from. So: the special tokens the tokenizer puts around any text
    (Llama's BOS: the same rule as for a non-empty prompt), or, when it adds none to text
    (GPT-2), its BOS token, the token ``generate()`` starts from when given no input. A
    tokenizer with neither gives [] and the first response token cannot be trained.
    """
    ids = list(tokenizer("", add_special_tokens=True)["input_ids"])
    if not ids and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id]
    return ids


def encode_demo(encoder: Encoder, demo: Demo, eos_token_id: int,
                truncation: str = "left") -> Example | None:
    """prompt ids (with special tokens) + response ids + EOS; labels mask the prompt.

    Over ``encoder.max_length``: with ``truncation="left"`` the prompt loses tokens from its
    start (the Encoder's rule for the RM: the end of the prompt, next to the response, matters
    most) while the response is kept whole; an example whose response + EOS does not fit next
    to at least one prompt token is dropped (None). With ``truncation="drop"`` every over-long
    example is dropped. The response is never cut: a cut response would lose its EOS and teach
    the policy not to stop.

    An empty prompt becomes :func:`empty_prompt_ids` (BOS), so the first response token is
    trained like any other; with a tokenizer that has no BOS it is not (its label is masked:
    nothing precedes it) and ``Example.no_context`` says so.
    """
    ids, prompt_length = encoder.encode_text(demo.prompt, demo.response)
    if prompt_length == 0:
        context = empty_prompt_ids(encoder.tokenizer)
        ids, prompt_length = context + ids, len(context)
    ids = ids + [eos_token_id]
    response_length = len(ids) - prompt_length
    truncated = False
    if len(ids) > encoder.max_length:
        # Need one context token before the response: the first response token is predicted
        # from the position before it.
        if truncation == "drop" or response_length + 1 > encoder.max_length:
            return None
        cut = len(ids) - encoder.max_length
        ids, prompt_length, truncated = ids[cut:], prompt_length - cut, True
    labels = [IGNORE_INDEX] * prompt_length + ids[prompt_length:]
    if prompt_length == 0:  # position 0 predicts nothing before it: say so in the labels
        labels[0] = IGNORE_INDEX
    return Example(ids, labels, truncated, no_context=prompt_length == 0)


def encode_demos(encoder: Encoder, demos: list[Demo], eos_token_id: int,
                 truncation: str = "left") -> tuple[list[Example], EncodeStats]:
    examples, stats = [], EncodeStats()
    for demo in demos:
        ex = encode_demo(encoder, demo, eos_token_id, truncation)
        if ex is None:
            stats.dropped += 1
            stats.dropped_lines.append(demo.line)
            continue
        stats.truncated += ex.truncated
        stats.no_context += ex.no_context
        examples.append(ex)
    stats.examples = len(examples)
    return examples, stats


def collate(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example. Padding is masked by attention_mask and labels, never
    by comparing ids to pad_token_id (pad may equal EOS, and the EOS is trained on)."""
    T = max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((len(examples), T), pad_token_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)     # (B, T)
    attention_mask = torch.zeros((len(examples), T), dtype=torch.long)          # (B, T)
    for i, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[i, :n] = torch.tensor(ex.input_ids)
        labels[i, :n] = torch.tensor(ex.labels)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ---------------------------------------------------------------- split and order

@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The order of the training examples in ``epoch``: a function of (seed, epoch) alone, so
    a resumed run needs only the cursor to continue the same sequence."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 1)
    return tuple(torch.randperm(n, generator=g).tolist())


def batch_indices(n: int, cursor: int, k: int, seed: int) -> list[int]:
    """The ``k`` example indices after ``cursor`` (examples consumed so far), across epochs."""
    out: list[int] = []
    while len(out) < k:
        epoch, pos = divmod(cursor, n)
        take = min(k - len(out), n - pos)
        out += epoch_order(n, seed, epoch)[pos:pos + take]
        cursor += take
    return out


def split_eval(examples: list[Example], fraction: float, seed: int):
    """(train, eval): a seeded random ``fraction`` held out, at least one example each side."""
    n = len(examples)
    k = min(n - 1, max(1, round(n * fraction))) if fraction > 0 and n >= 2 else 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [examples[i] for i in perm[k:]], [examples[i] for i in perm[:k]]
