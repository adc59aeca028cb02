"""Reward heads: a model with ``num_labels = K`` scores K heads per sample (multi-objective RMs
such as ArmoRM's, or an ensemble's members); ``reward`` is one aggregation of them.

- :func:`head_names`: the heads' names from ``config.id2label`` (``LABEL_k`` when unnamed);
- :func:`choose_aggregation`: the aggregation the flags ask for: ``--reward-head NAME`` (one
  head), ``--head-weights a=0.7,b=0.3`` (a weighted sum), ``--reward-aggregation
  {mean,min,uwo}`` over the heads; by default an ensemble's own (config.json
  ``reward_ensemble``, written by ``rm-server train --ensemble K``), else the first head (what
  TRL GRPO's in-process RM reads: ``logits[:, 0]``);
- :func:`aggregate`: the one pure function from head scores (B, K) to rewards (B,): weighted,
  or over an ensemble's members ``mean``, ``min`` (worst case) and ``uwo`` = mean − λ·std
  (uncertainty-weighted; Coste et al. 2023), std with 1/K (rm_client/ensemble.py, the
  client's side, computes the same); :meth:`Aggregation.asked` is a request's own;
- :func:`rewards_with_heads`: a batch's rewards and every sample's head scores, which travel
  through the batcher as ``rm_server.batch_policy.Scored`` results; :func:`head_stats` their
  mean and std, which every result carries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

MEMBER_KINDS = ("mean", "min", "uwo")


@dataclass(frozen=True)
class Aggregation:
    """reward = sum_k weights[k] * score_k over the heads ``names`` (kind "weighted"), or the
    heads' mean, min, or mean − coef·std (kinds "mean", "min", "uwo")."""

    names: tuple[str, ...]
    weights: tuple[float, ...]
    kind: str = "weighted"
    coef: float = 1.0  # λ of "uwo"
    members: int = 0  # an ensemble's members (config.json reward_ensemble); 0: not one

    def describe(self) -> str:
        """E.g. "helpfulness", "0.7*helpfulness + 0.3*safety", "mean - 1*std of 5 heads"."""
        if self.kind != "weighted":
            what = {"mean": "mean", "min": "min", "uwo": f"mean - {self.coef:g}*std"}[self.kind]
            return f"{what} of {len(self.names)} heads"
        used = [(w, n) for w, n in zip(self.weights, self.names) if w != 0.0]
        if len(used) == 1 and used[0][0] == 1.0:
            return used[0][1]
        return " + ".join(f"{w:g}*{n}" for w, n in used)

    def asked(self, kind: str, coef: float | None = None) -> Aggregation:
        """A request's own aggregation over these heads (``coef`` None: this one's λ)."""
        if len(self.names) < 2:
            raise ValueError("kind: the model has one head; there is nothing to aggregate")
        return replace(self, kind=_member_kind(kind), coef=_coef(self.coef if coef is None
                                                                 else coef))


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


def _member_kind(kind: str) -> str:
    if kind not in MEMBER_KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {', '.join(MEMBER_KINDS)}")
    return kind


def _coef(coef: float) -> float:
    if not (math.isfinite(coef) and coef >= 0):
        raise ValueError(f"uncertainty_coef: {coef!r} must be a number >= 0")
    return float(coef)


