"""Reward heads: a model with ``num_labels = K`` scores K heads per sample (multi-objective RMs
such as ArmoRM's, or an ensemble's members); ``reward`` is one aggregation of them.

- :func:`head_names`: the heads' names from ``config.id2label`` (``LABEL_k`` when unnamed);
- :func:`choose_aggregation`: the aggregation the flags ask for: ``--reward-head NAME`` (one
  head), ``--head-weights a=0.7,b=0.3`` (a weighted sum), or by default the first head (what
  TRL GRPO's in-process RM reads: ``logits[:, 0]``);
- :func:`aggregate`: the one pure function from head scores (B, K) to rewards (B,); other
  kinds (mean, min, mean - k*std over an ensemble's heads) are more branches of it;
- :func:`rewards_with_heads`: a batch's rewards and every sample's head scores, which travel
  through the batcher as ``rm_server.batch_policy.Scored`` results.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Aggregation:
    """reward = sum_k weights[k] * score_k over the heads ``names`` (kind "weighted")."""

    names: tuple[str, ...]
    weights: tuple[float, ...]
    kind: str = "weighted"

    def describe(self) -> str:
        """E.g. "helpfulness" or "0.7*helpfulness + 0.3*safety"."""
        used = [(w, n) for w, n in zip(self.weights, self.names) if w != 0.0]
        if len(used) == 1 and used[0][0] == 1.0:
            return used[0][1]
        return " + ".join(f"{w:g}*{n}" for w, n in used)


def head_names(id2label: dict | None, num_labels: int) -> tuple[str, ...]:
    """The K heads' names in output order; ``LABEL_k`` for heads without one."""
    labels = {int(k): str(v) for k, v in (id2label or {}).items()}
    return tuple(labels.get(k, f"LABEL_{k}") for k in range(num_labels))


def parse_weights(spec: str) -> dict[str, float]:
    """"a=0.7,b=0.3" -> {"a": 0.7, "b": 0.3}."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--head-weights: {part!r} is not NAME=WEIGHT") from None
    if not out:
        raise ValueError("--head-weights: no NAME=WEIGHT given")
    return out


def choose_aggregation(names: tuple[str, ...], reward_head: str | None = None,
                       head_weights: str | None = None) -> Aggregation:
    """The aggregation the flags ask for (the first head when they ask for none)."""
    if reward_head and head_weights:
        raise ValueError("give --reward-head or --head-weights, not both")
    if head_weights:
        weights = parse_weights(head_weights)
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise ValueError(f"--head-weights: no head named {unknown[0]!r} "
                             f"(heads: {', '.join(names)})")
        return Aggregation(names, tuple(weights.get(n, 0.0) for n in names))
    if reward_head is not None and reward_head not in names:
        raise ValueError(f"--reward-head: no head named {reward_head!r} "
                         f"(heads: {', '.join(names)})")
    chosen = names.index(reward_head) if reward_head is not None else 0
    return Aggregation(names, tuple(1.0 if k == chosen else 0.0 for k in range(len(names))))


def aggregate(scores: torch.Tensor, how: Aggregation) -> torch.Tensor:
    """Rewards (B,) fp32 from head scores (B, K)."""
    if how.kind == "weighted":
        weights = torch.tensor(how.weights, dtype=torch.float32, device=scores.device)  # (K,)
        return scores.float() @ weights  # (B,)
    raise ValueError(f"unknown aggregation {how.kind!r}")


def rewards_with_heads(scores: torch.Tensor, how: Aggregation
                       ) -> tuple[list[float], list[tuple[float, ...]]]:
    """Rewards (B,) and each sample's head scores from head scores (B, K): empty tuples for a
    one-head model. One device->host copy."""
    host = scores.float().cpu()  # (B, K): the batch's one sync
    if host.shape[1] == 1 and how.weights == (1.0,):
        return host[:, 0].tolist(), [()] * host.shape[0]
    return aggregate(host, how).tolist(), [tuple(h) for h in host.tolist()]
