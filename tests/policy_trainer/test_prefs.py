"""Preference data: the formats (the implicit prompt against TRL's own rule), JSONL, Parquet and
saved datasets, malformed lines and rows by number, over-long pairs."""

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
    ({"chosen": "a", "rejected": ["b"]}, "must both be strings or both message lists"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "'chosen' must be a string"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, "identical"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"},
     "'margin' must be a finite number"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": float("nan")}, "finite"),
    ({"chosen": chat("a"), "rejected": "b"}, "must both be strings or both message lists"),
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


# -- the implicit-prompt layout ({chosen, rejected}: TRL's, HH-RLHF's) --------------------------

IMPLICIT = [  # (chosen, rejected): the prompt is their common prefix
    ("Q: what is 2+2? A: 4", "Q: what is 2+2? A: 5"),
    ("\n\nHuman: hi there\n\nAssistant: hello!", "\n\nHuman: hi there\n\nAssistant: go away"),
    ("The movie was great", "The movie was awful"),
    ("good", "bad"),                       # no common prefix: an empty prompt
    ("same start, then yes", "same start, then no"),
]


def test_implicit_text_prompt_is_the_common_prefix_less_a_final_space():
    [p] = parse_record({"chosen": "Q: hi A: good", "rejected": "Q: hi A: bad", "margin": 1},
                       line=4)
    assert p.chosen == TextInput("Q: hi A:", " good")
    assert p.rejected == TextInput("Q: hi A:", " bad")
    assert p.margin == 1.0 and p.line == 4
    [q] = parse_record({"chosen": "good", "rejected": "bad"})
    assert q.chosen == TextInput("", "good")


def test_implicit_prompt_splits_exactly_as_trls_extract_prompt():
    data_utils = pytest.importorskip("trl.data_utils", reason="pip install trl")
    for chosen, rejected in IMPLICIT:
        want = data_utils.extract_prompt({"chosen": chosen, "rejected": rejected})
        [p] = parse_record({"chosen": chosen, "rejected": rejected})
        assert (p.chosen.prompt, p.chosen.response, p.rejected.response) == (
            want["prompt"], want["chosen"], want["rejected"]), (chosen, rejected)
    # conversations: TRL's prompt (the common leading messages) + a response is the whole
    # conversation, which is what is scored here
    chosen, rejected = chat("hello"), chat("go away")
    want = data_utils.maybe_extract_prompt({"chosen": chosen, "rejected": rejected})
    assert want["prompt"] == [USER]
    [p] = parse_record({"chosen": chosen, "rejected": rejected})
    as_trl = [(m["role"], m["content"]) for m in want["prompt"] + want["chosen"]]
    assert p.chosen == ChatInput(tuple(as_trl))
    # a string prompt beside conversations is ignored, as maybe_extract_prompt ignores it
    both = {"prompt": "hi", "chosen": chosen, "rejected": rejected}
    assert data_utils.maybe_extract_prompt(both)["prompt"] == [USER]
    assert parse_record(both) == [p]


def test_implicit_prompt_edge_cases_where_trls_loop_has_no_split_point():
    from policy_trainer.prefs import implicit_prompt

    # one text a prefix of the other: the shorter one is the prompt (TRL: "Hi t" + "here")
    assert implicit_prompt("Hi there", "Hi there, friend") == ("Hi there", "", ", friend")
    assert implicit_prompt("Hi there ", "Hi there friend") == ("Hi there", " ", " friend")
    # different from the first character and chosen ends in a space (TRL: index −1)
    assert implicit_prompt("yes ", "no") == ("", "yes ", "no")


# -- tables: Parquet files and saved `datasets` datasets ----------------------------------------

TABLE = [
    {"prompt": "q", "chosen": " good", "rejected": " bad", "margin": None},   # row 1
    {"prompt": "q", "chosen": " same", "rejected": " same", "margin": None},  # row 2: identical
    {"prompt": "q", "chosen": " good", "rejected": None, "margin": 2.0},      # row 3: missing
    {"prompt": None, "chosen": "Q: x A: yes", "rejected": "Q: x A: no", "margin": 0.5},  # row 4
]


def write_parquet(tmp_path, rows, name="prefs.parquet"):
    pa = pytest.importorskip("pyarrow", reason="pip install datasets")
    import pyarrow.parquet as pq

    path = tmp_path / name
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def save_dataset(path, rows):
    datasets = pytest.importorskip("datasets", reason="pip install datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def test_parquet_rows_parse_like_jsonl_lines_with_row_numbers(tmp_path):
    path = write_parquet(tmp_path, TABLE)
    with pytest.raises(UserError) as e:
        read_preferences(path)
    msg = str(e.value)
    assert "2 malformed row(s)" in msg and "--bad-lines skip" in msg
    assert "row 2: 'chosen' and 'rejected' are identical" in msg
    assert "row 3: missing 'rejected'" in msg  # a null cell is an absent key
    pairs, report = read_preferences(path, bad_lines="skip")
    assert [p.line for p in pairs] == [1, 4] and report.lines == 4 and report.bad_lines == 2
    assert report.summary()["errors"] == ["row 2: 'chosen' and 'rejected' are identical",
                                          "row 3: missing 'rejected' (or give a 'ranking')"]
    assert pairs[0].margin == 0.0  # null margin: the default
    assert pairs[1].chosen == TextInput("Q: x A:", " yes") and pairs[1].margin == 0.5
    good = [{k: v for k, v in r.items() if v is not None} for r in (TABLE[0], TABLE[3])]
    from_jsonl, _ = read_preferences(write(tmp_path, good))
    assert [(p.chosen, p.rejected, p.margin) for p in pairs] == [
        (p.chosen, p.rejected, p.margin) for p in from_jsonl]


def test_saved_datasets_of_chat_pairs_and_their_splits(tmp_path):
    rows = [{"chosen": chat("yes"), "rejected": chat("no")},
            {"chosen": chat("fine"), "rejected": [{"role": "robot", "content": "x"}]}]
    path = save_dataset(tmp_path / "ds", rows)
    with pytest.raises(UserError, match=r"ds: 1 malformed row\(s\): row 2: rejected\[0\]\.role"):
        read_preferences(path)
    pairs, report = read_preferences(path, bad_lines="skip")
    assert pairs[0].chosen == ChatInput((("user", "hi"), ("assistant", "yes")))
    assert report.file.unit == "row" and len(report.file.sha256) == 64

    import datasets

    split = datasets.Dataset.from_list(rows[:1])
    datasets.DatasetDict({"train": split}).save_to_disk(str(tmp_path / "one"))
    assert read_preferences(tmp_path / "one")[0] == pairs[:1]  # one split: that split
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(UserError, match=r"splits \['test', 'train'\]: pass one split's directory"):
        read_preferences(tmp_path / "two")
    assert read_preferences(tmp_path / "two" / "test")[0] == pairs[:1]


def test_table_input_errors_are_one_line(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a dataset saved by `datasets`"):
        read_preferences(tmp_path / "empty")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="junk.parquet: not a readable Parquet file"):
        read_preferences(tmp_path / "junk.parquet")
    with pytest.raises(UserError, match="nope.parquet: no such file"):
        read_preferences(tmp_path / "nope.parquet")
    path = write_parquet(tmp_path, TABLE[:1])
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)  # not installed
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)
    with pytest.raises(UserError, match="needs pyarrow: pip install datasets"):
        read_preferences(path)
    with pytest.raises(UserError, match="needs the datasets library: pip install datasets"):
        read_preferences(tmp_path / "empty")
