"""Preference data: the three formats, malformed lines by line number, over-long pairs."""

from __future__ import annotations

import json

import pytest

from policy_trainer.errors import UserError
from policy_trainer.prefs import ParseError, encode_pairs, parse_record, read_preferences
from protos.encoding import ChatInput, Encoder, TextInput

USER = {"role": "user", "content": "hi"}


def chat(*contents):
    return [USER] + [{"role": "assistant", "content": c} for c in contents]


def write(tmp_path, lines, name="prefs.jsonl"):
    path = tmp_path / name
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return path


def test_text_pair_with_margin():
    [p] = parse_record({"prompt": "q", "chosen": " good", "rejected": " bad", "margin": 2}, line=7)
    assert p.chosen == TextInput("q", " good") and p.rejected == TextInput("q", " bad")
    assert p.margin == 2.0 and p.line == 7


def test_chat_pair_and_chat_prompt():
    [p] = parse_record({"chosen": chat("yes"), "rejected": chat("no")})
    assert p.chosen == ChatInput((("user", "hi"), ("assistant", "yes")))
    # TRL's conversational form: shared prompt messages, then the responses' messages
    [q] = parse_record({"prompt": [USER], "chosen": [{"role": "assistant", "content": "yes"}],
                        "rejected": [{"role": "assistant", "content": "no"}]})
    assert q.chosen == p.chosen and q.rejected == p.rejected


def test_ranking_expands_into_all_ordered_pairs():
    pairs = parse_record({"prompt": "q", "ranking": ["a", "b", "c", "d"], "margin": 0.5}, line=3)
    got = [(p.chosen.response, p.rejected.response) for p in pairs]
    assert got == [("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d")]
    assert all(p.margin == 0.5 and p.line == 3 for p in pairs)
    chat_pairs = parse_record({"prompt": [USER], "ranking": [[{"role": "assistant", "content": c}]
                                                             for c in "xyz"]})
    assert len(chat_pairs) == 3 and isinstance(chat_pairs[0].chosen, ChatInput)


@pytest.mark.parametrize("record, message", [
    ([1, 2], "expected a JSON object"),
    ({"prompt": "q", "chosen": "a"}, "missing 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "missing 'prompt'"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "'chosen' must be a string"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, "identical"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"},
     "'margin' must be a finite number"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": float("nan")}, "finite"),
    ({"chosen": chat("a"), "rejected": "b"}, "'rejected' must be a list of messages"),
    ({"chosen": [{"role": "user"}], "rejected": chat("b")}, "chosen[0] must be an object"),
    ({"chosen": [{"role": "robot", "content": "x"}], "rejected": chat("b")},
     "unknown role 'robot'"),
    ({"chosen": [], "rejected": chat("b")}, "non-empty list"),
    ({"prompt": "q", "ranking": ["only"]}, "at least 2"),
    ({"prompt": "q", "ranking": ["a", "a"]}, "duplicate"),
    ({"ranking": ["a", "b"]}, "needs a string 'prompt'"),
    ({"prompt": "q", "ranking": ["a", "b"], "chosen": "a"}, "not both"),
    ({"prompt": 5, "chosen": "a", "rejected": "b"}, "'prompt' must be a non-empty list"),
])
def test_malformed_records_say_what_is_wrong(record, message):
    with pytest.raises(ParseError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_record(record)


MIXED = [
    {"prompt": "q", "chosen": " good", "rejected": " bad"},   # 1
    "",                                                       # 2 blank
    "{not json",                                              # 3
    {"prompt": "q", "chosen": " same", "rejected": " same"},  # 4
    {"prompt": "q", "ranking": [" a", " b", " c"]},           # 5 -> 3 pairs
    "[1, 2]",                                                 # 6
    {"chosen": chat("yes"), "rejected": chat("no")},          # 7
]


def test_malformed_lines_refuse_the_file_by_default_with_line_numbers(tmp_path):
    with pytest.raises(UserError) as e:
        read_preferences(write(tmp_path, MIXED))
    msg = str(e.value)
    assert "3 malformed line(s)" in msg
    assert "line 3: not valid JSON" in msg and "line 4:" in msg and "line 6:" in msg
    assert "--bad-lines skip" in msg


def test_skip_counts_everything(tmp_path):
    pairs, report = read_preferences(write(tmp_path, MIXED), bad_lines="skip")
    counts = (report.lines, report.blank_lines, report.bad_lines, report.rankings, report.pairs)
    assert counts == (7, 1, 3, 1, 5)
    assert [p.line for p in pairs] == [1, 5, 5, 5, 7]
    assert [n for n, _ in report.errors] == [3, 4, 6]
    assert report.summary()["errors"][0].startswith("line 3: not valid JSON")


def test_many_bad_lines_list_the_first_few(tmp_path):
    with pytest.raises(UserError, match=r"12 malformed line\(s\).*\(and 7 more\)"):
        read_preferences(write(tmp_path, ["{"] * 12 + [MIXED[0]]))


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UserError, match="nope.jsonl: no such file"):
        read_preferences(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="no preference pairs"):
        read_preferences(write(tmp_path, ["", ""]))


def test_encoding_is_the_servers_encoder(tmp_path, tokenizer):
    pairs, report = read_preferences(write(tmp_path, [MIXED[0], MIXED[6]]))
    enc = Encoder(tokenizer, 64, len(tokenizer))
    got = encode_pairs(pairs, enc, report)
    assert got[0].chosen == enc.encode(TextInput("q", " good")).ids
    assert got[1].rejected == enc.encode(ChatInput((("user", "hi"), ("assistant", "no")))).ids
    assert report.encoded_pairs == 2 and report.truncated_pairs == 0


LONG = {"prompt": " ".join(["movie"] * 60), "chosen": " great fun", "rejected": " awful dull"}


@pytest.mark.parametrize("policy", ["left", "drop", "error"])
def test_over_long_pairs_follow_the_policy(tmp_path, tokenizer, policy):
    path = write(tmp_path, [MIXED[0], LONG])
    pairs, report = read_preferences(path)
    enc = Encoder(tokenizer, 16, len(tokenizer))
    if policy == "error":
        with pytest.raises(UserError, match="line 2: .* longer than max_length 16"):
            encode_pairs(pairs, enc, report, truncation=policy)
        return
    got = encode_pairs(pairs, enc, report, truncation=policy)
    if policy == "drop":
        assert len(got) == 1 and report.dropped_long_pairs == 1 and report.truncated_pairs == 0
        return
    assert report.truncated_pairs == 1 and got[1].truncated and len(got[1].chosen) == 16
    full = enc.encode_text(LONG["prompt"], LONG["chosen"])[0]
    assert got[1].chosen == full[-16:]  # the end, where the score is read, is kept


def test_encoder_errors_are_reported_by_line(tmp_path):
    from tests.tiny import train_tokenizer

    no_chat = train_tokenizer(chat=False)
    path = write(tmp_path, [MIXED[0], MIXED[6]])
    pairs, report = read_preferences(path)
    enc = Encoder(no_chat, 64, len(no_chat))
    with pytest.raises(UserError, match="line 2: conversation: this model's tokenizer has no "
                                        "chat template"):
        encode_pairs(pairs, enc, report)
    pairs, report = read_preferences(path, bad_lines="skip")
    got = encode_pairs(pairs, enc, report)
    assert len(got) == 1 and report.bad_lines == 1
