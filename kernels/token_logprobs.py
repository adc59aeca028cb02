"""Per-token log-probs (and entropy) straight from hidden states, never holding (N, V) logits.

Math, for each token n with hidden state h_n (H,), LM head W (V, H), bias b, temperature tau,
target y_n:

    z_nv   = (W_v . h_n + b_v) / tau                        logits, one vocabulary chunk at a time
    lse_n  = log sum_v exp(z_nv)                            online: m' = max(m, max_c z),
                                                            s' = s exp(m - m') + sum_c exp(z - m')
    logp_n = z_{n, y_n} - lse_n
    H_n    = lse_n - E_p[z_n]  = -sum_v p_nv log p_nv       (t carried like s, weighted by z)

Backward, with p = softmax(z), upstream grads g (log-prob) and e (entropy):

    dL/dz_nv = g_n (1[v = y_n] - p_nv) + e_n p_nv (E_p[z_n] - z_nv)
    dL/dh    = (dL/dz / tau) @ W          dL/dW = (dL/dz / tau)^T @ h        dL/db = sum_n ...

The forward saves only lse and E_p[z] (N floats each); the backward RECOMPUTES each chunk's
logits from h and W, so memory stays O(N * chunk) instead of O(N * V) (the torch path keeps
them when the whole (N, V) is small: token_logprobs_cpu.py).

Paths (``kernels.dispatch`` picks; ``RLHF_KERNELS`` forces):
- Triton (CUDA): forward is one fused kernel (tl.dot tiles + online log-sum-exp, the vocabulary
  split across programs when there are few row blocks, partials merged in torch); backward is a
  Triton kernel that recomputes a chunk's logits and writes dL/dz for it, then two cuBLAS GEMMs
  per chunk (they dominate; cuBLAS does them better than atomics in a fused kernel).
- torch (CPU): the same chunked math with torch ops in preallocated buffers, in
  ``kernels/token_logprobs_cpu.py``: the forward's working memory is one N x chunk fp32 buffer
  (two with entropy), against two N x V for log_softmax(h @ W.T).gather(...).

Targets must lie in [0, V): the Triton path does not check (a sync); a target outside gives
-lse. File layout: kernels -> launchers -> autograd wrapper (both paths) -> torch reference ->
the public op. The CPU path's chunk loops live in token_logprobs_cpu.py.
"""

import torch

from kernels import token_logprobs_cpu as cpu_path
from kernels.dispatch import dot_in_fp32, interpreting, tl, triton, use_triton
from kernels.token_logprobs_cpu import (
    _dlogits_torch,
    _forward_torch,
    _scratch,
    kept_buffer,
    kept_chunk,
    release_kept,
)

# (BLOCK_N, BLOCK_V, BLOCK_H, num_warps): rows x vocab tile, reduction step. Untuned defaults
# (no GPU was lent when this was written); 16-bit operands take a deeper H step.
_GPU_CONFIG = {torch.float32: (64, 64, 32, 4), torch.float16: (64, 128, 64, 8),
               torch.bfloat16: (64, 128, 64, 8)}
_INTERPRET_CONFIG = (32, 128, 32, 1)  # interpreter cost is per op: few, wide tiles


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, H, stride_hn, stride_wv,
                 inv_temp, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_H: tl.constexpr):
    """z = (h[rows] @ W[cols]^T + b[cols]) * inv_temp, fp32 accumulate; -inf in masked columns."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        kmask = ks < H
        a = tl.load(h_ptr + rows[:, None] * stride_hn + ks[None, :],
                    mask=rmask[:, None] & kmask[None, :], other=0.0)  # (BLOCK_N, BLOCK_H)
        b = tl.load(w_ptr + cols[None, :] * stride_wv + ks[:, None],
                    mask=kmask[:, None] & cmask[None, :], other=0.0)  # (BLOCK_H, BLOCK_V) = W^T
        if DOT_FP32:  # interpreter + bf16 only, see dispatch.dot_in_fp32
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return tl.where(cmask[None, :], acc * inv_temp, float("-inf"))


@triton.jit
def _logprob_fwd_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr, m_ptr, s_ptr, t_ptr, zt_ptr,
    N, V, H, stride_hn, stride_wv, cols_per_split, inv_temp,
    HAS_BIAS: tl.constexpr, ENTROPY: tl.constexpr, DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Online log-sum-exp of one row block over one vocabulary split.

    Writes partials for split s: m (running max), s = sum exp(z - m), t = sum exp(z - m) z
    (only with ENTROPY), zt = z[target] (0 when the target lies in another split). Every split
    holds >= 1 real column, so m is finite after the first tile and exp(m - m') never sees
    -inf - (-inf).
    """
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    rows64 = rows.to(tl.int64)  # N * H can pass 2^31
    tgt = tl.load(tgt_ptr + rows, mask=rmask, other=-1)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    t = tl.zeros([BLOCK_N], dtype=tl.float32)
    zt = tl.zeros([BLOCK_N], dtype=tl.float32)
    v_start = split * cols_per_split
    v_end = tl.minimum(v_start + cols_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < v_end
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows64, cols.to(tl.int64), rmask, cmask, H,
                         stride_hn, stride_wv, inv_temp, HAS_BIAS, DOT_FP32, PRECISION,
                         BLOCK_N, BLOCK_V, BLOCK_H)  # (BLOCK_N, BLOCK_V)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])  # 0 in masked columns
        s = s * alpha + tl.sum(e, axis=1)
        if ENTROPY:  # e * z would be 0 * -inf = nan in masked columns
            t = t * alpha + tl.sum(e * tl.where(cmask[None, :], z, 0.0), axis=1)
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        m = m_new
    out = split * N + rows
    tl.store(m_ptr + out, m, mask=rmask)
    tl.store(s_ptr + out, s, mask=rmask)
    tl.store(zt_ptr + out, zt, mask=rmask)
    if ENTROPY:
        tl.store(t_ptr + out, t, mask=rmask)


