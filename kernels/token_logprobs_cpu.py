"""The chunked torch path of ``kernels.token_logprobs``: the CPU (and ``RLHF_KERNELS=torch``) op.

Same math as the Triton kernels (see ``kernels/token_logprobs.py``), one vocabulary chunk of
logits at a time with torch ops in preallocated buffers:

    z    = (h @ W[v0:v1]^T + b[v0:v1]) / tau           (N, C) fp32, into a scratch buffer
    m, s   online log-sum-exp over the chunks:        m' = max(m, max_c z),
                                                      s' = s exp(m - m') + sum_c exp(z - m')
    t    = sum exp(z - m) z, carried like s (only with entropy), so E_p[z] = t / s
    dz   = (g (1[v = y] - p) + e p (E_p[z] - z)) / tau  (backward, per recomputed chunk)

The forward's working memory is one N x chunk fp32 buffer (two with entropy), against two
N x V for ``log_softmax(h @ W.T).gather(...)``: that is the win on the CPU. Matmuls run in fp32:
most CPUs have no fast bf16 GEMM, and it matches the Triton path's fp32 accumulation.

File layout: scratch buffers -> chunk logits -> forward -> dlogits. The autograd Function that
calls these, the torch reference and the public ``token_logprobs`` live in token_logprobs.py.
"""

import math

import torch


def _scratch(n_rows, chunk, device, count):
    """Flat fp32 buffers reused by every chunk: no allocator churn, so the peak is just these
    (glibc serves freed 16 MB blocks from a heap that fragments, which shows up in RSS)."""
    return [torch.empty(n_rows * chunk, device=device) for _ in range(count)]


def _chunk_logits(h32, w_c, bias, v0, v1, inv_temp, buf):
    """(N, C) fp32 logits of columns [v0, v1) written into buf; w_c is W[v0:v1] in fp32."""
    z = torch.mm(h32, w_c.t(), out=buf[: h32.shape[0] * (v1 - v0)].view(-1, v1 - v0))
    if bias is not None:
        z += bias[v0:v1].float()
    if inv_temp != 1.0:
        z *= inv_temp
    return z


def _forward_torch(hidden, weight, bias, targets, inv_temp, with_entropy, *, chunk,
                   keep=None):
    """Chunked torch forward -> (logp, entropy or None, lse, E_p[z] or None), each (N,) fp32.
    ``keep``: a flat N * V fp32 tensor that receives every chunk's logits (chunk [v0, v1) at
    ``keep[v0 * N: v1 * N]``, row-major (N, v1 - v0)) for the backward to read instead of
    recomputing them (:func:`kept_chunk`); they are never modified in place here."""
    N, V = hidden.shape[0], weight.shape[0]
    # fp32 matmuls: most CPUs have no fast bf16 GEMM, and this matches Triton's fp32 accumulate.
    h32 = hidden.float()
    bufs = _scratch(N, min(chunk, V), hidden.device,
                    2 if with_entropy or keep is not None else 1)
    m = torch.full((N,), -math.inf, device=hidden.device)
    s, t, zt = (torch.zeros(N, device=hidden.device) for _ in range(3))
    for v0 in range(0, V, chunk):
        v1 = min(v0 + chunk, V)
        out = bufs[0] if keep is None else keep[v0 * N:]
        z = _chunk_logits(h32, weight[v0:v1].float(), bias, v0, v1, inv_temp, out)  # (N, C)
        inside = (targets >= v0) & (targets < v1)
        picked = z.gather(1, (targets - v0).clamp(0, v1 - v0 - 1)[:, None])[:, 0]
        zt += torch.where(inside, picked, 0.0)
        m_new = torch.maximum(m, z.amax(1))  # amax: no indices (max(1) is 15x slower here)
        alpha = torch.exp(m - m_new)
        if with_entropy:
            e = torch.sub(z, m_new[:, None], out=bufs[1][: z.numel()].view_as(z)).exp_()
            s = s * alpha + e.sum(1)
            t = t * alpha + e.mul_(z).sum(1)
        elif keep is None:
            s = s * alpha + z.sub_(m_new[:, None]).exp_().sum(1)  # in place: z is done
        else:
            e = torch.sub(z, m_new[:, None], out=bufs[1][: z.numel()].view_as(z)).exp_()
            s = s * alpha + e.sum(1)
        m = m_new
    lse = m + torch.log(s)
    if not with_entropy:
        return zt - lse, None, lse, None
    ez = t / s
    return zt - lse, lse - ez, lse, ez


