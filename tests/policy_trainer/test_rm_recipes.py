"""Training and serving apply the same scoring recipe: ``rm-server train`` encodes pairs with
the recipe (``--recipe``, or detected), scores them by its position rule, stores it as
scoring_recipe.json, and the server (no flag) then scores every pair exactly as training did
(train's own eval_scores.jsonl against the served model, 1e-5): OpenRLHF's layout on a pad ==
eos tokenizer (the last token, its EOS, is scored), an encoder base's pair encoding with token
type ids, and ``rm-server eval --recipe``."""

from __future__ import annotations

import json

import pytest

from policy_trainer.rm_eval import EvalConfig, evaluate
from policy_trainer.rm_train import TrainConfig, train
from protos.encoding import TextInput
from protos.recipes import RECIPE_FILE, RECIPES
from rm_server.model import RewardModel
from tests import tiny
from tests.wordpiece import make_bert_pair_rm

PAIRS = [("the movie was", " great fun", " boring"), ("i", " loved it\n", " hated it"),
         ("the acting", " was the best", " was the worst"), ("", "a good story", "a bad plot"),
         ("this film is", " wonderful", " awful"), ("we", " really loved it", " did not")]


def write_prefs(path) -> str:
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n"
                            for p, c, r in PAIRS))
    return str(path)


def train_tiny(tmp_path, base, **kw):
    data = write_prefs(tmp_path / "prefs.jsonl")
    out = tmp_path / "rm"
    cfg = TrainConfig(data=data, eval_data=data, base=str(base), out=str(out), max_steps=2,
                      batch_size=3, lr=1e-3, device="cpu", progress=False, save_every=0, **kw)
    assert train(cfg) == 0
    return out, data


def assert_served_as_trained(out, recipe_name: str):
    assert json.loads((out / RECIPE_FILE).read_text())["name"] == recipe_name
    trained = [json.loads(line) for line in (out / "eval_scores.jsonl").read_text().splitlines()]
    rm = RewardModel(out)
    assert rm.recipe.name == recipe_name and "stored in the checkpoint" in rm.recipe_reason
    chosen = rm.score([rm.encoder.encode(TextInput(p, c)).ids for p, c, _ in PAIRS])
    rejected = rm.score([rm.encoder.encode(TextInput(p, r)).ids for p, _, r in PAIRS])
    for t in trained:  # eval_scores.jsonl: one line per pair, in the file's line order
        i = t["line"] - 1
        assert t["r_chosen"] == pytest.approx(chosen[i], abs=1e-5)
        assert t["r_rejected"] == pytest.approx(rejected[i], abs=1e-5)
    return rm


def test_openrlhf_recipe_trains_and_serves_the_same_layout(tmp_path):
    tok = tiny.train_tokenizer(pad="eos")
    base = tiny.make_reward_model("llama", tok, tmp_path / "base", seed=2)
    out, data = train_tiny(tmp_path, base, recipe="openrlhf")
    rm = assert_served_as_trained(out, "openrlhf")
    ids = rm.encoder.encode(TextInput("i", " loved it\n")).ids
    assert ids[-1] == tok.eos_token_id == rm.pad_token_id  # scored: the last token, its EOS
    assert evaluate(EvalConfig(model=str(out), data=data, out=str(tmp_path / "ev"),
                               recipe="openrlhf", progress=False)) == 0
    trained = (out / "eval_scores.jsonl").read_text().splitlines()
    again = (tmp_path / "ev" / "eval_scores.jsonl").read_text().splitlines()
    for a, b in zip(map(json.loads, trained), map(json.loads, again)):
        assert a["r_chosen"] == pytest.approx(b["r_chosen"], abs=1e-5)


def test_encoder_base_trains_on_its_pair_encoding(tmp_path):
    base = make_bert_pair_rm(tmp_path / "bert-base")
    out, _ = train_tiny(tmp_path, base)
    rm = assert_served_as_trained(out, "encoder-pair")
    assert rm.encoder.encode(TextInput("the movie", "was great")).token_type_ids is not None
    assert RECIPES["encoder-pair"].join == "pair"
