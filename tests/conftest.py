"""Shared fixtures: a locally trained tokenizer and tiny checkpoints (no model hub)."""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels run on the CPU under the interpreter. It must be set before anything imports
# triton (rm_server imports kernels, which imports triton): triton fixes some ops to compiled
# mode at import time. On a CUDA machine the real kernels compile instead.
if not os.path.exists("/dev/nvidia0") and not os.environ.get("CUDA_VISIBLE_DEVICES"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return tiny.train_tokenizer()


@pytest.fixture(scope="session")
def rm_dirs(tmp_path_factory, tokenizer):
    """One saved reward-model checkpoint per architecture: {arch: Path}."""
    root = tmp_path_factory.mktemp("rms")
    return {arch: tiny.make_reward_model(arch, tokenizer, root / arch, seed=i)
            for i, arch in enumerate(tiny.ARCH_KW)}
