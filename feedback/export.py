"""Judgments as preference JSONL, the format ``policy-trainer rm`` / ``rm-server train`` and
TRL's reward trainer read:

    {"prompt": ..., "chosen": ..., "rejected": ..., "pair_id": ..., "rm_version": ...,
     "policy_step": ..., "reward_chosen": ..., "reward_rejected": ..., "labeler": ...,
     "source": ..., "judged_at": ..., "seq": ...}

The three first keys are the preference; the others are the pair's metadata, which readers of
the format ignore (policy_trainer/prefs.py: "other keys are ignored"; TRL's trainer keeps only
the columns it uses).

- A tie or a skip is not a preference: left out, and counted (the format, and the
  Bradley-Terry loss it feeds, have no tie).
- A doubly-labeled pair gives one line per judgment: two agreeing labels count twice, two
  disagreeing ones cancel, as label noise does in the BT model. Lines of one pair share
  ``pair_id``, so a reader can group them (e.g. to keep them on one side of a train/eval
  split).
- ``seq`` orders judgments by commit; ``--after SEQ`` exports only newer ones, and the last
  one exported is reported for the next call.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from feedback.pairs import Judgment, Pair


def preference(judgment: Judgment, pair: Pair) -> dict | None:
    """One JSONL record, or None for a tie or a skip."""
    if judgment.winner not in ("a", "b"):
        return None
    a_wins = judgment.winner == "a"
    chosen, rejected = ((pair.response_a, pair.response_b) if a_wins
                        else (pair.response_b, pair.response_a))
    reward_chosen, reward_rejected = ((pair.reward_a, pair.reward_b) if a_wins
                                      else (pair.reward_b, pair.reward_a))
    return {"prompt": pair.prompt, "chosen": chosen, "rejected": rejected, "pair_id": pair.id,
            "rm_version": pair.rm_version, "policy_step": pair.policy_step,
            "reward_chosen": reward_chosen, "reward_rejected": reward_rejected,
            "labeler": judgment.labeler, "source": pair.source,
            "judged_at": judgment.judged_at, "seq": judgment.seq}


@dataclass
class ExportReport:
    exported: int = 0
    left_out: dict[str, int] = field(default_factory=lambda: {"tie": 0, "skip": 0})
    last_seq: int = 0

    def summary(self) -> str:
        return (f"exported {self.exported} preferences ({self.left_out['tie']} ties and "
                f"{self.left_out['skip']} skips left out); last judgment {self.last_seq}: "
                f"next time --after {self.last_seq}")


def preferences(rows: Iterable[tuple[Judgment, Pair]], report: ExportReport) -> Iterator[dict]:
    """The records of ``rows`` (in sequence order), counting into ``report``."""
    for judgment, pair in rows:
        report.last_seq = max(report.last_seq, judgment.seq)
        record = preference(judgment, pair)
        if record is None:
            report.left_out[judgment.winner] += 1
            continue
        report.exported += 1
        yield record


def write_jsonl(records: Iterable[dict], out) -> None:
    for record in records:
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
