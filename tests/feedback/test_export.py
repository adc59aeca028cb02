"""``feedback-server export``: judgments -> preference JSONL that the RM trainer reads, with the
pair's metadata in extra keys; ties and skips left out and counted; incremental with --after;
from the store (both backends) or through the API. And the command's one-line errors."""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys

from feedback.pairs import Pair
from feedback.store import open_store
from policy_trainer.prefs import read_preferences
from protos.encoding import TextInput
from tests.feedback.servers import ROOT, ThreadServer

# pair id -> the winner its labeler picks ("a", "b", "tie", "skip")
PICKS = {"win-a": "a", "win-b": "b", "tied": "tie", "skipped": "skip", "win-a2": "a"}


def fill(store_url):
    """One judgment per pair of PICKS, answered in PICKS order."""
    rng, ids = random.Random(0), iter(range(100))
    with open_store(store_url) as store:
        store.enqueue([Pair(k, f"prompt {k}", f"A of {k}", f"B of {k}", reward_a=1.5,
                            reward_b=-0.5, rm_version="rm-v3", policy_step=40 + i,
                            source="run-1") for i, k in enumerate(PICKS)], 100, 0.0, 1.0)
        for lease in store.lease("ann", len(PICKS), 60, 2.0, lambda: rng.choice("ab"),
                                 lambda: f"L{next(ids)}")[0]:
            w = PICKS[lease.pair.id]
            choice = w if w in ("tie", "skip") else ("left" if lease.left == w else "right")
            store.submit(lease.lease_id, choice, 3.0)


def export(*args):
    return subprocess.run([sys.executable, "-m", "feedback", "export", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_export_writes_what_the_rm_trainer_reads(store_url, tmp_path):
    fill(store_url)
    out = tmp_path / "prefs.jsonl"
    done = export("--store", store_url, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "exported 3 preferences (1 ties and 1 skips left out)" in done.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["pair_id"] for x in lines] == ["win-a", "win-b", "win-a2"]
    for x in lines:
        pid = x["pair_id"]
        won, lost = ("A", "B") if PICKS[pid] == "a" else ("B", "A")
        assert (x["prompt"], x["chosen"], x["rejected"]) == (
            f"prompt {pid}", f"{won} of {pid}", f"{lost} of {pid}")
        assert (x["rm_version"], x["source"], x["labeler"]) == ("rm-v3", "run-1", "ann")
        assert (x["reward_chosen"], x["reward_rejected"]) == (
            (1.5, -0.5) if won == "A" else (-0.5, 1.5))
    assert lines[1]["policy_step"] == 41

    pairs, report = read_preferences(out)  # policy-trainer rm's reader takes it as it is
    assert report.summary()["bad_lines"] == 0 and len(pairs) == 3
    assert pairs[1].chosen == TextInput("prompt win-b", "B of win-b")

    newer = tmp_path / "newer.jsonl"
    done = export("--store", store_url, "--out", str(newer), "--after", "3")
    assert done.returncode == 0 and "next time --after 5" in done.stderr
    assert [json.loads(x)["pair_id"] for x in newer.read_text().splitlines()] == ["win-a2"]


def test_export_through_the_api_matches_the_store(tmp_path):
    db = str(tmp_path / "f.db")
    fill(db)
    (tmp_path / "token").write_text("t0ken")
    server = ThreadServer(db, auth_token_file=str(tmp_path / "token"))
    try:
        via_api = export("--server", server.url, "--auth-token-file", str(tmp_path / "token"))
        assert via_api.returncode == 0, via_api.stderr
        direct = export("--store", db)
        assert via_api.stdout == direct.stdout and len(direct.stdout.splitlines()) == 3
        denied = export("--server", server.url)
        assert denied.returncode == 1
        assert denied.stderr.strip().endswith("missing or wrong bearer token")
    finally:
        server.stop()


def test_the_commands_fail_in_one_line(tmp_path):
    both = export("--store", "x.db", "--server", "http://127.0.0.1:1")
    assert both.returncode == 1 and len(both.stderr.strip().splitlines()) == 1
    config = tmp_path / "serve.yaml"
    config.write_text("max_queue: 0\n")
    bad = subprocess.run([sys.executable, "-m", "feedback", "serve", "--config", str(config),
                          "--store", str(tmp_path / "f.db")], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 1 and "--max-queue must be >= 1" in bad.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        busy = subprocess.run([sys.executable, "-m", "feedback", "serve", "--port", port,
                               "--store", str(tmp_path / "f.db")], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
    assert busy.returncode == 1
    assert busy.stderr.strip().splitlines()[-1].endswith(
        f"--port {port}: cannot bind 127.0.0.1:{port} (Address already in use)")
    no_db = subprocess.run([sys.executable, "-m", "feedback", "serve", "--port", "0",
                            "--store", "postgresql://nobody@127.0.0.1:1/none"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert no_db.returncode == 1 and len(no_db.stderr.strip().splitlines()) == 1, no_db.stderr
    assert "PostgreSQL store:" in no_db.stderr
    usage = subprocess.run([sys.executable, "-m", "feedback"], cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
    assert usage.returncode == 2 and "commands: serve, export" in usage.stderr
