"""`policy-trainer ppo` and RM versions (issue 19): every logged rollout names the RM version
that scored it and every step counts its rewards per version; a swap of the server's default
mid-run is an ``rm_version_change`` event in the step log (and a metric); ``--rm-version`` pins
the whole run to one version whatever the default; a pin the server does not hold is one line,
exit 1. Real `rm-server` subprocesses, the real CLI in-process, tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from prometheus_client import CollectorRegistry

from policy_trainer import cli, ppo_loop
from policy_trainer.scoring import RMVersionLog
from rm_client import ScoreResult
from rm_client.admin import AdminClient
from rm_server.checkpoint import weights_version
from rm_server.launch import start_server
from tests import tiny
from tests.policy_trainer.test_ppo_e2e import ppo_args

ADMIN = "admin-secret"


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("ppo_versions")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in tiny.corpus(16, seed=5)))
    (root / "admin.token").write_text(ADMIN)
    rms = [tiny.make_reward_model("llama", tokenizer, root / f"rm{i}", seed=30 + i)
           for i in (1, 2)]
    return {"root": root, "prompts": prompts, "rms": rms,
            "hashes": [weights_version(d) for d in rms],
            "policy": tiny.make_causal_lm("llama", tokenizer, root / "policy", seed=1)}


@pytest.fixture
def server(world):
    """v1 the default; the tests load v2."""
    s = start_server(world["rms"][0], "--admin-token-file", str(world["root"] / "admin.token"),
                     "--version-label", "v1", "--max-wait-ms", "2")
    yield s
    assert s.stop() == 0, s.log()


def records(out):
    lines = [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]
    rollouts = [json.loads(ln) for ln in (out / "rollouts.jsonl").read_text().splitlines()]
    return lines, rollouts


def swap_before_step(monkeypatch, step: int, action) -> None:
    """Run ``action`` (an admin call) just before PPO step ``step`` generates."""
    real = ppo_loop.generate_and_score

    def wrapped(s, *args, **kwargs):
        if s == step:
            action()
        return real(s, *args, **kwargs)

    monkeypatch.setattr(ppo_loop, "generate_and_score", wrapped)


def test_a_swap_mid_run_is_logged_and_every_reward_names_its_version(world, server, tmp_path,
                                                                     monkeypatch):
    v1, v2 = world["hashes"]
    with AdminClient(server.address, ADMIN) as admin:
        swap_before_step(monkeypatch, 1, lambda: admin.load(str(world["rms"][1]), "v2"))
        out = tmp_path / "run"
        args = ppo_args(world["policy"], server.address, world["prompts"], out,
                        "--max-steps", "3", "--log-rollouts", "8", "--no-tensorboard")
        assert cli.main(args) == 0
    lines, rollouts = records(out)
    steps = {r["step"]: r for r in lines if "event" not in r}
    assert steps[1]["rm_versions"] == {v1: 8}
    assert steps[2]["rm_versions"] == steps[3]["rm_versions"] == {v2: 8}
    events = [r for r in lines if r.get("event") == "rm_version_change"]
    assert events == [{"event": "rm_version_change", "step": 2, "from": v1, "to": v2,
                       "label": "v2", "versions": {v2: 8}}]
    assert len(rollouts) == 24  # every reward of the run, each with its version
    assert [r["rm_version"] for r in rollouts] == [v1] * 8 + [v2] * 16


def test_rm_version_pins_the_whole_run(world, server, tmp_path, monkeypatch):
    v1, v2 = world["hashes"]
    with AdminClient(server.address, ADMIN) as admin:
        admin.load(str(world["rms"][1]), "v2")  # v2 the default from the start
        swap_before_step(monkeypatch, 1, lambda: admin.set_default("v1"))  # and a rollback
        out = tmp_path / "pinned"
        args = ppo_args(world["policy"], server.address, world["prompts"], out,
                        "--rm-version", "v2", "--log-rollouts", "8", "--no-tensorboard")
        assert cli.main(args) == 0
    lines, rollouts = records(out)
    assert {r["rm_version"] for r in rollouts} == {v2} and len(rollouts) == 16
    assert not [r for r in lines if r.get("event") == "rm_version_change"]
    assert lines[0]["event"] == "start" and lines[0]["rm_version"] == "v2"


def test_a_pin_the_server_does_not_hold_is_one_line(world, server, tmp_path, capsys):
    args = ppo_args(world["policy"], server.address, world["prompts"], tmp_path / "nope",
                    "--rm-version", "v9", "--no-tensorboard")
    assert cli.main(args) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(err) == 1 and err[0].startswith("policy-trainer ppo: error: --rm-version v9: ")
    assert f"resident: {world['hashes'][0]} (v1, default)" in err[0]


def test_version_log_events_and_metrics():
    registry = CollectorRegistry()
    log = RMVersionLog(registry)

    def results(*versions):
        return [ScoreResult(str(i), 0.0, 1, False, (), v, v.upper()) for i, v in
                enumerate(versions)]

    assert log.observe(1, results("a", "a")) == [] and log.counts == {"a": 2}
    assert log.observe(2, results("a")) == []
    [event] = log.observe(3, results("a", "b", "b"))  # a swap mid-step: the new one counts
    assert event == {"event": "rm_version_change", "step": 3, "from": "a", "to": "b",
                     "label": "B", "versions": {"a": 1, "b": 2}}
    assert log.observe(4, results("b")) == []
    assert registry.get_sample_value("ppo_rm_version_changes_total") == 1
    assert registry.get_sample_value("ppo_rm_version_info", {"version": "b", "label": "B"}) == 1
    assert registry.get_sample_value("ppo_rm_version_info", {"version": "a", "label": "A"}) is None
