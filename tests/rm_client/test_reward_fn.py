"""The RM as a reward function (TRL GRPO's calling convention and plain Python), live server."""

import asyncio
import json
import logging
import shutil

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from protos.encoding import Encoder, TextInput
from rm_client import AddressError, AsyncRemoteRewardFunction, RemoteRewardFunction, ScoringError
from rm_server.launch import start_server

STATS = {"mean": 0.25, "std": 2.0}


@pytest.fixture(scope="module")
def rm_dir(rm_dirs, tmp_path_factory):
    """The gpt2 RM with reward statistics, as `rm-server train` leaves them."""
    out = tmp_path_factory.mktemp("rm_with_stats") / "rm"
    shutil.copytree(rm_dirs["gpt2"], out)
    (out / "reward_stats.json").write_text(json.dumps(STATS))
    return out


@pytest.fixture(scope="module")
def server(rm_dir):
    s = start_server(rm_dir)
    yield s
    assert s.stop() == 0


def hf_scores(model_dir, id_lists):
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0, 0].item() for ids in id_lists]


def test_text_and_conversational_formats(server, rm_dir):
    tok = AutoTokenizer.from_pretrained(rm_dir)
    enc = Encoder(tok, 128, len(tok))
    rm = RemoteRewardFunction(server.address, client_id="grpo")
    try:
        prompts = ["the movie was", "i watched this film and"] * 3
        completions = [" great fun", " it was boring", " terrible", " wonderful", " ok", " bad"]
        # TRL passes extra dataset columns as keyword arguments: they are accepted and ignored;
        # without a tokenizer its completion_ids are not used (text goes out).
        got = rm(prompts=prompts, completions=completions, completion_ids=[[1]] * 6,
                 label=[0] * 6)
        want = hf_scores(rm_dir, [enc.encode(TextInput(p, c)).ids
                                           for p, c in zip(prompts, completions)])
        assert got == pytest.approx(want, abs=1e-5) and len(set(got)) > 1
        conv_p = [[{"role": "user", "content": "rate the film"}]] * 2
        conv_c = [[{"role": "assistant", "content": "great acting"}],
                  [{"role": "assistant", "content": "awful plot"}]]
        conv = rm(prompts=conv_p, completions=conv_c)
        ids = [tok.apply_chat_template(p + c, tokenize=True, return_dict=True)["input_ids"]
               for p, c in zip(conv_p, conv_c)]
        assert conv == pytest.approx(hf_scores(rm_dir, ids), abs=1e-5)
        with pytest.raises(ValueError):
            rm(prompts=["a"], completions=["b", "c"])
        with pytest.raises(TypeError):
            rm(prompts=["a"], completions=[[{"role": "assistant", "content": "b"}]])
    finally:
        rm.close()


def test_async_reward_function(server):
    async def main():
        f = AsyncRemoteRewardFunction(server.address)
        try:
            a = await f(["the movie was"] * 4, [" great", " bad", " great", " ok"])
        finally:
            await f.close()
        return a

    a = asyncio.run(main())
    assert len(a) == 4 and a[0] == pytest.approx(a[2])


@pytest.mark.parametrize("address", ["http://127.0.0.1:50051", "localhost", "127.0.0.1:65536"])
def test_a_malformed_address_is_refused_at_construction(address):
    with pytest.raises(AddressError, match="reward-model address"):
        RemoteRewardFunction(address)
    with pytest.raises(AddressError, match="reward-model address"):
        AsyncRemoteRewardFunction(address)  # its client is made at the first call: check now


def test_an_unreachable_rm_logs_a_line_per_retry_round_then_raises(caplog):
    rm = RemoteRewardFunction("127.0.0.1:9", max_attempts=3, backoff_max=0.01)
    try:
        with caplog.at_level(logging.WARNING, logger="rm_client.client"):
            with pytest.raises(ScoringError) as exc:
                rm(prompts=["a", "b"], completions=[" c", " d"])
    finally:
        rm.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "rm_client.client"]
    assert [ln.split(", ")[1].split(" in ")[0] for ln in lines] == [
        "attempt 2 of 3", "attempt 3 of 3"], lines
    assert all(ln.startswith("waiting for the reward model at 127.0.0.1:9") for ln in lines)
    assert len(exc.value.sample_ids) == 2  # named, never a made-up reward


# -- name=, TRL's completion_ids as token ids, the async twin's options ------------------------

PROMPTS = ["the movie was", "the movie was", "i watched this film and", "i watched this film and"]
COMPLETIONS = [" great fun", " it was boring", " terrible", " wonderful acting"]


def char_ids(tok, text: str) -> list[int]:
    """A non-canonical tokenization, as sampling can produce: one token per character."""
    return [i for ch in text for i in tok(ch, add_special_tokens=False)["input_ids"]]


def test_a_name_per_rm_so_trl_logs_two_series(server):
    a = RemoteRewardFunction(server.address, name="helpful")
    b = AsyncRemoteRewardFunction(server.address, name="harmless")
    try:
        assert (a.__name__, b.__name__) == ("helpful", "harmless")
        trl_utils = pytest.importorskip("trl.trainer.utils", reason="pip install trl")
        assert [trl_utils.get_callable_name(f) for f in (a, b)] == ["helpful", "harmless"]
        assert not trl_utils.is_async_callable(a) and trl_utils.is_async_callable(b)
    finally:
        a.close()
    with pytest.raises(ValueError, match="input_mode must be one of"):
        RemoteRewardFunction(server.address, input_mode="bytes")
    with pytest.raises(ValueError, match="needs tokenizer="):
        AsyncRemoteRewardFunction(server.address, input_mode="tokens")


