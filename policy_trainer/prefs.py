"""Preference data: JSONL lines -> (chosen, rejected) pairs -> token ids through the shared Encoder.

One JSON object per line, in one of three shapes (other keys are ignored):

    {"prompt": "...", "chosen": "...", "rejected": "...", "margin": 1.0}        text pair
    {"chosen": [{"role": "user", "content": "..."}, {"role": "assistant", ...}],
     "rejected": [...], "prompt": [...optional messages before both...]}           chat pair
    {"prompt": "..." | [messages], "ranking": [best, second, ..., worst]}          ranking

A ranking of k responses (strings with a text prompt, message lists with a chat prompt) expands
into its k(k−1)/2 pairs, each winner above each loser; ``margin`` (optional, ≥ 0 not required)
applies to every pair of the line. Pairs from one line stay together in the train/eval split.

Nothing is skipped silently. A malformed line (not JSON, a missing or mistyped field, chosen
equal to rejected, a role the Encoder refuses) is reported with its line number: by default the
whole file is refused, listing the first errors; with ``bad_lines="skip"`` it is skipped and
counted in :class:`DataReport`. Blank lines are counted too.

Over-long pairs (more than ``max_length`` tokens, either side) follow ``truncation``:
"left" (default) drops tokens from the start and keeps the end, where the score is read, exactly
as the server does (protos/encoding.py); the pair is counted as truncated. "drop" skips the
pair (counted); "error" refuses the file, naming the line.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from protos.encoding import ROLES, ChatInput, Encoder, InputError, TextInput

MAX_LISTED_ERRORS = 5


class ParseError(ValueError):
    """One malformed line; the message says what is wrong (the caller adds the line number)."""


@dataclass(frozen=True)
class PreferencePair:
    chosen: TextInput | ChatInput
    rejected: TextInput | ChatInput
    margin: float = 0.0
    line: int = 0  # 1-based line of the source file; pairs of one line form one split group


@dataclass
class EncodedPair:
    chosen: list[int]
    rejected: list[int]
    margin: float
    line: int
    truncated: bool = False

    @property
    def length(self) -> int:
        return max(len(self.chosen), len(self.rejected))


@dataclass
class DataReport:
    """Counts for the summary: every line and pair is accounted for."""

    path: str = ""
    lines: int = 0
    blank_lines: int = 0
    bad_lines: int = 0
    rankings: int = 0
    pairs: int = 0
    truncated_pairs: int = 0
    dropped_long_pairs: int = 0
    encoded_pairs: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)  # (line, message), first few

    def add_error(self, line: int, message: str) -> None:
        self.bad_lines += 1
        if len(self.errors) < MAX_LISTED_ERRORS:
            self.errors.append((line, message))

    def raise_if_bad(self, hint: str) -> None:
        if not self.bad_lines:
            return
        listed = "; ".join(f"line {n}: {m}" for n, m in self.errors)
        more = f" (and {self.bad_lines - len(self.errors)} more)" if self.bad_lines > len(self.errors) else ""
        raise ValueError(f"{self.path}: {self.bad_lines} malformed line(s): {listed}{more}. {hint}")

    def summary(self) -> dict:
        d = asdict(self)
        d["errors"] = [f"line {n}: {m}" for n, m in self.errors]
        return d


# -- parsing ------------------------------------------------------------------------------------

def _messages(value, name: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise ParseError(f"{name!r} must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ParseError(f"{name}[{i}] must be an object with string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ParseError(f"{name}[{i}].role: unknown role {m['role']!r} (expected one of {sorted(ROLES)})")
        out.append((m["role"], m["content"]))
    return tuple(out)


def _response(prompt, value, name: str) -> TextInput | ChatInput:
    """One response in the form its prompt asks for: text after a text prompt, messages after a chat one."""
    if isinstance(prompt, str):
        if not isinstance(value, str):
            raise ParseError(f"{name!r} must be a string when 'prompt' is a string")
        return TextInput(prompt, value)
    if isinstance(value, str):
        raise ParseError(f"{name!r} must be a list of messages (a text response needs a string 'prompt')")
    return ChatInput(tuple(prompt or ()) + _messages(value, name))


def _margin(record: dict) -> float:
    m = record.get("margin", 0.0)
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
        raise ParseError(f"'margin' must be a finite number, got {m!r}")
    return float(m)


def parse_record(record, line: int = 0) -> list[PreferencePair]:
    """The pairs of one JSON record; raises ParseError saying what is wrong."""
    if not isinstance(record, dict):
        raise ParseError(f"expected a JSON object, got {type(record).__name__}")
    prompt = record.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        prompt = _messages(prompt, "prompt")
    margin = _margin(record)
    if "ranking" in record:
        if "chosen" in record or "rejected" in record:
            raise ParseError("give either 'ranking' or 'chosen'/'rejected', not both")
        ranked = record["ranking"]
        if not isinstance(ranked, list) or len(ranked) < 2:
            raise ParseError("'ranking' must be a list of at least 2 responses, best first")
        if prompt is None and ranked and isinstance(ranked[0], str):
            raise ParseError("a ranking of text responses needs a string 'prompt'")
        items = [_response(prompt, r, f"ranking[{i}]") for i, r in enumerate(ranked)]
        if len(set(items)) != len(items):
            raise ParseError("'ranking' has duplicate responses")
        return [PreferencePair(items[i], items[j], margin, line)
                for i in range(len(items)) for j in range(i + 1, len(items))]
    for key in ("chosen", "rejected"):
        if key not in record:
            raise ParseError(f"missing {key!r} (or give a 'ranking')")
    if prompt is None and isinstance(record["chosen"], str):
        raise ParseError("missing 'prompt' (text pairs need a string prompt; it may be empty)")
    chosen = _response(prompt, record["chosen"], "chosen")
    rejected = _response(prompt, record["rejected"], "rejected")
    if chosen == rejected:
        raise ParseError("'chosen' and 'rejected' are identical")
    return [PreferencePair(chosen, rejected, margin, line)]


def read_preferences(path: str | Path, bad_lines: str = "error") -> tuple[list[PreferencePair], DataReport]:
    """Parse a preference JSONL file. ``bad_lines``: "error" (refuse the file) or "skip" (count)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"preference file not found: {path}")
    report = DataReport(path=str(path))
    pairs: list[PreferencePair] = []
    with path.open(encoding="utf-8") as f:
        for n, text in enumerate(f, start=1):
            report.lines += 1
            if not text.strip():
                report.blank_lines += 1
                continue
            try:
                record = json.loads(text)
                got = parse_record(record, n)
            except json.JSONDecodeError as e:
                report.add_error(n, f"not valid JSON ({e.msg} at column {e.colno})")
                continue
            except ParseError as e:
                report.add_error(n, str(e))
                continue
            report.rankings += "ranking" in record
            pairs.extend(got)
    if bad_lines == "error":
        report.raise_if_bad("Fix them, or pass --bad-lines skip to skip and count them.")
    report.pairs = len(pairs)
    if not pairs:
        raise ValueError(f"{path}: no preference pairs in {report.lines} line(s)")
    return pairs, report


