"""The guard both kernel test files run at collection: without CUDA, Triton must interpret.

TRITON_INTERPRET must be set before the first ``import triton`` in the process (tests/conftest.py
sets it when CUDA is unavailable): ``@triton.jit`` picks interpreter or compiler when the
decorator runs, for our kernels and for Triton's own ``tl.sum`` / ``tl.max``.
"""

import torch


def kernels_interpreted(kernel) -> None:
    """Fail collection loudly (not a silent skip) when the CPU run cannot interpret kernels."""
    if torch.cuda.is_available():
        return
    import triton

    import kernels

    std = type(triton.language.standard.sum).__name__
    if not kernels.dispatch.interpreting(kernel) or std != "InterpretedFunction":
        raise RuntimeError(
            "triton was imported before TRITON_INTERPRET=1 was set, so its kernels are compiled "
            "and cannot run on CPU tensors. Set TRITON_INTERPRET=1 in tests/conftest.py (when "
            "CUDA is unavailable) or in the environment.")
