"""Reward-model ensembles on the training side (issue 21): ``rm-server train --ensemble K``
trains K heads on one backbone, each on its own bootstrap resample, saved as one
``num_labels = K`` checkpoint marked as an ensemble; every member equals HF's ``logits[:, k]``
scored alone; eval.json carries the members' disagreement; ``rm-eval`` reads it back. PPO
optimizes the members' aggregation it asks for (``--reward-aggregation``) and logs their
spread, against that ensemble served by a real ``rm-server serve``."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from demo.labeler import BradleyTerryLabeler
from policy_trainer.bt_loss import bradley_terry_loss
from policy_trainer.rm_ensemble import bootstrap_counts, ensemble_of, member_loss
from policy_trainer.rm_metrics import ensemble_metrics
from protos.encoding import Encoder, TextInput
from rm_server import cli
from rm_server.launch import start_server
from tests import tiny

K = 3
REPO = Path(__file__).resolve().parents[2]


def test_bootstrap_counts_resample_each_member_and_are_a_function_of_the_seed():
    c = bootstrap_counts(50, K, seed=7)
    assert c.shape == (50, K) and torch.equal(c, bootstrap_counts(50, K, seed=7))
    assert torch.all(c.sum(0) == 50) and torch.all(c >= 0) and torch.all(c == c.round())
    assert not torch.equal(c[:, 0], c[:, 1]) and not torch.equal(c, bootstrap_counts(50, K, 8))
    assert 0.2 < (c[:, 0] == 0).float().mean() < 0.55  # about 1/e of the pairs left out


def test_member_loss_is_the_bt_loss_weighted_by_each_members_counts():
    g = torch.Generator().manual_seed(0)
    r_w, r_l = torch.randn(6, 1, generator=g), torch.randn(6, 1, generator=g)
    margin = torch.rand(6, generator=g)
    plain = bradley_terry_loss(r_w[:, 0], r_l[:, 0], margin, 0.01, reduction="sum")
    assert torch.allclose(member_loss(r_w, r_l, None, margin, 0.01), plain)
    r_w, r_l = torch.randn(6, K, generator=g), torch.randn(6, K, generator=g)
    counts = torch.tensor([[0, 1, 2]] * 6, dtype=torch.float32)
    want = sum(bradley_terry_loss(r_w[:, k], r_l[:, k], margin, 0.0, reduction="sum") * k
               for k in range(K)) / K
    assert torch.allclose(member_loss(r_w, r_l, counts, margin, 0.0), want)
    r_w.requires_grad_(True)
    member_loss(r_w, r_l, counts, None, 0.0).backward()
    assert torch.all(r_w.grad[:, 0] == 0) and torch.all(r_w.grad[:, 1:] != 0)  # undrawn: none


def test_ensemble_metrics_by_hand():
    r_w = np.array([[1.0, 1.0, 1.0], [2.0, 0.0, 1.0]])  # (N=2, K=3)
    r_l = np.array([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    m = ensemble_metrics(r_w, r_l, uncertainty_coef=2.0)
    assert m["members"] == 3 and m["member_accuracy"] == [1.0, 0.5, 1.0]
    d = m["disagreement"]
    # Δ per member: pair 1 (1, 1, 1), pair 2 (2, -1, 1)
    assert d["delta_std"] == pytest.approx((0 + np.std([2, -1, 1])) / 2)
    assert d["order_disagreement"] == 0.5  # pair 2: members order it differently
    assert d["delta_correlation"] == pytest.approx(-1.0)  # members 0 and 1 (2 is constant)
    assert m["accuracy"]["mean"] == 1.0 and m["accuracy"]["min"] == 0.75  # pair 2: a tie
    uwo_w = r_w.mean(1) - 2 * r_w.std(1)
    uwo_l = r_l.mean(1) - 2 * r_l.std(1)
    assert m["accuracy"]["uwo"] == np.mean(uwo_w > uwo_l) + 0.5 * np.mean(uwo_w == uwo_l)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    tok = tiny.train_tokenizer()
    base = tiny.make_causal_lm("llama", tok, root / "base")
    rng = random.Random(0)
    lab = BradleyTerryLabeler(lambda p, y: 1.5 * (y.count("great") - y.count("awful")), seed=0)

    def review():
        return " " + " ".join(rng.choice(tiny.WORDS) for _ in range(6))
    recs = [lab.record("review:", review(), review()) for _ in range(48)]
    data = root / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = root / "ens"
    rc = cli.main(["train", "--data", str(data), "--base", str(base), "--out", str(out),
                   "--ensemble", str(K), "--ensemble-aggregation", "uwo",
                   "--uncertainty-coef", "0.5", "--batch-size", "16", "--lr", "3e-3",
                   "--max-steps", "4", "--eval-fraction", "0.25", "--no-progress",
                   "--threads", "1"])
    assert rc == 0
    return {"root": root, "data": data, "out": out}


def test_the_checkpoint_is_k_heads_marked_as_an_ensemble(world):
    config = AutoConfig.from_pretrained(world["out"])
    assert config.num_labels == K
    assert [config.id2label[k] for k in range(K)] == [f"member_{k}" for k in range(K)]
    meta = ensemble_of(config)
    assert meta["members"] == K and meta["aggregation"] == "uwo"
    assert meta["uncertainty_coef"] == 0.5 and meta["bootstrap"] and meta["center_coef"] == 0.01
    head = AutoModelForSequenceClassification.from_pretrained(world["out"]).score.weight
    assert head.shape[0] == K and not torch.allclose(head[0], head[1])


def test_every_member_is_hfs_logit_scored_alone_and_the_report_is_their_mean(world):
    out = world["out"]
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    enc = Encoder(tok, 128, model.config.vocab_size)
    recs = [json.loads(x) for x in world["data"].read_text().splitlines()]
    scores = [json.loads(x) for x in (out / "eval_scores.jsonl").read_text().splitlines()]
    for s in scores:
        r = recs[s["line"] - 1]
        with torch.no_grad():
            heads = model(torch.tensor([enc.encode(TextInput(r["prompt"], r["chosen"])).ids])
                          ).logits[0]  # (K,)
        assert s["r_chosen"] == pytest.approx(heads.mean().item(), abs=1e-5)
    report = json.loads((out / "eval.json").read_text())
    e = report["ensemble"]
    assert e["members"] == K and len(e["member_accuracy"]) == K
    assert e["disagreement"]["delta_std"] > 0 and -1 <= e["disagreement"]["delta_correlation"] <= 1
    stats = json.loads((out / "reward_stats.json").read_text())
    assert stats["num_samples"] == 2 * report["pairs"]


def test_rm_eval_reads_an_ensemble_back(world, tmp_path, capsys):
    rc = cli.main(["eval", "--model", str(world["out"]), "--data", str(world["data"]),
                   "--out", str(tmp_path / "ev"), "--no-progress"])
    assert rc == 0
    e = json.loads((tmp_path / "ev" / "eval.json").read_text())["ensemble"]
    assert e["members"] == K and e["uncertainty_coef"] == 0.5
    assert "ensemble: 3 members" in capsys.readouterr().out


def test_an_ensemble_cannot_start_from_a_one_label_classifier(world, tmp_path, capsys):
    rm = tiny.make_reward_model("llama", tiny.train_tokenizer(), tmp_path / "rm1")
    rc = cli.main(["train", "--data", str(world["data"]), "--base", str(rm), "--out",
                   str(tmp_path / "o"), "--ensemble", "2", "--max-steps", "1", "--no-progress"])
    assert rc == 2 and "--ensemble asks for 2" in capsys.readouterr().err


# -- the trainer: policy-trainer ppo --reward-aggregation {mean,min,uwo} --uncertainty-coef λ --

def ppo(world, rm_address: str, out, *flags: str) -> subprocess.CompletedProcess:
    prompts = world["root"] / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in tiny.corpus(8, 5)))
    return subprocess.run(
        [sys.executable, "-m", "policy_trainer.cli", "ppo", "--policy",
         str(world["root"] / "base"), "--rm", rm_address, "--prompts", str(prompts),
         "--out", str(out), "--batch-size", "8", "--mini-batch-size", "4",
         "--micro-batch-size", "4", "--generation-batch-size", "8", "--max-new-tokens", "6",
         "--num-ppo-epochs", "1", "--max-steps", "2", "--torch-threads", "1", "--no-progress",
         "--no-tensorboard", "--checkpoint-every", "0", *flags],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=600)


def test_ppo_optimizes_the_members_aggregation_and_logs_their_spread(world, tmp_path):
    server = start_server(world["out"], "--num-threads", "1")
    try:
        proc = ppo(world, server.address, tmp_path / "uwo", "--reward-aggregation", "uwo",
                   "--uncertainty-coef", "0.5", "--metrics-port", "0")
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        plain = ppo(world, server.address, tmp_path / "server")  # the server's own reward
        assert plain.returncode == 0, plain.stderr[-2000:]
    finally:
        server.stop()
    logs = [json.loads(x) for x in (tmp_path / "uwo" / "train_log.jsonl").read_text().split("\n")
            if x and "score" in x]
    assert len(logs) == 2
    for r in logs:  # score = mean over rollouts of (mean − λ·std) over the members
        assert r["member_std"] > 0
        assert r["score"] == pytest.approx(r["member_mean"] - 0.5 * r["member_std"], abs=1e-4)
    for r in (json.loads(x) for x in (tmp_path / "server" / "train_log.jsonl").read_text()
              .split("\n") if x and "score" in x):
        assert r["member_std"] > 0 and r["score"] != pytest.approx(r["member_mean"])


def test_an_aggregation_needs_an_ensemble_and_a_sane_lambda(world, tmp_path):
    one_head = tiny.make_reward_model("llama", tiny.train_tokenizer(), tmp_path / "rm1")
    server = start_server(one_head, "--num-threads", "1")
    try:
        proc = ppo(world, server.address, tmp_path / "o", "--reward-aggregation", "min")
    finally:
        server.stop()
    assert proc.returncode == 1
    assert "--reward-aggregation min, but the RM has one head" in proc.stderr
    proc = ppo(world, "127.0.0.1:1", tmp_path / "p", "--uncertainty-coef", "-1")
    assert proc.returncode == 2 and "--uncertainty-coef must be >= 0" in proc.stderr
