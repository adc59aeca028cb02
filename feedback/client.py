"""The feedback service's client: what a trainer calls to enqueue pairs and a labeling program
calls to lease and answer them. Standard library only (urllib), so a trainer imports it with
no new dependency; every call has a timeout (default 2 s) and raises a feedback/errors.py class
(``QueueFull``, ``LeaseExpired``, ``Unreachable``, ...).

    client = FeedbackClient("http://127.0.0.1:50055", token_file="token")
    client.enqueue([Pair(...), ...])                     # -> Enqueued (ids queued, duplicates)
    for lease in client.lease("judge-1", count=8):      # a programmatic labeler
        client.submit(lease.lease_id, "left")           # left / right / tie / skip

A trainer that must never wait on the service uses feedback/sender.py (a background thread).

It lives in the feedback package, not in rm_client: rm_client is the reward server's gRPC
client (the light install: grpcio + protobuf); this one speaks the feedback service's HTTP/JSON
API, so it travels with the package that defines that API. Other packages import only this
module and feedback/sender.py from it (tests/test_layout.py).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from feedback.errors import FeedbackError, Unreachable, error_from_json
from feedback.pairs import Judgment, Pair


@dataclass(frozen=True)
class Enqueued:
    queued: list[str]
    duplicates: list[str]
    queue_depth: int


@dataclass(frozen=True)
class LeasedPair:
    """A pair as a labeler gets it: the prompt and the two responses in the drawn order."""

    lease_id: str
    pair_id: str
    prompt: str
    left: str
    right: str
    expires_at: float


class FeedbackClient:
    def __init__(self, url: str, token: str | None = None, token_file: str | None = None,
                 timeout: float = 2.0):
        self.url = url.rstrip("/")
        if token is None and token_file is not None:
            token = Path(token_file).read_text().strip()
        self._token = token
        self.timeout = timeout

    def _call(self, method: str, path: str, body: dict | None = None,
              timeout: float | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            try:
                answer = json.loads(e.read())
            except ValueError:
                answer = None
            raise error_from_json(e.code, answer) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            raise Unreachable(f"{self.url}: {reason}") from None
        except ValueError as e:  # a body that is not JSON
            raise FeedbackError(f"{self.url}{path}: bad answer ({e})") from None

    def enqueue(self, pairs: list[Pair | dict], timeout: float | None = None) -> Enqueued:
        """Queue pairs for labeling, all or none; ``QueueFull`` when they do not fit."""
        items = [p.to_json() if isinstance(p, Pair) else p for p in pairs]
        answer = self._call("POST", "/v1/pairs", {"pairs": items}, timeout)
        return Enqueued(answer["queued"], answer["duplicates"], answer["queue_depth"])

    def lease(self, labeler: str, count: int = 1,
              lease_seconds: float | None = None) -> list[LeasedPair]:
        """Up to ``count`` pairs for ``labeler`` (its open leases first); [] when none wait."""
        body = {"labeler": labeler, "count": count}
        if lease_seconds is not None:
            body["lease_seconds"] = lease_seconds
        answer = self._call("POST", "/v1/leases", body)
        return [LeasedPair(**x) for x in answer["leases"]]

    def submit(self, lease_id: str, choice: str) -> tuple[Judgment, bool]:
        """Answer a lease: 'left', 'right', 'tie' or 'skip'. (judgment, duplicate)."""
        answer = self._call("POST", "/v1/judgments", {"lease_id": lease_id, "choice": choice})
        return Judgment(**answer["judgment"]), answer["duplicate"]

    def judgments(self, after: int = 0, limit: int = 1000) -> tuple[list[tuple[Judgment, Pair]],
                                                                    int]:
        """Judgments with sequence number above ``after``, each with its pair; and the last
        sequence number read (``after`` when none)."""
        query = urllib.parse.urlencode({"after": after, "limit": limit})
        answer = self._call("GET", f"/v1/judgments?{query}")
        rows = [(Judgment(**{k: v for k, v in x.items() if k != "pair"}), Pair(**x["pair"]))
                for x in answer["judgments"]]
        return rows, answer["last_seq"]

    def stats(self) -> dict:
        return self._call("GET", "/v1/stats")
