"""The live loop (issue 20) with real servers on 127.0.0.1 and tiny models:

- ``policy-trainer ppo --feedback-url``: pairs of the run's own responses reach the feedback
  service with both rewards, the RM version and the policy step; a service that accepts
  connections and never answers holds no step up, and the lost pairs are counted and logged;
- ``policy-trainer refresh``: a candidate that is better on held-out fresh judgments is loaded
  into the reward server as its new default version; a worse one is not; every decision logged;
- ``policy-trainer loop``: PPO with a refresh between its steps, end to end, the labels given
  through the labeling API while it runs.
"""

from __future__ import annotations

import json
import logging
import socket
import threading

import pytest
import torch

from feedback.client import FeedbackClient
from policy_trainer import cli
from policy_trainer.refresh import heldout
from rm_client import RewardClient, text_sample
from rm_server.launch import start_server
from tests import tiny
from tests.feedback.servers import ThreadServer
from tests.policy_trainer.test_ppo_e2e import TORCHRUN, finish, ppo_args, trainer

ADMIN = "admin-secret"
GOOD, BAD = " the film was good and fun", " bad bad bad bad bad bad"


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("live_loop")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in tiny.corpus(16, seed=5)))
    (root / "admin.token").write_text(ADMIN)
    return {"root": root, "prompts": prompts,
            "rm": tiny.make_reward_model("llama", tokenizer, root / "rm", seed=31),
            "policy": tiny.make_causal_lm("llama", tokenizer, root / "policy", seed=1)}


@pytest.fixture
def rm_server(world):
    s = start_server(world["rm"], "--admin-token-file", str(world["root"] / "admin.token"),
                     "--version-label", "v0", "--max-wait-ms", "2")
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture
def feedback(tmp_path):
    s = ThreadServer(str(tmp_path / "feedback.db"), seed=0)
    yield s
    s.stop()


def log_lines(out) -> list[dict]:
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


def label_all(url: str, prefer) -> int:
    """Answer every queued pair: the side ``prefer(text) -> bool`` likes (else right)."""
    client, n = FeedbackClient(url), 0
    while leases := client.lease("tester", count=50):
        for lease in leases:
            client.submit(lease.lease_id, "left" if prefer(lease.left) else "right")
            n += 1
    return n


def test_ppo_sends_the_least_sure_pairs_with_rewards_version_and_step(world, rm_server, feedback,
                                                                      tmp_path):
    out = tmp_path / "run"
    args = ppo_args(world["policy"], rm_server.address, world["prompts"], out,
                    "--feedback-url", feedback.url, "--feedback-fraction", "0.5",
                    "--feedback-budget", "2")
    assert cli.main(args) == 0
    steps = [r for r in log_lines(out) if "score" in r]
    assert [r["feedback_candidates"] for r in steps] == [4, 4]  # half of 8 prompts, twice
    assert steps[-1]["feedback_offered"] == 4  # the budget: 2 a step
    assert label_all(feedback.url, lambda text: True) == 4
    rows, _ = FeedbackClient(feedback.url).judgments()
    pairs = [p for _, p in rows]
    assert sorted(p.policy_step for p in pairs) == [1, 1, 2, 2]  # as the step log numbers them
    version = RewardClient(rm_server.address).model_info().version
    for p in pairs:
        assert p.rm_version == version and p.source == "ppo-run"
        assert p.reward_a is not None and p.reward_b is not None
        assert p.priority == pytest.approx(-abs(p.reward_a - p.reward_b))
        assert p.response_a != p.response_b


def test_under_torchrun_every_rank_samples_and_rank_0_sends_the_least_sure(world, rm_server,
                                                                         feedback, tmp_path):
    # The sharded policy's generation is a collective: a second response sampled on rank 0
    # alone hung the run. Every rank samples for its own 4 rollouts (2 candidates each).
    out = tmp_path / "run"
    args = ppo_args(world["policy"], rm_server.address, world["prompts"], out,
                    "--feedback-url", feedback.url, "--feedback-fraction", "0.5",
                    "--feedback-budget", "3", "--no-tensorboard")
    finish(trainer(args, tmp_path / "log", TORCHRUN), tmp_path / "log", timeout=240)
    steps = [r for r in log_lines(out) if "score" in r]
    assert [r["feedback_candidates"] for r in steps] == [4, 4]  # both ranks' candidates
    assert steps[-1]["feedback_offered"] == 6
    assert label_all(feedback.url, lambda text: True) == 6
    pairs = [p for _, p in FeedbackClient(feedback.url).judgments()[0]]
    assert sorted(p.policy_step for p in pairs) == [1, 1, 1, 2, 2, 2]
    for p in pairs:
        assert p.priority == pytest.approx(-abs(p.reward_a - p.reward_b))
    assert all(p.response_a != p.response_b for p in pairs)


