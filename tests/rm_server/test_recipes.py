"""Scoring recipes against the originals, and the loading flags.

- encoder pair RMs (BERT): through the real gRPC server, text pairs score exactly
  ``model(**tokenizer(p, r))`` (token_type_ids included) and TokenIds carry token_type_ids;
- OpenRLHF: ``openrlhf``'s own RewardDataset tokenization (when the package imports; else the
  rule transcribed from its source), scored by its RewardModel rule (the value at the last
  attended token, even when pad == eos, models/model.py, transcribed: it needs flash_attn);
  its remote-RM query as a FullText (cli/serve_rm.py tokenize_fn); through the real server;
- TRL GRPO's in-process RM: TRL's own ``apply_chat_template`` for chats, then
  ``reward_processing_class(text=..., padding_side="right", add_special_tokens=False)`` and
  ``logits[:, 0]`` as grpo_trainer.py calls them;
- loading: a hub id from the local cache at a revision; offline, one line saying the hub is
  unreachable; --tokenizer, --chat-template, --trust-remote-code.
TRL's RewardTrainer: tests/policy_trainer/test_trl_parity.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import grpc
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from protos import reward_pb2 as pb
from protos import reward_pb2_grpc as pb_grpc
from protos.encoding import ChatInput, TextInput
from rm_client.samples import chat_sample, full_text_sample, text_sample, token_sample
from rm_server.checkpoint import ModelLoadError
from rm_server.launch import start_server
from rm_server.model import RewardModel
from tests import tiny
from tests.wordpiece import make_bert_pair_rm

PAIRS = [("the movie was", "really great fun"), ("i hated it", "the acting was bad\n"),
         ("", "a wonderful story with great music and a good ending"), ("it is", "dull")]


def score(address: str, samples: list[pb.Sample]) -> list[pb.ScoreResult]:
    with grpc.insecure_channel(address) as ch:
        return list(pb_grpc.RewardServiceStub(ch).Score(
            pb.ScoreRequest(samples=samples), timeout=60).results)


def model_info(address: str) -> pb.ModelInfo:
    with grpc.insecure_channel(address) as ch:
        return pb_grpc.RewardServiceStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=30)


def assert_exact(got, want, tol=1e-5):
    diff = max(abs(a - b) for a, b in zip(got, want))
    assert diff <= tol, f"max |ours - original| = {diff}"
    assert max(want) - min(want) > 0.05, "scores must differ across inputs for parity to matter"


# -- encoder pair RMs --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return make_bert_pair_rm(tmp_path_factory.mktemp("bert") / "bert-rm")


def test_bert_pair_rm_over_grpc_equals_model_of_tokenizer_pair(bert_dir):
    model = AutoModelForSequenceClassification.from_pretrained(bert_dir).eval()
    tok = AutoTokenizer.from_pretrained(bert_dir)
    with torch.no_grad():
        want = [model(**tok(p, r, return_tensors="pt")).logits[0, 0].item() for p, r in PAIRS]
        no_types = [model(**tok(p, r, return_tensors="pt", return_token_type_ids=False))
                    .logits[0, 0].item() for p, r in PAIRS]
    assert max(abs(a - b) for a, b in zip(want, no_types)) > 1e-3  # the types matter
    server = start_server(bert_dir)
    try:
        info = model_info(server.address)
        assert info.recipe.name == "encoder-pair" and info.recipe.join == "pair"
        assert "encoder" in info.recipe_reason and info.accepts_token_type_ids
        got = score(server.address, [text_sample(str(i), p, r) for i, (p, r) in enumerate(PAIRS)])
        assert_exact([r.reward for r in got], want)
        encoded = [tok(p, r) for p, r in PAIRS]
        typed = score(server.address, [
            token_sample(str(i), e["input_ids"], e["token_type_ids"].index(1),
                         e["token_type_ids"]) for i, e in enumerate(encoded)])
        assert_exact([r.reward for r in typed], want)
        assert [r.num_tokens for r in typed] == [len(e["input_ids"]) for e in encoded]
        with pytest.raises(grpc.RpcError) as e:
            score(server.address, [token_sample("bad", [2, 5, 3], 0, [0, 1])])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "tokens.token_type_ids" in e.value.details()
        assert "scoring recipe encoder-pair (detected: an encoder" in server.log()
    finally:
        server.stop()


# -- OpenRLHF ----------------------------------------------------------------------------------
def transcribed_chosen_ids(tok, prompt: str, response: str, max_length: int = 128) -> list[int]:
    """openrlhf 0.11.2 datasets/reward_dataset.py ``RewardDataset.__getitem__``, transcribed."""
    chosen = (prompt + response).rstrip("\n")
    if not chosen.endswith(tok.eos_token):
        chosen += " " + tok.eos_token
    ids = tok(chosen, max_length=max_length, truncation=True, add_special_tokens=False)
    return ids["input_ids"][:-1] + [tok.eos_token_id]  # "to avoid EOS_token truncation"


def openrlhf_chosen_ids(tok, prompt: str, response: str, max_length: int = 128) -> list[int]:
    """OpenRLHF's RewardDataset tokenization of (prompt, chosen): its own code when the package
    imports (``pip install --no-deps openrlhf``; it must then equal the transcription), else
    the transcription."""
    want = transcribed_chosen_ids(tok, prompt, response, max_length)
    try:
        from datasets import Dataset
        from openrlhf.datasets.reward_dataset import RewardDataset
    except ImportError:
        return want
    data = SimpleNamespace(prompt_key="prompt", chosen_key="chosen", rejected_key="rejected",
                           apply_chat_template=False)
    strategy = SimpleNamespace(args=SimpleNamespace(data=data))
    rows = Dataset.from_list([{"prompt": prompt, "chosen": response, "rejected": "x"}])
    ds = RewardDataset(rows, tok, max_length, strategy, num_processors=1)
    got = ds[0][0][0].tolist()
    assert got == want, "the transcribed OpenRLHF rule drifted from openrlhf's code"
    return got


def openrlhf_rewards(model, seqs: list[list[int]], pad_id: int) -> list[float]:
    """openrlhf 0.11.2 models/model.py RewardModel.forward on a left-padded batch (its
    collate_fn pads rewards on the left): position ids from the mask, the value head on the
    backbone's last hidden state, read at the last attended position."""
    t = max(map(len, seqs))
    input_ids = torch.tensor([[pad_id] * (t - len(s)) + s for s in seqs])
    attention_mask = torch.tensor([[0] * (t - len(s)) + [1] * len(s) for s in seqs])
    eos_indices = attention_mask.size(1) - 1 - attention_mask.long().fliplr().argmax(
        dim=1, keepdim=True)
    position_ids = attention_mask.long().cumsum(-1) - 1
    position_ids.masked_fill_(attention_mask == 0, 1)
    with torch.no_grad():
        hidden = model.model(input_ids, attention_mask=attention_mask,
                             position_ids=position_ids)["last_hidden_state"]
        values = model.score(hidden).squeeze(-1)
    return values.gather(dim=1, index=eos_indices).squeeze(1).tolist()


