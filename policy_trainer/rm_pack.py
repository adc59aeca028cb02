"""The reward model's fast training forward: a pair's prompt runs once, pairs are packed
instead of padded, and the head reads only the scored rows.

The plain forward (``rm_model.forward_heads``) scores 2m sequences padded to the longest: the
prompt, which chosen and rejected share, runs twice, and short sequences carry padding. Here
the m pairs of a micro-batch become a few packed rows:

- **a pair is one unit** ``prompt | chosen suffix | rejected suffix``: the prompt is the pair's
  longest common token prefix (whatever the recipe made of the text), run once. Positions
  restart after the prompt for the rejected suffix, and an attention mask (R, 1, L, L) lets
  each token see its own pair's prompt and its own suffix, causally, never the other suffix:
  every scored token sees exactly the tokens it sees alone;
- **tokens after a scored token are dropped**: causal attention means they change nothing
  (TRL's appended EOS when pad == eos, which HF's rule skips);
- **units are packed** first-fit-decreasing into rows, so short pairs share a row instead of
  carrying padding (the mask keeps units apart); the row length, from the longest unit to 4x
  it, is the one of least estimated compute (:func:`plan_rows`: longer rows leave fewer gaps,
  but attention costs more per token);
- **the scored rows only, from the last layer on**: the score head and the final norm run on
  the 2m scored rows, and so does the last layer but its keys and values (rm_scored_rows.py;
  its output elsewhere feeds nothing), as the server does.

The scores, losses and gradients are those of the plain forward (up to float rounding:
tests/policy_trainer/test_rm_pack.py compares them). Where that is not checked the plain forward
runs instead (:func:`unpackable` says why): an encoder or another family, attention other than
sdpa/eager (a 4D mask is what they take), a sliding window shorter than a sequence,
``token_type_ids``, FSDP2 (its hooks live on the root forward, which this bypasses).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from policy_trainer import lora, rm_scored_rows

# families whose backbone takes a 4D mask and position_ids as they are (masking_utils), checked
# against the plain forward in tests/policy_trainer/test_rm_pack.py
PACKABLE = frozenset({"llama", "qwen2", "qwen3", "mistral", "gpt2", "gpt_neox"})
ATTENTION = frozenset({"sdpa", "eager"})
WIDTHS = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0)  # row widths tried, as multiples of the longest unit


@dataclass(frozen=True)
class Packed:
    """A micro-batch of pairs as packed rows."""

    ids: torch.Tensor        # (R, L) long
    positions: torch.Tensor  # (R, L) long
    mask: torch.Tensor       # (R, 1, L, L) bool, True = attend
    chosen_at: torch.Tensor  # (m,) flat index into R*L of each chosen scored token
    rejected_at: torch.Tensor  # (m,)
    tokens: int              # real tokens (a pair's prompt counted once)
    slots: int               # R*L


def scored_index(seq: list[int], pad_id: int | None, position: str) -> int:
    """Where the model reads a sequence's score: HF's rule (the rightmost id != pad, 0 if
    none; the last token with no pad id), or the last token ("last", OpenRLHF's)."""
    if position == "last" or pad_id is None:
        return len(seq) - 1
    return next((i for i in range(len(seq) - 1, -1, -1) if seq[i] != pad_id), 0)


def split_pair(chosen: list[int], rejected: list[int], pad_id: int | None, position: str,
               share: bool = True) -> tuple[list[int], list[int], list[int]]:
    """(shared prompt, chosen suffix, rejected suffix): each sequence cut after its scored
    token, the prompt their longest common prefix less at least one token of each (none
    without ``share``)."""
    c = chosen[: scored_index(chosen, pad_id, position) + 1]
    r = rejected[: scored_index(rejected, pad_id, position) + 1]
    n, p = (min(len(c), len(r)) - 1) if share else 0, 0
    while p < n and c[p] == r[p]:
        p += 1
    return c[:p], c[p:], r[p:]


def first_fit(sizes: list[int], width: int) -> tuple[list[list[int]], int]:
    """(unit indices per row, the longest row's length): first fit decreasing into rows of
    ``width`` slots."""
    rows: list[list[int]] = []
    free: list[int] = []
    for u in sorted(range(len(sizes)), key=sizes.__getitem__, reverse=True):  # stable
        need, k = sizes[u], 0
        while k < len(free) and free[k] < need:  # the first row it fits
            k += 1
        if k == len(rows):
            rows.append([])
            free.append(width)
        rows[k].append(u)
        free[k] -= need
    return rows, width - min(free)


def plan_rows(sizes: list[int], hidden: int | None) -> tuple[list[list[int]], int]:
    """(unit indices per row, row length L). Rows as long as the longest unit leave the gaps
    of units of different lengths; longer rows fill them, but attention costs L per token.
    With the model's ``hidden`` size the widths of :data:`WIDTHS` are tried and the one of
    least estimated cost kept: R·L·(6H + L), a decoder layer's multiply-adds per token being
    about 12H² for the projections and MLP and 2H·L for attention (None: the longest unit)."""
    best = None
    for f in WIDTHS if hidden else WIDTHS[:1]:
        rows, length = first_fit(sizes, int(f * max(sizes)))
        cost = len(rows) * length * (6 * (hidden or 0) + length)
        if best is None or cost < best[0]:
            best = (cost, rows, length)
    return best[1], best[2]


def pack(chosen: list[list[int]], rejected: list[list[int]], pad_id: int | None,
         position: str = "last-non-pad", fill_id: int = 0, share: bool = True,
         hidden: int | None = None) -> Packed:
    """The m pairs as packed rows (module docstring); ``share`` False: each prompt twice (to
    measure what sharing pays); ``hidden``: for the row length (:func:`plan_rows`)."""
    units = [split_pair(c, r, pad_id, position, share) for c, r in zip(chosen, rejected)]
    sizes = [len(p) + len(c) + len(r) for p, c, r in units]
    rows, L = plan_rows(sizes, hidden)
    R = len(rows)
    ids, pos = [], []  # (R, L) each, built as lists: one tensor each
    chosen_at, rejected_at = [0] * len(units), [0] * len(units)
    causal = torch.ones(L, L, dtype=torch.bool).tril_()  # key at or before the query
    mask = torch.zeros(R, L, L, dtype=torch.bool)  # block by block, False between units
    for k, members in enumerate(rows):
        row_ids, row_pos = [], []
        for u in members:
            p, c, r = units[u]
            s, n, cut = len(row_ids), len(p) + len(c) + len(r), len(p) + len(c)
            chosen_at[u], rejected_at[u] = k * L + s + cut - 1, k * L + s + n - 1
            mask[k, s:s + n, s:s + n] = causal[:n, :n]
            mask[k, s + cut:s + n, s + len(p):s + cut] = False  # rejected never sees chosen
            row_ids += p + c + r
            row_pos += [*range(cut), *range(len(p), len(p) + len(r))]
        s = len(row_ids)
        mask[k, s:, s:].diagonal().fill_(True)  # a padding slot sees itself (no empty row)
        ids.append(row_ids + [fill_id] * (L - s))
        pos.append(row_pos + [0] * (L - s))
    ids, pos = torch.tensor(ids, dtype=torch.long), torch.tensor(pos, dtype=torch.long)
    return Packed(ids, pos, mask[:, None], torch.tensor(chosen_at), torch.tensor(rejected_at),
                  sum(sizes), R * L)


def _fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def unpackable(model: nn.Module, longest: int = 0) -> str | None:
    """Why the packed forward does not apply (None: it does); ``longest``: the longest sequence."""
    hf = lora.unwrap(model)
    config = hf.config
    text = config.get_text_config()
    if config.model_type not in PACKABLE:
        return f"model type {config.model_type!r} is not one checked for packing"
    attn = getattr(config, "_attn_implementation", None) or "eager"
    if attn not in ATTENTION:
        return f"attention {attn!r} takes no 4D mask"
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None) or ()
    sliding = any(t != "full_attention" for t in layer_types) or (
        config.model_type == "mistral" and window is not None)
    if sliding and (window is None or window < longest):
        return f"a sliding window ({window}) shorter than a sequence ({longest})"
    if not isinstance(getattr(hf, "score", None), nn.Module) or hf.base_model is hf:
        return "no score head on a backbone"
    if _fsdp(model):
        return "FSDP2 (its hooks are on the root forward)"
    return None


