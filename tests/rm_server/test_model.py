"""Scoring parity: our batched path equals HF's AutoModelForSequenceClassification run on each
sample alone, for every supported architecture, padding side, pad == eos, and dtype."""

from __future__ import annotations

import inspect
import random

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from protos.encoding import ChatInput, InputError, TextInput, TokenInput
from rm_server import prefix_batch
from rm_server.checkpoint import ModelLoadError
from rm_server.last_token import last_token_index, prefix_groups
from rm_server.model import RewardModel
from rm_server.prefix_batch import cache_keyword
from tests import tiny

DECODERS = ["gpt2", "llama", "qwen2", "mistral", "gpt_neox"]


def random_batch(vocab: int, n: int = 10, seed: int = 0, specials=()) -> list[list[int]]:
    rng = random.Random(seed)
    seqs = [[rng.randrange(8, vocab) for _ in range(rng.randint(1, 40))] for _ in range(n)]
    seqs += [[rng.randrange(8, vocab)]]  # length 1
    for s in specials:  # sequences that end in (or contain) special ids, e.g. trailing EOS
        seqs.append(seqs[0] + [s, s])
        seqs.append([s] + seqs[1])
    return seqs


def hf_alone(path, seqs, dtype=torch.float32) -> list[float]:
    ref = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype).eval()
    with torch.no_grad():
        return [ref(torch.tensor([s])).logits[0, 0].float().item() for s in seqs]


def assert_close(got, want, tol):
    diff = max(abs(a - b) for a, b in zip(got, want))
    assert diff <= tol, f"max |ours - HF| = {diff}"
    assert max(want) - min(want) > 0.1, "scores must differ across inputs for parity to matter"


@pytest.mark.parametrize("arch", DECODERS + ["bert"])
def test_parity_with_hf_per_architecture(arch, rm_dirs, tokenizer):
    rm = RewardModel(rm_dirs[arch])
    assert rm.scoring_path == ("forward" if arch == "bert" else "last-token")
    seqs = random_batch(len(tokenizer), specials=(tokenizer.pad_token_id, tokenizer.eos_token_id))
    assert_close(rm.score(seqs), hf_alone(rm_dirs[arch], seqs), 1e-5)


@pytest.mark.parametrize("arch", DECODERS)
def test_last_layer_mlp_runs_on_scored_rows_only(arch, rm_dirs, tokenizer):
    """The last layer's MLP sees one row per sequence (none for a shared prefix), and the
    scores still equal HF's; the other layers' MLPs see every position."""
    rm = RewardModel(rm_dirs[arch])
    seen = []
    inner = rm._rows_mlp.mlp_forward
    rm._rows_mlp.mlp_forward = lambda x: (seen.append(tuple(x.shape[:-1])), inner(x))[1]
    seqs = random_batch(len(tokenizer), n=5, seed=4)  # 6 sequences, padded to the longest
    assert_close(rm.score(seqs), hf_alone(rm_dirs[arch], seqs), 1e-5)
    assert seen == [(len(seqs),)]
    layers = getattr(rm._backbone, "layers", None) or rm._backbone.h
    first = []
    hook = layers[0].mlp.register_forward_hook(lambda m, i, o: first.append(i[0].shape[:-1]))
    seen.clear()
    prompt = seqs[0] * 3  # > min_shared_prefix tokens: the k responses share it
    rm.score([prompt + [9, 10], prompt + [11, 12, 13]])
    hook.remove()
    assert [tuple(s) for s in first] == [(1, len(prompt)), (2, 3)]  # prefix once, then suffixes
    assert seen == [(2,)]  # the prefix's last-layer MLP skipped, the suffixes' scored rows


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pad_equals_eos_skips_trailing_eos(arch, tmp_path):
    tok = tiny.train_tokenizer(pad="eos")
    path = tiny.make_reward_model(arch, tok, tmp_path / arch, seed=3)
    rm = RewardModel(path)
    eos = tok.eos_token_id
    seqs = random_batch(len(tok), specials=(eos,))
    got = rm.score(seqs)
    assert_close(got, hf_alone(path, seqs), 1e-5)
    # HF's rule: a trailing EOS counts as padding, so the token before it is scored.
    assert last_token_index(seqs[0] + [eos, eos], eos) == len(seqs[0]) - 1
    base, with_eos = rm.score([seqs[0], seqs[0] + [eos]])
    assert abs(base - with_eos) < 1e-5


def test_no_pad_token_scores_last_position(tmp_path):
    tok = tiny.train_tokenizer(pad="none")
    path = tiny.make_reward_model("gpt2", tok, tmp_path / "gpt2", seed=4)
    rm = RewardModel(path)
    assert rm.pad_token_id is None
    seqs = random_batch(len(tok), specials=(tok.eos_token_id,))
    assert_close(rm.score(seqs), hf_alone(path, seqs), 1e-5)