@pytest.fixture(scope="module")
def pad_is_eos_llama(tmp_path_factory):
    """OpenRLHF's get_tokenizer sets pad = eos when a tokenizer has none: the hard case."""
    tok = tiny.train_tokenizer(pad="eos")
    return tiny.make_reward_model("llama", tok, tmp_path_factory.mktemp("orl") / "llama", seed=3)


def test_openrlhf_recipe_over_grpc_equals_openrlhf(pad_is_eos_llama):
    path = pad_is_eos_llama
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    seqs = [openrlhf_chosen_ids(tok, p, r) for p, r in PAIRS]
    assert all(s[-1] == tok.eos_token_id == tok.pad_token_id for s in seqs)
    want = openrlhf_rewards(model, seqs, tok.pad_token_id)
    with torch.no_grad():  # HF's rule would skip the trailing EOS (pad == eos): not OpenRLHF's
        hf = [model(torch.tensor([s])).logits[0, 0].item() for s in seqs]
    assert max(abs(a - b) for a, b in zip(want, hf)) > 1e-3
    queries = [tok.decode(s, skip_special_tokens=False) for s in seqs]  # its remote-RM query
    server = start_server(path, "--recipe", "openrlhf")
    try:
        info = model_info(server.address)
        assert (info.recipe.name, info.recipe.position, info.recipe_reason) == (
            "openrlhf", "last", "--recipe")
        got = score(server.address, [text_sample(str(i), p, r) for i, (p, r) in enumerate(PAIRS)])
        assert_exact([r.reward for r in got], want)
        full = score(server.address, [full_text_sample(str(i), q) for i, q in enumerate(queries)])
        assert_exact([r.reward for r in full], want)  # serve_rm: add_special_tokens=False
        ids = score(server.address, [token_sample(str(i), s) for i, s in enumerate(seqs)])
        assert_exact([r.reward for r in ids], want)
    finally:
        server.stop()


# -- TRL GRPO's in-process reward model ----------------------------------------------------------
def grpo_rewards(path, prompts, completions) -> list[float]:
    """trl 1.16 trainer/grpo_trainer.py ``_calculate_rewards`` for an nn.Module reward func,
    with the reward processing class set up as its __init__ does (pad = eos if none)."""
    from trl.data_utils import apply_chat_template, is_conversational

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.config.get_text_config().pad_token_id = tok.pad_token_id
    if is_conversational({"prompt": prompts[0]}):
        messages = [{"messages": p + c} for p, c in zip(prompts, completions)]
        texts = [apply_chat_template(x, tok)["text"] for x in messages]
    else:
        texts = [p + c for p, c in zip(prompts, completions)]
    inputs = tok(text=texts, return_tensors="pt", padding=True, padding_side="right",
                 add_special_tokens=False)
    with torch.inference_mode():
        return model(**inputs).logits[:, 0].tolist()


