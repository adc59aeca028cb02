"""``policy-trainer refresh``: fresh judgments → a candidate reward model → promoted into the live
server only if it is at least as good on the policy's own samples (the live loop, issue 20).

    policy-trainer refresh --feedback-url http://127.0.0.1:50055 --current ./rm \
        --replay prefs.jsonl --rm-admin 127.0.0.1:50051 --admin-token-file admin.token \
        --out ./refresh

1. export: every judgment of the feedback service (``GET /v1/judgments``) as preference JSONL
   (feedback/export.py's records: ties and skips left out);
2. split by pair: ``--heldout-fraction`` of the pairs (a hash of the pair id, so a pair labeled
   twice stays on one side) are held out; the held-out judgments newer than ``--eval-after``
   (default: all) are the evaluation set: the policy's current distribution;
3. train: continue training ``--current`` on the other judgments plus a replay of
   ``--replay-ratio`` × as many lines of the original preferences (``--replay``, seeded), so
   the RM learns the policy's new region without forgetting the old (``policy-trainer rm
   --base CURRENT``, a subprocess);
4. evaluate candidate and current on the evaluation set (``policy-trainer rm-eval``);
5. decide (:func:`decide`): promote when the candidate's accuracy is at least the current's, or
   with ``--force``; a promotion loads the candidate into the server at ``--rm-admin`` as its
   new default version through the admin API (``LoadVersion``; the server must run with
   ``--admin-token-file`` and be able to read ``--out``);
6. log: one JSON line per decision in OUT/refresh_log.jsonl (counts, both accuracies and
   losses, the decision and why, the version loaded), also printed.

Each refresh writes OUT/refresh-N/ (train.jsonl, heldout.jsonl, candidate/, eval-current/,
eval-candidate/). Exit 0 whatever the decision; 1 when the server refuses the load; 2 for the
user's errors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import subprocess
import sys
import time
from pathlib import Path

from feedback.client import FeedbackClient
from feedback.errors import FeedbackError
from feedback.export import ExportReport, preferences
from policy_trainer.errors import UserError
from policy_trainer.refresh_config import RefreshConfig

log = logging.getLogger("policy_trainer.refresh")
__all__ = ["RefreshConfig", "decide", "refresh", "refresh_once", "split_heldout"]


# ---------------------------------------------------------------- pure parts

def heldout(pair_id: str, fraction: float, seed: int) -> bool:
    """Whether ``pair_id`` is on the held-out side: a hash of (seed, id), stable over calls."""
    h = hashlib.sha256(f"{seed}:{pair_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2 ** 64 < fraction


def split_heldout(records: list[dict], fraction: float, seed: int,
                  eval_after: int = 0) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records): by pair, the evaluation side only judgments with
    ``seq`` > ``eval_after`` (held-out older ones are used by neither)."""
    train, evaluation = [], []
    for r in records:
        if not heldout(r["pair_id"], fraction, seed):
            train.append(r)
        elif r.get("seq", 0) > eval_after:
            evaluation.append(r)
    return train, evaluation


def replay_sample(lines: list[str], n: int, seed: int) -> list[str]:
    """``n`` of ``lines`` without replacement (all of them when n >= len), seeded."""
    if n >= len(lines):
        return list(lines)
    return random.Random(seed).sample(lines, n)


def decide(current: dict | None, candidate: dict | None, force: bool) -> tuple[bool, str]:
    """(promote?, why) from the two evaluations ({"accuracy", "loss", "pairs"}, or None when
    there was nothing to evaluate on)."""
    if force:
        return True, "forced"
    if current is None or candidate is None:
        return False, "no held-out judgments to evaluate on"
    if candidate["accuracy"] >= current["accuracy"]:
        return True, (f"candidate accuracy {candidate['accuracy']:.3f} >= current "
                      f"{current['accuracy']:.3f} on {candidate['pairs']} held-out judgments")
    return False, (f"candidate accuracy {candidate['accuracy']:.3f} < current "
                   f"{current['accuracy']:.3f} on {candidate['pairs']} held-out judgments")


# ---------------------------------------------------------------- the command

def refresh(cfg: RefreshConfig) -> int:
    """The command: one refresh, its decision printed and logged."""
    decision = refresh_once(cfg)
    return 1 if decision.get("load_error") else 0


def fetch_records(client: FeedbackClient, report: ExportReport) -> list[dict]:
    """Every judgment as a preference record, in sequence order (paged)."""
    rows, after = [], 0
    while True:
        page, last = client.judgments(after=after, limit=1000)
        rows += page
        if not page or last == after:
            break
        after = last
    return list(preferences(rows, report))


