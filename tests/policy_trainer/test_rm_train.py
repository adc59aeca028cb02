"""`rm-server train` / `rm-server eval` on tiny real models.

- the output is a plain HF checkpoint; the scores computed at the end of training equal
  ``AutoModelForSequenceClassification.from_pretrained(out)`` on Encoder ids scored alone;
- resume continues at the same step with the same losses;
- the bar: on synthetic Bradley-Terry preferences from a known gold reward, held-out agreement
  within 3 points of the Bayes-optimal agreement and Spearman(RM, gold) ≥ 0.9.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from demo.labeler import BradleyTerryLabeler
from policy_trainer import checkpoint
from policy_trainer import rm_train as train_mod
from policy_trainer.errors import UserError
from policy_trainer.prefs import EncodedPair
from policy_trainer.rm_metrics import calibration, pair_metrics, spearman
from policy_trainer.rm_model import forward_rewards, forward_rewards_one, load_model, score_pairs
from policy_trainer.rm_train import TrainConfig, train
from protos.encoding import ChatInput, Encoder, TextInput
from rm_server import cli
from tests import tiny

REPO = Path(__file__).resolve().parents[2]
POS = {"great", "wonderful", "good", "best", "fun", "loved"}
NEG = {"terrible", "boring", "awful", "bad", "worst", "dull", "hated"}


def sentiment(prompt: str, response: str) -> float:
    """Gold reward: positive words minus negative words, times 1.5 (BT noise: Bayes ≈ 0.83)."""
    words = response.split()
    return 1.5 * (sum(w in POS for w in words) - sum(w in NEG for w in words))


def review(rng: random.Random, n: int = 8) -> str:
    return " " + " ".join(rng.choice(tiny.WORDS) for _ in range(n))


def chat_pair(chosen: str, rejected: str) -> dict:
    user = {"role": "user", "content": "review?"}
    return {"chosen": [user, {"role": "assistant", "content": chosen}],
            "rejected": [user, {"role": "assistant", "content": rejected}]}


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine, two threads contend badly (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A causal-LM base whose tokenizer has no pad token, and mixed-format train/eval files."""
    root = tmp_path_factory.mktemp("rm_train")
    tok = tiny.train_tokenizer(pad="none")
    base = tiny.make_causal_lm("llama", tok, root / "base")
    rng, lab = random.Random(0), BradleyTerryLabeler(sentiment, seed=0)
    train_recs = [lab.record("review:", review(rng), review(rng)) for _ in range(64)]
    train_recs += [chat_pair(*lab.label("", review(rng), review(rng))[:2]) for _ in range(16)]
    eval_recs = [lab.record("review:", review(rng), review(rng)) for _ in range(8)]
    eval_recs += [chat_pair(*lab.label("", review(rng), review(rng))[:2]) for _ in range(4)]
    eval_recs += [{"prompt": "rank:", "ranking": [" great fun", " good", " awful dull"],
                   "margin": 0.5}]
    eval_recs += [{"prompt": " ".join(["movie"] * 40), "chosen": review(rng),
                   "rejected": review(rng)}
                  for _ in range(2)]  # longer than --max-length 64: truncated, the end kept
    return {"root": root, "base": str(base),
            "train": write_jsonl(root / "train.jsonl", train_recs),
            "eval": write_jsonl(root / "eval.jsonl", eval_recs), "eval_recs": eval_recs}


def base_args(world, out) -> list[str]:
    return ["train", "--data", world["train"], "--eval-data", world["eval"],
            "--base", world["base"], "--out", str(out), "--batch-size", "16", "--lr", "3e-3",
            "--max-length", "64", "--no-progress"]


@pytest.fixture(scope="module")
def trained(world):
    out = world["root"] / "rm"
    rc = cli.main(base_args(world, out) + ["--max-steps", "6", "--micro-batch-size", "8",
                                           "--save-every", "3"])
    assert rc == 0
    return out