def test_trl_grpo_recipe_equals_grpos_in_process_reward_model(rm_dirs):
    path = rm_dirs["llama"]
    rm = RewardModel(path, recipe="trl-grpo")
    prompts, completions = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    got = rm.score([rm.encoder.encode(TextInput(p, c)).ids for p, c in PAIRS])
    assert_exact(got, grpo_rewards(path, prompts, completions))
    chats_p = [[{"role": "user", "content": p or "hi"}] for p in prompts]
    chats_c = [[{"role": "assistant", "content": c}] for c in completions]
    items = [ChatInput((("user", p[0]["content"]), ("assistant", c[0]["content"])))
             for p, c in zip(chats_p, chats_c)]
    got = rm.score([rm.encoder.encode(x).ids for x in items])
    assert_exact(got, grpo_rewards(path, chats_p, chats_c))


# -- loading flags -------------------------------------------------------------------------------
def hub_cache(root, repo: str, src, commit: str = "a" * 40):
    """A local hub cache holding ``repo`` at ``commit`` (the layout huggingface_hub reads)."""
    base = root / ("models--" + repo.replace("/", "--"))
    shutil.copytree(src, base / "snapshots" / commit)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    return root


def test_hub_id_loads_from_the_local_cache_at_a_revision(tmp_path, rm_dirs, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache(tmp_path, "org/tiny-rm",
                                                                 rm_dirs["gpt2"])))
    rm = RewardModel("org/tiny-rm", revision="a" * 40)
    assert rm.name == "org/tiny-rm" and rm.path.name == "a" * 40
    assert rm.score([[5, 6, 7]]) == RewardModel(rm_dirs["gpt2"]).score([[5, 6, 7]])
    with pytest.raises(ModelLoadError, match="hub is unreachable"):
        RewardModel("org/tiny-rm", revision="b" * 40)


def test_offline_hub_id_is_one_clear_line(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, "-m", "rm_server.cli", "serve", "--model", "someorg/some-rm",
         "--revision", "v1", "--port", "0", "--metrics-port", "-1"],
        capture_output=True, text=True, timeout=120, env={**__import__("os").environ, **env})
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("rm-server serve: error: --model someorg/some-rm: not a local "
                               "directory, and the Hugging Face hub is unreachable "
                               "(HF_HUB_OFFLINE is set)")


def test_tokenizer_and_chat_template_flags(tmp_path, rm_dirs, tokenizer):
    bare = tmp_path / "weights-only"
    shutil.copytree(rm_dirs["llama"], bare)
    for f in bare.glob("*token*"):
        f.unlink()
    with pytest.raises(ModelLoadError, match="--tokenizer"):
        RewardModel(bare)
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n"
                        "{% endfor %}")
    rm = RewardModel(bare, tokenizer=str(rm_dirs["llama"]), chat_template=str(template))
    plain = RewardModel(rm_dirs["llama"])
    chat = ChatInput((("user", "hi"), ("assistant", "great movie")))
    assert rm.encoder.encode(chat).ids == tokenizer("[user] hi\n[assistant] great movie\n",
                                                    add_special_tokens=False)["input_ids"]
    assert rm.encoder.encode(chat).ids != plain.encoder.encode(chat).ids
    assert rm.tokenizer_fingerprint != plain.tokenizer_fingerprint
    assert rm.score([[5, 6, 7]]) == plain.score([[5, 6, 7]])


def test_trust_remote_code_loads_a_custom_head(tmp_path, rm_dirs, tokenizer):
    path = tmp_path / "custom"
    shutil.copytree(rm_dirs["llama"], path)
    (path / "modeling_gated.py").write_text(
        "from transformers import LlamaForSequenceClassification\n\n\n"
        "class GatedRewardModel(LlamaForSequenceClassification):\n    pass\n")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["GatedRewardModel"]
    cfg["auto_map"] = {"AutoModelForSequenceClassification": "modeling_gated.GatedRewardModel"}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="GatedRewardModel, not a"):
        RewardModel(path)
    rm = RewardModel(path, trust_remote_code=True)
    assert rm.architecture == "GatedRewardModel"
    assert rm.score([[5, 6, 7, 8]]) == pytest.approx(
        RewardModel(rm_dirs["llama"]).score([[5, 6, 7, 8]]), abs=1e-6)


def test_conversation_over_grpc_with_the_trl_recipe(rm_dirs):
    """A chat under TRL's recipe is the template with tokenize=True, no EOS added (TRL's
    add_eos is for non-conversational data); the recipe shows in GetModelInfo."""
    server = start_server(rm_dirs["llama"], "--recipe", "trl")
    try:
        info = model_info(server.address)
        assert info.recipe.name == "trl" and info.recipe.eos == "append"
        msgs = [("user", "hi"), ("assistant", "great movie")]
        got = score(server.address, [chat_sample("c", msgs)])[0]
        tok = AutoTokenizer.from_pretrained(rm_dirs["llama"])
        ids = tok.apply_chat_template([{"role": r, "content": c} for r, c in msgs],
                                      tokenize=True, return_dict=True)["input_ids"]
        assert got.num_tokens == len(ids)
        assert got.reward == pytest.approx(score(server.address, [token_sample("t", ids)])[0]
                                           .reward, abs=1e-6)
    finally:
        server.stop()
