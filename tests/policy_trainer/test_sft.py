"""`policy-trainer sft` on a tiny Llama: labels, data errors, learning, output, resume."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from policy_trainer import cli, data, sft
from policy_trainer.data import Demo, read_demos
from policy_trainer.errors import UserError
from policy_trainer.optim import build_optimizer
from policy_trainer.sft_data import IGNORE_INDEX, collate, encode_demo
from protos.encoding import Encoder
from tests import tiny

RESPONSE = " great movie"  # the toy task: whatever the prompt, answer this
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    n = torch.get_num_threads()  # the runs below pin 1 thread; leave the session as it was
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    return tiny.make_causal_lm("llama", tokenizer, tmp_path_factory.mktemp("sft") / "base")


def write_demos(path: Path, n: int = 40, bad: bool = False) -> Path:
    lines = [json.dumps({"prompt": p, "response": RESPONSE}) for p in tiny.corpus(n, seed=1)]
    if bad:  # 1-based line numbers 3, 6, 9, 12 (and a blank line 15, which is not an error)
        lines.insert(2, "{not json")
        lines.insert(5, json.dumps({"prompt": "the plot"}))
        lines.insert(8, json.dumps(["a", "list"]))
        lines.insert(11, json.dumps({"prompt": "x", "response": 3}))
        lines.insert(14, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def run_args(data, base, out, *extra):
    return ["sft", "--data", str(data), "--base", str(base), "--out", str(out),
            "--micro-batch-size", "4", "--lr", "1e-2", "--torch-threads", "1", "--no-progress",
            *extra]


def read_log(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(out) if "loss" in r}


# ---------------------------------------------------------------- labels and data

def test_labels_mask_the_prompt_and_train_the_response_and_eos(tokenizer):
    enc = Encoder(tokenizer, max_length=64, vocab_size=len(tokenizer))
    ex = encode_demo(enc, Demo("the plot was", RESPONSE, 1), tokenizer.eos_token_id)
    prompt_ids = tokenizer("the plot was")["input_ids"]
    response_ids = tokenizer(RESPONSE, add_special_tokens=False)["input_ids"]
    assert prompt_ids[0] == tokenizer.bos_token_id
    assert ex.input_ids == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert ex.labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [tokenizer.eos_token_id]

    short = encode_demo(enc, Demo("a", " good", 2), tokenizer.eos_token_id)
    batch = collate([ex, short], pad_token_id=tokenizer.pad_token_id)
    n = len(short.input_ids)
    assert batch["labels"][1].tolist() == short.labels + [IGNORE_INDEX] * (len(ex.input_ids) - n)
    assert batch["attention_mask"][1].tolist() == [1] * n + [0] * (len(ex.input_ids) - n)
    assert batch["labels"][0].tolist() == ex.labels


def test_over_long_examples_keep_the_response_whole(tokenizer):
    eos = tokenizer.eos_token_id
    full = encode_demo(Encoder(tokenizer, 128, len(tokenizer)),
                       Demo("the acting was really good but the ending", RESPONSE, 1), eos)
    n_resp = sum(t != IGNORE_INDEX for t in full.labels)
    enc = Encoder(tokenizer, max_length=n_resp + 2, vocab_size=len(tokenizer))
    cut = encode_demo(enc, Demo("the acting was really good but the ending", RESPONSE, 1), eos)
    assert cut.truncated and cut.input_ids == full.input_ids[-(n_resp + 2):]
    assert cut.labels == [IGNORE_INDEX] * 2 + full.labels[-n_resp:]
    assert encode_demo(enc, Demo("the acting was really good", RESPONSE, 1), eos, "drop") is None
    tiny_enc = Encoder(tokenizer, max_length=n_resp, vocab_size=len(tokenizer))
    assert encode_demo(tiny_enc, Demo("the", RESPONSE, 1), eos) is None  # no room for context


def test_an_empty_prompt_starts_from_bos_and_trains_the_first_response_token(tokenizer):
    eos = tokenizer.eos_token_id
    response_ids = tokenizer(RESPONSE, add_special_tokens=False)["input_ids"]
    ex = encode_demo(Encoder(tokenizer, 64, len(tokenizer)), Demo("", RESPONSE, 1), eos)
    # The non-empty rule with the prompt's text taken away: its special tokens (BOS) stay.
    with_prompt = encode_demo(Encoder(tokenizer, 64, len(tokenizer)), Demo("the", RESPONSE, 1), eos)
    assert with_prompt.input_ids[0] == tokenizer.bos_token_id
    assert ex.input_ids == [tokenizer.bos_token_id] + response_ids + [eos]
    assert ex.labels == [IGNORE_INDEX] + response_ids + [eos] and not ex.no_context
    assert sft.num_targets([ex]) == len(response_ids) + 1  # the first response token included
    # Position 0 (BOS) predicts the first response token in the loss sum.
    batch = collate([ex], tokenizer.pad_token_id)
    assert batch["labels"][0, 1:].tolist()[0] == response_ids[0]

    # A tokenizer that adds no BOS to text but has one (GPT-2): start from it, as generate() does.
    gpt2_like = tiny.train_tokenizer(bos=False)
    assert gpt2_like("the")["input_ids"][0] != gpt2_like.bos_token_id
    ex = encode_demo(Encoder(gpt2_like, 64, len(gpt2_like)), Demo("", RESPONSE, 1), eos)
    assert ex.input_ids[0] == gpt2_like.bos_token_id and ex.labels[1] == response_ids[0]


def test_an_empty_prompt_without_bos_is_reported_not_silently_untrained(tmp_path, caplog):
    no_bos = tiny.train_tokenizer(bos=False)
    no_bos.bos_token = None
    eos = no_bos.eos_token_id
    response_ids = no_bos(RESPONSE, add_special_tokens=False)["input_ids"]
    ex = encode_demo(Encoder(no_bos, 64, len(no_bos)), Demo("", RESPONSE, 1), eos)
    assert ex.input_ids == response_ids + [eos] and ex.no_context
    assert ex.labels == [IGNORE_INDEX] + response_ids[1:] + [eos]  # nothing precedes token 0
    demos = tmp_path / "demos.jsonl"
    demos.write_text("\n".join(json.dumps({"prompt": p, "response": RESPONSE})
                               for p in ("", "the plot", "")) + "\n")
    cfg = sft.SFTConfig(data=str(demos), base="unused", out=str(tmp_path / "out"))
    with caplog.at_level("WARNING", logger="policy_trainer.sft"):
        examples, _, _ = sft.load_examples(cfg, no_bos, len(no_bos))
    warned = [r.getMessage() for r in caplog.records if "no BOS" in r.getMessage()]
    assert len(examples) == 3 and len(warned) == 1 and "2 examples" in warned[0]


def test_malformed_lines_are_reported_with_line_numbers(tmp_path):
    demos = read_demos(write_demos(tmp_path / "demos.jsonl", n=10, bad=True))
    assert [b.line for b in demos.bad] == [3, 6, 9, 12]
    reasons = [b.reason for b in demos.bad]
    assert "Expecting" in reasons[0] and "missing key 'response'" in reasons[1]
    assert "expected a JSON object" in reasons[2] and "must be a string" in reasons[3]
    assert len(demos.records) == 10 and demos.blank == 1
    with pytest.raises(UserError, match=r"demos.jsonl: 4 malformed line\(s\): line 3: not valid "
                       r"JSON .*; line 6: missing key 'response'.*drop --strict"):
        read_demos(tmp_path / "demos.jsonl", strict=True)


def test_batches_walk_a_fresh_permutation_each_epoch():
    idx = data.batch_indices(n=5, cursor=0, k=15, seed=0)
    assert [sorted(idx[i:i + 5]) for i in (0, 5, 10)] == [list(range(5))] * 3
    assert data.batch_indices(5, cursor=7, k=4, seed=0) == idx[7:11]


def lr_factors(total_steps: int, **schedule) -> list[float]:
    """The multiplier of the peak lr at each step (0-based) of a ``build_optimizer`` schedule."""
    optimizer, scheduler = build_optimizer(torch.nn.Linear(2, 2), total_steps, lr=1.0, **schedule)
    factors = []
    for _ in range(total_steps):
        factors.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return factors


def test_lr_schedule_warms_up_then_decays():
    # transformers' warm-up: s / warmup, from 0 at the first step
    f = lr_factors(10, schedule="cosine", warmup_ratio=0.2, min_lr_ratio=0.0)
    assert f[:3] == [0.0, 0.5, 1.0]
    assert f[9] == pytest.approx(0.5 * (1 + math.cos(7 / 8 * math.pi)))
    f = lr_factors(10, schedule="cosine", warmup_ratio=0.2, min_lr_ratio=0.1)
    assert f[2] == 1.0 and f[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(7 / 8 * math.pi)))
    f = lr_factors(10, schedule="linear", warmup_ratio=0.0, min_lr_ratio=0.0)
    assert f == pytest.approx([1 - s / 10 for s in range(10)])  # cleanrl's linear annealing
    assert lr_factors(4, schedule="constant", warmup_ratio=0.5) == [0.0, 0.5, 1.0, 1.0]


# ---------------------------------------------------------------- the command

def test_sft_learns_the_toy_task_and_writes_a_loadable_model(tmp_path, base, tokenizer, caplog):
    data = write_demos(tmp_path / "demos.jsonl", n=40, bad=True)
    out = tmp_path / "out"
    assert cli.main(run_args(data, base, out, "--max-steps", "30", "--eval-every", "10")) == 0

    assert any("demos.jsonl:6: skipped bad line: missing key 'response'" in r.getMessage()
               for r in caplog.records)
    start = read_log(out)[0]
    assert start["bad_lines"] == 4 and start["blank_lines"] == 1 and start["records"] == 40
    loss = losses(out)
    assert len(loss) == 30 and sum(loss[s] for s in range(26, 31)) / 5 < 0.2 * loss[1]
    evals = [r["eval_loss"] for r in read_log(out) if "eval_loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0]

    model = AutoModelForCausalLM.from_pretrained(out)
    prompt = tokenizer("the ending was", return_tensors="pt")
    gen = model.generate(**prompt, max_new_tokens=8, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    want = tokenizer(RESPONSE, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert gen[0, prompt["input_ids"].shape[1]:].tolist()[:len(want)] == want


def test_resume_gives_the_same_losses_as_a_straight_run(tmp_path, base, monkeypatch):
    data = write_demos(tmp_path / "demos.jsonl", n=24)
    extra = ("--max-steps", "8", "--checkpoint-every", "4", "--eval-every", "2",
             "--grad-accum-steps", "2", "--warmup-ratio", "0.25", "--keep-checkpoints", "0")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert cli.main(run_args(data, base, straight, *extra)) == 0

    real_step, calls = sft.train_step, []

    def crash_after_four(*args, **kwargs):  # a preemption between step 4 (checkpointed) and 5
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(sft, "train_step", crash_after_four)
    assert cli.main(run_args(data, base, resumed, *extra)) == 130
    monkeypatch.undo()
    assert [p.name for p in (resumed / "checkpoints").iterdir()] == ["step-4"]

    # Without --resume the run refuses to clobber the checkpoints; with it, a new process
    # (the console script, fresh RNG and caches) continues from step 4.
    assert cli.main(run_args(data, base, resumed, *extra)) == 2
    script = Path(sys.executable).with_name("policy-trainer")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "policy_trainer.cli"]
    proc = subprocess.run(cmd + run_args(data, base, resumed, *extra, "--resume"),
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stderr

    a, b = losses(straight), losses(resumed)
    assert sorted(b) == list(range(1, 9))  # steps 1-4 from the first run, 5-8 after resuming
    for step in range(1, 9):
        assert b[step] == pytest.approx(a[step], abs=1e-5), step
    eval_a = [r["eval_loss"] for r in read_log(straight) if "eval_loss" in r]
    eval_b = [r["eval_loss"] for r in read_log(resumed) if "eval_loss" in r]
    assert eval_b == pytest.approx(eval_a, abs=1e-5)


def test_user_errors_print_one_line_and_exit_2(tmp_path, base, capsys):
    data = write_demos(tmp_path / "demos.jsonl", n=10, bad=True)
    cases = [
        (run_args(tmp_path / "missing.jsonl", base, tmp_path / "o1"),
         "missing.jsonl: no such file"),
        (run_args(data, base, tmp_path / "o2", "--strict"), "demos.jsonl: 4 malformed line(s): "
                                                             "line 3: "),
        (run_args(data, tmp_path / "nobase", tmp_path / "o3"), "nobase: no such directory"),
        (run_args(data, base, tmp_path / "o4", "--micro-batch-size", "0"), "--micro-batch-size"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert cli.main(argv) == 2, argv
        err = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
        assert len(err) == 1 and message in err[0], err
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))  # nothing half-written
