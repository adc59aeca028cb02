"""The RM service as a reward function for other trainers (TRL's GRPO, plain Python).

    from rm_client import RemoteRewardFunction
    rm = RemoteRewardFunction("rm-0:50051,rm-1:50051", name="helpful_rm", token=...)
    rewards = rm(prompts=["Q: ...", ...], completions=[" A: ...", ...])      # list[float]
    trainer = GRPOTrainer(model=..., reward_funcs=[rm], ...)                  # TRL

TRL calls reward functions as ``f(prompts=..., completions=..., completion_ids=...,
**dataset_columns)`` and expects one float per completion; it logs each one under its
``__name__`` (``name=``, default "remote_rm"): give two RMs two names, or they log as one
series. Both of its formats work: plain text (prompt and completion strings, scored as a text
pair) and conversational (lists of ``{"role", "content"}`` messages; prompt + completion
messages are scored with the model's chat template). The samples of one call go out on one
stream, so the server batches them with everyone else's.

Token ids (``tokenizer=``, the policy's tokenizer, e.g. ``trainer.processing_class``): TRL
passes the ids it generated as ``completion_ids``. When the local tokenizer's fingerprint
(``protos.encoding.tokenizer_fingerprint``, the policy trainer's check) equals the server's
``ModelInfo.tokenizer_fingerprint`` (the same tokenizer, chat template and scoring recipe),
text prompts go out as token ids: the prompt tokenized as TRL tokenizes it for generation
(with the tokenizer's special tokens, e.g. BOS), then the generated ids, less the trailing
special tokens (EOS) that TRL's decoded completion drops too. The RM then scores the policy's
own tokens, with no decode/re-encode round trip (which is not always the identity).
Conversations stay conversations: the server's chat template ends the assistant turn as the
RM was trained, which generated ids need not (a trailing newline after the end-of-turn token,
say), and the score is read at that last token. ``input_mode``: "auto" (the above), "text"
(never token ids), "tokens" (token ids for text prompts, refused at the first call when the
fingerprints differ).

``normalize=True`` maps rewards to ``(r − mean) / std`` with the statistics the checkpoint
carries (``ModelInfo.reward_mean/std``; unchanged when it has none).

A sample that cannot be scored raises :class:`ScoringError`: a failed reward is never 0. A
malformed address (``http://host:50051``, ``localhost`` without a port) raises
:class:`AddressError` at construction; while the server is unreachable a warning per retry
round goes to the ``rm_client.client`` logger (pass ``logger=`` to route it elsewhere), and
``total_timeout=`` (seconds per call, all retries included) bounds a hung server.
:class:`AsyncRemoteRewardFunction` takes the same options, for asyncio trainers (TRL runs an
async reward function on its own event loop).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from protos import reward_pb2 as pb
from protos.encoding import tokenizer_fingerprint
from rm_client.client import AsyncRewardClient
from rm_client.samples import chat_sample, text_sample, token_sample
from rm_client.sync import RewardClient
from rm_client.targets import parse_targets

INPUT_MODES = ("auto", "text", "tokens")
_call_ids = itertools.count()


def build_samples(prompts: Sequence, completions: Sequence,
                  prompt_ids: Sequence[list[int]] | None = None,
                  completion_ids: Sequence[list[int]] | None = None) -> list[pb.Sample]:
    """One sample per (prompt, completion): token ids where ``prompt_ids[i]`` is given (not
    None), else a text pair (strings) or a conversation (message lists)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    call = next(_call_ids)
    samples = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        sid = f"r{call}-{i}"
        if prompt_ids is not None and prompt_ids[i] is not None:
            samples.append(token_sample(sid, prompt_ids[i] + completion_ids[i],
                                        len(prompt_ids[i])))
        elif isinstance(p, str) and isinstance(c, str):
            samples.append(text_sample(sid, p, c))
        elif isinstance(p, list) and isinstance(c, list):
            samples.append(chat_sample(sid, list(p) + list(c)))
        else:
            raise TypeError(f"item {i}: prompt and completion must both be strings or both be "
                            f"message lists, got {type(p).__name__} and {type(c).__name__}")
    return samples


