"""Fused ops for reward scoring and token log-probs: Triton kernels, torch references, CPU paths.

No I/O, no gRPC, no logging here: pure tensor math. Each op file reads
kernel -> launcher -> autograd wrapper -> torch reference. ``RLHF_KERNELS=auto|triton|torch``
picks the implementation (``kernels.dispatch``); Triton is optional at import time.

Note: the PyPI package ``kernels`` (Hugging Face's kernel hub client) has the same import name.
``transformers`` only probes for it; see README "Troubleshooting" for a clash.
"""

from kernels.last_token_score import last_token_score, last_token_score_reference
from kernels.token_logprobs import token_logprobs, token_logprobs_reference

__all__ = [
    "last_token_score",
    "last_token_score_reference",
    "token_logprobs",
    "token_logprobs_reference",
]
