"""The demo world: grammar, recognizer, gold reward, simulated labels, and the quick build."""

from __future__ import annotations

import json
import math
import random

import pytest

from demo import grammar, world

FLUENT_POS = " really superb, and the plot was brilliant!"
PROMPT = "the movie was"


@pytest.mark.parametrize("prompt", ["the movie was", "honestly the acting", "overall i",
                                    "i watched this film and it"])
@pytest.mark.parametrize("bias", [-1.0, 0.0, world.DEMO_BIAS, 1.0])
def test_grammar_samples_are_recognized(prompt, bias):
    rng = random.Random(7)
    for _ in range(200):
        y = world.sample_continuation(rng, bias, prompt)
        assert y.startswith(" ") and grammar.render(grammar.tokenize(y)) == y
        assert world.recognizes(prompt, y), y
        assert world.gold_terms(prompt, y).repetition == 0  # the writer never repeats itself


@pytest.mark.parametrize("response", [
    " great great great wonderful great",       # spam: no grammar, no end
    " great wonderful superb brilliant.",       # adjectives without "and"
    " was great.",                              # a copula after a prompt that has one
    " great",                                   # no end punctuation
    "great.",                                   # no leading space: "the movie wasgreat."
    " great .",                                 # not the canonical surface
    " great, and.",                             # a connective with no clause
    " Great.",                                  # not lowercase
    "",
])
def test_recognizer_rejects_broken_text(response):
    assert not world.recognizes(PROMPT, response)
    assert world.gold(PROMPT, response) < world.gold(PROMPT, FLUENT_POS) - 1.5


def test_head_must_fit_the_prompt():
    assert world.recognizes("overall i", " loved it.")
    assert not world.recognizes("overall i", " great.")
    assert world.recognizes("honestly the acting", " kept me hooked.")
    assert not world.recognizes("honestly the acting", " superb.")


def test_spam_fools_naive_sentiment_but_not_gold():
    spam = " great great great wonderful great"
    s_spam = world.sentiment_sum(grammar.tokenize(spam))
    s_fluent = world.sentiment_sum(grammar.tokenize(FLUENT_POS))
    assert s_spam > 3.0 and s_fluent > 3.0            # both saturate the sentiment term
    terms = world.gold_terms(PROMPT, spam)
    assert terms.sentiment > 1.9 and terms.repetition > 1 and terms.grammar > 1
    assert terms.total < -1.0 < 1.8 < world.gold(PROMPT, FLUENT_POS)


def test_repetition_and_length_cost_gold():
    base = world.gold(PROMPT, " really superb, and the plot was good!")
    repeated = world.gold(PROMPT, " really superb, and the superb plot was good!")
    looped = world.gold(PROMPT, " superb, and the plot was good, and the plot was good.")
    assert repeated < base - 1 and looped < base - 0.5
    short = world.gold_terms(PROMPT, " superb.")
    assert short.length == pytest.approx(0.5) and short.grammar == 0


def test_positive_beats_neutral_beats_negative():
    assert (world.gold(PROMPT, " wonderful and beautiful.") > world.gold(PROMPT, " long and quiet.")
            > world.gold(PROMPT, " boring and painful."))
    rng = random.Random(1)

    def mean_gold(bias):
        ps = world.make_prompts(400, rng)
        return sum(world.gold(p, world.sample_continuation(rng, bias, p)) for p in ps) / 400
    neg, neu, demo, pos = (mean_gold(b) for b in (-1.0, 0.0, world.DEMO_BIAS, 1.0))
    assert neg < neu - 0.8 and neu < demo - 0.3 and demo < pos - 0.5


def test_gold_is_order_one():
    rng = random.Random(2)
    golds = [world.gold(p, world.sample_continuation(rng, rng.uniform(-1, 1), p))
             for p in world.make_prompts(1000, rng)]
    assert -3 < min(golds) and max(golds) < 2.0
    assert 0.6 < (sum(g * g for g in golds) / len(golds)) ** 0.5 < 2.0
    assert world.gold(PROMPT, "!!!!!!!!") >= -4.0


