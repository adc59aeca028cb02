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


def _forward_torch(hidden, weight, bias, targets, inv_temp, with_entropy, *, chunk):
    """Chunked torch forward -> (logp, entropy or None, lse, E_p[z] or None), each (N,) fp32."""
    N, V = hidden.shape[0], weight.shape[0]
    # fp32 matmuls: most CPUs have no fast bf16 GEMM, and this matches Triton's fp32 accumulate.
    h32 = hidden.float()
    bufs = _scratch(N, min(chunk, V), hidden.device, 2 if with_entropy else 1)
    m = torch.full((N,), -math.inf, device=hidden.device)
    s, t, zt = (torch.zeros(N, device=hidden.device) for _ in range(3))
    for v0 in range(0, V, chunk):
        v1 = min(v0 + chunk, V)
        z = _chunk_logits(h32, weight[v0:v1].float(), bias, v0, v1, inv_temp, bufs[0])  # (N, C)
        inside = (targets >= v0) & (targets < v1)
        picked = z.gather(1, (targets - v0).clamp(0, v1 - v0 - 1)[:, None])[:, 0]
        zt += torch.where(inside, picked, 0.0)
        m_new = torch.maximum(m, z.max(1).values)
        alpha = torch.exp(m - m_new)
        if with_entropy:
            e = torch.sub(z, m_new[:, None], out=bufs[1][: z.numel()].view_as(z)).exp_()
            s = s * alpha + e.sum(1)
            t = t * alpha + e.mul_(z).sum(1)
        else:
            s = s * alpha + z.sub_(m_new[:, None]).exp_().sum(1)  # in place: z is done
        m = m_new
    lse = m + torch.log(s)
    if not with_entropy:
        return zt - lse, None, lse, None
    ez = t / s
    return zt - lse, lse - ez, lse, ez


def _dlogits_torch(h32, w_c, bias, targets, lse, ez, g_lp, g_ent, v0, v1, inv_temp, bufs):
    """(N, C) fp32 dL/dz for columns [v0, v1), in place on the recomputed logits."""
    z = _chunk_logits(h32, w_c, bias, v0, v1, inv_temp, bufs[0])
    p = torch.sub(z, lse[:, None], out=bufs[1][: z.numel()].view_as(z)).exp_()
    if g_ent is not None:  # e p (E_p[z] - z)
        dz = z.sub_(ez[:, None]).mul_(p).mul_(-g_ent[:, None])
        if g_lp is not None:
            dz.sub_(p.mul_(g_lp[:, None]))
    else:
        dz = p.mul_(-g_lp[:, None])
    if g_lp is not None:  # + g at the target column
        rows = ((targets >= v0) & (targets < v1)).nonzero()[:, 0]
        dz.index_put_((rows, targets[rows] - v0), g_lp[rows], accumulate=True)
    return dz.mul_(inv_temp) if inv_temp != 1.0 else dz