def test_a_hung_feedback_service_never_holds_a_step_up(world, rm_server, tmp_path, caplog):
    """The service accepts connections (the listen backlog) and never answers, with a call
    timeout far beyond the test's: every step still completes; the socket closes only once the
    last step is logged, and the pairs it swallowed are counted as failed and logged once."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)
    url = f"http://127.0.0.1:{hung.getsockname()[1]}"
    out = tmp_path / "run"
    args = ppo_args(world["policy"], rm_server.address, world["prompts"], out,
                    "--feedback-url", url, "--feedback-fraction", "0.5", "--feedback-budget",
                    "2", "--feedback-timeout", "3600", "--max-steps", "3")

    def release_after_the_last_step() -> None:
        log = out / "train_log.jsonl"
        while not (log.exists() and log.read_text().count('"score"') == 3):
            threading.Event().wait(0.1)
        hung.close()  # resets the connections waiting in the backlog

    watcher = threading.Thread(target=release_after_the_last_step, daemon=True)
    watcher.start()
    with caplog.at_level(logging.INFO):
        assert cli.main(args) == 0
    watcher.join(10)
    steps = [r for r in log_lines(out) if "score" in r]
    assert len(steps) == 3
    assert [r["feedback_offered"] for r in steps] == [2, 4, 6]  # offered, never waited on
    assert all(r["feedback_sent"] == 0 for r in steps)
    assert "feedback service: 2 pairs lost" in caplog.text  # the streak's first failure, once
    assert caplog.text.count("pairs lost") == 1
    [final] = [r.getMessage() for r in caplog.records if "pairs offered" in r.getMessage()]
    failed = int(final.split("failed ")[1].split(",")[0])
    dropped = int(final.split("dropped ")[1])
    assert "sent 0" in final and failed >= 2 and failed + dropped == 6, final


def preferred_by(address: str, prompt: str) -> str:
    """GOOD or BAD: the one the served RM scores higher for ``prompt``."""
    results = RewardClient(address).score([text_sample("g", prompt, GOOD),
                                           text_sample("b", prompt, BAD)])
    return GOOD if results[0].reward > results[1].reward else BAD


def enqueue_and_label(url: str, prompts: list[str], train_winner: str, eval_winner: str) -> None:
    """One pair (GOOD vs BAD) per prompt; the held-out side's pairs judged for ``eval_winner``,
    the others for ``train_winner``."""
    ids = [f"pair-{i}" for i in range(len(prompts))]
    FeedbackClient(url).enqueue([{"id": i, "prompt": p, "response_a": GOOD, "response_b": BAD}
                                 for i, p in zip(ids, prompts)])
    held = {i for i in ids if heldout(i, 0.25, 0)}
    client = FeedbackClient(url)
    while leases := client.lease("tester", count=50):
        for lease in leases:
            winner = eval_winner if lease.pair_id in held else train_winner
            client.submit(lease.lease_id, "left" if lease.left == winner else "right")


def refresh_args(world, feedback_url, rm_address, out, *extra) -> list[str]:
    return ["refresh", "--feedback-url", feedback_url, "--current", str(world["rm"]),
            "--out", str(out), "--rm-admin", rm_address,
            "--admin-token-file", str(world["root"] / "admin.token"),
            "--refresh-lr", "3e-3", "--refresh-epochs", "4", "--refresh-batch-size", "4",
            "--refresh-threads", "1", "--refresh-device", "cpu", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["better", "worse"])
def test_refresh_promotes_a_better_candidate_and_keeps_the_current_over_a_worse(
        world, rm_server, feedback, tmp_path, case):
    prompts = tiny.corpus(40, seed=9)
    liked = preferred_by(rm_server.address, prompts[0])
    other = BAD if liked == GOOD else GOOD
    # better: every judgment wants what the current RM does not like (it is wrong on held-out);
    # worse: training judgments teach the opposite of the held-out ones (the current RM's)
    enqueue_and_label(feedback.url, prompts, other, other if case == "better" else liked)
    out = tmp_path / "refresh"
    assert cli.main(refresh_args(world, feedback.url, rm_server.address, out)) == 0
    [decision] = [json.loads(x) for x in (out / "refresh_log.jsonl").read_text().splitlines()]
    assert decision["judgments"] == 40 and decision["eval_judgments"] > 0
    cur, cand = decision["current_eval"]["accuracy"], decision["candidate_eval"]["accuracy"]
    info = RewardClient(rm_server.address).model_info()
    labels = {v.label for v in info.resident_versions}
    if case == "better":
        assert decision["promote"] and cand >= cur and cur < 0.5
        assert decision["current"] == decision["candidate"]
        default = [v for v in info.resident_versions if v.version == info.default_version]
        assert default[0].label == "refresh-0" and labels == {"v0", "refresh-0"}
        assert preferred_by(rm_server.address, prompts[0]) == other  # the swap is live
    else:
        assert not decision["promote"] and cand < cur and "< current" in decision["reason"]
        assert decision["current"] == str(world["rm"])
        assert labels == {"v0"}
    for name in ("train.jsonl", "heldout.jsonl", "candidate/config.json"):
        assert (out / "refresh-0" / name).exists()


def test_refresh_with_too_few_judgments_trains_nothing(world, rm_server, feedback, tmp_path):
    out = tmp_path / "refresh"
    assert cli.main(refresh_args(world, feedback.url, rm_server.address, out)) == 0
    [decision] = [json.loads(x) for x in (out / "refresh_log.jsonl").read_text().splitlines()]
    assert not decision["promote"] and "--min-judgments" in decision["reason"]
    assert not (out / "refresh-0" / "candidate").exists()


class Labeler:
    """Labels whatever is queued, on a thread, until stopped (the labeling API)."""

    def __init__(self, url: str):
        self.client, self.n = FeedbackClient(url), 0
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop_event.is_set():
            leases = self.client.lease("sim", count=10)
            for lease in leases:
                self.client.submit(lease.lease_id, "left" if len(lease.left) < len(lease.right)
                                   else "right")
                self.n += 1
            if not leases:
                self.stop_event.wait(0.1)

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(10)


@pytest.mark.slow
def test_the_loop_refreshes_between_steps_and_ppo_scores_with_the_new_version(
        world, rm_server, feedback, tmp_path):
    out = tmp_path / "loop"
    args = ppo_args(world["policy"], rm_server.address, world["prompts"], out,
                    "--feedback-url", feedback.url, "--feedback-fraction", "1.0",
                    "--feedback-budget", "8", "--max-steps", "3")
    args[0] = "loop"
    args += ["--rm-model", str(world["rm"]), "--refresh-every", "2", "--admin-token-file",
             str(world["root"] / "admin.token"), "--min-judgments", "1", "--force",
             "--refresh-threads", "1", "--refresh-device", "cpu", "--label-wait", "60"]
    labeler = Labeler(feedback.url)
    try:
        assert cli.main(args) == 0
    finally:
        labeler.stop()
    decisions = [json.loads(x) for x in
                 (out / "refresh" / "refresh_log.jsonl").read_text().splitlines()]
    assert len(decisions) == 1 and decisions[0]["step"] == 2  # none after the last step
    assert decisions[0]["promote"] and decisions[0]["judgments"] == 16  # both steps' pairs
    lines = log_lines(out)
    [change] = [r for r in lines if r.get("event") == "rm_version_change"]
    assert change["step"] == 3 and change["label"] == "refresh-0"
    rollouts = [json.loads(x) for x in (out / "rollouts.jsonl").read_text().splitlines()]
    before = {r["rm_version"] for r in rollouts if r["step"] <= 2}
    after = {r["rm_version"] for r in rollouts if r["step"] == 3}
    assert len(before) == len(after) == 1 and before != after
    assert (out / "config.json").exists()  # the final policy
