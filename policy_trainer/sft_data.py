"""SFT examples: a demonstration becomes input ids and labels (the prompt masked), and a list
of examples a right-padded batch.

Tokenization goes through :class:`protos.encoding.Encoder`, the one the reward model is
trained and served with, so the policy and the RM see the same ids for the same text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from policy_trainer.data import Demo, pad
from protos.encoding import Encoder

IGNORE_INDEX = -100  # label of a position that is not trained on (torch's cross_entropy default)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens; the response and its EOS are trained on
    truncated: bool = False
    no_context: bool = False  # no prompt and no BOS: the first response token is not trained


@dataclass
class EncodeStats:
    examples: int = 0
    truncated: int = 0  # prompt cut from the left to fit max_length
    dropped: int = 0    # too long to train on (see encode_demo)
    dropped_lines: list[int] = field(default_factory=list)
    no_context: int = 0  # empty prompt and no BOS: the first response token is not trained


def empty_prompt_ids(tokenizer) -> list[int]:
    """What an empty prompt becomes: the context the first response token is predicted from.

    The Encoder tokenizes a prompt with the tokenizer's special tokens, but an empty prompt with
    none at all (``encode_text`` skips it), which would leave the first response token with no
    position to be predicted from. So: the special tokens the tokenizer puts around any text
    (Llama's BOS: the same rule as for a non-empty prompt), or, when it adds none to text
    (GPT-2), its BOS token, the token ``generate()`` starts from when given no input. A
    tokenizer with neither gives [] and the first response token cannot be trained.
    """
    ids = list(tokenizer("", add_special_tokens=True)["input_ids"])
    if not ids and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id]
    return ids


def encode_demo(encoder: Encoder, demo: Demo, eos_token_id: int,
                truncation: str = "left") -> Example | None:
    """prompt ids (with special tokens) + response ids + EOS; labels mask the prompt.

    Over ``encoder.max_length``: with ``truncation="left"`` the prompt loses tokens from its
    start (the Encoder's rule for the RM: the end of the prompt, next to the response, matters
    most) while the response is kept whole; an example whose response + EOS does not fit next
    to at least one prompt token is dropped (None). With ``truncation="drop"`` every over-long
    example is dropped. The response is never cut: a cut response would lose its EOS and teach
    the policy not to stop.

    An empty prompt becomes :func:`empty_prompt_ids` (BOS), so the first response token is
    trained like any other; with a tokenizer that has no BOS it is not (its label is masked:
    nothing precedes it) and ``Example.no_context`` says so.
    """
    ids, prompt_length = encoder.encode_text(demo.prompt, demo.response)
    if prompt_length == 0:
        context = empty_prompt_ids(encoder.tokenizer)
        ids, prompt_length = context + ids, len(context)
    ids = ids + [eos_token_id]
    response_length = len(ids) - prompt_length
    truncated = False
    if len(ids) > encoder.max_length:
        # Need one context token before the response: the first response token is predicted
        # from the position before it.
        if truncation == "drop" or response_length + 1 > encoder.max_length:
            return None
        cut = len(ids) - encoder.max_length
        ids, prompt_length, truncated = ids[cut:], prompt_length - cut, True
    labels = [IGNORE_INDEX] * prompt_length + ids[prompt_length:]
    if prompt_length == 0:  # position 0 predicts nothing before it: say so in the labels
        labels[0] = IGNORE_INDEX
    return Example(ids, labels, truncated, no_context=prompt_length == 0)


def encode_demos(encoder: Encoder, demos: list[Demo], eos_token_id: int,
                 truncation: str = "left") -> tuple[list[Example], EncodeStats]:
    examples, stats = [], EncodeStats()
    for demo in demos:
        ex = encode_demo(encoder, demo, eos_token_id, truncation)
        if ex is None:
            stats.dropped += 1
            stats.dropped_lines.append(demo.line)
            continue
        stats.truncated += ex.truncated
        stats.no_context += ex.no_context
        examples.append(ex)
    stats.examples = len(examples)
    return examples, stats


def collate(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask and labels, each (B, T).
    Padding is masked by attention_mask and labels (pad may equal EOS, and the EOS is trained
    on)."""
    input_ids, attention_mask = pad([ex.input_ids for ex in examples], pad_token_id)
    labels, _ = pad([ex.labels for ex in examples], IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
