"""Which samples share a token prefix, and what a batch of them costs (pure: lists of ids only).

k responses to one prompt share the prompt's tokens. The model runs such a prefix once and the
k suffixes against its keys/values (rm_server/prefix_batch.py), so a batch's work is not its
padded size ``max_len * n`` but

    cost = sum over groups (p + k * (longest - p))  +  n_rest * longest_rest

(a group: k >= 2 samples sharing p >= ``min_prefix`` leading tokens, its suffixes padded to the
longest; the rest: padded to their longest, as before). The batching policy charges this cost
against the token budget and keeps a group in one batch (rm_server/batch_policy.py); the model
groups a batch with the same function, so what the policy planned is what runs.

The rule for a group (:func:`group_by_prefix`): samples whose first ``min_prefix`` tokens are
equal; p is their longest common prefix, cut so that every member keeps its scored token (and at
least one token) after it. The policy cuts at the last token; the model at the scored token of
its recipe (``scored``): they differ only for a member that ends in pad tokens reaching into
the shared part, where the model's p is shorter than the policy planned.

A queued group's p is that of all its queued members; a part of it in a batch shares at least
as much, so a cost computed from the queue's groups is an upper bound of the batch's.
"""

from __future__ import annotations

from collections.abc import Sequence


def common_length(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the common prefix of ``a`` and ``b``, at most ``limit``: a binary search on
    slice equality, so the comparisons run in C (prompts are hundreds of tokens)."""
    lo, hi = 0, min(limit, len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi:  # invariant: a[:lo] == b[:lo] and a[:hi] != b[:hi]
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def group_by_prefix(seqs: Sequence[Sequence[int]], min_prefix: int,
                    scored: Sequence[int] | None = None
                    ) -> tuple[list[tuple[int, list[int]]], list[int]]:
    """Split ``seqs`` into groups sharing a token prefix of >= ``min_prefix`` tokens, and the rest.

    Each group is (shared length p, member indices in input order), k >= 2. ``scored``: each
    sequence's scored position (default: its last token); p stops before every member's.
    """
    by_head: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(seqs):
        if len(s) > min_prefix:
            by_head.setdefault(tuple(s[:min_prefix]), []).append(i)
    groups, shared = [], set()
    for members in by_head.values():
        if len(members) < 2:
            continue
        first = seqs[members[0]]
        p = min(len(seqs[i]) - 1 if scored is None else scored[i] for i in members)
        for i in members[1:]:
            p = common_length(first, seqs[i], p)
        if p >= min_prefix:
            groups.append((p, members))
            shared.update(members)
    return groups, [i for i in range(len(seqs)) if i not in shared]


def padded_cost(lengths: Sequence[int]) -> int:
    """Tokens of a right-padded batch: longest x n (the cost when nothing is shared)."""
    return max(lengths) * len(lengths) if lengths else 0


def group_cost(prefix: int, lengths: Sequence[int]) -> int:
    """Tokens a group runs: its prefix once, its k suffixes padded to the longest."""
    return prefix + len(lengths) * (max(lengths) - prefix)


def batch_cost(seqs: Sequence[Sequence[int]], min_prefix: int) -> int:
    """What a batch costs with its shared prefixes run once (the module's formula)."""
    groups, rest = group_by_prefix(seqs, min_prefix)
    cost = sum(group_cost(p, [len(seqs[i]) for i in m]) for p, m in groups)
    return cost + padded_cost([len(seqs[i]) for i in rest])


def shared_tokens(seqs: Sequence[Sequence[int]], min_prefix: int) -> int:
    """Tokens not recomputed thanks to sharing: (k - 1) x p per group."""
    groups, _ = group_by_prefix(seqs, min_prefix)
    return sum((len(m) - 1) * p for p, m in groups)
