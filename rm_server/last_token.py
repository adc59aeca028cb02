"""The last-token surgery: what lets a decoder RM's head run on B rows instead of B*T.

HF's ``*ForSequenceClassification`` runs the final norm and the score head over every position,
then keeps one row per sequence: the rightmost token whose id != pad_token_id (with no pad id,
the last token). These pieces let :class:`rm_server.model.RewardModel` compute that row itself
and skip the rest:

- :func:`last_token_index`: HF's rule on one unpadded sequence;
- :func:`prefix_groups`: samples of a batch sharing a long token prefix (k responses to one
  prompt), whose prefix runs once;
- :class:`ScoredRowsMLP` and :func:`last_layer_mlp`: the last decoder layer's MLP on the scored
  rows only (its output at any other position feeds nothing);
- :class:`FinalNorm` and :func:`describe_norm`: the backbone's final norm, detached so
  ``kernels.last_token_score`` applies it to the scored rows.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from rm_server.prefix_plan import group_by_prefix


def last_token_index(ids: list[int], pad_token_id: int | None) -> int:
    """HF's rule on one unpadded sequence: the rightmost id != pad (0 if none); else the last."""
    if pad_token_id is None:
        return len(ids) - 1
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] != pad_token_id:
            return i
    return 0


def prefix_groups(seqs: list[list[int]], pad_token_id: int | None, min_prefix: int
                  ) -> tuple[list[tuple[int, list[int]]], list[int]]:
    """Split a batch into groups sharing a token prefix of >= ``min_prefix`` tokens, and the rest.

    Each group is (shared length p, member indices), k >= 2; p is the group's longest common
    prefix, cut so every member keeps its scored token (and at least one token) after it. The
    rule is the batching policy's (rm_server/prefix_plan.py), with HF's scored token.
    """
    return group_by_prefix(seqs, min_prefix,
                           [last_token_index(s, pad_token_id) for s in seqs])


class ScoredRowsMLP:
    """Runs the last decoder layer's position-wise MLP on the scored rows only.

    Installed over the MLP's ``forward`` (weights and state-dict keys untouched). Outside
    :meth:`rows` it is the plain MLP. Inside, it gathers row ``index[b]`` of every sequence,
    runs the MLP on those B rows and returns zeros elsewhere (those outputs feed nothing);
    ``index=None`` (a shared prefix, whose last-layer output is never read) skips it. It holds
    the MLP weakly: the MLP holds it (its ``forward``), and a reference cycle would keep the
    MLP's weights alive after the model is dropped (an unloaded version) until a full garbage
    collection.
    """

    _ALL = object()

    def __init__(self, mlp: nn.Module):
        original = mlp.forward
        if getattr(original, "__self__", None) is mlp:  # a bound method: keep its function
            self._mlp, self._forward = weakref.ref(mlp), original.__func__
        else:  # a forward already replaced on the instance: call it as it is
            self._mlp, self._forward = None, original
        self.index = self._ALL
        mlp.forward = self.forward

    def mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(self._mlp(), x) if self._mlp is not None else self._forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.index is self._ALL:
            return self.mlp_forward(x)
        out = torch.zeros_like(x)
        if self.index is not None:
            b = torch.arange(x.shape[0], device=x.device)
            out[b, self.index] = self.mlp_forward(x[b, self.index])
        return out

    @contextmanager
    def rows(self, index: torch.Tensor | None):
        self.index = index
        try:
            yield
        finally:
            self.index = self._ALL


def last_layer_mlp(backbone: nn.Module) -> nn.Module | None:
    """The MLP of a decoder backbone's last layer (``layers`` or GPT-2's ``h``), if any."""
    for attr in ("layers", "h"):
        layers = getattr(backbone, attr, None)
        if isinstance(layers, nn.ModuleList) and len(layers):
            mlp = getattr(layers[-1], "mlp", None)
            return mlp if isinstance(mlp, nn.Module) else None
    return None


@dataclass(frozen=True)
class FinalNorm:
    """What ``kernels.last_token_score`` needs to apply the backbone's final norm to one row."""

    kind: str  # "rms" | "layer"
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float


def describe_norm(module: nn.Module) -> FinalNorm | None:
    """The final norm as (kind, weight, bias, eps), or None if it is not a plain RMS/LayerNorm."""
    if isinstance(module, nn.LayerNorm):
        return FinalNorm("layer", module.weight, module.bias, float(module.eps))
    name = type(module).__name__
    # Llama/Qwen/Mistral RMSNorm: weight * x / rms(x). Gemma's (1 + weight) variant is excluded.
    if name.endswith("RMSNorm") and "Gemma" not in name and hasattr(module, "weight"):
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if eps is not None:
            return FinalNorm("rms", module.weight, None, float(eps))
    return None