def choose_aggregation(names: tuple[str, ...], reward_head: str | None = None,
                       head_weights: str | None = None, kind: str | None = None,
                       coef: float | None = None, ensemble: dict | None = None) -> Aggregation:
    """The aggregation the flags ask for (``kind``, ``coef``: --reward-aggregation,
    --uncertainty-coef); with none, an ``ensemble``'s own (config.json ``reward_ensemble``),
    else the first head."""
    if sum(map(bool, (reward_head, head_weights, kind))) > 1:
        raise ValueError("give one of --reward-head, --head-weights and --reward-aggregation, "
                         "not both")
    members = int((ensemble or {}).get("members", 0))
    if kind is None and not (reward_head or head_weights):
        kind = (ensemble or {}).get("aggregation")  # the ensemble's own default
    if kind:
        if len(names) < 2:
            raise ValueError(f"--reward-aggregation {kind}: the model has one head")
        stored = (ensemble or {}).get("uncertainty_coef", 1.0)
        try:
            return Aggregation(names, (1 / len(names),) * len(names), _member_kind(kind),
                               _coef(stored if coef is None else coef), members)
        except ValueError as e:
            raise ValueError(f"--reward-aggregation: {e}") from None
    if head_weights:
        weights = parse_weights(head_weights)
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise ValueError(f"--head-weights: no head named {unknown[0]!r} "
                             f"(heads: {', '.join(names)})")
        return Aggregation(names, tuple(weights.get(n, 0.0) for n in names), members=members)
    if reward_head is not None and reward_head not in names:
        raise ValueError(f"--reward-head: no head named {reward_head!r} "
                         f"(heads: {', '.join(names)})")
    chosen = names.index(reward_head) if reward_head is not None else 0
    return Aggregation(names, tuple(1.0 if k == chosen else 0.0 for k in range(len(names))),
                       members=members)


def heads_of(config, num_labels: int, reward_head: str | None = None,
             head_weights: str | None = None,
             reward_aggregation: tuple[str | None, float | None] = (None, None)) -> Aggregation:
    """:func:`choose_aggregation` for a loaded model's ``config`` (head names from id2label,
    the ensemble's own aggregation from ``reward_ensemble``)."""
    ensemble = getattr(config, "reward_ensemble", None)
    return choose_aggregation(head_names(config.id2label, num_labels), reward_head,
                              head_weights, *reward_aggregation,
                              ensemble if isinstance(ensemble, dict) else None)


def aggregate(scores: torch.Tensor, how: Aggregation) -> torch.Tensor:
    """Rewards (B,) fp32 from head scores (B, K)."""
    scores = scores.float()
    if how.kind == "weighted":
        weights = torch.tensor(how.weights, dtype=torch.float32, device=scores.device)  # (K,)
        return scores @ weights  # (B,)
    if how.kind == "mean":
        return scores.mean(1)
    if how.kind == "min":
        return scores.min(1).values
    if how.kind == "uwo":  # Coste et al. 2023: mean − λ·std over the members (1/K)
        return scores.mean(1) - how.coef * scores.std(1, correction=0)
    raise ValueError(f"unknown aggregation {how.kind!r}")


def aggregate_one(heads: tuple[float, ...], how: Aggregation) -> float:
    """One sample's reward from its head scores, as :func:`aggregate` makes a batch's."""
    if how.kind == "weighted":
        return math.fsum(w * h for w, h in zip(how.weights, heads))
    mean, std = head_stats(heads)
    return {"mean": mean, "min": min(heads), "uwo": mean - how.coef * std}[how.kind]


def head_stats(heads: tuple[float, ...]) -> tuple[float, float]:
    """(mean, std with 1/K) of one sample's head scores; (0, 0) for a one-head model."""
    if not heads:
        return 0.0, 0.0
    mean = math.fsum(heads) / len(heads)
    return mean, math.sqrt(math.fsum((h - mean) ** 2 for h in heads) / len(heads))


def rewards_with_heads(scores: torch.Tensor, how: Aggregation
                       ) -> tuple[list[float], list[tuple[float, ...]]]:
    """Rewards (B,) and each sample's head scores from head scores (B, K): empty tuples for a
    one-head model. One device->host copy."""
    host = scores.float().cpu()  # (B, K): the batch's one sync
    if host.shape[1] == 1 and how.weights == (1.0,):
        return host[:, 0].tolist(), [()] * host.shape[0]
    return aggregate(host, how).tolist(), [tuple(h) for h in host.tolist()]
