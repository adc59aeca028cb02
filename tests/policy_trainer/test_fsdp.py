"""FSDP2 under torchrun, 2 ranks on the CPU (gloo), tiny Llamas.

- SFT and the reward model: the same global batch on 2 ranks gives the losses and the weights
  of 1 rank (fp32, tolerances below: the ranks sum in another order, nothing else differs);
- SFT resumes on 2 ranks from its sharded (DCP) checkpoint and ends where the straight run
  ends; the final output is a plain Hugging Face directory;
- PPO's advantage whitening and reward whitening are over every rank's rollouts, and its
  reward normalization is the RM's statistics on every rank: 2 ranks on halves of a batch
  compute what 1 rank computes on the whole (a process group of 2, no models).
(PPO under torchrun end to end, bf16 and LoRA included: test_ppo_e2e.py.)
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from policy_trainer import cli
from policy_trainer.distributed import Dist
from policy_trainer.ppo_config import PPOConfig
from policy_trainer.ppo_loop import rewards_and_advantages
from policy_trainer.rm_train import TrainConfig, train
from policy_trainer.rollout import Rollouts
from tests import tiny

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2", "-m", "policy_trainer.cli"]
LOSS_RTOL = 1e-5   # per-step losses, 2 ranks against 1
WEIGHT_ATOL = 1e-5  # every weight after the run (AdamW), 2 ranks against 1


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def torchrun(args: list[str], log: Path) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(TORCHRUN + args, cwd=REPO, env=ENV, stdout=f,
                              stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == 0, log.read_text()[-4000:]


def losses(out: Path, key: str = "loss") -> dict[int, float]:
    recs = [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in recs if key in r and r.get("split", "train") == "train"}


def assert_same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=WEIGHT_ATOL, rtol=0,
                                   msg=lambda m, k=k: f"{k}: {m}")


def test_sft_two_ranks_take_one_ranks_steps_and_resume_from_shards(tmp_path, tokenizer):
    """1 rank x 5 steps against: 2 ranks x 2 steps, 2 ranks resumed to 4, 1 rank resumed to
    5 from the 2-rank shards; each step the same 8 examples."""
    base = tiny.make_causal_lm("llama", tokenizer, tmp_path / "base", seed=3)
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps({"prompt": p, "response": " great movie"}) + "\n"
                             for p in tiny.corpus(40, seed=1)))
    common = ["sft", "--data", str(demos), "--base", str(base), "--lr", "1e-2",
              "--lr-schedule", "constant", "--warmup-ratio", "0", "--no-progress",
              "--torch-threads", "1", "--micro-batch-size", "4", "--checkpoint-every", "2",
              "--eval-every", "2", "--keep-checkpoints", "0"]
    one, two = tmp_path / "one", tmp_path / "two"
    # one rank: 5 steps of 8 examples (2 micro-batches of 4)
    assert cli.main(common + ["--out", str(one), "--grad-accum-steps", "2",
                              "--max-steps", "5"]) == 0
    # two ranks, 4 examples each: 2 steps, stop; resume from the sharded checkpoint to 4
    torchrun(common + ["--out", str(two), "--max-steps", "2"], tmp_path / "two-a.log")
    assert sorted(p.name for p in (two / "checkpoints" / "step-2" / "dcp").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]  # one file per rank
    torchrun(common + ["--out", str(two), "--max-steps", "4", "--resume"],
             tmp_path / "two-b.log")
    # and one process resumes the 2-rank shards (DCP re-shards them) for step 5
    assert cli.main(common + ["--out", str(two), "--grad-accum-steps", "2", "--max-steps", "5",
                              "--resume"]) == 0
    assert sorted(losses(two)) == [1, 2, 3, 4, 5]
    for step, loss in losses(one).items():
        assert losses(two)[step] == pytest.approx(loss, rel=LOSS_RTOL), step
    for step, loss in losses(one, "eval_loss").items():
        assert losses(two, "eval_loss")[step] == pytest.approx(loss, rel=LOSS_RTOL), step
    assert json.loads((two / "train_log.jsonl").read_text().splitlines()[0])["world_size"] == 2
    assert {p.name for p in two.iterdir()} >= {"config.json", "model.safetensors",
                                              "tokenizer.json"}  # plain, from rank 0
    assert_same_weights(AutoModelForCausalLM.from_pretrained(one),
                        AutoModelForCausalLM.from_pretrained(two))


def test_reward_model_two_ranks_take_one_ranks_steps(tmp_path):
    tok = tiny.train_tokenizer(pad="none")
    base = tiny.make_causal_lm("llama", tok, tmp_path / "base", seed=4)
    rng = random.Random(0)
    rows = [{"prompt": "review?", "chosen": " great fun " + rng.choice(tiny.WORDS),
             "rejected": " awful " + rng.choice(tiny.WORDS)} for _ in range(36)]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # lr 1e-3: AdamW moves a weight whose gradient is ~0 by up to lr whatever the rounding of
    # that gradient did (it divides by sqrt(v)); at 1e-2 one norm weight differed by 4e-5
    flags = dict(batch_size=8, micro_batch_size=4, max_steps=3, lr=1e-3, eval_batch_size=8,
                 progress=False, threads=1)
    one, two = tmp_path / "one", tmp_path / "two"
    assert train(TrainConfig(data=str(data), base=str(base), out=str(one), **flags)) == 0
    args = ["rm", "--data", str(data), "--base", str(base), "--out", str(two)]
    for k, v in flags.items():
        args += [f"--{k.replace('_', '-')}", str(v)] if k != "progress" else ["--no-progress"]
    torchrun(args, tmp_path / "two.log")
    for step, loss in losses(one).items():
        assert losses(two)[step] == pytest.approx(loss, rel=LOSS_RTOL), step
    assert_same_weights(AutoModelForSequenceClassification.from_pretrained(one),
                        AutoModelForSequenceClassification.from_pretrained(two))
    stats = [json.loads((o / "reward_stats.json").read_text()) for o in (one, two)]
    assert stats[1]["num_samples"] == stats[0]["num_samples"]  # every eval pair, once
    assert stats[1]["mean"] == pytest.approx(stats[0]["mean"], abs=1e-5)
    assert stats[1]["std"] == pytest.approx(stats[0]["std"], abs=1e-5)


# ---------------------------------------------------------------- PPO's global statistics

def fake_rollouts(seed: int = 0, B: int = 8, R: int = 6) -> Rollouts:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, R + 1, (B,), generator=g)
    mask = (torch.arange(R)[None, :] < lengths[:, None]).long()
    return Rollouts(torch.ones(B, 2, dtype=torch.long), torch.ones(B, 2, dtype=torch.long),
                    torch.ones(B, R, dtype=torch.long), mask, torch.rand(B, generator=g) > 0.2,
                    list(range(B)), logprobs=-torch.rand(B, R, generator=g),
                    ref_logprobs=-torch.rand(B, R, generator=g),
                    values=torch.randn(B, R, generator=g))


SCORES = torch.tensor([1.0, -2.0, float("nan"), 0.5, 3.0, -1.0, 0.25, 2.0])
CFG = dict(policy="p", rm="r", prompts="x", out="o", whiten_rewards=True,
           normalize_reward=True, missing_eos_penalty=0.5)
NORM = (0.3, 1.7)  # the RM's reward statistics (ModelInfo): the same on every rank


def _rank(rank: int, init: str, results) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        ro = fake_rollouts().subset(torch.arange(rank * 4, rank * 4 + 4))
        sums, _ = rewards_and_advantages(ro, SCORES[rank * 4: rank * 4 + 4], 0.1, NORM,
                                         PPOConfig(**CFG), Dist(rank, 2, rank))
        results[rank] = (ro.advantages, ro.rewards, ro.returns, sums)
    finally:
        dist.destroy_process_group()


def test_whitening_and_reward_normalization_are_global_across_ranks(tmp_path):
    alone = fake_rollouts()
    sums_alone, _ = rewards_and_advantages(alone, SCORES, 0.1, NORM, PPOConfig(**CFG))
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(f"file://{tmp_path / 'store'}", results), nprocs=2)
    for rank in (0, 1):
        rows = torch.arange(rank * 4, rank * 4 + 4)
        sub = alone.subset(rows)  # the rows trimmed as the rank's own batch was
        advantages, rewards, returns, _ = results[rank]
        for got, want in ((advantages, sub.advantages), (rewards, sub.rewards),
                          (returns, sub.returns)):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    summed = {k: results[0][3][k] + results[1][3][k] for k in sums_alone}
    assert summed == pytest.approx(sums_alone, rel=1e-6)
