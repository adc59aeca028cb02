"""The RM service as a reward function for other trainers (TRL's GRPO, plain Python).

    from rm_client import RemoteRewardFunction
    rm = RemoteRewardFunction("rm-0:50051,rm-1:50051", token=...)
    rewards = rm(prompts=["Q: ...", ...], completions=[" A: ...", ...])      # list[float]
    trainer = GRPOTrainer(model=..., reward_funcs=[rm], ...)                  # TRL

TRL calls reward functions as ``f(prompts=..., completions=..., **dataset_columns)`` and
expects one float per completion. Both of its formats work: plain text (prompt and completion
strings, scored as a text pair) and conversational (lists of ``{"role", "content"}``
messages; prompt + completion messages are scored with the model's chat template). The
samples of one call go out on one stream, so the server batches them with everyone else's.
A sample that cannot be scored raises :class:`ScoringError`: a failed reward is never 0.
A malformed address (``http://host:50051``, ``localhost`` without a port) raises
:class:`AddressError` at construction; while the server is unreachable a warning per retry
round goes to the ``rm_client.client`` logger (pass ``logger=`` to route it elsewhere), and
``total_timeout=`` (seconds per call, all retries included) bounds a hung server.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from rm_client.client import AsyncRewardClient
from rm_client.samples import chat_sample, text_sample
from rm_client.sync import RewardClient
from rm_client.targets import parse_targets

_call_ids = itertools.count()


def build_samples(prompts: Sequence, completions: Sequence) -> list:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    call = next(_call_ids)
    samples = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        sid = f"r{call}-{i}"
        if isinstance(p, str) and isinstance(c, str):
            samples.append(text_sample(sid, p, c))
        elif isinstance(p, list) and isinstance(c, list):
            samples.append(chat_sample(sid, list(p) + list(c)))
        else:
            raise TypeError(f"item {i}: prompt and completion must both be strings or both be "
                            f"message lists, got {type(p).__name__} and {type(c).__name__}")
    return samples


class RemoteRewardFunction:
    """Sync callable: ``(prompts, completions, **kwargs) -> list[float]``."""

    def __init__(self, targets: str | Sequence[str], normalize: bool = False, **client_kwargs):
        self.client = RewardClient(targets, **client_kwargs)
        self.normalize = normalize
        self.__name__ = "remote_rm"  # TRL logs rewards under the function's __name__
        self._stats = None

    def _stats_or_none(self):
        if self._stats is None:
            info = self.client.model_info()
            self._stats = (info.reward_mean, info.reward_std) if info.has_reward_stats else ()
        return self._stats

    def __call__(self, prompts: Sequence, completions: Sequence, **kwargs) -> list[float]:
        samples = build_samples(prompts, completions)
        rewards = [r.reward for r in self.client.score_all(samples)]
        if self.normalize and self._stats_or_none():
            mean, std = self._stats
            rewards = [(r - mean) / max(std, 1e-6) for r in rewards]
        return rewards

    def close(self) -> None:
        self.client.close()


class AsyncRemoteRewardFunction:
    """Async callable for asyncio trainers: ``await f(prompts, completions) -> list[float]``."""

    def __init__(self, targets: str | Sequence[str], **client_kwargs):
        # The client is made at the first call (on its loop); a bad address fails now.
        self.targets, self.client_kwargs = parse_targets(targets), client_kwargs
        self.client: AsyncRewardClient | None = None
        self.__name__ = "remote_rm"

    async def __call__(self, prompts: Sequence, completions: Sequence, **kwargs) -> list[float]:
        if self.client is None:  # channels belong to the loop that created them
            self.client = AsyncRewardClient(self.targets, **self.client_kwargs)
        results = await self.client.score_all(build_samples(prompts, completions))
        return [r.reward for r in results]

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
