"""TRL's own GRPOTrainer trains against served reward models: examples/grpo_reward.py, as
shipped, on a CPU, two steps, two RMs (two `rm-server serve` processes) logged as two series.

The policy and the first RM share a tokenizer: TRL's completion_ids go to it as token ids. The
second RM has a tokenizer of its own: it gets text.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rm_server.launch import start_server
from tests import tiny

pytest.importorskip("trl", reason="pip install trl (the dev extra has it)")

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("grpo")
    policy = tiny.make_causal_lm("llama", tokenizer, root / "policy")
    same = tiny.make_reward_model("llama", tokenizer, root / "rm_same", seed=1)
    own = tiny.make_reward_model("gpt2", tiny.train_tokenizer(vocab_size=280), root / "rm_own",
                                 seed=2)
    servers = [start_server(same), start_server(own)]
    yield {"root": root, "policy": policy, "servers": servers}
    for s in servers:
        assert s.stop() == 0


@pytest.mark.slow
def test_the_example_trains_two_grpo_steps_against_two_served_rms(world):
    same, own = world["servers"]
    cmd = [sys.executable, "examples/grpo_reward.py", "--rm", f"helpful={same.address}",
           "--rm", f"other={own.address}", "--policy", str(world["policy"]),
           "--out", str(world["root"] / "grpo-out"), "--steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    assert "helpful: token ids sent" in lines and "other: text sent" in lines, proc.stdout
    steps = [ln.split(": ", 1) for ln in lines if ln.startswith("grpo step ")]
    assert [s for s, _ in steps] == ["grpo step 1", "grpo step 2"], proc.stdout
    rows = [json.loads(row) for _, row in steps]
    for row in rows:  # one series per RM, named as given
        assert {"rewards/helpful/mean", "rewards/other/mean"} <= row.keys()
        assert all(math.isfinite(v) for v in row.values())
    assert rows[0]["rewards/helpful/mean"] != rows[0]["rewards/other/mean"]
