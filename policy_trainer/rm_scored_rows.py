"""The packed forward's last layer and final norm on the scored rows only (rm_pack.py).

A reward model reads one hidden state per sequence, the scored token's. Past the last layer's
keys and values (every scored token attends to its own tokens) nothing at any other position
feeds a score, so from the last layer on only the scored rows need computing:

- **the Llama family's layer** (llama, qwen2, qwen3, mistral: :func:`direct_layer`) runs
  here, from the layer's own modules: its input norm, keys and values at every position, its
  queries (with their rotary angles and qwen3's head norm), attention, output projection,
  residuals and MLP on the scored rows only (:func:`layer_on_rows`); the backbone runs up to
  the layer's input (:func:`input_of`);
- **other layers** (GPT-2, GPT-NeoX) run as they are with two parts swapped for the scored
  rows: an attention function of transformers' interface that computes the scored queries
  only (:func:`_scored_attention`) and the MLP on those rows (:class:`_RowsMLP`); their
  outputs elsewhere are zeros that feed nothing;
- **the final norm** (position-wise) runs on the scored rows after the layer.

Scores, losses and gradients are those of the full forward up to float rounding
(tests/policy_trainer/test_rm_pack.py, per family).
"""

from __future__ import annotations

import copy
import sys
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

DIRECT = frozenset({"llama", "qwen2", "qwen3", "mistral"})  # layers layer_on_rows reproduces


def scored_hidden(backbone: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                  positions: torch.Tensor, at: torch.Tensor, rows_only: bool) -> torch.Tensor:
    """The backbone's final hidden states (after its final norm) at the flat positions ``at``
    of (R, L): (S, H). ``rows_only``: from the last layer on, the scored rows only."""
    def run() -> torch.Tensor:
        return backbone(input_ids=ids, attention_mask=mask, position_ids=positions,
                        use_cache=False).last_hidden_state  # (R, L, H)

    if not rows_only:
        h = run()
        return h.reshape(-1, h.shape[-1])[at]
    layer, norm = last_layer(backbone), final_norm(backbone)
    if norm is not None:  # the backbone returns its last layer's output; the norm comes after
        norm.forward = _identity
    try:
        if direct_layer(backbone, layer):
            with input_of(layer) as seen:
                run()
            h = layer_on_rows(layer, seen["hidden"], seen["position_embeddings"], mask, at)
        else:
            with last_layer_on_rows(backbone, at, *ids.shape):
                h = run()
            h = h.reshape(-1, h.shape[-1])[at]  # (S, H)
    finally:
        if norm is not None:
            del norm.forward
    return norm(h) if norm is not None else h


def direct_layer(backbone: nn.Module, layer: nn.Module | None) -> bool:
    """Whether :func:`layer_on_rows` reproduces ``layer``: a Llama-family decoder layer."""
    attn = getattr(layer, "self_attn", None)
    return (getattr(backbone.config, "model_type", None) in DIRECT and attn is not None
            and all(isinstance(getattr(layer, n, None), nn.Module)
                    for n in ("input_layernorm", "post_attention_layernorm", "mlp"))
            and all(isinstance(getattr(attn, n, None), nn.Module)
                    for n in ("q_proj", "k_proj", "v_proj", "o_proj")))


@contextmanager
def input_of(layer: nn.Module):
    """Within: ``layer`` returns its input unchanged and records it (``hidden``) with its
    ``position_embeddings`` in the dict yielded."""
    seen: dict = {}

    def record(hidden_states, *args, **kwargs):
        seen["hidden"], seen["position_embeddings"] = hidden_states, kwargs["position_embeddings"]
        return hidden_states

    layer.forward = record
    try:
        yield seen
    finally:
        del layer.forward