@triton.jit
def _logprob_bwd_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, ez_ptr, glp_ptr, gent_ptr, dz_ptr,
    N, C, H, v_offset, stride_hn, stride_wv, stride_dn, inv_temp,
    HAS_BIAS: tl.constexpr, HAS_GLP: tl.constexpr, HAS_GENT: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """dz[n, c] = (g_n (1[v = y_n] - p) + e_n p (E_p[z_n] - z)) / tau for v = v_offset + c.

    Recomputes the chunk's logits tile (no (N, V) was saved) and p = exp(z - lse).
    """
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    local = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    rmask = rows < N
    cmask = local < C
    cols = v_offset + local
    rows64 = rows.to(tl.int64)
    z = _logits_tile(h_ptr, w_ptr, b_ptr, rows64, cols.to(tl.int64), rmask, cmask, H, stride_hn,
                     stride_wv, inv_temp, HAS_BIAS, DOT_FP32, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    p = tl.exp(z - lse[:, None])  # (BLOCK_N, BLOCK_V), 0 in masked columns
    dz = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    if HAS_GLP:
        g = tl.load(glp_ptr + rows, mask=rmask, other=0.0)
        tgt = tl.load(tgt_ptr + rows, mask=rmask, other=-1)
        dz += g[:, None] * (tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0) - p)
    if HAS_GENT:
        e = tl.load(gent_ptr + rows, mask=rmask, other=0.0)
        ez = tl.load(ez_ptr + rows, mask=rmask, other=0.0)
        # where() before the product: p * (ez - z) is 0 * inf = nan in masked columns
        dz += e[:, None] * p * tl.where(cmask[None, :], ez[:, None] - z, 0.0)
    dz = dz * inv_temp
    tl.store(dz_ptr + rows64[:, None] * stride_dn + local[None, :],
             dz.to(dz_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


def _launch_args(kernel, dtype, config):
    """Tile sizes, dot precision and the bf16-interpreter flag for this kernel and dtype."""
    if config is None:
        config = _INTERPRET_CONFIG if interpreting(kernel) else _GPU_CONFIG[dtype]
    # fp32 follows torch's own switch: TF32 only where the user allowed it for matmuls.
    # 16-bit operands ignore it; they keep Triton's default.
    fp32_exact = dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    precision = "ieee" if fp32_exact else "tf32"
    return config, precision, dot_in_fp32(dtype, kernel)


def _forward_triton(hidden, weight, bias, targets, inv_temp, with_entropy, *, config=None,
                    splits=None):
    """Fused forward -> (logp, entropy or None, lse, E_p[z] or None), each (N,) fp32."""
    (BN, BV, BH, warps), precision, dot_fp32 = _launch_args(_logprob_fwd_kernel, hidden.dtype,
                                                             config)
    N, H = hidden.shape
    V = weight.shape[0]
    row_blocks = triton.cdiv(N, BN)
    if splits is None:  # enough programs to fill the GPU: ~4 per SM
        sms = torch.cuda.get_device_properties(hidden.device).multi_processor_count \
            if hidden.is_cuda else 1
        splits = max(1, min(triton.cdiv(4 * sms, row_blocks), triton.cdiv(V, BV)))
    cols_per_split = triton.cdiv(triton.cdiv(V, splits), BV) * BV
    splits = triton.cdiv(V, cols_per_split)  # no empty split
    part = torch.empty((4, splits, N), dtype=torch.float32, device=hidden.device)  # m, s, t, zt
    _logprob_fwd_kernel[(row_blocks, splits)](
        hidden, weight, bias if bias is not None else weight, targets,
        part[0], part[1], part[2], part[3], N, V, H, hidden.stride(0), weight.stride(0),
        cols_per_split, inv_temp, HAS_BIAS=bias is not None, ENTROPY=with_entropy,
        DOT_FP32=dot_fp32, PRECISION=precision, BLOCK_N=BN, BLOCK_V=BV, BLOCK_H=BH,
        num_warps=warps, num_stages=3,
    )
    m, s, t, zt = part
    m_all = m.max(0).values  # (N,) merge the splits' partial sums at a common max
    scale = torch.exp(m - m_all)
    s_all = (s * scale).sum(0)
    lse = m_all + torch.log(s_all)
    logp = zt.sum(0) - lse
    if not with_entropy:
        return logp, None, lse, None
    ez = (t * scale).sum(0) / s_all
    return logp, lse - ez, lse, ez


def _dlogits_triton(hidden, weight, bias, targets, lse, ez, g_lp, g_ent, v0, v1, inv_temp,
                    out, *, config=None):
    """Write dL/dz for vocabulary columns [v0, v1) into out (N, v1 - v0)."""
    (BN, BV, BH, warps), precision, dot_fp32 = _launch_args(_logprob_bwd_kernel, hidden.dtype,
                                                             config)
    N, H = hidden.shape
    C = v1 - v0
    dummy = lse
    _logprob_bwd_kernel[(triton.cdiv(N, BN), triton.cdiv(C, BV))](
        hidden, weight, bias if bias is not None else weight, targets, lse,
        ez if ez is not None else dummy, g_lp if g_lp is not None else dummy,
        g_ent if g_ent is not None else dummy, out, N, C, H, v0, hidden.stride(0),
        weight.stride(0), out.stride(0), inv_temp, HAS_BIAS=bias is not None,
        HAS_GLP=g_lp is not None, HAS_GENT=g_ent is not None, DOT_FP32=dot_fp32,
        PRECISION=precision, BLOCK_N=BN, BLOCK_V=BV, BLOCK_H=BH, num_warps=warps, num_stages=3,
    )
    return out


def _backward_chunks(ctx, g_lp, g_ent):
    """Shared by both paths: per chunk, dz from the path's dlogits, then the two GEMMs."""
    hidden, weight, bias, targets, lse, ez = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    N, V = hidden.shape[0], weight.shape[0]
    grad_h = torch.zeros((N, hidden.shape[1]), dtype=torch.float32, device=hidden.device) \
        if need_h else None  # sums over chunks, so fp32 whatever the operands
    grad_w = torch.empty_like(weight) if need_w else None
    grad_b = torch.empty_like(bias) if need_b else None
    # Triton: dz enters cuBLAS in the operands' dtype (tensor cores). torch: fp32 throughout.
    h_mm = hidden if ctx.triton_path else hidden.float()  # (N, H)
    if ctx.triton_path:
        buf = torch.empty((N, min(ctx.chunk, V)), dtype=hidden.dtype, device=hidden.device)
    else:
        bufs = _scratch(N, min(ctx.chunk, V), hidden.device, 2)
    for v0 in range(0, V, ctx.chunk):
        v1 = min(v0 + ctx.chunk, V)
        if ctx.triton_path:
            w_c = weight[v0:v1]  # (C, H)
            dz = _dlogits_triton(hidden, weight, bias, targets, lse, ez, g_lp, g_ent, v0, v1,
                                 ctx.inv_temp, buf[:, : v1 - v0])  # (N, C)
        else:
            w_c = weight[v0:v1].float()
            kept = None if ctx.kept is None else kept_chunk(ctx.kept, N, v0, v1)
            dz = _dlogits_torch(h_mm, w_c, bias, targets, lse, ez, g_lp, g_ent, v0, v1,
                                ctx.inv_temp, bufs, kept)
        same = dz.dtype == w_c.dtype == torch.float32  # fp32 throughout: into place
        if grad_h is not None:  # (N, H)
            grad_h.addmm_(dz, w_c) if same else grad_h.add_(dz @ w_c)
        if grad_w is not None:  # (C, H): each column block written once
            if same and grad_w.dtype == torch.float32:
                torch.mm(dz.t(), h_mm, out=grad_w[v0:v1])
            else:
                grad_w[v0:v1] = dz.t() @ h_mm
        if grad_b is not None:
            grad_b[v0:v1] = dz.sum(0, dtype=torch.float32)
    return grad_h.to(hidden.dtype) if grad_h is not None else None, grad_w, grad_b


class _TokenLogprobs(torch.autograd.Function):
    """Saves h, W, b, targets, lse and E_p[z]; backward recomputes logits chunk by chunk, or
    (torch path, ``keep``) reads the ones the forward kept."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_temp, with_entropy, chunk, triton_path,
                keep=False):
        fwd = _forward_triton if triton_path else _forward_torch
        args = (hidden, weight, bias, targets, inv_temp, with_entropy)
        ctx.kept = (kept_buffer(hidden.shape[0] * weight.shape[0], hidden.device)
                    if keep and not triton_path else None)  # (N * V,) fp32
        logp, ent, lse, ez = fwd(*args) if triton_path else fwd(*args, chunk=chunk,
                                                                keep=ctx.kept)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ez)
        ctx.inv_temp, ctx.chunk, ctx.triton_path = inv_temp, chunk, triton_path
        ctx.set_materialize_grads(False)  # an unused output sends None: skip its term
        return (logp, ent) if with_entropy else logp

    @staticmethod
    def backward(ctx, g_lp, g_ent=None):
        if g_lp is None and g_ent is None:
            return (None,) * 9
        g_lp = g_lp.float().contiguous() if g_lp is not None else None
        g_ent = g_ent.float().contiguous() if g_ent is not None else None
        grad_h, grad_w, grad_b = _backward_chunks(ctx, g_lp, g_ent)
        if ctx.kept is not None:
            release_kept(ctx.kept)
            ctx.kept = None
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def token_logprobs_reference(hidden, lm_head_weight, targets, *, lm_head_bias=None,
                             temperature=1.0, return_entropy=False):
    """The naive math: log_softmax over the full (N, V) logits in fp32, then gather."""
    logits = hidden.float() @ lm_head_weight.float().t()  # (N, V)
    if lm_head_bias is not None:
        logits = logits + lm_head_bias.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)  # (N, V)
    logp = logp_all.gather(-1, targets[..., None])[..., 0]
    if not return_entropy:
        return logp
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def default_chunk_size(n_rows: int, vocab: int, budget: int = 1 << 22) -> int:
    """Vocabulary columns per chunk so that one (N, chunk) buffer holds ~budget elements."""
    chunk = max(256, (budget // max(n_rows, 1)) // 128 * 128)
    return min(chunk, vocab)


def token_logprobs(hidden, lm_head_weight, targets, *, lm_head_bias=None, temperature=1.0,
                   return_entropy=False, chunk_size=None):
    """log p(target) (and entropy) per token, fp32, without materializing (N, V).

    hidden (..., H), lm_head_weight (V, H), targets (...) long -> (...) fp32, or
    (logprobs, entropy) when return_entropy. Differentiable w.r.t. hidden, weight and bias.
    ``chunk_size`` (vocabulary columns per step) bounds the torch path's working memory and
    the backward's dz buffer; the Triton forward holds no chunk at all.
    """
    if hidden.dtype != lm_head_weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and lm_head_weight ({lm_head_weight.dtype}) "
                         "must share a dtype")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    lead, H = targets.shape, hidden.shape[-1]
    if hidden.shape[:-1] != lead or lm_head_weight.shape[1] != H:
        raise ValueError(f"shapes disagree: hidden {tuple(hidden.shape)}, targets "
                         f"{tuple(lead)}, lm_head_weight {tuple(lm_head_weight.shape)}")
    h = hidden.reshape(-1, H)
    h = h if h.stride(-1) == 1 else h.contiguous()  # (N, H)
    w = lm_head_weight if lm_head_weight.stride(-1) == 1 else lm_head_weight.contiguous()
    tgt = targets.reshape(-1).to(torch.long).contiguous()  # (N,) gather wants int64
    triton_path = use_triton(hidden, lm_head_weight, kernel=_logprob_fwd_kernel)
    chunk = chunk_size or default_chunk_size(h.shape[0], w.shape[0],
                                             1 << 24 if triton_path else cpu_path.chunk_budget(H))
    grads = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, lm_head_weight, lm_head_bias))
    keep = grads and not triton_path and h.shape[0] * w.shape[0] <= cpu_path.KEEP_LOGITS_MAX
    out = _TokenLogprobs.apply(h, w, lm_head_bias, tgt, 1.0 / temperature, return_entropy,
                               chunk, triton_path, keep)
    if return_entropy:
        return out[0].view(lead), out[1].view(lead)
    return out.view(lead)
