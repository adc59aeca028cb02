"""`policy-trainer ppo` end to end: the real CLI against real `rm-server serve` subprocesses.

Two trainers at once (one sends token ids to two balanced servers, one has another tokenizer
and sends text), a stop-and-resume that reproduces the straight run, two 2-process torchruns
(FSDP2: every weight trained in bf16 with gradient checkpointing; LoRA), and a trainer whose
RM is killed and restarted mid-run. Tiny models, 8 rollouts a step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from policy_trainer import cli, ppo_loop
from policy_trainer.critic import ValueModel
from rm_server.launch import start_server, wait_serving
from tests import tiny

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# Compared between a straight and a resumed run; timings and retry counts are not.
DETERMINISTIC = ("score", "score_std", "kl", "kl_k1", "kl_k3", "kl_coef", "lr", "reward",
                 "pg_loss", "vf_loss", "clipfrac", "approx_kl", "entropy", "grad_norm",
                 "value_grad_norm", "explained_variance", "response_length", "rollouts", "scored")


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("ppo_e2e")
    other_tok = tiny.train_tokenizer(vocab_size=280, pad="eos")  # another fingerprint
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in tiny.corpus(16, seed=5)))
    return {"root": root, "prompts": prompts,
            "rm": tiny.make_reward_model("llama", tokenizer, root / "rm", seed=3),
            "policy": tiny.make_causal_lm("llama", tokenizer, root / "policy", seed=1),
            "policy_other_tok": tiny.make_causal_lm("gpt2", other_tok, root / "policy2", seed=2)}


@pytest.fixture(scope="module")
def servers(world):
    """Two replicas of the same RM, started side by side."""
    procs = [start_server(world["rm"], "--max-wait-ms", "2", wait=False) for _ in range(2)]
    try:
        for s in procs:
            wait_serving(s.address, 120, s.proc)
        yield procs  # a list: the restart test swaps in the replica it restarts
    finally:
        for s in procs:
            s.stop()


def ppo_args(policy, rm, prompts, out, *extra) -> list[str]:
    return ["ppo", "--policy", str(policy), "--rm", rm, "--prompts", str(prompts),
            "--out", str(out), "--batch-size", "8", "--mini-batch-size", "4",
            "--micro-batch-size", "2", "--generation-batch-size", "4", "--max-new-tokens", "8",
            "--num-ppo-epochs", "2", "--max-steps", "2", "--lr", "1e-3", "--torch-threads", "1",
            "--no-progress", "--rm-timeout", "30", "--rm-chunk-size", "2", *extra]


def trainer(args: list[str], log_path: Path, launcher=("-m", "policy_trainer.cli")):
    return subprocess.Popen([sys.executable, *launcher, *args], cwd=REPO, env=ENV,
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log_path: Path, timeout: float = 300) -> str:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"trainer timed out:\n{log_path.read_text()}") from None
    text = log_path.read_text()
    assert proc.returncode == 0, text
    return text


def read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def steps(out: Path) -> dict[int, dict]:
    recs = [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in recs if "event" not in r}


def samples_scored(server) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics",
                                  timeout=5).read().decode()
    return sum(float(ln.split()[-1]) for ln in text.splitlines()
               if ln.startswith("rm_samples_total"))


TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "policy_trainer.cli")


@pytest.fixture(scope="module")
def runs(world, servers):
    """Four trainers at the same time against the same two servers, 2 PPO steps each:
    A (same tokenizer as the RM: token ids, both replicas balanced), B (another tokenizer:
    text), and two 2-rank torchrun jobs (4 rollouts per rank): every weight trained, in bf16
    with gradient checkpointing, and LoRA (the reference its base, the critic its adapter)."""
    root = world["root"]
    both = f"{servers[0].address},{servers[1].address}"
    a = ppo_args(world["policy"], both, world["prompts"], root / "a",
                 "--checkpoint-every", "1", "--keep-checkpoints", "0", "--adaptive-kl",
                 "--kl-target", "0.05", "--kl-horizon", "100", "--metrics-port", "0")
    b = ppo_args(world["policy_other_tok"], servers[0].address, world["prompts"], root / "b",
                 "--stop-token", ".", "--missing-eos-penalty", "1.0", "--rm-client-id", "b",
                 "--no-tensorboard")
    ddp = ppo_args(world["policy"], servers[1].address, world["prompts"], root / "ddp",
                   "--num-ppo-epochs", "1", "--rm-client-id", "ddp", "--no-tensorboard",
                   "--dtype", "bfloat16", "--gradient-checkpointing")
    lora = ppo_args(world["policy"], servers[0].address, world["prompts"], root / "lora",
                    "--num-ppo-epochs", "1", "--rm-client-id", "lora", "--no-tensorboard",
                    "--lora-r", "4", "--whiten-rewards", "--checkpoint-every", "1")
    procs = {"a": trainer(a, root / "a.log"), "b": trainer(b, root / "b.log"),
             "ddp": trainer(ddp, root / "ddp.log", TORCHRUN),
             "lora": trainer(lora, root / "lora.log", TORCHRUN)}
    logs = {n: finish(p, root / f"{n}.log") for n, p in procs.items()}
    return {"a": root / "a", "b": root / "b", "ddp": root / "ddp", "lora": root / "lora",
            "a_args": a, "logs": logs}


def test_two_trainers_at_once_tokens_and_text(runs, servers):
    for name, mode in (("a", "tokens"), ("b", "text")):
        out = runs[name]
        start = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])
        assert start["event"] == "start" and start["rm_input"] == mode
        recs = steps(out)
        assert sorted(recs) == [1, 2]
        for r in recs.values():
            assert r["rollouts"] == r["scored"] == 8 and r["failed_samples"] == 0
            for key in ("score", "kl", "kl_coef", "approx_kl", "clipfrac", "entropy",
                        "explained_variance", "response_length", "time/generate",
                        "time/score", "time/reference", "time/train"):
                assert key in r, key
            assert 0 < r["response_length"] <= 8
        AutoModelForCausalLM.from_pretrained(out)  # the final policy loads as it is
        ValueModel.from_pretrained(out / "value")
    a = steps(runs["a"])
    assert a[2]["kl_coef"] != a[1]["kl_coef"]  # adaptive β moved
    samples = [json.loads(ln) for ln in (runs["a"] / "rollouts.jsonl").read_text().splitlines()]
    assert [r["step"] for r in samples] == [1] * 8 + [2] * 8
    assert all(isinstance(r["score"], float) and r["prompt"] for r in samples)
    assert "metrics on http://127.0.0.1:" in runs["logs"]["a"]
    assert list((runs["a"] / "tensorboard").glob("events.out.tfevents.*"))
    # A's chunks went round-robin to both replicas
    assert samples_scored(servers[0]) > 0 and samples_scored(servers[1]) > 0


def test_stopped_and_resumed_run_matches_the_straight_run(runs, tmp_path, monkeypatch):
    straight = runs["a"]
    args = list(runs["a_args"])
    out = tmp_path / "resumed"
    args[args.index("--out") + 1] = str(out)

    real, calls = ppo_loop.ppo_update, []

    def preempted(*a, **kw):  # killed between step 1 (checkpointed) and step 2's update
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(ppo_loop, "ppo_update", preempted)
    assert cli.main(args) == 130
    monkeypatch.undo()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-1"]
    assert cli.main(args) == 2  # checkpoints there and no --resume: refuses to clobber them

    assert cli.main(args + ["--resume"]) == 0  # fresh models, optimizers, RNG from disk
    starts = [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()
              if '"event"' in ln]
    assert [r["step"] for r in starts] == [0, 1]  # the second run started after step 1
    a, b = steps(straight), steps(out)
    assert sorted(b) == [1, 2]
    # the same samples down to the text, scored the same (to fp32: the RM batches differently)
    ra, rb = ([json.loads(ln) for ln in read(p / "rollouts.jsonl").splitlines()]
              for p in (straight, out))
    assert [(r["prompt"], r["response"]) for r in rb] == [(r["prompt"], r["response"]) for r in ra]
    assert [r["score"] for r in rb] == pytest.approx([r["score"] for r in ra], abs=1e-5)
    for step in (1, 2):
        for key in DETERMINISTIC:
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-6), (step, key)


def test_sequential_pipeline_gives_the_overlapped_runs_results(runs, tmp_path):
    """--no-rm-overlap (bench/ppo.py's baseline) waits for each chunk's scores before the
    reference forward and the next chunk: only the timing may differ from the straight run."""
    args = list(runs["a_args"])
    out = tmp_path / "sequential"
    args[args.index("--out") + 1] = str(out)
    assert cli.main(args + ["--no-rm-overlap", "--no-tensorboard"]) == 0
    a, b = steps(runs["a"]), steps(out)
    assert sorted(b) == [1, 2]
    ra, rb = ([json.loads(ln) for ln in read(p / "rollouts.jsonl").splitlines()]
              for p in (runs["a"], out))
    assert [(r["prompt"], r["response"]) for r in rb] == [(r["prompt"], r["response"]) for r in ra]
    for step in (1, 2):
        assert b[step]["failed_samples"] == 0
        for key in DETERMINISTIC:
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-6), (step, key)


@pytest.mark.parametrize("name", ["ddp", "lora"])
def test_torchrun_two_ranks_sharded(runs, name):
    out = runs[name]
    lines = (out / "train_log.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["world_size"] == 2 and len(lines) == 3  # rank 0 writes alone
    for r in steps(out).values():  # 4 rollouts per rank, all scored
        assert r["rollouts"] == r["scored"] == 8 and r["failed_samples"] == 0
    # the final output is plain (gathered from the shards, a LoRA adapter merged in)
    assert not (out / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(out)
    ValueModel.from_pretrained(out / "value")
    shards = sorted(p.name for p in (out / "checkpoints" / "step-2" / "dcp").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]


def test_rm_killed_and_restarted_mid_run_loses_no_sample(world, servers, tmp_path):
    server = servers[1]  # the last test of the module: it takes a replica down and back up
    out, log_path = tmp_path / "restart", tmp_path / "restart.log"
    # A retry budget of minutes: after an outage gRPC's own reconnect backoff (1 s growing
    # to 120 s) can keep a channel failing for a while after the server is back.
    args = ppo_args(world["policy"], server.address, world["prompts"], out,
                    "--max-steps", "4", "--num-ppo-epochs", "1", "--rm-max-attempts", "2000",
                    "--rm-backoff-max", "0.5")
    proc = trainer(args, log_path)
    try:
        deadline = time.monotonic() + 240
        while '"step": 1,' not in read(out / "train_log.jsonl"):
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        server.stop(signal.SIGKILL)  # the RM dies mid-run, without a goodbye
        time.sleep(1.0)
        servers[1] = start_server(world["rm"], "--port", str(server.port), "--max-wait-ms", "2")
        text = finish(proc, log_path)
    finally:
        if proc.poll() is None:
            proc.kill()
    recs = steps(out)
    assert sorted(recs) == [1, 2, 3, 4]
    for r in recs.values():  # every rollout scored once: none lost, none zero-filled
        assert r["rollouts"] == r["scored"] == 8 and r["failed_samples"] == 0, r
    assert recs[4]["rm_retries"] > 0, text
    assert samples_scored(servers[1]) >= 8  # the later steps were scored by the new server