def layer_on_rows(layer: nn.Module, h: torch.Tensor, position_embeddings, mask: torch.Tensor,
                  at: torch.Tensor) -> torch.Tensor:
    """A Llama-family decoder layer's output at the flat positions ``at`` of its input ``h``
    (R, L, H): (S, H) in the order of ``at``. Keys and values at every position; queries,
    attention, output projection, residuals and MLP at those rows only. ``mask`` (R, 1, L, L):
    bool (True = attend) or additive; ``position_embeddings``: (cos, sin), each (R, L, d)."""
    attn = layer.self_attn
    R, L, H = h.shape
    d = attn.head_dim
    qidx, src, dest = query_slots(at, R, L)  # (R, Q), (S,), (S,)
    rows = torch.arange(R, device=h.device)[:, None]
    x = layer.input_layernorm(h)  # (R, L, H)
    q = attn.q_proj(x[rows, qidx]).view(R, qidx.shape[1], -1, d)  # (R, Q, h, d)
    k = attn.k_proj(x).view(R, L, -1, d)  # (R, L, kv, d)
    v = attn.v_proj(x).view(R, L, -1, d).transpose(1, 2)  # (R, kv, L, d)
    if hasattr(attn, "q_norm"):  # qwen3: RMSNorm over each head
        q, k = attn.q_norm(q), attn.k_norm(k)
    rotate_half = sys.modules[type(attn).__module__].rotate_half  # the family's own
    cos, sin = position_embeddings
    cq, sq = cos[rows, qidx][:, None], sin[rows, qidx][:, None]  # (R, 1, Q, d)
    q = q.transpose(1, 2)  # (R, h, Q, d)
    q = q * cq + rotate_half(q) * sq
    k = k.transpose(1, 2)  # (R, kv, L, d)
    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    heads = q.shape[1]
    if k.shape[1] != heads:  # grouped-query attention
        k = k.repeat_interleave(heads // k.shape[1], 1)
        v = v.repeat_interleave(heads // v.shape[1], 1)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask[rows, 0, qidx][:, None], scale=attn.scaling,
        dropout_p=attn.attention_dropout if attn.training else 0.0)  # (R, h, Q, d)
    out = out.transpose(1, 2).reshape(-1, heads * d)[src]  # (S, h*d), in the order of dest
    y = h.reshape(-1, H)[dest] + attn.o_proj(out)  # (S, H)
    y = y + layer.mlp(layer.post_attention_layernorm(y))
    back = torch.empty_like(dest)
    back[at.argsort()] = torch.arange(len(at), device=at.device)  # at[i] == dest[back[i]]
    return y[back]


def _identity(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return x


def final_norm(backbone: nn.Module) -> nn.Module | None:
    """The backbone's final norm (``norm``; GPT-2's ``ln_f``; GPT-NeoX's ``final_layer_norm``):
    position-wise, so it can run on the scored rows alone."""
    for name in ("norm", "ln_f", "final_layer_norm"):
        m = getattr(backbone, name, None)
        if isinstance(m, nn.Module) and "Norm" in type(m).__name__:
            return m
    return None



SCORED_ATTENTION = "rm_pack_scored_rows"  # registered with transformers' AttentionInterface


def _scored_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      **kwargs):
    """An attention function of transformers' interface that computes the scored queries only:
    query (R, h, L, d), key and value (R, kv, L, d), the 4D mask; returns (R, L, h, d), zeros
    at every other position (they feed nothing), and no weights. Each row's scored queries
    (at most Q) attend to that row's keys: (R, h, Q, L) scores instead of (R, h, L, L)."""
    qidx, src, dest = module._rm_pack_rows
    R, h, L, d = query.shape
    rows = torch.arange(R, device=query.device)[:, None]
    q = query[rows, :, qidx].transpose(1, 2)  # (R, h, Q, d)
    if key.shape[1] != h:  # grouped-query attention
        key = key.repeat_interleave(h // key.shape[1], 1)
        value = value.repeat_interleave(h // value.shape[1], 1)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, key, value, attn_mask=attention_mask[rows, 0, qidx][:, None], dropout_p=dropout,
        scale=scaling)  # (R, h, Q, d)
    out = out.transpose(1, 2).reshape(-1, h, d)[src]  # (S, h, d)
    return query.new_zeros(R * L, h, d).index_copy(0, dest, out).view(R, L, h, d), None


def query_slots(at: torch.Tensor, rows: int, length: int):
    """The scored positions ``at`` (flat into (rows, length)) by row: (qidx (rows, Q): each
    row's scored positions, padded with 0; src (S,): each one's slot in the flattened
    (rows, Q); dest (S,): its flat position), both in the order of ``dest``."""
    dest, _ = at.sort()
    b = torch.div(dest, length, rounding_mode="floor")
    counts = torch.bincount(b, minlength=rows)
    slot = torch.arange(len(dest), device=at.device) - (counts.cumsum(0) - counts)[b]
    qidx = torch.zeros(rows, int(counts.max()), dtype=torch.long, device=at.device)
    qidx[b, slot] = dest - b * length
    return qidx, b * qidx.shape[1] + slot, dest


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(SCORED_ATTENTION, _scored_attention)


def last_layer(backbone: nn.Module) -> nn.Module | None:
    """A decoder backbone's last layer (``layers``; GPT-2's ``h``), if any."""
    for attr in ("layers", "h"):
        layers = getattr(backbone, attr, None)
        if isinstance(layers, nn.ModuleList) and len(layers):
            return layers[-1]
    return None


def _attention_of(layer: nn.Module) -> nn.Module | None:
    """The layer's self-attention: the child with a ``config`` whose class ends in Attention."""
    return next((m for m in layer.children() if type(m).__name__.endswith("Attention")
                 and hasattr(m, "config")), None)


@contextmanager
def last_layer_on_rows(backbone: nn.Module, at: torch.Tensor, rows: int, length: int):
    """Within: the backbone's last layer computes its output at the flat positions ``at`` of
    (R, L) only (its keys and values still at every position): attention for those queries
    (:func:`_scored_attention`, through a copy of the attention module's config naming it) and
    the MLP on those rows (:class:`_RowsMLP`). Its output elsewhere is the input plus zeros,
    which the head never reads."""
    layer = last_layer(backbone)
    attn = _attention_of(layer) if layer is not None else None
    mlp = _RowsMLP.of(getattr(layer, "mlp", None))
    config = None
    if attn is not None:
        _register()
        config = copy.copy(attn.config)  # its own: the model's config is shared by every layer
        config.__dict__["_attn_implementation_internal"] = SCORED_ATTENTION
        config, attn.config = attn.config, config
        attn._rm_pack_rows = query_slots(at, rows, length)
    try:
        with mlp.rows(at) if mlp is not None else nullcontext():
            yield
    finally:
        if config is not None:
            attn.config = config
            del attn._rm_pack_rows


class _RowsMLP:
    """The last decoder layer's MLP on the scored rows only, within :meth:`rows`: it runs on
    those rows of the flattened (R*L, H) input and returns zeros elsewhere (the last layer's
    output at any other position feeds nothing that is scored). Installed over the MLP
    instance's ``forward`` (weights, state-dict keys and LoRA layers untouched); held by the
    MLP, holding its original forward."""

    def __init__(self, mlp: nn.Module):
        self.original = mlp.forward
        self.at: torch.Tensor | None = None
        mlp.forward = self.forward

    @classmethod
    def of(cls, mlp: nn.Module | None) -> _RowsMLP | None:
        if mlp is None:
            return None
        if not isinstance(getattr(mlp, "_rows_mlp", None), cls):
            mlp._rows_mlp = cls(mlp)
        return mlp._rows_mlp

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.at is None:
            return self.original(x, *args, **kwargs)
        flat = x.reshape(-1, x.shape[-1])
        y = self.original(flat[self.at], *args, **kwargs)  # (S, H)
        return flat.new_zeros(flat.shape[0], y.shape[-1]).index_copy(0, self.at, y).view(
            *x.shape[:-1], y.shape[-1])

    @contextmanager
    def rows(self, at: torch.Tensor):
        self.at = at
        try:
            yield
        finally:
            self.at = None