def test_labels_agree_with_gold_at_the_bayes_rate():
    from demo.labeler import BradleyTerryLabeler
    pairs = world.make_preference_pairs(1500, random.Random(3))
    bayes = world.bayes_agreement(pairs)
    assert 0.65 < bayes < 0.9  # informative but noisy
    triples = [(x.prompt, x.chosen, x.rejected) for x in pairs]
    labeler = BradleyTerryLabeler(world.gold)
    assert labeler.bayes_agreement(triples) == pytest.approx(bayes)
    agreement = labeler.gold_agreement(triples)  # labels that match the gold-better response
    assert abs(agreement - bayes) < 4 * math.sqrt(bayes * (1 - bayes) / len(pairs))
    assert all(x.chosen != x.rejected for x in pairs)
    parsed = sum(world.recognizes(x.prompt, y) for x in pairs for y in (x.chosen, x.rejected))
    assert 0.8 < parsed / (2 * len(pairs)) < 0.97  # mostly grammatical, a few light breaks


def test_data_sets_are_seeded_and_heldout_prompts_are_held_out():
    assert world.make_demos(50, random.Random(4)) == world.make_demos(50, random.Random(4))
    train = set(world.make_prompts(2000, random.Random(5)))
    heldout = set(world.make_prompts(500, random.Random(5), heldout=True))
    assert train.isdisjoint(heldout) and len(heldout) > 20
    assert all(not world.is_heldout(p) for p, _ in world.make_demos(500, random.Random(6)))


def test_quick_build_makes_a_learnable_world(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from demo import build
    from demo.evaluate import generate, score
    with pytest.raises(SystemExit):  # every flag's help renders (docstrings become help text)
        build.main(["--help"])
    out = tmp_path / "world"
    build.main(["--out", str(out), "--quick", "--seed", "0"])
    for name in ("demos.jsonl", "prefs.jsonl", "prompts.jsonl", "heldout_prompts.jsonl"):
        rows = [json.loads(line) for line in (out / name).read_text().splitlines()]
        assert rows and all(isinstance(v, str) and v for row in rows for v in row.values())
    pref = json.loads((out / "prefs.jsonl").read_text().splitlines()[0])
    assert set(pref) == {"prompt", "chosen", "rejected"}
    summary = json.loads((out / "world.json").read_text())
    assert summary["gold"]["demos"]["mean"] > summary["gold"]["corpus"]["mean"] + 0.3
    assert summary["gold"]["ceiling"] > summary["gold"]["demos"]["mean"] + 1.0

    model = AutoModelForCausalLM.from_pretrained(out / "base")
    tok = AutoTokenizer.from_pretrained(out / "base")
    assert tok.pad_token == "<pad>" and tok("the movie")["input_ids"][0] == tok.bos_token_id
    assert 300 <= len(tok) <= 800 and model.config.max_position_embeddings in range(64, 97)
    # Prompt and response tokenized apart (as SFT, the RM and PPO do) = the text tokenized whole.
    for p, r in world.make_demos(100, random.Random(8)):
        assert (tok(p)["input_ids"] + tok(r, add_special_tokens=False)["input_ids"]
                == tok(p + r)["input_ids"])
    # The base LM writes text the grammar accepts (build scored its samples on held-out prompts
    # with evaluate_policy): the world is learnable.
    base = summary["gold"]["base_lm"]
    assert base["parse_rate"] >= 0.5 and math.isfinite(base["mean"]) and base["stderr"] > 0
    prompts = ["the movie was", "overall i"]
    responses = generate(model, tok, prompts, max_new_tokens=40, temperature=1.0, seed=1)
    assert responses == generate(model, tok, prompts, 40, 1.0, seed=1)  # seeded
    assert len(score(prompts, responses)["samples"]) == 2 and tok.padding_side == "right"
