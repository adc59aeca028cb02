"""Which implementation runs an op: the Triton kernel or the torch path.

``RLHF_KERNELS`` (read at every call, so tests and benchmarks can flip it):

- ``auto`` (default): Triton for CUDA tensors when ``triton`` imports, torch otherwise.
- ``triton``: always Triton. CPU tensors then need kernels decorated under
  ``TRITON_INTERPRET=1`` (``@triton.jit`` reads it when this package is imported): that is
  how the tests run the kernels on a machine without a GPU.
- ``torch``: always the torch path (a GPU without a working Triton, or to bisect a numerics
  question).

Triton is imported guarded: without it ``import kernels`` still works and every op runs its
torch path. The op modules take ``triton``/``tl`` from here so their ``@triton.jit``
definitions survive a missing install (the stub's ``jit`` returns the function unchanged and
nothing ever launches it).
"""

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs: the torch paths below serve every op.
    HAS_TRITON = False

    class _Stub:
        """Just enough of ``triton``/``triton.language`` for the kernel definitions to parse."""

        constexpr = None

        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _Stub()

ENV_VAR = "RLHF_KERNELS"
_CHOICES = ("auto", "triton", "torch")


def backend() -> str:
    """The forced backend from ``RLHF_KERNELS`` ("auto", "triton" or "torch")."""
    choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"{ENV_VAR} must be one of {_CHOICES}, got {choice!r}")
    return choice


def interpreting(kernel=None) -> bool:
    """True when Triton kernels run on the CPU interpreter.

    With ``kernel``, asks that kernel: ``@triton.jit`` reads ``TRITON_INTERPRET`` when the
    decorator runs (at import), so the kernel object, not today's environment, is the truth.
    Without, reads the environment (what a kernel decorated now would be).
    """
    if not HAS_TRITON:
        return False
    if kernel is not None:
        return type(kernel).__name__ == "InterpretedFunction"
    return bool(triton.knobs.runtime.interpret)


def use_triton(*tensors: torch.Tensor, kernel=None) -> bool:
    """Decide for one call of ``kernel``. Raises when Triton is forced but cannot run here."""
    choice = backend()
    on_cuda = all(t.is_cuda for t in tensors)
    if choice == "torch":
        return False
    if choice == "auto":
        return HAS_TRITON and on_cuda
    if not HAS_TRITON:
        raise RuntimeError(f"{ENV_VAR}=triton but triton is not installed (pip install triton)")
    if not on_cuda and not interpreting(kernel):
        raise RuntimeError(
            f"{ENV_VAR}=triton with CPU tensors needs kernels decorated under TRITON_INTERPRET=1 "
            "(set it before importing this package; the interpreter is for tests, it is slow)"
        )
    return True


def dot_in_fp32(dtype: torch.dtype, kernel) -> bool:
    """Whether ``tl.dot`` operands must be upcast to fp32 first.

    Only under the interpreter with bf16: it stores bf16 as uint16 and ``tl.dot`` multiplies
    the bit patterns (triton-lang/triton#11584; the debugging guide says to cast bf16 to fp32).
    On a GPU bf16 goes to the tensor cores as it is, with fp32 accumulation.
    """
    return dtype == torch.bfloat16 and interpreting(kernel)