class _Rules:
    """What both callables share, with no I/O: the options, the decision made from the server's
    ModelInfo at the first call, the samples of a call, the normalization of its rewards."""

    def __init__(self, name: str, normalize: bool, tokenizer, input_mode: str):
        if input_mode not in INPUT_MODES:
            raise ValueError(f"input_mode must be one of {INPUT_MODES}, got {input_mode!r}")
        if input_mode == "tokens" and tokenizer is None:
            raise ValueError("input_mode='tokens' needs tokenizer= (the policy's tokenizer)")
        self.name, self.normalize = name, normalize
        self.tokenizer, self.input_mode = tokenizer, input_mode
        self.send_tokens = False
        self.stats: tuple[float, float] | None = None
        self.ready = not self.needs_info  # nothing to ask the server: ready at once

    @property
    def needs_info(self) -> bool:
        return self.normalize or (self.tokenizer is not None and self.input_mode != "text")

    def decide(self, info: pb.ModelInfo) -> None:
        """Token ids or text, and the normalization statistics, from the server's ModelInfo."""
        if self.tokenizer is not None and self.input_mode != "text":
            ours = tokenizer_fingerprint(self.tokenizer)
            self.send_tokens = ours == info.tokenizer_fingerprint
            if self.input_mode == "tokens" and not self.send_tokens:
                raise ValueError(
                    f"{self.name}: input_mode='tokens', but the server's tokenizer or scoring "
                    f"recipe (fingerprint {info.tokenizer_fingerprint}) differs from the local "
                    f"tokenizer's ({ours}): use input_mode='auto' or 'text'")
        if info.has_reward_stats:
            self.stats = (info.reward_mean, info.reward_std)
        self.ready = True

    def samples(self, prompts: Sequence, completions: Sequence,
                completion_ids: Sequence[Sequence[int]] | None) -> list[pb.Sample]:
        if not (self.send_tokens and completion_ids is not None):
            return build_samples(prompts, completions)
        if len(completion_ids) != len(completions):
            raise ValueError(f"{len(completions)} completions but {len(completion_ids)} "
                             "completion_ids")
        texts = sorted({p for p in prompts if isinstance(p, str)})
        tokenized = dict(zip(texts, self.tokenizer(texts)["input_ids"])) if texts else {}
        prompt_ids = [list(tokenized[p]) if isinstance(p, str) else None for p in prompts]
        return build_samples(prompts, completions, prompt_ids,
                             [self._response_ids(ids) for ids in completion_ids])

    def _response_ids(self, ids: Sequence[int]) -> list[int]:
        """Generated ids less their trailing special tokens (EOS): TRL decodes completions with
        skip_special_tokens, and this project's recipe scores a response without EOS."""
        special = set(getattr(self.tokenizer, "all_special_ids", None) or ())
        special.add(getattr(self.tokenizer, "eos_token_id", None))
        ids = [int(t) for t in ids]
        while ids and ids[-1] in special:
            ids.pop()
        return ids

    def finish(self, rewards: list[float]) -> list[float]:
        if self.normalize and self.stats:
            mean, std = self.stats
            return [(r - mean) / max(std, 1e-6) for r in rewards]
        return rewards


class RemoteRewardFunction:
    """Sync callable: ``(prompts, completions, completion_ids=None, **kwargs) -> list[float]``.

    ``name``: the ``__name__`` TRL logs the rewards under. ``normalize``: rewards as z-scores
    with the checkpoint's statistics. ``tokenizer`` and ``input_mode``: token ids for TRL's
    ``completion_ids`` (module docstring). Other keywords go to :class:`RewardClient`
    (``token``, ``client_id``, ``timeout``, ``total_timeout``, ``max_attempts``, ``tls``...).
    """

    def __init__(self, targets: str | Sequence[str], normalize: bool = False, *,
                 name: str = "remote_rm", tokenizer=None, input_mode: str = "auto",
                 **client_kwargs):
        self._rules = _Rules(name, normalize, tokenizer, input_mode)
        self.__name__ = name  # TRL logs rewards under the function's __name__
        self.client = RewardClient(targets, **client_kwargs)

    @property
    def sends_token_ids(self) -> bool:
        """Whether text prompts go out as token ids (decided at the first call)."""
        return self._rules.send_tokens

    def __call__(self, prompts: Sequence, completions: Sequence,
                 completion_ids: Sequence[Sequence[int]] | None = None,
                 **kwargs) -> list[float]:
        if not self._rules.ready:
            self._rules.decide(self.client.model_info())
        samples = self._rules.samples(prompts, completions, completion_ids)
        return self._rules.finish([r.reward for r in self.client.score_all(samples)])

    def close(self) -> None:
        self.client.close()


class AsyncRemoteRewardFunction:
    """Async callable for asyncio trainers: ``await f(prompts, completions, completion_ids=None)
    -> list[float]``; the options of :class:`RemoteRewardFunction`."""

    def __init__(self, targets: str | Sequence[str], normalize: bool = False, *,
                 name: str = "remote_rm", tokenizer=None, input_mode: str = "auto",
                 **client_kwargs):
        self._rules = _Rules(name, normalize, tokenizer, input_mode)
        self.__name__ = name
        # The client is made at the first call (on its loop); a bad address fails now.
        self.targets, self.client_kwargs = parse_targets(targets), client_kwargs
        self.client: AsyncRewardClient | None = None

    @property
    def sends_token_ids(self) -> bool:
        return self._rules.send_tokens

    async def __call__(self, prompts: Sequence, completions: Sequence,
                       completion_ids: Sequence[Sequence[int]] | None = None,
                       **kwargs) -> list[float]:
        if self.client is None:  # channels belong to the loop that created them
            self.client = AsyncRewardClient(self.targets, **self.client_kwargs)
        if not self._rules.ready:
            self._rules.decide(await self.client.model_info())
        results = await self.client.score_all(
            self._rules.samples(prompts, completions, completion_ids))
        return self._rules.finish([r.reward for r in results])

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
