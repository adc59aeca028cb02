"""Scoring samples that share a token prefix: the prefix runs once, the suffixes against its
keys/values (the model's side of prefix-aware batching; which samples share what:
rm_server/prefix_plan.py).

For a group of k sequences sharing their first p tokens, ``ids[:p]`` runs once as a (1, P)
batch with a cache; then the k suffixes run right-padded as a (k, S) batch, their position ids
continuing from p, each suffix token attending to the prefix and to its own suffix up to it:
exactly what it sees in the full sequence, so the scores are those of the sequences run alone
(tested per family against HF's forward: tests/rm_server/test_model.py). Two ways:

- on the CPU (:func:`merged_attention`): no cache and no mask; each layer's attention is split
  into the k*S suffix queries against the one prefix and each suffix against itself, merged
  by log-sum-exp, so the prefix's keys/values are never copied k times (a model whose
  attention it does not compute, e.g. soft-capped or with sinks, is found on its first shared
  batch, logged, and takes the cache path from then on);
- elsewhere (another device, a sliding window shorter than the sequence): the prefix's cache
  viewed k times along the batch (``expand``: the cache's first update concatenates, the one
  copy it must make) and a mask over prefix + suffix.

transformers renamed the forward's ``past_key_values`` to ``cache`` (the old name warns, and
goes in 5.40); :func:`cache_keyword` reads the backbone's signature and passes whichever it
takes, and reads the returned cache under the same name.
"""

from __future__ import annotations

import inspect
import logging
import threading

import torch
from torch import nn

log = logging.getLogger("rm_server")