def test_completion_ids_go_as_token_ids_when_the_fingerprints_match(server, rm_dir):
    tok = AutoTokenizer.from_pretrained(rm_dir)
    generated = [char_ids(tok, c) for c in COMPLETIONS]
    assert all(g != tok(c, add_special_tokens=False)["input_ids"]
               for g, c in zip(generated, COMPLETIONS))
    # TRL's completion_ids end with the EOS that stopped generation (where one did)
    completion_ids = [g + [tok.eos_token_id] if i % 2 else g for i, g in enumerate(generated)]
    rm = RemoteRewardFunction(server.address, tokenizer=tok)
    try:
        got = rm(prompts=PROMPTS, completions=COMPLETIONS, completion_ids=completion_ids)
        assert rm.sends_token_ids
        # conversations stay conversations (the server's template ends the turn)
        conv_p = [[{"role": "user", "content": "rate the film"}]]
        conv_c = [[{"role": "assistant", "content": "great acting"}]]
        conv = rm(prompts=conv_p, completions=conv_c, completion_ids=[[5, 6]])
    finally:
        rm.close()
    # the prompt as TRL tokenizes it for generation (BOS ...), then the generated ids, no EOS
    want = hf_scores(rm_dir, [tok(p)["input_ids"] + g for p, g in zip(PROMPTS, generated)])
    assert got == pytest.approx(want, abs=1e-5)
    enc = Encoder(tok, 128, len(tok))
    as_text = hf_scores(rm_dir, [enc.encode(TextInput(p, c)).ids
                                 for p, c in zip(PROMPTS, COMPLETIONS)])
    assert all(abs(a - b) > 1e-4 for a, b in zip(got, as_text))  # the ids, not re-encoded text
    ids = tok.apply_chat_template(conv_p[0] + conv_c[0], tokenize=True,
                                  return_dict=True)["input_ids"]
    assert conv == pytest.approx(hf_scores(rm_dir, [ids]), abs=1e-5)


def test_another_tokenizer_sends_text_and_tokens_mode_refuses_it(server, rm_dir):
    other = AutoTokenizer.from_pretrained(rm_dir)
    other.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # a new print
    ids = [char_ids(other, c) for c in COMPLETIONS]
    rm = RemoteRewardFunction(server.address, tokenizer=other)
    plain = RemoteRewardFunction(server.address)
    strict = RemoteRewardFunction(server.address, tokenizer=other, input_mode="tokens")
    try:
        got = rm(prompts=PROMPTS, completions=COMPLETIONS, completion_ids=ids)
        assert not rm.sends_token_ids
        assert got == pytest.approx(plain(prompts=PROMPTS, completions=COMPLETIONS), abs=1e-6)
        with pytest.raises(ValueError, match="input_mode='tokens', but the server's tokenizer"):
            strict(prompts=PROMPTS, completions=COMPLETIONS, completion_ids=ids)
    finally:
        for f in (rm, plain, strict):
            f.close()


def test_the_async_twin_takes_the_same_options(server, rm_dir):
    tok = AutoTokenizer.from_pretrained(rm_dir)
    ids = [char_ids(tok, c) + [tok.eos_token_id] for c in COMPLETIONS]

    async def main():
        f = AsyncRemoteRewardFunction(server.address, normalize=True, name="rm_z",
                                      tokenizer=tok, client_id="grpo")
        try:
            return await f(prompts=PROMPTS, completions=COMPLETIONS, completion_ids=ids,
                           trainer_state=None), f.sends_token_ids
        finally:
            await f.close()

    got, sent_ids = asyncio.run(main())
    sync = RemoteRewardFunction(server.address, normalize=True, tokenizer=tok)
    raw = RemoteRewardFunction(server.address, tokenizer=tok)
    try:
        want = sync(prompts=PROMPTS, completions=COMPLETIONS, completion_ids=ids)
        unnormalized = raw(prompts=PROMPTS, completions=COMPLETIONS, completion_ids=ids)
    finally:
        sync.close()
        raw.close()
    assert sent_ids and got == pytest.approx(want, abs=1e-6)
    assert want == pytest.approx([(r - STATS["mean"]) / STATS["std"] for r in unnormalized],
                                 abs=1e-6)


def test_a_server_with_another_scoring_recipe_gets_text(rm_dir):
    """Same tokenizer, but the server lays text out as TRL's RewardTrainer (prompt + response +
    EOS, tokenized once): the fingerprint covers the recipe, so the policy's ids are not sent."""
    tok = AutoTokenizer.from_pretrained(rm_dir)
    server = start_server(rm_dir, "--recipe", "trl")
    rm = RemoteRewardFunction(server.address, tokenizer=tok)
    plain = RemoteRewardFunction(server.address)
    try:
        ids = [char_ids(tok, c) for c in COMPLETIONS]
        got = rm(prompts=PROMPTS, completions=COMPLETIONS, completion_ids=ids)
        assert not rm.sends_token_ids
        assert got == pytest.approx(plain(prompts=PROMPTS, completions=COMPLETIONS), abs=1e-6)
    finally:
        rm.close()
        plain.close()
        assert server.stop() == 0
