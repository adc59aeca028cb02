"""Scoring recipes (protos/recipes.py) applied by the Encoder with a tokenizer alone: each
built-in layout token for token as the library that defines it writes it, the fixed empty
prompt, full texts, token type ids, the fingerprint and how a recipe is chosen. Against the
libraries' own code and models: tests/rm_server/test_recipes.py,
tests/policy_trainer/test_trl_parity.py."""

from __future__ import annotations

import json

import pytest

from protos.encoding import (
    ChatInput,
    Encoder,
    FullTextInput,
    InputError,
    TextInput,
    TokenInput,
    tokenizer_fingerprint,
)
from protos.recipes import (
    DEFAULT_RECIPE,
    RECIPE_FILE,
    RECIPES,
    Recipe,
    choose_recipe,
    load_recipe,
    save_recipe,
)
from tests import tiny
from tests.wordpiece import bert_tokenizer

PROMPT, RESPONSE = "the movie was", " great fun\n\n"


def encoder(tok, name: str, max_length: int = 64, **kw) -> Encoder:
    return Encoder(tok, max_length, len(tok), recipe=RECIPES[name], **kw)


def test_rm_server_recipe_gives_an_empty_prompt_its_bos(tokenizer):
    enc = encoder(tokenizer, "rm-server")
    ids, plen = enc.encode_text("", " it was great")
    assert ids[0] == tokenizer.bos_token_id and plen == 1  # a whole transcript keeps its BOS
    ids, plen = enc.encode_text(PROMPT, RESPONSE)
    assert ids == (tokenizer(PROMPT)["input_ids"]
                   + tokenizer(RESPONSE, add_special_tokens=False)["input_ids"])


def test_trl_recipe_is_prompt_response_eos_with_special_tokens(tokenizer):
    """trl/trainer/reward_trainer.py: add_eos on the completion, then prompt + completion
    through processing_class(text=...), special tokens included."""
    enc, eos = encoder(tokenizer, "trl"), tokenizer.eos_token
    ids, _ = enc.encode_text(PROMPT, RESPONSE)
    assert ids == tokenizer(text=PROMPT + RESPONSE + eos)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    again, _ = enc.encode_text(PROMPT, RESPONSE + eos)  # already ends with EOS: not doubled
    assert again == ids


def test_trl_grpo_recipe_is_the_joined_text_without_special_tokens(tokenizer):
    ids, _ = encoder(tokenizer, "trl-grpo").encode_text(PROMPT, RESPONSE)
    assert ids == tokenizer(text=PROMPT + RESPONSE, add_special_tokens=False)["input_ids"]


def test_openrlhf_recipe_strips_newlines_and_appends_space_eos(tokenizer):
    """openrlhf/datasets/reward_dataset.py: (prompt + chosen).rstrip("\\n") + " " + eos."""
    enc, eos = encoder(tokenizer, "openrlhf"), tokenizer.eos_token
    ids, _ = enc.encode_text(PROMPT, RESPONSE)
    want = (PROMPT + RESPONSE).rstrip("\n") + " " + eos
    assert ids == tokenizer(want, add_special_tokens=False)["input_ids"]
    chat = (("user", "hi"), ("assistant", "great movie"))
    got = enc.encode(ChatInput(chat))
    text = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in chat],
                                         tokenize=False)
    assert got.ids == tokenizer(RECIPES["openrlhf"].finish_text(text, eos),
                                add_special_tokens=False)["input_ids"]
    assert 0 < got.prompt_length < len(got.ids)


def test_encoder_pair_recipe_is_the_tokenizers_pair_encoding(tmp_path):
    tok = bert_tokenizer(tmp_path)
    enc = encoder(tok, "encoder-pair", type_vocab_size=2)
    got = enc.encode(TextInput("the movie was", "really great fun"))
    want = tok("the movie was", "really great fun")
    assert got.ids == want["input_ids"] and got.token_type_ids == want["token_type_ids"]
    assert got.ids[0] == tok.cls_token_id and got.ids[-1] == tok.sep_token_id
    assert got.prompt_length == want["token_type_ids"].index(1)


