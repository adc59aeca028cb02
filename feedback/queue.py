"""The queue's rules, as plain functions both stores call (no I/O, no database, no clock).

Lease semantics:

- A pair wants ``labels_wanted`` judgments from distinct labelers: 1, or 2 for the fraction
  ``double_label_fraction`` of pairs chosen by a hash of the pair id (the same pair always
  gets the same answer, whoever enqueues it and however often). Two labels give agreement.
- Leasing hands a labeler the pending pair of highest priority (first enqueued first among
  equals) that still wants a label, that no open lease already covers up to its want, and that
  this labeler has neither answered nor holds. A labeler who asks again while holding an open
  lease gets that lease back (a page reload does not burn pairs).
- A lease is open until ``expires_at``; after it, it is expired (the pair is back in the
  queue for everyone, that labeler included), and a submit for it is refused.
- A submit records one judgment per lease, exactly once: the first submit of an open lease
  records it; the same choice again is a duplicate (answered as the first, nothing written);
  another choice is refused (``AlreadyAnswered``); any submit after expiry is refused
  (``LeaseExpired``).
- Every answer, skip included, fills one of the pair's wanted labels (Label Studio's
  "ignore skipped"): a pair nobody can judge leaves the queue instead of cycling through every
  labeler. Ties and skips are not exported as preferences (feedback/export.py).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from feedback.errors import AlreadyAnswered, LeaseExpired

WINNER_OF = {("a", "left"): "a", ("a", "right"): "b", ("b", "left"): "b", ("b", "right"): "a"}


def labels_wanted(pair_id: str, double_label_fraction: float) -> int:
    """2 for a ``double_label_fraction`` share of pair ids (by hash), else 1."""
    h = int.from_bytes(hashlib.sha256(pair_id.encode()).digest()[:8], "big") / 2.0**64
    return 2 if h < double_label_fraction else 1


def draw_left(rng: random.Random) -> str:
    """Which response goes on the left: 'a' or 'b' with probability ½ each (position bias)."""
    return "a" if rng.random() < 0.5 else "b"


def winner_of(left: str, choice: str) -> str:
    """The labeler's choice of a side mapped back onto the pair: 'a', 'b', 'tie' or 'skip'."""
    return WINNER_OF.get((left, choice), choice)


def is_expired(expires_at: float, now: float) -> bool:
    return expires_at <= now


def lease_seconds(asked: float | None, default: float, longest: float) -> float:
    """The lease time a labeler asked for, within (0, longest]; the default when not asked."""
    if asked is None:
        return default
    return min(max(float(asked), 0.001), longest)


def decide_submit(state: str, expires_at: float, recorded_choice: str | None, choice: str,
                  now: float) -> str:
    """What a submit of ``choice`` does to a lease in ``state`` ('open', 'answered',
    'expired'): 'record', 'duplicate', or 'expire' (the store marks the lease expired, then
    refuses); refusals of an answered lease raise here."""
    if state == "answered":
        if recorded_choice == choice:
            return "duplicate"
        raise AlreadyAnswered(f"this lease was answered {recorded_choice!r}; a judgment is "
                              "recorded once")
    if state == "expired" or is_expired(expires_at, now):
        return "expire"
    return "record"


def expired_error(lease_id: str) -> LeaseExpired:
    return LeaseExpired(f"lease {lease_id} expired before this answer; the pair went back to "
                        "the queue (lease it again)")


@dataclass(frozen=True)
class Agreement:
    """Agreement between labelers on doubly-labeled pairs answered by both with a, b or tie."""

    pairs: int
    agreed: int

    @property
    def ratio(self) -> float | None:
        return self.agreed / self.pairs if self.pairs else None


def agreement(winners_by_pair: dict[str, list[str]]) -> Agreement:
    """Pairs with at least two non-skip answers; agreed when their first two winners match."""
    compared = [w for w in ({p: [x for x in ws if x != "skip"] for p, ws in
                             winners_by_pair.items()}).values() if len(w) >= 2]
    return Agreement(len(compared), sum(1 for w in compared if w[0] == w[1]))
