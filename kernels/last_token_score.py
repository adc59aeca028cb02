"""Last-token scoring: gather the scored row, apply the final norm to it, apply the score head.

Math, for each sequence b with scored position i_b (the last non-pad token):

    x_b = h[b, i_b, :]                                     # (H,)
    RMSNorm:   n_b = x_b / sqrt(mean(x_b^2) + eps) * w       (Llama, Qwen2, Mistral)
    LayerNorm: n_b = (x_b - mean(x_b)) / sqrt(var(x_b) + eps) * w + beta   (GPT-2, GPT-NeoX)
    r_b = W_score @ n_b + b_score                           # (L,)

HF's ``*ForSequenceClassification`` runs the norm and the head over all B*T positions and
then picks one row per sequence; computing only the B picked rows is the same math.
Accumulation is in fp32 and the result is fp32 whatever the input dtype.

Two input layouts:

- padded: hidden (B, T, H), index (B,) the scored position of each row (negative counts from
  the end, as torch indexing does);
- packed: hidden (N, H) holding the sequences back to back, ``cu_seqlens`` (B + 1,) their
  offsets (cu_seqlens[0] = 0, cu_seqlens[B] = N). The scored row of sequence b is
  cu_seqlens[b] + index[b] when index is given (negative: from the sequence's end), else its
  last row cu_seqlens[b + 1] - 1. No padding is read or stored at all.

Indices are not range-checked on the Triton path (that would cost a device->host sync);
the torch path raises on an out-of-range index.

File layout: Triton kernel -> launcher -> autograd wrapper -> torch reference -> dispatcher.
"""

import torch

from kernels.dispatch import tl, triton, use_triton

_NORMS = {None: 0, "rms": 1, "layer": 2}


