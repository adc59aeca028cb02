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


def test_the_models_groups_are_the_policys():
    """The batching policy plans a batch with prefix_plan.group_by_prefix (the last token
    scored); the model splits it with prefix_groups (HF's scored token). On random batches of
    k responses to a few prompts they agree exactly unless a response ends in pad tokens, and
    then the model's shared part is never longer than the plan's (so the plan's cost of the
    batch is what runs, or a little less: rm_server/prefix_plan.py)."""
    import random

    from rm_server.prefix_plan import group_by_prefix

    pad = 3
    for seed in range(200):
        rng = random.Random(seed)
        prompts = [[rng.randrange(4, 9) for _ in range(rng.randint(10, 30))] for _ in range(3)]
        seqs = [rng.choice(prompts) + [rng.randrange(4, 9) for _ in range(rng.randint(0, 6))]
                for _ in range(rng.randint(1, 12))]
        plan = group_by_prefix(seqs, 16)
        assert prefix_groups(seqs, pad, 16) == plan  # no pad ids: the same split
        padded = [s + [pad] * rng.choice([0, 0, 1, 3]) for s in seqs]
        model_groups, _ = prefix_groups(padded, pad, 16)
        planned = dict((tuple(m), p) for p, m in group_by_prefix(padded, 16)[0])
        for p, members in model_groups:
            assert tuple(members) in planned and p <= planned[tuple(members)]
