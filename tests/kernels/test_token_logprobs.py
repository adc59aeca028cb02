"""kernels/token_logprobs.py: Triton kernels and the chunked torch path against the naive math.

Without a GPU the Triton kernels run on the CPU through Triton's interpreter (slow; small
shapes). GPU tests are marked and skip here. Also: the CPU memory bar, measured in fresh
processes. (The KL estimators k1/k3 live in policy_trainer/ppo.py, tested in test_ppo.py.)
"""

import os

import torch

# TRITON_INTERPRET must be set before the first `import triton` in this process: @triton.jit
# picks interpreter or compiler when the decorator runs, for our kernels and for Triton's own
# tl.sum / tl.max. If another module imported triton first, kernels_interpreted() says so.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from kernels import token_logprobs, token_logprobs_reference  # noqa: E402
from tests.kernels.interpreted import kernels_interpreted  # noqa: E402

op = sys.modules["kernels.token_logprobs"]  # the module (kernels.token_logprobs is the op)
kernels_interpreted(op._logprob_fwd_kernel)
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.float16: dict(rtol=1e-3, atol=1e-3),
       torch.bfloat16: dict(rtol=1e-3, atol=1e-3)}
# Gradients: the Triton backward feeds dL/dz to the GEMMs in the operands' dtype.
GRAD_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-2, atol=2e-3),
            torch.bfloat16: dict(rtol=5e-2, atol=1e-2)}
DTYPES = list(TOL)


