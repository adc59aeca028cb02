"""The last-token surgery's pure parts (rm_server/last_token.py): HF's rule for the scored
token, and the grouping of samples that share a prompt. Parity of the whole path with HF:
test_model.py."""

from __future__ import annotations

from rm_server.last_token import last_token_index, prefix_groups


def test_last_token_index_follows_hf():
    assert last_token_index([5, 6, 7], None) == 2  # no pad id: the last token
    assert last_token_index([5, 6, 3, 3], 3) == 1  # the rightmost id != pad (pad == eos case)
    assert last_token_index([5, 3, 6], 3) == 2
    assert last_token_index([3, 3], 3) == 0  # nothing but pad: position 0, as HF


def test_prefix_groups_split():
    p = list(range(10, 40))  # 30 shared tokens
    seqs = [p + [50, 51], p + [52], p[:20] + [99] * 12, [1, 2, 3], p + [53, 54, 55]]
    groups, rest = prefix_groups(seqs, pad_token_id=3, min_prefix=16)
    assert groups == [(20, [0, 1, 2, 4])] and rest == [3]
    # the shared part stops before any member's scored token (trailing pads are not scored)
    groups, _ = prefix_groups([p + [3, 3], p + [60]], pad_token_id=3, min_prefix=16)
    assert groups == [(29, [0, 1])]