def expected_pairs(records) -> dict[int, list]:
    """line -> [(chosen input, rejected input)], built here from the JSON, not by
    policy_trainer.prefs."""
    def inp(prompt, resp):
        if isinstance(resp, str):
            return TextInput(prompt, resp)
        return ChatInput(tuple((m["role"], m["content"]) for m in resp))
    out = {}
    for n, r in enumerate(records, start=1):
        if "ranking" in r:
            k = r["ranking"]
            out[n] = [(inp(r["prompt"], k[i]), inp(r["prompt"], k[j]))
                      for i in range(len(k)) for j in range(i + 1, len(k))]
        else:
            out[n] = [(inp(r.get("prompt"), r["chosen"]), inp(r.get("prompt"), r["rejected"]))]
    return out


def test_scores_at_end_of_training_equal_from_pretrained_scored_alone(world, trained):
    model = AutoModelForSequenceClassification.from_pretrained(trained).eval()
    tok = AutoTokenizer.from_pretrained(trained)
    # no pad in the base: pad = eos on the tokenizer and the config, so batches score
    assert model.config.pad_token_id == tok.pad_token_id == tok.eos_token_id
    assert tok.model_max_length == 64
    enc = Encoder(tok, tok.model_max_length, model.config.vocab_size)
    rows = [json.loads(t) for t in (trained / "eval_scores.jsonl").read_text().splitlines()]
    todo = expected_pairs(world["eval_recs"])
    assert len(rows) == sum(map(len, todo.values())) == 17
    ends_in_eos = 0
    with torch.no_grad():
        for row in rows:
            for item, key in zip(todo[row["line"]].pop(0), ("r_chosen", "r_rejected")):
                e = enc.encode(item)
                ends_in_eos += e.ids[-1] == tok.eos_token_id  # HF's rule skips it, in both paths
                alone = model(input_ids=torch.tensor([e.ids])).logits[0, 0].item()
                assert alone == pytest.approx(row[key], abs=1e-5)
    assert ends_in_eos == 8  # the chat pairs' template ends every message with EOS
    assert sum(r["truncated"] for r in rows) == 2
    assert np.std([r["r_chosen"] for r in rows]) > 0.1  # real spread: the test is not trivial


