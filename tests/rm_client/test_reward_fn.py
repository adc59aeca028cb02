"""The RM as a reward function (TRL GRPO's calling convention and plain Python), live server."""

import asyncio
import logging

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from protos.encoding import Encoder, TextInput
from rm_client import AddressError, AsyncRemoteRewardFunction, RemoteRewardFunction, ScoringError
from rm_server.launch import start_server


@pytest.fixture(scope="module")
def server(rm_dirs):
    s = start_server(rm_dirs["gpt2"])
    yield s
    assert s.stop() == 0


def hf_scores(model_dir, id_lists):
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0, 0].item() for ids in id_lists]


def test_text_and_conversational_formats(server, rm_dirs):
    tok = AutoTokenizer.from_pretrained(rm_dirs["gpt2"])
    enc = Encoder(tok, 128, len(tok))
    rm = RemoteRewardFunction(server.address, client_id="grpo")
    try:
        prompts = ["the movie was", "i watched this film and"] * 3
        completions = [" great fun", " it was boring", " terrible", " wonderful", " ok", " bad"]
        # TRL passes extra dataset columns as keyword arguments: they are accepted and ignored.
        got = rm(prompts=prompts, completions=completions, completion_ids=None, label=[0] * 6)
        want = hf_scores(rm_dirs["gpt2"], [enc.encode(TextInput(p, c)).ids
                                           for p, c in zip(prompts, completions)])
        assert got == pytest.approx(want, abs=1e-5) and len(set(got)) > 1
        conv_p = [[{"role": "user", "content": "rate the film"}]] * 2
        conv_c = [[{"role": "assistant", "content": "great acting"}],
                  [{"role": "assistant", "content": "awful plot"}]]
        conv = rm(prompts=conv_p, completions=conv_c)
        ids = [tok.apply_chat_template(p + c, tokenize=True, return_dict=True)["input_ids"]
               for p, c in zip(conv_p, conv_c)]
        assert conv == pytest.approx(hf_scores(rm_dirs["gpt2"], ids), abs=1e-5)
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