def make(N, V, H, dtype, bias=True, scale=1.0, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) * scale / H**0.25).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    y[: min(N, 3)] = torch.tensor([0, V - 1, V // 2])[: min(N, 3)]  # both vocabulary ends
    return h.to(device), w.to(device), (b.to(device) if bias else None), y.to(device)


def reference(h, w, b, y, temperature=1.0, entropy=True):
    return token_logprobs_reference(h, w, y, lm_head_bias=b, temperature=temperature,
                                    return_entropy=entropy)


# (N, V, H, bias, temperature, entropy, splits), against the interpreter's tiles (32, 128, 32):
# N, V and H off the tiles with the default split heuristic; N = 1 with a vocabulary split
# holding 3 columns; exact tiles.
FWD_CASES = [(37, 1000, 72, True, 0.7, True, None), (1, 259, 40, False, 1.0, False, 3),
             (32, 256, 64, True, 1.0, True, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", FWD_CASES, ids=str)
def test_triton_forward_matches_reference(case, dtype):
    N, V, H, bias, temp, ent, splits = case
    h, w, b, y = make(N, V, H, dtype, bias)
    logp, entropy, _, _ = op._forward_triton(h, w, b, y, 1.0 / temp, ent, splits=splits)
    want = reference(h, w, b, y, temp, entropy=True)
    torch.testing.assert_close(logp, want[0], **TOL[dtype])
    assert (logp <= 0).all()  # verl#2656: a fused kernel once returned positive log-probs
    if ent:
        torch.testing.assert_close(entropy, want[1], **TOL[dtype])


def test_triton_forward_large_logits():
    """Logits in the hundreds: the online max must keep exp() finite, as log_softmax does."""
    h, w, b, y = make(20, 300, 40, torch.float32, scale=30.0)
    logp, entropy, _, _ = op._forward_triton(h, w, b, y, 1.0, True, splits=2)
    want = reference(h, w, b, y)
    assert torch.isfinite(logp).all() and (logp <= 0).all()
    torch.testing.assert_close(logp, want[0], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(entropy, want[1], rtol=1e-5, atol=1e-3)


def grads_of(fn, leaves, g_lp, g_ent):
    for t in leaves:
        t.grad = None
    lp, ent = fn()
    loss = (lp * g_lp).sum() + ((ent * g_ent).sum() if g_ent is not None else 0)
    loss.backward()
    return [t.grad.clone() for t in leaves]


@pytest.mark.parametrize("backend,dtype,entropy", [
    ("triton", torch.float32, True), ("triton", torch.bfloat16, False),
    ("torch", torch.float32, True), ("torch", torch.bfloat16, True),
    ("torch", torch.float16, False)], ids=str)
def test_gradients_match_reference(backend, dtype, entropy, monkeypatch):
    monkeypatch.setenv("RLHF_KERNELS", backend)
    N, V, H = (37, 1000, 72) if dtype == torch.float32 else (20, 300, 40)
    h, w, b, y = make(N, V, H, dtype)
    leaves = [t.requires_grad_() for t in (h, w, b)]
    g_lp, g_ent = torch.randn(N), (torch.randn(N) if entropy else None)
    got = grads_of(lambda: token_logprobs(h, w, y, lm_head_bias=b, temperature=0.7,
                                          return_entropy=True, chunk_size=384),
                   leaves, g_lp, g_ent)
    want = grads_of(lambda: reference(h, w, b, y, 0.7), leaves, g_lp, g_ent)
    for name, a, e in zip(("hidden", "weight", "bias"), got, want):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a.float(), e.float(), **GRAD_TOL[dtype], msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_backward_from_kept_logits_equals_the_recomputing_one(dtype, monkeypatch):
    """Small (N, V): the forward keeps its logits and the backward reads them; above
    KEEP_LOGITS_MAX it recomputes them. Same chunks, same GEMM shapes: the same gradients,
    bit for bit, both outputs' terms, bias and temperature included; retain_graph works (the
    first backward hands the kept buffer back, the second recomputes)."""
    monkeypatch.setenv("RLHF_KERNELS", "torch")
    h, w, b, y = make(37, 1000, 72, dtype)
    leaves = [t.requires_grad_() for t in (h, w, b)]
    g_lp, g_ent = torch.randn(37), torch.randn(37)

    def run():
        return token_logprobs(h, w, y, lm_head_bias=b, temperature=0.7, return_entropy=True,
                              chunk_size=384)

    kept = grads_of(run, leaves, g_lp, g_ent)
    monkeypatch.setattr(sys.modules["kernels.token_logprobs_cpu"], "KEEP_LOGITS_MAX", 0)
    recomputed = grads_of(run, leaves, g_lp, g_ent)
    for a, e in zip(kept, recomputed):
        assert torch.equal(a, e)
    monkeypatch.undo()
    monkeypatch.setenv("RLHF_KERNELS", "torch")
    for t in leaves:
        t.grad = None
    lp, ent = run()
    (lp * g_lp + ent * g_ent).sum().backward(retain_graph=True)
    first = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    (lp * g_lp + ent * g_ent).sum().backward()
    for a, e in zip(first, (t.grad for t in leaves)):
        assert torch.equal(a, e)


def test_gradient_of_entropy_alone(monkeypatch):
    """An unused log-prob output sends no gradient (set_materialize_grads(False))."""
    monkeypatch.setenv("RLHF_KERNELS", "triton")
    h, w, _, y = make(12, 200, 24, torch.float32, bias=False)
    h.requires_grad_()
    token_logprobs(h, w, y, return_entropy=True)[1].sum().backward()
    got, h.grad = h.grad.clone(), None
    reference(h, w, None, y)[1].sum().backward()
    torch.testing.assert_close(got, h.grad, **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("chunk,dtype", [(7, torch.float32), (256, torch.float32),
                                         (333, torch.float32), (333, torch.bfloat16),
                                         (333, torch.float16), (1000, torch.float32),
                                         (4096, torch.float32)], ids=str)
def test_torch_path_chunk_edges(chunk, dtype, monkeypatch):
    """Chunks of one column, not dividing V, equal to V, past V; targets on chunk borders."""
    monkeypatch.setenv("RLHF_KERNELS", "torch")
    h, w, b, y = make(9, 1000, 48, dtype)
    y[3:9] = torch.tensor([255, 256, 332, 333, 665, 666])
    logp, entropy = token_logprobs(h, w, y, lm_head_bias=b, temperature=1.3,
                                   return_entropy=True, chunk_size=chunk)
    want = reference(h, w, b, y, 1.3)
    torch.testing.assert_close(logp, want[0], **TOL[dtype])
    torch.testing.assert_close(entropy, want[1], **TOL[dtype])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_leading_dims_and_dispatch(backend, monkeypatch):
    monkeypatch.setenv("RLHF_KERNELS", backend)
    h, w, _, y = make(2 * 7, 130, 24, torch.float32, bias=False)
    logp = token_logprobs(h.view(2, 7, 24), w, y.view(2, 7))  # (B, T, H) in, (B, T) out
    assert logp.shape == (2, 7) and logp.dtype == torch.float32
    torch.testing.assert_close(logp.view(-1), reference(h, w, None, y, entropy=False),
                               **TOL[torch.float32])


def test_rejects_bad_arguments():
    h, w, _, y = make(4, 50, 8, torch.float32, bias=False)
    with pytest.raises(ValueError, match="dtype"):
        token_logprobs(h.bfloat16(), w, y)
    with pytest.raises(ValueError, match="shapes"):
        token_logprobs(h, w[:, :4], y)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(h, w, y, temperature=0.0)


MEMORY_CHILD = textwrap.dedent("""
    import json, sys, torch
    from kernels import token_logprobs, token_logprobs_reference
    variant, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(2)
    fn = token_logprobs if variant == "chunked" else token_logprobs_reference

    def vm(key):  # bytes, from /proc/self/status
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    g = torch.Generator().manual_seed(0)
    N, V, H = 4096, 32000, 512
    h, w = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g).mul_(0.05)
    y = torch.randint(0, V, (N,), generator=g)
    fn(h[:8], w[:300], y[:8] % 300)  # load the libraries and thread pools on a tiny call
    base = vm("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS (Linux >= 4.0)
    logp = fn(h, w, y)
    peak = vm("VmHWM:") - base
    torch.save(logp, out)
    print(json.dumps({"peak": peak}))
""")


def test_cpu_peak_memory_at_most_an_eighth_of_naive(tmp_path):
    """The bar: N = 4096, V = 32000, H = 512, fp32, on the CPU. Each variant runs in a fresh
    process and we read its peak RSS over the inputs (VmHWM after a reset): real pages touched,
    allocator included, nothing estimated."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    env = dict(os.environ, RLHF_KERNELS="torch")
    outs = {v: tmp_path / f"{v}.pt" for v in ("naive", "chunked")}
    procs = {v: subprocess.Popen([sys.executable, "-c", MEMORY_CHILD, v, str(out)], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for v, out in outs.items()}  # side by side: peak RSS is per process
    peaks = {}
    for v, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr
        peaks[v] = json.loads(stdout.strip().splitlines()[-1])["peak"]
    assert peaks["naive"] > 2 * 4096 * 32000 * 4 * 0.9  # logits + log-softmax really measured
    assert peaks["chunked"] * 8 <= peaks["naive"], peaks
    torch.testing.assert_close(torch.load(outs["chunked"]), torch.load(outs["naive"]),
                               rtol=1e-5, atol=1e-4)


def test_import_and_cpu_path_without_triton():
    code = textwrap.dedent("""
        import os, sys
        sys.modules["triton"] = None  # `import triton` now raises ImportError
        import torch, kernels
        h, w, y = torch.randn(5, 8), torch.randn(40, 8), torch.randint(0, 40, (5,))
        assert kernels.token_logprobs(h, w, y).shape == (5,)
        os.environ["RLHF_KERNELS"] = "triton"
        try:
            kernels.token_logprobs(h, w, y)
        except RuntimeError as e:
            print("refused:", e)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={k: v for k, v in os.environ.items()
                                           if k != "TRITON_INTERPRET"})
    assert run.returncode == 0, run.stderr
    assert "refused: RLHF_KERNELS=triton but triton is not installed" in run.stdout


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_forward_and_backward_match_reference(dtype, monkeypatch):
    monkeypatch.setenv("RLHF_KERNELS", "triton")
    h, w, b, y = make(1000, 32003, 1024, dtype, device="cuda")  # V off every tile
    leaves = [t.requires_grad_() for t in (h, w, b)]
    g_lp, g_ent = torch.randn(1000, device="cuda"), torch.randn(1000, device="cuda")
    got = grads_of(lambda: token_logprobs(h, w, y, lm_head_bias=b, return_entropy=True),
                   leaves, g_lp, g_ent)
    want = grads_of(lambda: reference(h, w, b, y), leaves, g_lp, g_ent)
    with torch.no_grad():
        lp, ent = token_logprobs(h, w, y, lm_head_bias=b, return_entropy=True)
        ref_lp, ref_ent = reference(h, w, b, y)
    torch.testing.assert_close(lp, ref_lp, **TOL[dtype])
    torch.testing.assert_close(ent, ref_ent, **TOL[dtype])
    for a, e in zip(got, want):
        torch.testing.assert_close(a.float(), e.float(), **GRAD_TOL[dtype])