def test_output_is_a_plain_checkpoint_with_stats_logs_and_plots(world, trained):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "reward_stats.json", "train_log.jsonl", "eval.json", "eval_scores.jsonl",
                 "train_summary.json"):
        assert (trained / name).is_file(), name
    for png in ("eval.png", "train_curves.png"):
        assert (trained / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((trained / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["id2label"] == {"0": "reward"}
    scores = [json.loads(t) for t in (trained / "eval_scores.jsonl").read_text().splitlines()]
    rewards = np.array([r["r_chosen"] for r in scores] + [r["r_rejected"] for r in scores])
    stats = json.loads((trained / "reward_stats.json").read_text())
    assert stats["split"] == "eval" and stats["num_samples"] == 34
    assert stats["mean"] == pytest.approx(rewards.mean(), abs=1e-5)
    assert stats["std"] == pytest.approx(rewards.std(), abs=1e-5)
    rows = [json.loads(t) for t in (trained / "train_log.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "accuracy", "lr", "grad_norm"} <= r.keys() for r in train_rows)
    assert [r["step"] for r in rows if r["split"] == "eval"] == [5, 6]  # end of epoch 0, end of run
    # the resumable state lives beside the servable output, not in it
    assert not (trained / "checkpoints").exists()
    ckpts = trained.parent / "rm.checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-3", "step-6"]
    summary = json.loads((trained / "train_summary.json").read_text())
    assert summary["data"]["eval"]["truncated_pairs"] == 2
    assert summary["data"]["train"]["pairs"] == 80 and summary["data"]["eval"]["rankings"] == 1


def test_eval_cli_reproduces_the_training_evaluation(world, trained, tmp_path, capsys):
    assert cli.main(["eval", "--model", str(trained), "--data", world["eval"],
                     "--out", str(tmp_path), "--no-progress"]) == 0
    got, ref = (json.loads((d / "eval.json").read_text()) for d in (tmp_path, trained))
    assert got["pairs"] == ref["pairs"] == 17 and got["accuracy"] == ref["accuracy"]
    for key in ("delta_mean", "delta_std", "loss", "ece", "reward_mean"):
        assert got[key] == pytest.approx(ref[key], abs=1e-5)
    assert got["data"]["truncated_pairs"] == 2
    assert (tmp_path / "eval.png").is_file()
    assert "accuracy" in capsys.readouterr().out


NO_MATPLOTLIB = ("import sys; sys.modules['matplotlib'] = None  # as if not installed\n"
                 "from rm_server.cli import main; sys.exit(main(sys.argv[1:]))")
PLOTS_HINT = "pip install 'rlhf-rm-service[plots]'"


def run_without_matplotlib(args: list[str]) -> subprocess.CompletedProcess:
    """``rm-server ARGS`` in a fresh interpreter where ``import matplotlib`` fails (a plain
    ``pip install`` without the [plots] extra)."""
    return subprocess.run([sys.executable, "-c", NO_MATPLOTLIB, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_train_and_eval_finish_without_matplotlib_and_say_how_to_get_plots(world, trained,
                                                                            tmp_path):
    out = tmp_path / "rm"
    proc = run_without_matplotlib(base_args(world, out) + ["--max-steps", "2", "--threads", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("model.safetensors", "reward_stats.json", "eval.json", "train_summary.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.png"))
    hint = [ln for ln in proc.stderr.splitlines() if PLOTS_HINT in ln]
    assert len(hint) == 1 and "matplotlib is not installed" in hint[0], proc.stderr[-3000:]
    assert "eval.png" not in proc.stdout  # it does not claim a plot it did not make

    ev = tmp_path / "eval"
    proc = run_without_matplotlib(["eval", "--model", str(trained), "--data", world["eval"],
                                   "--out", str(ev), "--no-progress", "--threads", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (ev / "eval.json").is_file() and not (ev / "eval.png").exists()
    assert [ln for ln in proc.stderr.splitlines() if PLOTS_HINT in ln] == [
        f"eval: {hint[0]}"], proc.stderr[-3000:]
    assert "accuracy" in proc.stdout


def test_with_matplotlib_the_plots_are_made_and_no_hint_is_printed(world, trained, tmp_path,
                                                                   capsys):
    assert cli.main(["eval", "--model", str(trained), "--data", world["eval"],
                     "--out", str(tmp_path), "--no-progress"]) == 0
    assert (tmp_path / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert PLOTS_HINT not in capsys.readouterr().err


def test_resume_continues_at_the_same_step_with_the_same_losses(world, tmp_path, monkeypatch):
    def cfg(out, resume=False):  # 80 pairs / 16 = 5 steps per epoch: step 6 starts a new shuffle
        return TrainConfig(data=world["train"], eval_data=world["eval"], base=world["base"],
                           out=str(out), max_steps=7, batch_size=16, lr=3e-3, max_length=64,
                           save_every=3, keep_checkpoints=5, progress=False, resume=resume)

    assert train(cfg(tmp_path / "a")) == 0
    real, calls = train_mod.train_step, []

    def crash_at_step_5(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", crash_at_step_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg(tmp_path / "b"))
    monkeypatch.setattr(train_mod, "train_step", real)
    b = tmp_path / "b"
    assert [p.name for _, p in checkpoint.list_checkpoints(tmp_path / "b.checkpoints")] == [
        "step-3"]
    # make it a run of an earlier version, which kept its checkpoints in OUT/checkpoints: it
    # resumes from there, and goes on saving there
    os.replace(tmp_path / "b.checkpoints", b / "checkpoints")
    # step 4 ran past the checkpoint
    assert len((b / "train_log.jsonl").read_text().splitlines()) == 4
    assert train(cfg(b, resume=True)) == 0

    a_rows, b_rows = ([json.loads(t) for t in (d / "train_log.jsonl").read_text().splitlines()]
                      for d in (tmp_path / "a", b))
    assert [(r["split"], r["step"]) for r in b_rows] == [(r["split"], r["step"]) for r in a_rows]
    for ra, rb in zip(a_rows, b_rows):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-6)
        assert rb["accuracy"] == ra["accuracy"] and rb.get("lr") == ra.get("lr")
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(b / "model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6
    assert [p.name for _, p in checkpoint.list_checkpoints(b / "checkpoints")] == [
        "step-3", "step-6", "step-7"]
    assert not (tmp_path / "b.checkpoints").exists()


def test_checkpoint_dir_default_explicit_and_the_old_layout(tmp_path, monkeypatch):
    out = tmp_path / "runs" / "rm"
    assert checkpoint.checkpoint_root(out, None) == tmp_path / "runs" / "rm.checkpoints"
    assert checkpoint.checkpoint_root(out, str(tmp_path / "ck")) == tmp_path / "ck"
    out.parent.mkdir(parents=True)
    monkeypatch.chdir(out.parent)
    assert checkpoint.checkpoint_root(Path("."), None) == tmp_path / "runs.checkpoints"
    (out / "checkpoints" / "step-4").mkdir(parents=True)
    assert checkpoint.checkpoint_root(out, None) == tmp_path / "runs" / "rm.checkpoints"
    (out / "checkpoints" / "step-4" / checkpoint.STATE_FILE).write_bytes(b"")  # complete now
    assert checkpoint.checkpoint_root(out, None) == out / "checkpoints"
    assert checkpoint.checkpoint_root(out, str(tmp_path / "ck")) == tmp_path / "ck"


def test_eval_writes_into_a_directory_of_its_own_not_the_model(world, trained, tmp_path,
                                                               monkeypatch, capsys):
    before = sorted(p.name for p in trained.iterdir())
    monkeypatch.chdir(tmp_path)
    assert cli.main(["eval", "--model", str(trained), "--data", world["eval"],
                     "--no-progress"]) == 0
    out = tmp_path / "rm-eval-rm-eval"  # rm-eval-<model name>-<data name>
    assert json.loads((out / "eval.json").read_text())["pairs"] == 17
    assert (out / "eval_scores.jsonl").is_file()
    assert sorted(p.name for p in trained.iterdir()) == before
    assert "rm-eval-rm-eval/eval.json" in capsys.readouterr().out


def test_train_reads_parquet_and_saved_datasets_with_implicit_prompts(world, tmp_path):
    """TRL's layout: {chosen, rejected} whole texts, the prompt their common prefix; a Parquet
    file to train on and a saved `datasets` directory to evaluate on."""
    datasets = pytest.importorskip("datasets", reason="pip install datasets")
    text = [r for r in world["eval_recs"] + [json.loads(t) for t in
            Path(world["train"]).read_text().splitlines()] if isinstance(r.get("chosen"), str)]
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
                for r in text]
    datasets.Dataset.from_list(implicit[12:]).to_parquet(str(tmp_path / "train.parquet"))
    datasets.Dataset.from_list(implicit[:12]).save_to_disk(str(tmp_path / "eval_ds"))
    out = tmp_path / "rm"
    assert cli.main(["train", "--data", str(tmp_path / "train.parquet"), "--eval-data",
                     str(tmp_path / "eval_ds"), "--base", world["base"], "--out", str(out),
                     "--max-steps", "2", "--batch-size", "16", "--max-length", "64",
                     "--no-progress"]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["data"]["train"]["lines"] == summary["data"]["train"]["pairs"] == 62
    assert summary["data"]["eval"]["pairs"] == 12
    ev = tmp_path / "ev"
    assert cli.main(["eval", "--model", str(out), "--data", str(tmp_path / "eval_ds"),
                     "--out", str(ev), "--no-progress"]) == 0
    got, ref = (json.loads((d / "eval.json").read_text()) for d in (ev, out))
    assert got["pairs"] == 12 and got["delta_mean"] == pytest.approx(ref["delta_mean"], abs=1e-5)


def test_user_errors_are_one_line_exit_2(world, trained, tmp_path, capsys):
    def run(*args):
        rc = cli.main(list(args))
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "\n" not in err, err
        return err

    assert "no checkpoint at --base" in run(*base_args(world, tmp_path / "x")[:5], "--base",
                                            str(tmp_path / "missing"), "--out", str(tmp_path / "x"))
    assert "already holds a run" in run(*base_args(world, trained))
    assert "no checkpoint in" in run(*base_args(world, tmp_path / "fresh"), "--resume")
    assert "differ" in run(*base_args(world, trained), "--batch-size", "8", "--resume")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q"}\n')
    assert "line 2: missing 'chosen'" in run("eval", "--model", str(trained), "--data", str(bad))


def test_causal_lm_base_gets_a_new_scalar_head(world):
    model, head = load_model(world["base"], seed=0, disable_dropout=True)
    assert head == ["score.weight"] and model.config.num_labels == 1
    w = model.score.weight
    assert w.std().item() == pytest.approx(1 / math.sqrt(w.shape[1] + 1), rel=0.5)


def test_sequence_classification_base_keeps_its_head_and_trains(world, tokenizer, tmp_path):
    base = tiny.make_reward_model("gpt2", tokenizer, tmp_path / "base")
    model, head = load_model(base, seed=0, disable_dropout=True)
    assert head == [] and all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    saved = load_file(base / "model.safetensors")
    assert torch.equal(model.score.weight, saved["score.weight"])
    out = tmp_path / "rm"
    assert train(TrainConfig(data=world["train"], base=str(base), out=str(out), max_steps=2,
                             batch_size=16, eval_fraction=0.1, progress=False)) == 0
    assert AutoModelForSequenceClassification.from_pretrained(out).config.num_labels == 1
    assert json.loads((out / "reward_stats.json").read_text())["split"] == "eval"


def test_a_two_label_classifier_is_refused(tokenizer, tmp_path):
    base = tiny.make_reward_model("llama", tokenizer, tmp_path / "cls", num_labels=2)
    with pytest.raises(UserError, match="2 labels"):
        load_model(base, seed=0, disable_dropout=True)


@pytest.mark.parametrize("pad", ["own", "eos"])
def test_batched_scores_equal_scores_alone(tmp_path, pad):
    tok = tiny.train_tokenizer(pad=pad)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny.make_reward_model("llama", tok, tmp_path / pad)).eval()
    g = torch.Generator().manual_seed(0)
    seqs = [[1] + torch.randint(8, len(tok), (int(n),), generator=g).tolist()
            for n in torch.randint(2, 20, (22,), generator=g)]
    seqs[3] += [tok.eos_token_id]  # a trailing EOS: skipped by HF's rule when pad == eos
    pairs = [EncodedPair(seqs[i], seqs[i + 1], 0.0, i) for i in range(0, 22, 2)]
    r_w, r_l = score_pairs(model, pairs, torch.device("cpu"), batch_size=4)
    with torch.no_grad():
        alone = torch.cat([forward_rewards_one(model, s, torch.device("cpu")) for s in seqs])
        assert torch.allclose(forward_rewards(model, seqs, torch.device("cpu")), alone, atol=1e-5)
    assert torch.allclose(torch.stack([r_w, r_l], 1).flatten(), alone, atol=1e-5)


def test_spearman_and_calibration_by_hand():
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 − 6·2 / (4·15)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(1.5 / math.sqrt(3))  # ties: mean ranks
    l3 = math.log(3)  # σ(log 3) = 0.75
    ece, table = calibration(np.array([l3, l3, l3, -l3]), bins=10)
    assert ece == pytest.approx(0.0, abs=1e-12)  # claims 0.75, agrees on 3 of 4
    assert table[5]["count"] == 4 and table[5]["agreement"] == 0.75
    ece, _ = calibration(np.array([l3] * 4), bins=10)
    assert ece == pytest.approx(0.25)
    m = pair_metrics([2.0, 1.0, 0.0], [1.0, 1.0, 3.0])
    assert m["accuracy"] == pytest.approx(0.5) and m["delta_mean"] == pytest.approx(-2 / 3)
    assert sum(m["abs_delta_histogram"]["counts"]) == 3 and m["reward_mean"] == pytest.approx(4 / 3)


def test_bar_synthetic_bt_preferences(tmp_path):
    """Held-out agreement within 3 points of the Bayes ceiling; Spearman with gold ≥ 0.9.

    The world is built so a 28k-parameter Llama can represent the gold reward: one prompt and
    8-word responses, so the sum of word sentiments is a fixed multiple of their mean, which
    attention at the last token computes.
    """
    rng, lab = random.Random(1), BradleyTerryLabeler(sentiment, seed=1)
    triples = [("review:", review(rng), review(rng)) for _ in range(3000)]
    records = [lab.record(*t) for t in triples]
    train_file = write_jsonl(tmp_path / "train.jsonl", records[:2000])
    eval_file = write_jsonl(tmp_path / "eval.jsonl", records[2000:])
    tok = tiny.train_tokenizer()
    base = tiny.make_causal_lm("llama", tok, tmp_path / "base")
    t0 = time.time()
    assert train(TrainConfig(data=train_file, eval_data=eval_file, base=str(base),
                             out=str(tmp_path / "rm"), epochs=2, batch_size=32, lr=3e-3,
                             save_every=0, progress=False)) == 0
    seconds = time.time() - t0
    agreement = json.loads((tmp_path / "rm" / "eval.json").read_text())["accuracy"]
    bayes = lab.bayes_agreement(triples[2000:])

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    enc = Encoder(tok, 128, len(tok))
    held_out = [review(rng) for _ in range(500)]
    with torch.no_grad():
        scores = forward_rewards(model, [enc.encode(TextInput("review:", y)).ids for y in held_out],
                                 torch.device("cpu"))
    rho = spearman(scores.numpy(), [sentiment("review:", y) for y in held_out])
    print(f"\nbar: Bayes agreement {bayes:.4f}, held-out agreement {agreement:.4f}, "
          f"Spearman {rho:.4f}, train {seconds:.0f} s")
    assert agreement >= bayes - 0.03
    assert rho >= 0.9


def test_trained_scores_equal_what_the_running_server_returns(world, trained):
    """Train equals serve: the scores written at the end of training for the eval pairs are the
    scores a running `rm-server serve` returns for the same text/chat pairs, and GetModelInfo
    reports the checkpoint's reward statistics."""
    from rm_client import RewardClient, chat_sample, text_sample
    from rm_server.launch import start_server

    as_trained = [json.loads(x) for x in (trained / "eval_scores.jsonl").read_text().splitlines()]
    stats = json.loads((trained / "reward_stats.json").read_text())
    samples, expected = [], {}
    for row in as_trained:
        rec = world["eval_recs"][row["line"] - 1]
        if "ranking" in rec or row["line"] in {e[0] for e in expected.values()}:
            continue  # a ranking expands to several pairs: the text pairs above cover the path
        for side in ("chosen", "rejected"):
            sid = f"{row['line']}-{side}"
            resp = rec[side]
            samples.append(text_sample(sid, rec["prompt"], resp) if isinstance(resp, str)
                           else chat_sample(sid, resp))
            expected[sid] = (row["line"], row[f"r_{side}"])
    server = start_server(trained)
    try:
        with RewardClient(server.address) as rm:
            info = rm.model_info()
            served = {r.id: r.reward for r in rm.score(samples)}
    finally:
        assert server.stop() == 0
    assert any(s.WhichOneof("input") == "conversation" for s in samples)
    assert len(served) == len(expected) >= 20
    for sid, (_, want) in expected.items():
        assert served[sid] == pytest.approx(want, abs=1e-5), sid
    assert info.has_reward_stats
    assert info.reward_mean == pytest.approx(stats["mean"], abs=1e-6)
    assert info.reward_std == pytest.approx(stats["std"], abs=1e-6)