def refresh_once(cfg: RefreshConfig, index: int | None = None) -> dict:
    """Steps 1-6; the decision record (also appended to OUT/refresh_log.jsonl). ``current``
    in it is the RM checkpoint to refresh from next time (the candidate when promoted)."""
    cfg.validate()
    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    index = index if index is not None else sum(1 for _ in out.glob("refresh-*"))
    work = out / f"refresh-{index}"
    work.mkdir(parents=True, exist_ok=True)
    client = FeedbackClient(cfg.feedback_url, token_file=cfg.feedback_token_file,
                            timeout=cfg.feedback_timeout)
    report = ExportReport()
    record = {"event": "refresh", "refresh": index, "time": time.time(),
              "rm_before": str(cfg.current), "current": str(cfg.current),
              "step": cfg.policy_step}
    try:
        records = fetch_records(client, report)  # 1.
    except FeedbackError as e:
        return finish(out, {**record, "promote": False, "reason": f"feedback service: {e}"}, t0)
    train, evaluation = split_heldout(records, cfg.heldout_fraction, cfg.seed, cfg.eval_after)
    record.update(judgments=len(records), ties_skips=report.left_out, last_seq=report.last_seq,
                  train_judgments=len(train), eval_judgments=len(evaluation))
    if len(train) < cfg.min_judgments and not cfg.force:
        return finish(out, {**record, "promote": False,
                            "reason": f"{len(train)} training judgments < --min-judgments "
                                      f"{cfg.min_judgments}"}, t0)
    replay = read_lines(cfg.replay) if cfg.replay else []  # 2-3.
    replayed = replay_sample(replay, round(cfg.replay_ratio * len(train)), cfg.seed + index)
    write_jsonl(work / "train.jsonl", [json.dumps(r) for r in train] + replayed)
    write_jsonl(work / "heldout.jsonl", [json.dumps(r) for r in evaluation])
    record["replayed"] = len(replayed)
    candidate = work / "candidate"
    train_candidate(cfg, work / "train.jsonl", work / "heldout.jsonl" if evaluation else None,
                    candidate)
    current_eval = candidate_eval = None
    if evaluation:  # 4.
        current_eval = evaluate(cfg, Path(cfg.current), work / "heldout.jsonl",
                                work / "eval-current")
        candidate_eval = evaluate(cfg, candidate, work / "heldout.jsonl", work / "eval-candidate")
    promote, why = decide(current_eval, candidate_eval, cfg.force)  # 5.
    record.update(current_eval=current_eval, candidate_eval=candidate_eval, promote=promote,
                  reason=why, candidate=str(candidate))
    if promote:
        try:
            record["loaded"] = load_version(cfg, candidate, f"{cfg.label_prefix}{index}")
            record["current"] = str(candidate)
        except Exception as e:  # noqa: BLE001 (grpc.RpcError and friends: logged, exit 1)
            record.update(promote=False, load_error=f"{type(e).__name__}: {e}")
    return finish(out, record, t0)


def finish(out: Path, record: dict, t0: float) -> dict:
    record["seconds"] = time.perf_counter() - t0
    with (out / "refresh_log.jsonl").open("a") as f:  # 6.
        f.write(json.dumps(record) + "\n")
    verdict = "PROMOTED" if record.get("promote") else "kept the current RM"
    print(f"refresh {record['refresh']}: {verdict}: {record.get('reason', '')}"
          + (f"; load failed: {record['load_error']}" if record.get("load_error") else ""),
          flush=True)
    return record


def read_lines(path: str) -> list[str]:
    try:
        return [x for x in Path(path).read_text().splitlines() if x.strip()]
    except OSError as e:
        raise UserError(f"--replay {path}: {e.strerror}") from None


def write_jsonl(path: Path, lines: list[str]) -> None:
    path.write_text("".join(x + "\n" for x in lines))


def members_of(model_dir: Path) -> int:
    """An ensemble checkpoint's members (config.json reward_ensemble), else 1."""
    config = json.loads((model_dir / "config.json").read_text())
    return int((config.get("reward_ensemble") or {}).get("members", 1))


def run_command(args: list[str], log_path: Path) -> None:
    cmd = [sys.executable, "-m", "policy_trainer.cli", *args]
    with log_path.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = log_path.read_text()[-2000:]
        raise UserError(f"{' '.join(args[:1])} failed (exit {rc}); {log_path}:\n{tail}")


def train_candidate(cfg: RefreshConfig, data: Path, eval_data: Path | None, out: Path) -> None:
    members = members_of(Path(cfg.current))
    args = ["rm", "--data", str(data), "--base", str(cfg.current), "--out", str(out),
            "--lr", str(cfg.refresh_lr), "--epochs", str(cfg.refresh_epochs),
            "--batch-size", str(cfg.refresh_batch_size), "--seed", str(cfg.seed),
            "--save-every", "1000000", "--warmup-ratio", "0.1", "--no-progress",
            "--log-every", "0", "--device", cfg.refresh_device]
    args += ["--eval-data", str(eval_data)] if eval_data else ["--eval-fraction", "0.0"]
    args += ["--ensemble", str(members)] if members > 1 else []
    args += ["--threads", str(cfg.refresh_threads)] if cfg.refresh_threads else []
    run_command(args, out.parent / f"{out.name}.log")


def evaluate(cfg: RefreshConfig, model: Path, data: Path, out: Path) -> dict:
    args = ["rm-eval", "--model", str(model), "--data", str(data), "--out", str(out),
            "--no-progress", "--device", cfg.refresh_device]
    args += ["--threads", str(cfg.refresh_threads)] if cfg.refresh_threads else []
    run_command(args, out.parent / f"{out.name}.log")
    metrics = json.loads((out / "eval.json").read_text())
    return {k: metrics[k] for k in ("pairs", "accuracy", "loss")}


def load_version(cfg: RefreshConfig, candidate: Path, label: str) -> dict:
    """LoadVersion as the new default; the server's answer (its versions) as a dict."""
    from google.protobuf import json_format

    from rm_client.admin import AdminClient

    token = Path(cfg.admin_token_file).read_text().strip()
    admin = AdminClient(cfg.rm_admin, token)
    try:
        answer = admin.load(str(candidate.resolve()), label=label, make_default=True)
    finally:
        admin.close()
    return json_format.MessageToDict(answer)

