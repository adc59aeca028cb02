"""The text->token rule both sides apply (protos/encoding.py), with a tokenizer alone: the
same ids for training and serving, and a prompt tokenized once for its k responses. The rule
applied by a loaded reward model (truncation, field names, chat templates):
tests/rm_server/test_model.py."""

from __future__ import annotations

from protos.encoding import ChatInput, Encoder, TextInput
from tests import tiny


def test_encoder_is_shared_with_training():
    """Training imports the same Encoder: one tokenization for both (policy_trainer/rm_train.py)."""
    tok = tiny.train_tokenizer()
    enc = Encoder(tok, 64, len(tok))
    ids, plen = enc.encode_text("a movie", " it was great")
    assert ids[:plen] == tok("a movie")["input_ids"]
    assert ids[plen:] == tok(" it was great", add_special_tokens=False)["input_ids"]


class CountingTokenizer:
    """Delegates to a real tokenizer, counting tokenizer and chat-template calls."""

    def __init__(self, tok):
        self.tok, self.calls, self.templates = tok, 0, 0
        self.chat_template = tok.chat_template

    def __call__(self, *a, **kw):
        self.calls += 1
        return self.tok(*a, **kw)

    def apply_chat_template(self, *a, **kw):
        self.templates += 1
        return self.tok.apply_chat_template(*a, **kw)


def test_a_prompt_is_tokenized_once_for_its_k_responses(tokenizer):
    counting = CountingTokenizer(tokenizer)
    cached, plain = Encoder(counting, 64, len(tokenizer)), Encoder(tokenizer, 64, len(tokenizer))
    responses = [" good", " bad", " fine", " awful"]
    got = [cached.encode(TextInput("the movie was", r)) for r in responses]
    assert counting.calls == 1 + len(responses)  # the prompt once, then each response
    for g, r in zip(got, responses):
        want = plain.encode(TextInput("the movie was", r))
        assert (g.ids, g.prompt_length) == (want.ids, want.prompt_length)
    history = (("system", "be brief"), ("user", "hi"))
    chats = [cached.encode(ChatInput(history + (("assistant", r),))) for r in responses]
    assert counting.templates == len(responses) + 1  # each full chat, the shared prompt once
    for g, r in zip(chats, responses):
        want = plain.encode(ChatInput(history + (("assistant", r),)))
        assert (g.ids, g.prompt_length) == (want.ids, want.prompt_length) and g.prompt_length > 0
