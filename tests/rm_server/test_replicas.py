"""Several replicas, several trainers (issue 8): balanced load, and a replica stopped mid-run
leaves the trainers finishing on the other with nothing lost."""

from __future__ import annotations

import json
import time
import urllib.request

from rm_client import RewardClient, text_sample
from rm_server.launch import start_server, wait_serving
from tests import tiny
from tests.policy_trainer.test_ppo_e2e import finish, ppo_args, steps, trainer


def scored(server) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics",
                                  timeout=5).read().decode()
    return sum(float(ln.split()[-1]) for ln in text.splitlines()
               if ln.startswith("rm_samples_total"))


def test_two_replicas_two_trainers_one_replica_stopped(tmp_path, tokenizer):
    rm = tiny.make_reward_model("llama", tokenizer, tmp_path / "rm", seed=3)
    policy = tiny.make_causal_lm("llama", tokenizer, tmp_path / "policy", seed=1)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in tiny.corpus(32, seed=9)))
    replicas = [start_server(rm, "--max-wait-ms", "2", wait=False) for _ in range(2)]
    try:
        for s in replicas:
            wait_serving(s.address, 120, s.proc)
        both = ",".join(s.address for s in replicas)
        # Fair share: plain client calls spread over both replicas.
        with RewardClient(both) as client:
            for i in range(40):
                client.score([text_sample(f"{i}-{j}", "the movie", " was fun") for j in range(4)])
        shares = [scored(s) for s in replicas]
        assert min(shares) >= 0.3 * sum(shares), shares
        # Two trainers on both replicas; replica 1 drains and stops after A's first step.
        runs = {}
        for name in ("a", "b"):
            args = ppo_args(policy, both, prompts, tmp_path / name, "--max-steps", "4",
                            "--rm-client-id", name, "--no-tensorboard", "--seed", str(len(runs)))
            runs[name] = trainer(args, tmp_path / f"{name}.log")
        log_a = tmp_path / "a" / "train_log.jsonl"
        end = time.monotonic() + 240
        while time.monotonic() < end and not (log_a.exists() and '"step": 1' in log_a.read_text()):
            time.sleep(0.2)
        assert replicas[1].stop() == 0  # graceful: in-flight calls finish, new ones go elsewhere
        for name, proc in runs.items():
            finish(proc, tmp_path / f"{name}.log")
            recs = steps(tmp_path / name)
            assert sorted(recs) == [1, 2, 3, 4]
            for r in recs.values():
                assert r["rollouts"] == r["scored"] == 8 and r["failed_samples"] == 0
    finally:
        for s in replicas:
            s.stop()