def forward_pairs(model: nn.Module, chosen: list[list[int]], rejected: list[list[int]],
                  device: torch.device, position: str, scored_rows: bool = True,
                  share: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected), each (m, K) fp32, of the packed forward (with grad if enabled).
    ``scored_rows``: the last layer (but its keys and values) and the final norm on the scored
    rows only (rm_scored_rows.py; not under gradient checkpointing, whose recomputation would
    run the layer on every row). The caller checks :func:`unpackable` first."""
    hf = lora.unwrap(model)
    pad_id = hf.config.get_text_config().pad_token_id
    p = pack(chosen, rejected, pad_id, position, share=share,
             hidden=hf.config.get_text_config().hidden_size)
    at = torch.cat([p.chosen_at, p.rejected_at]).to(device)  # (2m,)
    mask = p.mask.to(device)
    if getattr(hf.config, "_attn_implementation", None) != "sdpa":  # eager adds its mask
        mask = torch.zeros(mask.shape, device=device).masked_fill_(
            ~mask, torch.finfo(torch.float32).min)
    h = rm_scored_rows.scored_hidden(hf.base_model, p.ids.to(device), mask,
                                     p.positions.to(device), at,
                                     scored_rows and not _checkpointing(hf))  # (2m, H)
    r = hf.score(h).float()  # (2m, K)
    m = len(chosen)
    return r[:m], r[m:]


def _checkpointing(hf: nn.Module) -> bool:
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # new, old
        if hasattr(type(hf), name):
            return bool(getattr(hf, name))
    return False