def test_left_padding_tokenizer_still_matches_alone(tmp_path):
    """Left-padding tokenizers are right-padded internally: Llama positions stay those of the
    sample alone (a left-padded batch through HF would shift them)."""
    tok = tiny.train_tokenizer(padding_side="left")
    path = tiny.make_reward_model("llama", tok, tmp_path / "llama", seed=5)
    rm = RewardModel(path)
    seqs = random_batch(len(tok), seed=7)
    assert_close(rm.score(seqs), hf_alone(path, seqs), 1e-5)


def test_batch_invariance(rm_dirs, tokenizer):
    """A sample's score is the same alone, in a full batch, and among different length mixes."""
    rm = RewardModel(rm_dirs["qwen2"])
    seqs = random_batch(len(tokenizer), n=30, seed=11)
    target = seqs[3]
    alone = rm.score([target])[0]
    for mix in (seqs, [target] + [s for s in seqs if len(s) > 30], [target, [9] * 120]):
        i = next(i for i, s in enumerate(mix) if s is target)
        assert abs(rm.score(mix)[i] - alone) < 1e-5


def test_bf16_within_dtype_tolerance(rm_dirs, tokenizer):
    rm = RewardModel(rm_dirs["llama"], dtype="bfloat16")
    seqs = random_batch(len(tokenizer), seed=2)
    seqs += [list(range(20, 60)) + [9 + j] * (j + 1) for j in range(3)]  # shared: merged
    want = hf_alone(rm_dirs["llama"], seqs, torch.bfloat16)
    diff = max(abs(a - b) for a, b in zip(rm.score(seqs), want))
    assert diff < 0.1  # bf16 has ~3 significant digits; the head accumulates in fp32 here


def test_text_and_chat_match_token_ids(rm_dirs):
    rm = RewardModel(rm_dirs["llama"])
    enc = rm.encoder
    e = enc.encode(TextInput("the movie was", " great fun"))
    assert e.prompt_length == len(rm.tokenizer("the movie was")["input_ids"])
    assert e.ids[0] == rm.tokenizer.bos_token_id
    t = enc.encode(TokenInput(tuple(e.ids), e.prompt_length))
    assert t.ids == e.ids
    c = enc.encode(ChatInput((("user", "hi"), ("assistant", "great movie"))))
    rendered = rm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "great movie"}],
        tokenize=True, return_dict=True)["input_ids"]
    assert c.ids == list(rendered)
    assert 0 < c.prompt_length < len(c.ids)


def test_truncation_keeps_the_scored_end(rm_dirs):
    rm = RewardModel(rm_dirs["llama"], max_length=16)
    ids = list(range(10, 50))
    e = rm.encoder.encode(TokenInput(tuple(ids), 30))
    assert e.truncated and e.ids == ids[-16:] and e.prompt_length == 30 - 24
    strict = RewardModel(rm_dirs["llama"], max_length=16, truncation="error")
    with pytest.raises(InputError, match="longer than max_length"):
        strict.encoder.encode(TokenInput(tuple(ids), 0))


@pytest.mark.parametrize("item, field", [
    (TokenInput((), 0), "tokens.ids"),
    (TokenInput((5, 300), 0), "tokens.ids"),
    (TokenInput((5, -1), 0), "tokens.ids"),
    (TokenInput((5, 6), 3), "tokens.prompt_length"),
    (ChatInput((("wizard", "hi"),)), "conversation.messages[0].role"),
    (ChatInput(()), "conversation.messages"),
    (TextInput("", ""), "text"),
])
def test_invalid_inputs_name_the_field(rm_dirs, item, field):
    rm = RewardModel(rm_dirs["gpt2"])
    with pytest.raises(InputError) as exc:
        rm.encoder.encode(item)
    assert exc.value.field == field


def test_chat_without_template_is_refused(tmp_path):
    tok = tiny.train_tokenizer(chat=False)
    path = tiny.make_reward_model("llama", tok, tmp_path / "m")
    with pytest.raises(InputError, match="no chat template"):
        RewardModel(path).encoder.encode(ChatInput((("user", "hi"),)))


def test_load_errors_are_clear(tmp_path, tokenizer):
    with pytest.raises(ModelLoadError, match="no config.json"):
        RewardModel(tmp_path / "missing")
    path = tiny.make_reward_model("llama", tokenizer, tmp_path / "two", num_labels=2)
    with pytest.raises(ModelLoadError, match="no head named 'nope'"):  # heads: test_heads.py
        RewardModel(path, reward_head="nope")
    with pytest.raises(ModelLoadError, match="unknown scoring recipe 'nope'"):
        RewardModel(path, recipe="nope")


# -- prefix-shared scoring (the grouping itself: test_last_token.py) ---------------------------
@pytest.mark.parametrize("arch", DECODERS)
def test_prefix_shared_scores_equal_unshared(arch, rm_dirs, tokenizer):
    rm = RewardModel(rm_dirs[arch])
    rng = random.Random(3)
    prompt = [rng.randrange(8, len(tokenizer)) for _ in range(48)]
    seqs = [prompt + [rng.randrange(8, len(tokenizer)) for _ in range(rng.randint(1, 12))]
            for _ in range(8)]
    seqs += [[5, 6, 7], prompt + [tokenizer.eos_token_id, tokenizer.pad_token_id]]
    shared = rm.score(seqs)
    rm.prefix_sharing = False
    assert shared == pytest.approx(rm.score(seqs), abs=1e-5)
    assert_close(shared, hf_alone(rm_dirs[arch], seqs), 1e-5)


