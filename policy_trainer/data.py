"""The data plumbing of every stage: record reading with one bad-line policy, the order of the
examples by (seed, epoch), the hold-out split, padding, and the max-length rule.

Inputs are JSONL, one object per line (other keys are allowed and ignored):

- demonstrations (``policy-trainer sft``): ``{"prompt": str, "response": str}``
- prompts (``policy-trainer ppo``): ``{"prompt": str}``
- preferences (``policy-trainer rm`` / ``rm-eval``): see :mod:`policy_trainer.prefs`; these
  may also be tables (:mod:`policy_trainer.tables`): a Parquet file, or a ``datasets`` dataset
  saved with ``save_to_disk``, one record per row.

Blank lines are not records: they are counted and skipped. Every other line that is not a
valid record (bad UTF-8, bad JSON, not an object, a missing or mistyped field, an empty
response or prompt) is a *bad line*, kept with its line number and reason; in a table, a *bad
row* with its 1-based row number. The *bad-line policy* decides what happens next, the same
for every command and input kind: ``"skip"`` keeps the good records and reports the bad lines
(logged and counted); ``"error"`` refuses the file, naming the first few. ``sft`` and ``ppo``
spell it ``--strict`` (default skip), ``rm`` and ``rm-eval`` ``--bad-lines error|skip``
(default error). Nothing is dropped silently.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import torch

from policy_trainer.errors import UserError

BadLinePolicy = Literal["error", "skip"]
MAX_LISTED_BAD_LINES = 5  # named in the message that refuses a file


class BadLine(NamedTuple):
    line: int  # 1-based line number in the file
    reason: str


@dataclass
class RecordFile:
    """What reading a data file found: the records, the bad lines and the blank ones. For a
    table (Parquet, a saved dataset) ``unit`` is "row": ``lines`` counts rows, a bad line is a
    bad row, numbered from 1."""

    path: str
    on_bad: BadLinePolicy = "skip"
    hint: str = ""  # how to choose the other policy, said when the file is refused
    records: list = field(default_factory=list)
    bad: list[BadLine] = field(default_factory=list)
    lines: int = 0
    blank: int = 0
    sha256: str = ""  # of the raw bytes: a resumed run checks it is reading the same data
    unit: str = "line"  # what a record's number counts: "line" (JSONL) or "row" (a table)

    def add_bad(self, line: int, reason: str) -> None:
        self.bad.append(BadLine(line, reason))

    def enforce(self) -> None:
        """Apply the bad-line policy to the bad lines found so far (reading, then encoding,
        may find them): "error" refuses the file; "skip" lets the good records through."""
        if self.on_bad == "skip" or not self.bad:
            return
        n, k = len(self.bad), MAX_LISTED_BAD_LINES
        listed = "; ".join(f"{self.where(b.line)}: {b.reason}" for b in self.bad[:k])
        more = f" (and {n - k} more)" if n > k else ""
        raise UserError(f"{self.path}: {n} malformed {self.unit}(s): {listed}{more}. "
                        f"Fix them, or {self.hint}.")

    def where(self, line: int) -> str:
        """``line 3`` or ``row 3``: how messages name a record."""
        return f"{self.unit} {line}"

    def report(self, log: logging.Logger, limit: int = 20) -> None:
        for b in self.bad[:limit]:
            log.warning("%s:%d: skipped bad %s: %s", self.path, b.line, self.unit, b.reason)
        if len(self.bad) > limit:
            log.warning("%s: ... and %d more bad %ss", self.path, len(self.bad) - limit, self.unit)
        log.info("%s: %d records, %d bad %ss, %d blank lines",
                 self.path, len(self.records), len(self.bad), self.unit, self.blank)


def read_jsonl(path: str | Path, parse: Callable[[dict, int], object],
               on_bad: BadLinePolicy = "skip", hint: str = "") -> RecordFile:
    """Every line of ``path`` through ``parse(obj, line)``, which raises ValueError saying what
    is wrong with a bad record; then the bad-line policy (:meth:`RecordFile.enforce`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    result, digest = RecordFile(str(path), on_bad, hint), hashlib.sha256()
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            digest.update(raw)
            result.lines += 1
            try:
                text = raw.decode("utf-8")
                if not text.strip():
                    result.blank += 1
                    continue
                obj = json.loads(text)
                if not isinstance(obj, dict):
                    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
                result.records.append(parse(obj, lineno))
            except UnicodeDecodeError as e:
                result.add_bad(lineno, f"not valid UTF-8 ({e.reason} at byte {e.start})")
            except json.JSONDecodeError as e:
                result.add_bad(lineno, f"not valid JSON ({e.msg} at column {e.colno})")
            except ValueError as e:
                result.add_bad(lineno, str(e))
    result.sha256 = digest.hexdigest()
    result.enforce()
    return result


# ---------------------------------------------------------------- demonstrations and prompts

STRICT_HINT = "drop --strict to skip and count them"


@dataclass(frozen=True)
class Demo:
    prompt: str
    response: str
    line: int  # 1-based line number in the file, for messages


@dataclass(frozen=True)
class Prompt:
    prompt: str
    line: int


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


def read_demos(path: str | Path, strict: bool = False) -> RecordFile:
    return read_jsonl(path, parse_demo, "error" if strict else "skip", STRICT_HINT)


def read_prompts(path: str | Path, strict: bool = False) -> RecordFile:
    return read_jsonl(path, parse_prompt, "error" if strict else "skip", STRICT_HINT)


# ---------------------------------------------------------------- order and split

@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The order of ``n`` training examples in ``epoch``: a function of (seed, epoch) alone, so
    a resumed run needs only its position to continue the same sequence."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 1)
    return tuple(torch.randperm(n, generator=g).tolist())


def batch_indices(n: int, cursor: int, k: int, seed: int) -> list[int]:
    """The ``k`` example indices after ``cursor`` (examples consumed so far), running on into
    the next epoch's order: every batch is full (SFT's and PPO's order)."""
    out: list[int] = []
    while len(out) < k:
        epoch, pos = divmod(cursor, n)
        take = min(k - len(out), n - pos)
        out += epoch_order(n, seed, epoch)[pos:pos + take]
        cursor += take
    return out


def epoch_batch(n: int, batch_size: int, epoch: int, batch: int, seed: int) -> list[int]:
    """Batch ``batch`` of ``epoch`` when batches stay within an epoch (the reward model's
    order): the epoch's order cut into ``batch_size`` pieces, the last one the remainder."""
    return list(epoch_order(n, seed, epoch)[batch * batch_size:(batch + 1) * batch_size])


def split_eval(items: list, fraction: float, seed: int,
               group: Callable[[object], object] | None = None) -> tuple[list, list]:
    """(train, eval): a seeded random ``fraction`` of the groups held out, at least one group
    on each side (none held out with ``fraction`` 0 or a single group). ``group(item)`` names
    the group an item belongs to (a preference line: the pairs of one ranking stay together);
    by default each item is its own. Both sides come in the shuffled order of their groups."""
    members: dict = {}
    for i, item in enumerate(items):
        members.setdefault(group(item) if group else i, []).append(item)
    groups = sorted(members)
    n = len(groups)
    k = min(n - 1, max(1, round(n * fraction))) if fraction > 0 and n >= 2 else 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return ([item for i in perm[k:] for item in members[groups[i]]],
            [item for i in perm[:k] for item in members[groups[i]]])


# ---------------------------------------------------------------- padding and length

def pad(seqs: list[list[int]], value: int, side: Literal["right", "left"] = "right"
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (B, T) long with T the longest: each sequence padded with ``value``
    on ``side``, mask 1 on its real tokens. Padding is told by the mask, never by comparing
    ids with the pad id (it may equal EOS, and an EOS is a real token)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), value, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)       # (B, T)
    for i, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


DEFAULT_MAX_LENGTH = 1024  # when neither the model nor its tokenizer says


def max_sequence_length(config, tokenizer=None) -> int:
    """The longest sequence a model takes: its position table, capped by the tokenizer's
    ``model_max_length`` when that is set (``policy-trainer rm`` saves the length it trained
    with there); :data:`DEFAULT_MAX_LENGTH` when neither says."""
    text = config.get_text_config()
    limits = [getattr(text, k, None) for k in ("max_position_embeddings", "n_positions")]
    limits = [n for n in limits if isinstance(n, int) and n > 0]
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:  # HF's "unset" is 1e30
        limits.append(tok_max)
    return min(limits) if limits else DEFAULT_MAX_LENGTH
