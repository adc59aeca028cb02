"""How long the model needs for a batch: a lower bound, from batches that ran.

The batcher refuses samples whose deadline falls before their batch could finish, so that a
result nobody can receive is not computed. Refusing is safe only on evidence: a refused batch
never runs, so it never corrects the estimate that refused it, and an estimate that is too high
refuses every batch from then on. A per-token rate learnt from one 2-token batch and applied
to a full batch does exactly that, because model time is a fixed cost per call plus a cost per
token, not a cost per token alone (on a small model the fixed cost dominates small batches).

So this is a lower bound, not a guess. The time of a batch of ``n`` rows padded to length
``L`` is, for the transformers we serve, ``t(n, L) = a + n * (b * L + c * L**2)`` with
``a, b, c >= 0``: a fixed cost per call (launches, Python), a cost per token (projections,
MLP) and a cost per token per token of context (attention). A batch ``(n_i, L_i)`` that ran in
``t_i`` seconds then proves::

    t(n, L) >= t_i * min(1, n / n_i) * min(1, L / L_i) ** 2

(at least as many rows, each at least as long: at least ``t_i``; fewer rows: their share of a
wider batch, which holds at most their share of the fixed cost; shorter rows: scaled by the
square of the length, the most any term falls). The estimate is the ``quorum``-th largest of
these bounds over the last ``window`` batches, so that one slow batch (a pause, a noisy
neighbour) cannot refuse work on its own; with fewer batches to go by it is 0 (run the batch).
Bounds expire after ``max_age`` seconds: after a slow spell that made the server refuse
everything, the next batch runs and measures again.

A batch whose samples share a prompt runs faster than its shape says (the prompt is computed
once): the batcher passes such a batch as ``rows = cost / length`` rows of its longest length,
its token cost as the batching policy charges it (rm_server/prefix_plan.py). That is not
quite a bound (a suffix attends to the whole prefix, which ``cost`` counts once), so a bound
from batches that shared nothing can exceed a shared batch's time by a little; it matters only
for deadlines within that margin of the model time.
"""

from __future__ import annotations

from collections import deque


class ModelTimeEstimate:
    """Seconds a batch of ``rows`` x ``length`` padded tokens needs at least (pure: the
    caller passes the time)."""

    def __init__(self, window: int = 32, quorum: int = 3, max_age: float = 10.0):
        self.quorum = quorum
        self.max_age = max_age
        self._ran: deque[tuple[float, int, float, float]] = deque(maxlen=window)  # n, L, t, at

    def observe(self, rows: float, length: int, seconds: float, now: float) -> None:
        """Record a batch that ran: ``rows`` samples padded to ``length`` in ``seconds``
        (fractional rows: a batch with shared prefixes, see above)."""
        if rows > 0 and length > 0 and seconds >= 0:
            self._ran.append((rows, length, seconds, now))

    def lower_bound(self, rows: float, length: int, now: float) -> float:
        """The least model time that ``quorum`` recent batches each prove; 0 without them."""
        bounds = sorted((t * min(1.0, rows / n) * min(1.0, length / ln) ** 2
                         for n, ln, t, at in self._ran if now - at <= self.max_age),
                        reverse=True)
        return bounds[self.quorum - 1] if len(bounds) >= self.quorum else 0.0