@pytest.mark.parametrize("arch", DECODERS)
def test_groups_met_in_a_batch_equal_hf_alone(arch, rm_dirs, tokenizer):
    """What prefix-aware batching hands the model: two prompts' responses interleaved (samples
    of several requests that met in the queue), samples that share nothing, a response that
    is nothing but pad and EOS. Each score equals HF's forward on the sample alone."""
    rm = RewardModel(rm_dirs[arch])
    rng = random.Random(7)
    vocab = len(tokenizer)
    prompts = [[rng.randrange(8, vocab) for _ in range(n)] for n in (40, 23)]
    seqs = [prompts[i % 2] + [rng.randrange(8, vocab) for _ in range(rng.randint(1, 9))]
            for i in range(7)]
    seqs += [[rng.randrange(8, vocab) for _ in range(30)], [9] * 5,
             prompts[0] + [tokenizer.eos_token_id, tokenizer.pad_token_id]]
    groups, rest = prefix_groups(seqs, rm.position_pad, rm.min_shared_prefix)
    assert sorted(len(m) for _, m in groups) == [3, 5] and len(rest) == 2  # both prompts shared
    assert_close(rm.score(seqs), hf_alone(rm_dirs[arch], seqs), 1e-5)


def test_shared_prefix_paths_without_copies(rm_dirs, monkeypatch):
    """On the CPU the suffixes' attention merges the prefix's part and their own (no cache
    passed, no k copies of the prefix); elsewhere (here forced) the prefix's cache is passed
    under the keyword the backbone takes (transformers >= 5.2x: ``cache``; ``past_key_values``
    warns, and goes in 5.40), viewed k times, not copied. Both equal HF alone."""
    rm = RewardModel(rm_dirs["llama"])
    assert rm.cache_keyword == ("cache" if "cache" in inspect.signature(
        rm._backbone.forward).parameters else "past_key_values")

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=None):
            return input_ids

    assert cache_keyword(Old()) == "past_key_values"
    calls, views = [], []
    forward, expand = rm._backbone.forward, prefix_batch.expand_cache

    def spy(*args, **kwargs):
        calls.append(sorted(k for k in kwargs if k in ("cache", "past_key_values")))
        return forward(*args, **kwargs)

    def spy_expand(cache, k):
        expand(cache, k)
        views.extend(layer.keys.stride(0) for layer in cache.layers)

    monkeypatch.setattr(rm._backbone, "forward", spy)
    monkeypatch.setattr(prefix_batch, "expand_cache", spy_expand)
    prompt = list(range(20, 60))
    seqs = [prompt + [70 + j] * (1 + j % 2) for j in range(3)]
    want = hf_alone(rm_dirs["llama"], seqs)
    assert_close(rm.score(seqs), want, 1e-5)
    assert calls == [[], []] and not views  # merged: the prefix, then the suffixes alone
    assert rm._backbone.config._attn_implementation != prefix_batch.PREFIX_ATTENTION
    calls.clear()
    monkeypatch.setattr(prefix_batch, "prefix_kv", lambda *a: None)
    assert_close(rm.score(seqs), want, 1e-5)
    assert calls == [[], [rm.cache_keyword]]  # the prefix, then the suffixes with its cache
    assert views and set(views) == {0}  # (k, H, P, D) views of the one prefix row


def test_merged_attention_falls_back_when_a_layer_bypasses_it(rm_dirs, monkeypatch, caplog):
    """The merged path counts the layers that took it: one that did not would have scored
    its suffixes without the prompt, so the batch is scored on the cache path instead (still
    HF's scores), logged once, and the model keeps to that path."""
    from transformers import AttentionInterface

    rm = RewardModel(rm_dirs["llama"])
    monkeypatch.setitem(AttentionInterface._global_mapping, prefix_batch.PREFIX_ATTENTION,
                        lambda m, q, *a, **kw: (q.transpose(1, 2).contiguous(), None))
    prompt = list(range(20, 60))
    seqs = [prompt + [70], prompt + [71]]
    with caplog.at_level("WARNING", logger="rm_server"):
        assert_close(rm.score(seqs), hf_alone(rm_dirs["llama"], seqs), 1e-5)
    assert "merged prefix attention ran in 0 of 2 layers" in caplog.text
    assert rm.merged_prefix_attention is False
    assert_close(rm.score(seqs), hf_alone(rm_dirs["llama"], seqs), 1e-5)


@pytest.mark.parametrize("extra", ["softcap", "s_aux"])
def test_merged_attention_refuses_what_it_does_not_compute(extra):
    """Soft-capped logits (Gemma 2) or attention sinks (gpt-oss) are not the plain softmax the
    merge computes: refused before any output, so the caller takes the cache path."""
    q = torch.zeros(2, 2, 3, 4)
    with pytest.raises(prefix_batch.MergeUnsupported, match=extra):
        prefix_batch.merged_attention(torch.nn.Module(), q, q, q, None, **{extra: 30.0})