def cache_keyword(backbone: nn.Module) -> str:
    """``cache`` if the backbone's forward takes it (transformers >= 5.2x), else the old name."""
    params = inspect.signature(backbone.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def expand_cache(cache, k: int) -> None:
    """View a batch-1 cache as ``k`` rows without copying where the cache class allows it
    (transformers' dynamic layers, which concatenate on update); else repeat it (a copy)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers and all(isinstance(layer, DynamicLayer) for layer in layers):
        for layer in layers:
            if layer.keys is not None and layer.keys.numel():
                layer.keys = layer.keys.expand(k, -1, -1, -1)  # (k, H, P, D), a view
                layer.values = layer.values.expand(k, -1, -1, -1)
        return
    cache.batch_repeat_interleave(k)


def score_shared(rm, seqs: list[list[int]], p: int, index: list[int]) -> torch.Tensor:
    """Head scores (k, K) of ``seqs``, which share their first ``p`` tokens; ``index``: each
    one's scored position (>= p). ``rm``: a last-token :class:`rm_server.model.RewardModel`."""
    k, device, kw = len(seqs), rm.device, rm.cache_keyword
    prefix = torch.tensor([seqs[0][:p]], device=device)  # (1, P)
    with rm._scored_rows(None):  # only the prefix's keys/values are read
        out = rm._backbone(input_ids=prefix, use_cache=True)
    cache = getattr(out, kw)
    ids, suffix_mask, _ = (x.to(device) for x in rm.collate([s[p:] for s in seqs]))
    s_len = ids.shape[1]
    positions = torch.arange(p, p + s_len, device=device).expand(k, s_len)  # (k, S)
    rows = torch.tensor([i - p for i in index], device=device)  # (k,) in the suffix
    kv = (prefix_kv(cache, rm._backbone.config, p + s_len)
          if getattr(rm, "merged_prefix_attention", True) else None)
    hidden = None
    if kv is not None:  # the suffixes attend to the prefix's keys/values as they are
        try:
            hidden = _suffixes_merged(rm, ids, positions, rows, kv)
        except MergeUnsupported as e:  # this model's attention: the cache path from now on
            log.warning("prefix sharing: %s; the prefix's cache is passed instead", e)
            rm.merged_prefix_attention = False
    if hidden is None:
        expand_cache(cache, k)
        mask = torch.cat([torch.ones(k, p, dtype=suffix_mask.dtype, device=device),
                          suffix_mask], dim=1)  # (k, P + S)
        with rm._scored_rows(rows):
            hidden = rm._backbone(input_ids=ids, attention_mask=mask, position_ids=positions,
                                  use_cache=True, **{kw: cache}).last_hidden_state  # (k, S, H)
    return rm._head_on_rows(hidden, rows)  # (k, K)


# -- the suffixes against the prefix without k copies of it (CPU) ----------------------------
# Attention over [prefix | own suffix] is split in two and merged by log-sum-exp (as flash
# attention merges its blocks): all k*S suffix queries against the one prefix (1, H, P, D), no
# mask, as a single (1, H, k*S, D) batch; each suffix against itself, causal (right padding
# follows the real tokens, so causal alone keeps them out). No cache, no mask and no k copies
# of the prefix; torch's CPU flash kernel returns the log-sum-exp the merge needs.
PREFIX_ATTENTION = "rm_prefix_merge"
_active = threading.local()  # .kv: the prefix's keys/values per layer while suffixes run; .calls
# what the merge does not compute: logit soft-capping (Gemma 2), attention sinks (gpt-oss...)
_UNSUPPORTED = ("softcap", "s_aux", "sinks")


class MergeUnsupported(Exception):
    """The model's attention is not what :func:`merged_attention` computes: a layer with its
    own attention code, or soft-capping or sinks. Raised before any score is returned; the
    caller falls back to the cache path (exact for every family)."""


def prefix_kv(cache, config, total: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Each layer's prefix (keys, values), (1, H_kv, P, D), when the merged path applies: on
    the CPU, a dynamic cache, no sliding window shorter than the sequence; else None."""
    from transformers.cache_utils import DynamicLayer

    window = getattr(config, "sliding_window", None)
    layers = getattr(cache, "layers", None)
    if (not layers or (window is not None and window < total)
            or not all(type(layer) is DynamicLayer and layer.keys is not None
                       and layer.keys.device.type == "cpu" for layer in layers)):
        return None
    return [(layer.keys, layer.values) for layer in layers]


def _suffixes_merged(rm, ids, positions, rows, kv) -> torch.Tensor:
    """Hidden states (k, S, H) of the suffixes, their attention merged with the prefix's."""
    config = rm._backbone.config
    before, calls = config._attn_implementation, len(kv)
    _active.kv, _active.calls = kv, 0
    config._attn_implementation = PREFIX_ATTENTION
    try:
        with rm._scored_rows(rows):
            hidden = rm._backbone(input_ids=ids, position_ids=positions,
                                  use_cache=False).last_hidden_state  # (k, S, H)
        calls = _active.calls
    finally:
        config._attn_implementation = before
        _active.kv = None
    if calls != len(kv):  # a layer that did not take the merged attention: never silently
        raise MergeUnsupported(f"the merged prefix attention ran in {calls} of {len(kv)} "
                               "layers")
    return hidden


def merged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     **kwargs):
    """transformers' attention interface: (k, H, S, D) suffix queries against the active
    prefix's keys/values and their own (causal); returns (k, S, H, D) and no weights.

    With o1, lse1 the attention output and log-sum-exp of the scores over the prefix, o2, lse2
    over the suffix: ``out = (e^lse1 * o1 + e^lse2 * o2) / (e^lse1 + e^lse2)``, i.e. the softmax
    over prefix + suffix, computed in fp32 as ``o1 * e^(lse1 - lse) + o2 * e^(lse2 - lse)``.
    """
    from transformers.integrations.sdpa_attention import repeat_kv

    if extra := [name for name in _UNSUPPORTED if kwargs.get(name) is not None]:
        raise MergeUnsupported(f"the attention of {type(module).__name__} uses {extra}")
    _active.calls += 1
    pk, pv = _active.kv[module.layer_idx]  # (1, H_kv, P, D)
    k, h, s, d = query.shape
    groups = h // key.shape[1]
    pk, pv, key, value = (repeat_kv(x, groups) for x in (pk, pv, key, value))  # H_kv -> H
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    q_all = query.transpose(0, 1).reshape(1, h, k * s, d)  # (1, H, k*S, D)
    o1, lse1 = flash(q_all, pk, pv, 0.0, False, scale=scaling)[:2]  # (1, H, kS, D), (1, H, kS)
    o2, lse2 = flash(query, key, value, 0.0, True, scale=scaling)[:2]  # (k, H, S, D), (k, H, S)
    o1 = o1.reshape(h, k, s, d).transpose(0, 1)  # (k, H, S, D)
    lse1 = lse1.reshape(h, k, s).transpose(0, 1)  # (k, H, S)
    lse = torch.logaddexp(lse1, lse2)
    out = (o1.float() * (lse1 - lse).exp().unsqueeze(-1)
           + o2.float() * (lse2 - lse).exp().unsqueeze(-1)).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None  # (k, S, H, D)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PREFIX_ATTENTION, merged_attention)


_register()
