"""kernels/last_token_score.py: the Triton kernel against its torch reference and against HF.

Without a GPU the Triton kernel runs on the CPU through Triton's interpreter (slow; small
shapes). GPU tests are marked and skip here.
"""

import os

import torch

# TRITON_INTERPRET must be set before the first `import triton` in this process: @triton.jit
# picks interpreter or compiler when the decorator runs, for our kernels and for Triton's own
# tl.sum / tl.max. If another module imported triton first, kernels_interpreted() says so.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

import kernels  # noqa: E402
from tests.kernels.interpreted import kernels_interpreted  # noqa: E402


def load_compiled_copy(name: str):
    """A private copy of kernels/<name>.py with compiled (not interpreted) kernel objects."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"  # read by the decorators while the copy executes
    try:
        spec = importlib.util.spec_from_file_location(
            f"_compiled_{name}", Path(kernels.__file__).parent / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return mod


op = sys.modules["kernels.last_token_score"]  # the module (kernels.last_token_score is the op)
kernels_interpreted(op._last_token_score_kernel)
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Both sides compute in fp32 from the same rounded inputs; 16-bit inputs get looser bounds for
# a GPU's different summation order on larger magnitudes.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-3),
       torch.bfloat16: dict(rtol=1e-3, atol=1e-3)}
DTYPES = list(TOL)


def make(B, T, H, L, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    h = (r(B, T, H) * 3 + 1).to(dtype)  # offset mean: LayerNorm's centering matters
    return dict(hidden=h.to(device), head_weight=(r(L, H) / H**0.5).to(dtype).to(device),
                head_bias=r(L).to(device), norm_weight=(1 + 0.3 * r(H)).to(dtype).to(device),
                norm_bias=(0.1 * r(H)).to(dtype).to(device))


def run_both(args, index, norm, eps=1e-5, **kw):
    a = dict(args, index=index, norm=norm, eps=eps)
    return op._last_token_score_triton(**a, **kw), op.last_token_score_reference(**a)


# (B, T, H, L): H off the block (block_h=32 -> masked tail), B = 1, length-1 sequences, L > 1
SHAPES = [(1, 1, 72, 1), (3, 5, 72, 3), (4, 7, 130, 2), (2, 3, 16, 17)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", ["rms", "layer", None])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_padded_matches_reference(shape, norm, dtype):
    B, T, H, L = shape
    args = make(B, T, H, L, dtype)
    index = torch.randint(0, T, (B,), generator=torch.Generator().manual_seed(1))
    got, want = run_both(args, index, norm, block_h=32)
    assert got.dtype == torch.float32 and got.shape == (B, L)
    torch.testing.assert_close(got, want, **TOL[dtype])


def test_padded_index_edges_and_default_block():
    args = make(4, 6, 100, 1, torch.float32)
    for index in ([5, 5, 5, 5], [0, 0, 0, 0], [-1, -6, 2, -3]):  # all equal, first, negative
        got, want = run_both(args, torch.tensor(index), "rms")
        torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_no_weights_and_strided_hidden():
    args = make(3, 8, 72, 2, torch.float32)
    args.update(head_bias=None, norm_weight=None, norm_bias=None)
    args["hidden"] = args["hidden"][:, ::2]  # (3, 4, 72), non-contiguous over T
    got, want = run_both(args, torch.tensor([3, 0, 1]), "layer")
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_index", [False, True])
def test_packed_matches_reference_and_padded(dtype, with_index):
    lengths = [1, 4, 3, 1, 5]
    H, L = 72, 2
    cu = torch.tensor([0] + lengths).cumsum(0)  # (B + 1,)
    args = make(1, cu[-1].item(), H, L, dtype)
    packed = args["hidden"][0]  # (N, H), no padding anywhere
    index = torch.tensor([0, 2, -1, 0, -4]) if with_index else None
    a = dict(args, hidden=packed, index=index, norm="rms")
    got = op._last_token_score_triton(**a, cu_seqlens=cu, block_h=32)
    want = op.last_token_score_reference(**a, cu_seqlens=cu)
    torch.testing.assert_close(got, want, **TOL[dtype])
    # the same rows read from a padded batch
    padded = torch.zeros(len(lengths), max(lengths), H, dtype=dtype)
    for b, n in enumerate(lengths):
        padded[b, :n] = packed[cu[b]:cu[b + 1]]
    pos = torch.tensor([0, 2, 2, 0, 1]) if with_index else torch.tensor(lengths) - 1
    torch.testing.assert_close(op.last_token_score_reference(**dict(a, hidden=padded, index=pos)),
                               want, rtol=0, atol=0)


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_gradients_match_reference(norm, monkeypatch):
    monkeypatch.setenv("RLHF_KERNELS", "triton")
    args = make(3, 5, 40, 2, torch.float32)
    leaves = {k: v.requires_grad_() for k, v in args.items()}
    index, grad = torch.tensor([4, 0, 2]), torch.randn(3, 2)
    op.last_token_score(**args, index=index, norm=norm).backward(grad)
    got = {k: v.grad.clone() for k, v in leaves.items()}
    for v in leaves.values():
        v.grad = None
    op.last_token_score_reference(**args, index=index, norm=norm).backward(grad)
    for k, v in leaves.items():
        torch.testing.assert_close(got[k], v.grad, rtol=1e-5, atol=1e-5, msg=k)


def test_dispatch(monkeypatch):
    args = make(2, 3, 24, 1, torch.float32)
    index = torch.tensor([2, 1])
    want = op.last_token_score_reference(**args, index=index)
    for choice in ("auto", "torch", "triton"):  # auto on CPU tensors: the torch path
        monkeypatch.setenv("RLHF_KERNELS", choice)
        torch.testing.assert_close(op.last_token_score(**args, index=index), want)
    monkeypatch.setenv("RLHF_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="RLHF_KERNELS"):
        op.last_token_score(**args, index=index)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_forced_triton_refuses_compiled_kernels_on_cpu(monkeypatch):
    compiled = load_compiled_copy("last_token_score")
    monkeypatch.setenv("RLHF_KERNELS", "triton")
    args = make(1, 2, 16, 1, torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        compiled.last_token_score(**args, index=torch.tensor([1]))


@pytest.mark.parametrize("arch,dtype", [("llama", torch.float32), ("gpt2", torch.float32),
                                        ("llama", torch.bfloat16)], ids=str)
def test_equals_hf_sequence_classification(arch, dtype):
    """Backbone without its final norm + the kernel == HF's logits at HF's scored index."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(0)
    kw = dict(llama=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2),
              gpt2=dict(n_embd=48, n_layer=2, n_head=4))[arch]
    cfg = AutoConfig.for_model(arch, vocab_size=64, num_labels=1, pad_token_id=0, **kw)
    model = AutoModelForSequenceClassification.from_config(cfg).eval()
    backbone = model.base_model
    norm_attr, kind = ("norm", "rms") if arch == "llama" else ("ln_f", "layer")
    final = getattr(backbone, norm_attr)
    head = model.score
    with torch.no_grad():  # random-init heads are ~0: give them spread, and the norm weights
        head.weight.normal_(0, 1.0)
        final.weight.normal_(1.0, 0.5)
        if kind == "layer":
            final.bias.normal_(0, 0.5)
    model.to(dtype)
    ids = torch.tensor([[5, 9, 3, 7, 0, 0], [4, 4, 8, 2, 6, 11], [13, 0, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    index = (torch.arange(ids.shape[1]) * mask).argmax(-1)  # HF's last non-pad rule
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits.float()  # (B, 1)
        setattr(backbone, norm_attr, torch.nn.Identity())
        hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
        setattr(backbone, norm_attr, final)
        eps = getattr(final, "variance_epsilon", getattr(final, "eps", 1e-6))
        a = dict(hidden=hidden, index=index, head_weight=head.weight, head_bias=head.bias,
                 norm=kind, norm_weight=final.weight, norm_bias=getattr(final, "bias", None),
                 eps=eps)
        got = op._last_token_score_triton(**a)
        ref = op.last_token_score_reference(**a)
    # HF rounds the normalized row and the head output to the model dtype; we stay in fp32.
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(got, ref, **TOL[dtype])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_compiled_kernel_matches_reference(dtype):
    args = make(8, 257, 4096, 1, dtype, device="cuda")
    index = torch.randint(0, 257, (8,), device="cuda")
    for norm in ("rms", "layer"):
        a = dict(args, index=index, norm=norm)
        torch.testing.assert_close(op._last_token_score_triton(**a),
                                   op.last_token_score_reference(**a), **TOL[dtype])
