"""What a client sends and gets back: sample builders (text pair, conversation, token ids, full
text) and :class:`ScoreResult`, a plain copy of the wire's result."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from protos import reward_pb2 as pb


@dataclass(frozen=True)
class ScoreResult:
    id: str
    reward: float
    num_tokens: int
    truncated: bool
    head_scores: tuple[float, ...] = ()  # a multi-head RM's heads (an ensemble's members)
    version: str = ""  # the model version that scored it: its weights hash (ModelInfo.version)
    version_label: str = ""  # that version's operator label; empty when it has none
    head_mean: float = 0.0  # mean and std (1/K) of head_scores: an ensemble's members' mean
    head_std: float = 0.0  # and disagreement (rm_client/ensemble.py); 0 for one head

    @classmethod
    def from_message(cls, r: pb.ScoreResult) -> ScoreResult:
        return cls(r.id, r.reward, r.num_tokens, r.truncated, tuple(r.head_scores), r.version,
                   r.version_label, r.head_mean, r.head_std)


def text_sample(sample_id: str, prompt: str, response: str) -> pb.Sample:
    """Prompt + response, tokenized by the server as in training."""
    return pb.Sample(id=sample_id, text=pb.TextPair(prompt=prompt, response=response))


def chat_sample(sample_id: str, messages: Sequence[dict | tuple[str, str]]) -> pb.Sample:
    """Chat messages (``{"role", "content"}`` dicts or ``(role, content)`` pairs); the server
    applies the model's chat template."""
    msgs = [pb.ChatMessage(role=m["role"], content=m["content"]) if isinstance(m, dict)
            else pb.ChatMessage(role=m[0], content=m[1]) for m in messages]
    return pb.Sample(id=sample_id, conversation=pb.Conversation(messages=msgs))


def token_sample(sample_id: str, ids: Sequence[int], prompt_length: int = 0,
                 token_type_ids: Sequence[int] = ()) -> pb.Sample:
    """Token ids already made with the server's tokenizer (compare ``tokenizer_fingerprint``);
    ``token_type_ids`` for models that take them (``ModelInfo.accepts_token_type_ids``)."""
    return pb.Sample(id=sample_id, tokens=pb.TokenIds(ids=list(ids), prompt_length=prompt_length,
                                                      token_type_ids=list(token_type_ids)))


def full_text_sample(sample_id: str, text: str) -> pb.Sample:
    """A whole text as the model sees it, its special tokens written out (e.g. a transcript
    with the chat template applied, or OpenRLHF's query); tokenized as it is."""
    return pb.Sample(id=sample_id, full_text=pb.FullText(text=text))
