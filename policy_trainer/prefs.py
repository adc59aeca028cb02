"""Preference data: records -> (chosen, rejected) pairs -> token ids through the shared Encoder.

One record per JSONL line, or per row of a Parquet file or saved ``datasets`` dataset
(:mod:`policy_trainer.tables`), in one of these shapes (other keys are ignored):

    {"prompt": "...", "chosen": "...", "rejected": "...", "margin": 1.0}        text pair
    {"chosen": "...", "rejected": "..."}                          text pair, implicit prompt
    {"chosen": [{"role": "user", "content": "..."}, {"role": "assistant", ...}],
     "rejected": [...], "prompt": [...optional messages before both...]}           chat pair
    {"prompt": "..." | [messages], "ranking": [best, second, ..., worst]}          ranking

The implicit-prompt layout (TRL's, HH-RLHF's) splits off the prompt as TRL's ``extract_prompt``
does (trl/data_utils.py): the longest common prefix of the two texts, less a final space, which
stays with the responses (:func:`implicit_prompt`). Chat pairs need no split: prompt and
response messages are scored as one conversation either way. A string ``prompt`` beside chat
``chosen``/``rejected`` is ignored, as TRL's ``maybe_extract_prompt`` ignores it: the
conversations hold their prompt.

A ranking of k responses (strings with a text prompt, message lists with a chat prompt) expands
into its k(k−1)/2 pairs, each winner above each loser; ``margin`` (optional, ≥ 0 not required)
applies to every pair of the line. Pairs from one line stay together in the train/eval split.

Nothing is skipped silently. A malformed line (not JSON, a missing or mistyped field, chosen
equal to rejected, a role the Encoder refuses) is a bad line under the bad-line policy of every
input (:mod:`policy_trainer.data`; a bad row of a table likewise, named by its row number): by
default (``--bad-lines error``) the whole file is refused, listing the first bad lines; with
``skip`` it is skipped and counted in :class:`DataReport`. Blank lines are counted too.

Over-long pairs (more than ``max_length`` tokens, either side) follow ``truncation``:
"left" (default) drops tokens from the start and keeps the end, where the score is read, exactly
as the server does (protos/encoding.py); the pair is counted as truncated. "drop" skips the
pair (counted); "error" refuses the file, naming the line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from policy_trainer.data import MAX_LISTED_BAD_LINES, BadLinePolicy, RecordFile
from policy_trainer.errors import UserError
from policy_trainer.tables import read_records
from protos.encoding import ROLES, ChatInput, Encoder, InputError, TextInput

BAD_LINES_HINT = "pass --bad-lines skip to skip and count them"


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
    """Counts for the summary: every line and pair is accounted for. The lines (a table's rows),
    and the bad ones (found by reading, then by encoding), are those of the file read."""

    file: RecordFile
    rankings: int = 0
    pairs: int = 0
    truncated_pairs: int = 0
    dropped_long_pairs: int = 0
    encoded_pairs: int = 0

    @property
    def path(self) -> str:
        return self.file.path

    @property
    def lines(self) -> int:
        return self.file.lines

    @property
    def blank_lines(self) -> int:
        return self.file.blank

    @property
    def bad_lines(self) -> int:
        return len(self.file.bad)

    @property
    def errors(self) -> list[tuple[int, str]]:
        """The first few bad lines: (line, reason)."""
        return self.file.bad[:MAX_LISTED_BAD_LINES]

    def summary(self) -> dict:
        return {"path": self.path, "lines": self.lines, "blank_lines": self.blank_lines,
                "bad_lines": self.bad_lines, "rankings": self.rankings, "pairs": self.pairs,
                "truncated_pairs": self.truncated_pairs,
                "dropped_long_pairs": self.dropped_long_pairs,
                "encoded_pairs": self.encoded_pairs,
                "errors": [f"{self.file.where(n)}: {m}" for n, m in self.errors]}

    def describe(self, max_length: int) -> str:
        """One line for the training log."""
        return (f"{self.path}: {self.lines} lines ({self.blank_lines} blank, {self.bad_lines} "
                f"bad skipped), {self.pairs} pairs ({self.rankings} rankings expanded), "
                f"{self.truncated_pairs} truncated to the last {max_length} tokens, "
                f"{self.dropped_long_pairs} dropped as too long")


# -- parsing ------------------------------------------------------------------------------------

def _messages(value, name: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise ParseError(f"{name!r} must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise ParseError(f"{name}[{i}] must be an object with string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ParseError(f"{name}[{i}].role: unknown role {m['role']!r} "
                             f"(expected one of {sorted(ROLES)})")
        out.append((m["role"], m["content"]))
    return tuple(out)


def _response(prompt, value, name: str) -> TextInput | ChatInput:
    """One response in the form its prompt asks for: text after a text prompt, messages after
    a chat one."""
    if isinstance(prompt, str):
        if not isinstance(value, str):
            raise ParseError(f"{name!r} must be a string when 'prompt' is a string")
        return TextInput(prompt, value)
    if isinstance(value, str):
        raise ParseError(f"{name!r} must be a list of messages "
                         "(a text response needs a string 'prompt')")
    return ChatInput(tuple(prompt or ()) + _messages(value, name))


def _margin(record: dict) -> float:
    m = record.get("margin", 0.0)
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
        raise ParseError(f"'margin' must be a finite number, got {m!r}")
    return float(m)


def implicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) of a text pair whose prompt is part of both texts.

    TRL's ``extract_prompt`` rule: the prompt ends where the texts first differ, one character
    earlier when the character before is a space (the space starts the responses: "A: good" /
    "A: bad" split as "A:" + " good" / " bad"). Where TRL's loop has no such point it returns
    odd splits, which are not copied: when one text is a prefix of the other, TRL cuts one
    character before the end of the shorter; here the whole shorter text (less a final space)
    is the prompt. When the texts differ at the first character and ``chosen`` ends in a space,
    TRL's index becomes −1; here the prompt is empty.
    """
    n = min(len(chosen), len(rejected))
    cut = next((i for i in range(n) if chosen[i] != rejected[i]), n)
    if cut > 0 and chosen[cut - 1] == " ":
        cut -= 1
    return chosen[:cut], chosen[cut:], rejected[cut:]


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
    chosen, rejected = record["chosen"], record["rejected"]
    if {type(chosen), type(rejected)} == {str, list}:
        raise ParseError("'chosen' and 'rejected' must both be strings or both message lists")
    if isinstance(prompt, str) and isinstance(chosen, list) and isinstance(rejected, list):
        prompt = None  # TRL's maybe_extract_prompt: the conversations hold their prompt
    if prompt is None and isinstance(chosen, str) and isinstance(rejected, str):
        prompt, chosen, rejected = implicit_prompt(chosen, rejected)
    chosen = _response(prompt, chosen, "chosen")
    rejected = _response(prompt, rejected, "rejected")
    if chosen == rejected:
        raise ParseError("'chosen' and 'rejected' are identical")
    return [PreferencePair(chosen, rejected, margin, line)]


def read_preferences(path: str | Path, bad_lines: BadLinePolicy = "error"
                     ) -> tuple[list[PreferencePair], DataReport]:
    """The pairs of a preference file (JSONL, Parquet or a saved dataset), under the bad-line
    policy ``bad_lines``."""
    found = read_records(path, lambda record, line: ("ranking" in record,
                                                     parse_record(record, line)),
                         bad_lines, BAD_LINES_HINT)
    pairs = [p for _, line_pairs in found.records for p in line_pairs]
    report = DataReport(found, rankings=sum(r for r, _ in found.records), pairs=len(pairs))
    if not pairs:
        raise UserError(f"{path}: no preference pairs in {found.lines} {found.unit}(s)")
    return pairs, report


# -- encoding -----------------------------------------------------------------------------------

def encode_pairs(pairs: list[PreferencePair], encoder: Encoder, report: DataReport,
                 truncation: str = "left") -> list[EncodedPair]:
    """Token ids for each pair through the shared Encoder (the server's tokenization); a line
    the Encoder refuses is a bad line of ``report``'s file, under its policy.

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
                report.file.add_bad(p.line, str(e))
    out: list[EncodedPair] = []
    for p in pairs:
        if p.line in failed:  # the whole line goes, not some of a ranking's pairs
            continue
        c, r = encoded[p.chosen], encoded[p.rejected]
        truncated = c.truncated or r.truncated
        if truncated and truncation == "error":
            n = max(c.original_length, r.original_length)
            raise UserError(f"{report.path}: {report.file.where(p.line)}: {n} tokens is longer "
                            f"than max_length {encoder.max_length} (pass --truncation left to "
                            "keep the end, or drop)")
        if truncated and truncation == "drop":
            report.dropped_long_pairs += 1
            continue
        report.truncated_pairs += truncated
        out.append(EncodedPair(c.ids, r.ids, p.margin, p.line, truncated))
    report.file.enforce()
    report.encoded_pairs = len(out)
    if not out:
        raise UserError(f"{report.path}: no pairs left to use after encoding ({report.bad_lines} "
                        f"bad line(s), {report.dropped_long_pairs} dropped as too long)")
    return out