# The forward keeps its logits for the backward (one GEMM of the four saved: a tiny model's head
# is mostly those GEMMs) when the whole (N, V) fp32 is at most this (64 MiB), where O(N * V)
# memory is small in absolute terms; above it the backward recomputes them chunk by chunk, as
# the Triton path always does.
KEEP_LOGITS_MAX = 1 << 24


def chunk_budget(hidden_size: int) -> int:
    """Elements of the (N, chunk) buffer: H * 4096, within [2^18, 2^22].

    A chunk's logits cost N·C·H in the GEMM and N·C in each of the ~10 elementwise passes
    after it. With a small H the passes dominate, and they run from cache only while the
    buffer fits in L2 (2^18 fp32 = 1 MiB: at N = 1024, V = 8192, H = 64, forward + backward
    take 0.75x the time of 16 MiB chunks); with a large H the GEMM dominates and wants wide
    chunks (at H = 512 the 16 MiB chunk is fastest). bench/RESULTS.md, "PPO step against TRL".
    """
    return min(max(hidden_size << 12, 1 << 18), 1 << 22)


# The last kept-logits buffer a finished backward handed back, for the next forward: a fresh
# N * V buffer (32 MiB at N = 1024, V = 8192) is fresh pages, whose faults cost about what the
# GEMM it saves does. One at most: forward and backward alternate.
_spare: list[torch.Tensor] = []


def kept_buffer(numel, device):
    """A flat fp32 buffer of ``numel`` for the forward's kept logits (the spare when it fits)."""
    if _spare and _spare[0].device == device and _spare[0].numel() >= numel:
        return _spare.pop()[:numel]
    return torch.empty(numel, device=device)


def release_kept(buf) -> None:
    """The backward is done with ``buf``: keep its storage as the spare (the larger one)."""
    base = buf if buf._base is None else buf._base
    if not _spare or _spare[0].numel() < base.numel():
        _spare[:] = [base]


def kept_chunk(keep, n_rows, v0, v1):
    """Chunk [v0, v1)'s logits in ``keep`` (see :func:`_forward_torch`): (N, v1 - v0)."""
    return keep[v0 * n_rows: v1 * n_rows].view(n_rows, v1 - v0)


def _dlogits_torch(h32, w_c, bias, targets, lse, ez, g_lp, g_ent, v0, v1, inv_temp, bufs,
                   z=None):
    """(N, C) fp32 dL/dz for columns [v0, v1), in bufs[0] (the recomputed logits' buffer);
    ``z``: the chunk's logits kept by the forward (read, not recomputed nor modified)."""
    if z is None:
        z = _chunk_logits(h32, w_c, bias, v0, v1, inv_temp, bufs[0])
    work = bufs[0][: z.numel()].view_as(z)  # z itself when recomputed: in place
    p = torch.sub(z, lse[:, None], out=bufs[1][: z.numel()].view_as(z)).exp_()
    if g_ent is not None:  # e p (E_p[z] - z)
        dz = torch.sub(z, ez[:, None], out=work).mul_(p).mul_(-g_ent[:, None])
        if g_lp is not None:
            dz.sub_(p.mul_(g_lp[:, None]))
    else:
        dz = p.mul_(-g_lp[:, None])
    if g_lp is not None:  # + g at the target column (rows whose target is elsewhere add 0;
        # a scatter, not nonzero() + index_put: no host sync)
        inside = (targets >= v0) & (targets < v1)
        dz.scatter_add_(1, (targets - v0).clamp(0, v1 - v0 - 1)[:, None],
                        torch.where(inside, g_lp, 0.0)[:, None])
    return dz.mul_(inv_temp) if inv_temp != 1.0 else dz
