"""Scoring samples that share a token prefix: the prefix runs once, the suffixes against its
keys/values (the model's side of prefix-aware batching; which samples share what:
rm_server/prefix_plan.py).

For a group of k sequences sharing their first p tokens, ``ids[:p]`` runs once as a (1, P)
batch with a cache; its keys/values are then viewed k times along the batch dimension
(``expand``: no copy; the cache's first update concatenates the suffix's keys/values and makes
the one copy it must), and the k suffixes run right-padded as a (k, S) batch against them, their
position ids continuing from p and their attention mask covering prefix + suffix. Each suffix
token then sees exactly what it sees in the full sequence, so the scores are those of the
sequences run alone (tested per family against HF's forward: tests/rm_server/test_model.py).

transformers renamed the forward's ``past_key_values`` to ``cache`` (the old name warns, and
goes in 5.40); :func:`cache_keyword` reads the backbone's signature and passes whichever it
takes, and reads the returned cache under the same name.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn


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
    expand_cache(cache, k)
    ids, suffix_mask, _ = (x.to(device) for x in rm.collate([s[p:] for s in seqs]))
    s_len = ids.shape[1]
    mask = torch.cat([torch.ones(k, p, dtype=suffix_mask.dtype, device=device),
                      suffix_mask], dim=1)  # (k, P + S)
    positions = torch.arange(p, p + s_len, device=device).expand(k, s_len)  # (k, S)
    rows = torch.tensor([i - p for i in index], device=device)  # (k,) in the suffix
    with rm._scored_rows(rows):
        hidden = rm._backbone(input_ids=ids, attention_mask=mask, position_ids=positions,
                              use_cache=True, **{kw: cache}).last_hidden_state  # (k, S, H)
    return rm._head_on_rows(hidden, rows)  # (k, K)
