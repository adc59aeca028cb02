"""bench.ensemble's checkpoint: the single RM's weights with a K-row head, served as an ensemble
whose member 0 is the single RM."""

from __future__ import annotations

import torch

from bench.ensemble import ensemble_checkpoint
from rm_server.model import RewardModel
from tests.tiny import make_reward_model, train_tokenizer


def test_ensemble_checkpoint_keeps_the_single_head_as_member_0(tmp_path):
    tok = train_tokenizer()
    single = make_reward_model("llama", tok, tmp_path / "one")
    ens = ensemble_checkpoint(single, 3, tmp_path / "ens")
    one, many = RewardModel(single), RewardModel(ens)
    batch = [tok("a fine film")["input_ids"], tok("dull")["input_ids"]]
    rewards, _ = one.score_heads(batch)
    uwo, heads = many.score_heads(batch)
    assert many.heads.kind == "uwo" and many.heads.members == 3 and len(heads[0]) == 3
    torch.testing.assert_close(torch.tensor([h[0] for h in heads]), torch.tensor(rewards),
                               rtol=1e-5, atol=1e-5)
    mean, std = torch.tensor(heads).mean(1), torch.tensor(heads).std(1, correction=0)
    torch.testing.assert_close(torch.tensor(uwo), mean - std, rtol=1e-5, atol=1e-5)
    assert ensemble_checkpoint(single, 3, tmp_path / "ens") == ens  # kept, not rebuilt