def test_pair_truncation_keeps_the_pooled_first_token(tmp_path):
    tok = bert_tokenizer(tmp_path)
    full = tok("the movie was really very good and the music was great", "loved it")
    enc = encoder(tok, "encoder-pair", max_length=8, type_vocab_size=2)
    got = enc.encode(TextInput("the movie was really very good and the music was great",
                               "loved it"))
    n = len(full["input_ids"])
    assert got.truncated and len(got.ids) == 8
    assert got.ids == [full["input_ids"][0]] + full["input_ids"][n - 7:]
    assert got.token_type_ids == [0] + full["token_type_ids"][n - 7:]


def test_full_text_is_tokenized_as_it_is(tokenizer):
    for name in RECIPES:
        got = encoder(tokenizer, name).encode(FullTextInput("<s>the movie</s>"))
        assert got.ids == tokenizer("<s>the movie</s>", add_special_tokens=False)["input_ids"]
        assert got.ids[0] == tokenizer.bos_token_id


def test_token_type_ids_are_checked(tokenizer):
    typed = encoder(tokenizer, "encoder-pair", type_vocab_size=2)
    got = typed.encode(TokenInput((5, 6, 7), 1, (0, 1, 1)))
    assert got.ids == [5, 6, 7] and got.token_type_ids == [0, 1, 1]
    for types, msg in (((0, 1), "2 type ids for 3"), ((0, 2, 1), r"outside \[0, 2\)")):
        with pytest.raises(InputError, match=msg) as e:
            typed.encode(TokenInput((5, 6, 7), 1, types))
        assert e.value.field == "tokens.token_type_ids"
    with pytest.raises(InputError, match="takes no token type ids"):
        encoder(tokenizer, "rm-server").encode(TokenInput((5, 6, 7), 1, (0, 0, 0)))


def test_fingerprint_covers_the_recipe(tokenizer):
    prints = {name: tokenizer_fingerprint(tokenizer, r) for name, r in RECIPES.items()}
    assert len(set(prints.values())) == len(RECIPES)
    assert tokenizer_fingerprint(tokenizer) == prints["rm-server"]  # the trainer's own layout
    renamed = Recipe(**{**RECIPES["trl"].__dict__, "name": "my-trl", "summary": "x"})
    assert tokenizer_fingerprint(tokenizer, renamed) == prints["trl"]  # rules, not names


def test_choose_recipe_flag_stored_detected_default(tmp_path):
    assert choose_recipe("trl", tmp_path, "llama")[0] is RECIPES["trl"]
    assert choose_recipe(None, tmp_path, "llama") == (DEFAULT_RECIPE, choose_recipe(
        None, tmp_path, "llama")[1])
    assert "default" in choose_recipe(None, tmp_path, "llama")[1]
    recipe, why = choose_recipe(None, tmp_path, "bert")
    assert recipe is RECIPES["encoder-pair"] and "encoder" in why
    save_recipe(tmp_path, RECIPES["openrlhf"])
    recipe, why = choose_recipe(None, tmp_path, "bert")
    assert recipe == RECIPES["openrlhf"] and RECIPE_FILE in why
    assert json.loads((tmp_path / RECIPE_FILE).read_text())["name"] == "openrlhf"
    with pytest.raises(ValueError, match="unknown scoring recipe 'nope'"):
        load_recipe("nope")
    custom = tmp_path / "mine.json"
    custom.write_text(json.dumps({"name": "mine", "join": "text", "eos": "append"}))
    assert load_recipe(str(custom)).rules() == {**RECIPES["rm-server"].rules(), "join": "text",
                                                "eos": "append"}
    custom.write_text(json.dumps({"name": "bad", "join": "glue"}))
    with pytest.raises(ValueError, match="join must be one of"):
        load_recipe(str(custom))


def test_every_recipe_tokenizes_every_form(tokenizer):
    """No recipe refuses a form the model can take; prompt lengths stay in range."""
    chat = ChatInput((("user", "hi"), ("assistant", "great movie")))
    for name in ("rm-server", "trl", "trl-grpo", "openrlhf"):
        enc = encoder(tokenizer, name)
        for item in (TextInput(PROMPT, RESPONSE), TextInput("", "fun"), chat):
            got = enc.encode(item)
            assert 0 <= got.prompt_length <= len(got.ids) and got.ids
    no_bos = tiny.train_tokenizer(bos=False)
    ids, plen = encoder(no_bos, "rm-server").encode_text("", " fun")
    assert plen == 0 and ids == no_bos(" fun", add_special_tokens=False)["input_ids"]
