"""The records of the feedback service and their JSON shapes: a comparison (``Pair``), a lease
of it to one labeler (``Lease``), the answer (``Judgment``).

Names, once: a pair holds ``response_a`` and ``response_b`` as they were enqueued; a labeler
sees them as ``left`` and ``right``, in an order drawn per lease (``Lease.left`` says which
response was shown on the left, and the judgment keeps it); the labeler's ``choice`` is
left / right / tie / skip, and the ``winner`` is that choice mapped back onto the pair:
a / b / tie / skip. The page's "A" and "B" buttons are left and right.

Standard library only: the client imports this module.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass

from feedback.errors import InvalidArgument

CHOICES = ("left", "right", "tie", "skip")
WINNERS = ("a", "b", "tie", "skip")
LABELER = re.compile(r"^[\w.@+-]{1,64}$")
MAX_ID = 128


@dataclass(frozen=True)
class Pair:
    """Two responses to one prompt, to be compared; ``id`` makes enqueue idempotent."""

    id: str
    prompt: str
    response_a: str
    response_b: str
    reward_a: float | None = None
    """The RM's reward of response_a when the pair was made."""
    reward_b: float | None = None
    rm_version: str = ""
    """The RM version that scored them."""
    policy_step: int | None = None
    """The policy step whose rollouts they are."""
    priority: float = 0.0
    """Higher is labeled first (e.g. −|reward margin|, or ensemble disagreement)."""
    source: str = ""
    """Who sent it (a run id)."""

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Lease:
    """A pair handed to one labeler until ``expires_at`` (Unix seconds)."""

    lease_id: str
    pair: Pair
    labeler: str
    left: str
    """'a' or 'b': which response is shown on the left."""
    leased_at: float
    expires_at: float

    @property
    def left_text(self) -> str:
        return self.pair.response_a if self.left == "a" else self.pair.response_b

    @property
    def right_text(self) -> str:
        return self.pair.response_b if self.left == "a" else self.pair.response_a

    def to_json(self) -> dict:
        """What a labeler sees: no rewards, no RM version (they would bias the judgment)."""
        return {"lease_id": self.lease_id, "pair_id": self.pair.id, "prompt": self.pair.prompt,
                "left": self.left_text, "right": self.right_text,
                "expires_at": self.expires_at}


@dataclass(frozen=True)
class Judgment:
    """One labeler's answer for one lease; ``seq`` orders judgments by commit."""

    seq: int
    lease_id: str
    pair_id: str
    labeler: str
    left: str
    choice: str
    winner: str
    judged_at: float

    def to_json(self) -> dict:
        return asdict(self)


def pair_id_of(prompt: str, response_a: str, response_b: str, source: str = "",
               policy_step: int | None = None) -> str:
    """A content id for a pair sent without one: the same pair sent twice is queued once."""
    text = json.dumps([prompt, response_a, response_b, source, policy_step])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _text(obj: dict, key: str, where: str, required: bool = True) -> str:
    value = obj.get(key, None if required else "")
    if not isinstance(value, str):
        raise InvalidArgument(f"{where}{key}: expected a string, got {type(value).__name__}")
    return value


def _number(obj: dict, key: str, where: str, integer: bool = False):
    value = obj.get(key)
    if value is None:
        return None
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        kind_name = "integer" if integer else "number"
        raise InvalidArgument(f"{where}{key}: expected a finite {kind_name}, got {value!r}")
    return value if integer else float(value)


def pair_from_json(obj: object, index: int = 0) -> Pair:
    """A pair from the enqueue body; INVALID_ARGUMENT names the pair's index and the field."""
    where = f"pairs[{index}]."
    if not isinstance(obj, dict):
        raise InvalidArgument(f"pairs[{index}]: expected an object, got {type(obj).__name__}")
    prompt, a, b = (_text(obj, k, where) for k in ("prompt", "response_a", "response_b"))
    if a == b:
        raise InvalidArgument(f"pairs[{index}]: response_a and response_b are identical "
                              "(nothing to compare)")
    source, rm_version = _text(obj, "source", where, False), _text(obj, "rm_version", where, False)
    step = _number(obj, "policy_step", where, integer=True)
    pair_id = obj.get("id") or pair_id_of(prompt, a, b, source, step)
    if not isinstance(pair_id, str) or len(pair_id) > MAX_ID:
        raise InvalidArgument(f"{where}id: expected a string of at most {MAX_ID} characters")
    return Pair(pair_id, prompt, a, b, _number(obj, "reward_a", where),
                _number(obj, "reward_b", where), rm_version, step,
                _number(obj, "priority", where) or 0.0, source)


def check_labeler(name: object) -> str:
    if not isinstance(name, str) or not LABELER.match(name):
        raise InvalidArgument("labeler: 1-64 letters, digits or . _ @ + - (got "
                              f"{str(name)[:80]!r})")
    return name


def check_choice(choice: object) -> str:
    if choice not in CHOICES:
        raise InvalidArgument(f"choice: one of {', '.join(CHOICES)} (got {str(choice)[:20]!r})")
    return choice