@triton.jit
def _last_token_score_kernel(
    h_ptr, idx_ptr, cu_ptr, w_ptr, hb_ptr, nw_ptr, nb_ptr, out_ptr,
    T, H, L, stride_hb, stride_ht, stride_wl, eps,
    NORM: tl.constexpr,  # 0 none, 1 RMSNorm, 2 LayerNorm
    PACKED: tl.constexpr,  # rows come from cu_seqlens (packed) rather than (B, T, H)
    HAS_INDEX: tl.constexpr,  # packed only: index given, else the sequence's last row
    HAS_NW: tl.constexpr, HAS_NB: tl.constexpr, HAS_HB: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """out[b, l] = sum_k W[l, k] * ((x_k - mu) * rstd * w_k + beta_k) + bias_l,  x = h[row(b)].

    One program per (sequence, block of BLOCK_L head outputs). The row is read up to three
    times (mean, variance, output): it is H elements and stays in L1/L2, and two passes give
    the same variance as the reference where E[x^2] - mu^2 would cancel on large activations.
    """
    b = tl.program_id(0)
    l_offs = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)  # (BLOCK_L,)
    if PACKED:
        start = tl.load(cu_ptr + b).to(tl.int64)
        end = tl.load(cu_ptr + b + 1).to(tl.int64)
        if HAS_INDEX:
            i = tl.load(idx_ptr + b).to(tl.int64)
            t = tl.where(i < 0, end + i, start + i)
        else:
            t = end - 1
    else:
        t = tl.load(idx_ptr + b).to(tl.int64)
        t = tl.where(t < 0, t + T, t)
    # int64 offsets: B*T*H passes 2^31 elements at long context (8 x 32k x 8192).
    row = h_ptr + b.to(tl.int64) * stride_hb + t * stride_ht

    mean = 0.0
    rstd = 1.0
    if NORM != 0:
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        if NORM == 2:
            for h0 in range(0, H, BLOCK_H):
                offs = h0 + tl.arange(0, BLOCK_H)
                acc += tl.load(row + offs, mask=offs < H, other=0.0).to(tl.float32)
            mean = tl.sum(acc, axis=0) / H
            acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            offs = h0 + tl.arange(0, BLOCK_H)
            x = tl.load(row + offs, mask=offs < H, other=0.0).to(tl.float32)
            d = tl.where(offs < H, x - mean, 0.0)  # masked lanes would add mu^2
            acc += d * d
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / H + eps)

    acc2 = tl.zeros([BLOCK_L, BLOCK_H], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs = h0 + tl.arange(0, BLOCK_H)
        hmask = offs < H
        n = (tl.load(row + offs, mask=hmask, other=0.0).to(tl.float32) - mean) * rstd  # (BLOCK_H,)
        if HAS_NW:
            n = n * tl.load(nw_ptr + offs, mask=hmask, other=0.0).to(tl.float32)
        if HAS_NB:
            n = n + tl.load(nb_ptr + offs, mask=hmask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + l_offs[:, None] * stride_wl + offs[None, :],
                    mask=(l_offs[:, None] < L) & hmask[None, :], other=0.0).to(tl.float32)
        acc2 += w * n[None, :]  # masked lanes: w = 0 kills whatever n holds there
    out = tl.sum(acc2, axis=1)  # (BLOCK_L,)
    if HAS_HB:
        out += tl.load(hb_ptr + l_offs, mask=l_offs < L, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * L + l_offs, out, mask=l_offs < L)


def _last_token_score_triton(hidden, index, head_weight, head_bias=None, norm="rms",
                             norm_weight=None, norm_bias=None, eps=1e-6, *, cu_seqlens=None,
                             block_h=None) -> torch.Tensor:
    """Launch the kernel; same contract as ``last_token_score``. ``block_h`` is for tests."""
    if norm not in _NORMS:
        raise ValueError(f"norm must be 'rms', 'layer' or None, got {norm!r}")
    packed = cu_seqlens is not None
    if packed:
        if hidden.dim() != 2:
            raise ValueError(f"packed hidden must be (N, H), got {tuple(hidden.shape)}")
        B, T, H = cu_seqlens.numel() - 1, 0, hidden.shape[1]
    else:
        if hidden.dim() != 3 or index is None:
            raise ValueError("padded input needs hidden (B, T, H) and index (B,)")
        B, T, H = hidden.shape
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    w = head_weight if head_weight.stride(-1) == 1 else head_weight.contiguous()  # (L, H)
    L = w.shape[0]
    out = torch.empty((B, L), dtype=torch.float32, device=hidden.device)
    if B == 0:
        return out
    stride_hb, stride_ht = (0, hidden.stride(0)) if packed else (hidden.stride(0), hidden.stride(1))
    norm_weight = norm_weight if norm is not None else None  # the reference ignores them too
    norm_bias = norm_bias if norm is not None else None
    dummy = hidden  # never dereferenced: its HAS_* flag is False
    BLOCK_L = min(triton.next_power_of_2(L), 16)
    BLOCK_H = block_h or min(triton.next_power_of_2(H), max(16, 8192 // BLOCK_L), 2048)
    grid = (B, triton.cdiv(L, BLOCK_L))
    _last_token_score_kernel[grid](
        hidden, index if index is not None else dummy, cu_seqlens if packed else dummy, w,
        head_bias if head_bias is not None else dummy,
        norm_weight.contiguous() if norm_weight is not None else dummy,
        norm_bias.contiguous() if norm_bias is not None else dummy,
        out, T, H, L, stride_hb, stride_ht, w.stride(0), float(eps),
        NORM=_NORMS[norm], PACKED=packed, HAS_INDEX=index is not None,
        HAS_NW=norm_weight is not None, HAS_NB=norm_bias is not None,
        HAS_HB=head_bias is not None, BLOCK_H=BLOCK_H, BLOCK_L=BLOCK_L,
        num_warps=4 if BLOCK_H * BLOCK_L <= 2048 else 8,
    )
    return out


class _LastTokenScore(torch.autograd.Function):
    """Triton forward; backward recomputes the B picked rows in torch.

    Serving needs no gradient; reward-model training may. The backward touches B*H elements
    (negligible next to the backbone), so it re-runs the reference math on the gathered rows
    under autograd instead of a second kernel, and scatters d(rows) into a zero d(hidden).
    """

    @staticmethod
    def forward(ctx, hidden, index, cu_seqlens, head_weight, head_bias, norm, norm_weight,
                norm_bias, eps):
        ctx.save_for_backward(hidden, index, cu_seqlens, head_weight, head_bias, norm_weight,
                              norm_bias)
        ctx.norm, ctx.eps = norm, eps
        return _last_token_score_triton(hidden, index, head_weight, head_bias, norm, norm_weight,
                                        norm_bias, eps, cu_seqlens=cu_seqlens)

    @staticmethod
    def backward(ctx, grad_out):  # grad_out (B, L)
        hidden, index, cu_seqlens, *params = ctx.saved_tensors
        needs = [ctx.needs_input_grad[i] for i in (0, 3, 4, 6, 7)]  # hidden, W, b, w_n, b_n
        picks = _scored_positions(hidden, index, cu_seqlens)
        leaves = [t.detach().requires_grad_(need) if t is not None else None
                  for t, need in zip([hidden[picks], *params], needs)]  # rows (B, H) first
        with torch.enable_grad():
            rows, w, b, nw, nb = leaves
            out = _score_rows(rows, w, b, ctx.norm, nw, nb, ctx.eps)
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        found = dict(zip(map(id, wanted), torch.autograd.grad(out, wanted, grad_out)))
        d_rows, d_w, d_b, d_nw, d_nb = (found.get(id(t)) for t in leaves)
        d_hidden = None
        if d_rows is not None:
            d_hidden = torch.zeros_like(hidden)
            d_hidden.index_put_(picks, d_rows.to(hidden.dtype), accumulate=True)
        return d_hidden, None, None, d_w, d_b, None, d_nw, d_nb, None


def _scored_positions(hidden, index, cu_seqlens=None) -> tuple[torch.Tensor, ...]:
    """Index tuple selecting the scored row of each sequence: hidden[picks] is (B, H)."""
    if cu_seqlens is None:
        return torch.arange(hidden.shape[0], device=hidden.device), index
    cu = cu_seqlens.long()
    if index is None:
        return (cu[1:] - 1,)
    index = index.long()
    return (torch.where(index < 0, cu[1:] + index, cu[:-1] + index),)


def _score_rows(rows, head_weight, head_bias, norm, norm_weight, norm_bias, eps) -> torch.Tensor:
    """The fp32 math on gathered rows (B, H) -> (B, L)."""
    rows = rows.float()
    if norm == "rms":
        rows = rows * torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + eps)
    elif norm == "layer":
        mu = rows.mean(-1, keepdim=True)
        var = (rows - mu).pow(2).mean(-1, keepdim=True)
        rows = (rows - mu) * torch.rsqrt(var + eps)
    elif norm is not None:
        raise ValueError(f"norm must be 'rms', 'layer' or None, got {norm!r}")
    if norm is not None:
        if norm_weight is not None:
            rows = rows * norm_weight.float()
        if norm_bias is not None:
            rows = rows + norm_bias.float()
    out = rows @ head_weight.float().t()  # (B, L)
    if head_bias is not None:
        out = out + head_bias.float()
    return out


def last_token_score_reference(
    hidden: torch.Tensor,
    index: torch.Tensor | None,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None = None,
    norm: str | None = "rms",
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference. hidden (B, T, H), index (B,) int -> rewards (B, L) float32.

    ``norm`` is "rms", "layer" or None (hidden states are already normalized).
    With ``cu_seqlens`` (B + 1,), hidden is packed (N, H) and index (optional) is relative to
    each sequence's start (see the module docstring).
    """
    rows = hidden[_scored_positions(hidden, index, cu_seqlens)]  # (B, H)
    return _score_rows(rows, head_weight, head_bias, norm, norm_weight, norm_bias, eps)


def last_token_score(hidden, index, head_weight, head_bias=None, norm="rms", norm_weight=None,
                     norm_bias=None, eps=1e-6, *, cu_seqlens=None) -> torch.Tensor:
    """Rewards (B, L) float32: the Triton kernel on CUDA, the torch reference on CPU.

    ``RLHF_KERNELS`` forces either (see ``kernels.dispatch``). Differentiable on both paths.
    """
    if use_triton(hidden, kernel=_last_token_score_kernel):
        return _LastTokenScore.apply(hidden, index, cu_seqlens, head_weight, head_bias, norm,
                                     norm_weight, norm_bias, eps)
    return last_token_score_reference(hidden, index, head_weight, head_bias, norm, norm_weight,
                                      norm_bias, eps, cu_seqlens=cu_seqlens)