# -- encoding -----------------------------------------------------------------------------------

def encode_pairs(pairs: list[PreferencePair], encoder: Encoder, report: DataReport,
                 truncation: str = "left", bad_lines: str = "error") -> list[EncodedPair]:
    """Token ids for each pair through the shared Encoder (the server's tokenization).

    ``encoder`` must truncate "left"; ``truncation`` "drop" and "error" act on its flag.
    """
    if truncation not in ("left", "drop", "error"):
        raise ValueError(f"truncation must be 'left', 'drop' or 'error', got {truncation!r}")
    encoded: dict = {}  # input -> Encoded; a ranking's responses are encoded once each
    failed: set[int] = set()
    for p in pairs:
        for item in (p.chosen, p.rejected):
            if item in encoded or p.line in failed:
                continue
            try:
                encoded[item] = encoder.encode(item)
            except InputError as e:  # e.g. chat messages for a tokenizer with no chat template
                failed.add(p.line)
                report.add_error(p.line, str(e))
    out: list[EncodedPair] = []
    for p in pairs:
        if p.line in failed:  # the whole line goes, not some of a ranking's pairs
            continue
        c, r = encoded[p.chosen], encoded[p.rejected]
        truncated = c.truncated or r.truncated
        if truncated and truncation == "error":
            n = max(c.original_length, r.original_length)
            raise ValueError(f"{report.path}: line {p.line}: {n} tokens is longer than max_length "
                             f"{encoder.max_length} (pass --truncation left to keep the end, or drop)")
        if truncated and truncation == "drop":
            report.dropped_long_pairs += 1
            continue
        report.truncated_pairs += truncated
        out.append(EncodedPair(c.ids, r.ids, p.margin, p.line, truncated))
    if bad_lines == "error":
        report.raise_if_bad("Fix them, or pass --bad-lines skip to skip and count them.")
    report.encoded_pairs = len(out)
    if not out:
        raise ValueError(f"{report.path}: no pairs left to use after encoding "
                         f"({report.bad_lines} bad line(s), {report.dropped_long_pairs} dropped as too long)")
    return out


def file_fingerprint(path: str | Path) -> str:
    """sha256 (16 hex digits) of a file's bytes: resume refuses data that changed under it."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
