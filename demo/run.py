"""``make demo``: the whole RLHF pipeline, for real, on a laptop CPU in minutes.

    python -m demo.run --out out/demo [--seed 0] [--quick] [--no-overopt]

1. build the world: grammar corpus, tokenizer, a tiny base LM, demonstrations, prompts, and
   preferences labeled by a simulated Bradley-Terry human with a hidden gold reward;
2. SFT the base on the demonstrations             (`policy-trainer sft`);
3. train a reward model on the preferences          (`rm-server train`), evaluate it;
4. serve it                                         (`rm-server serve`, a subprocess, gRPC);
5. PPO the SFT policy against the served RM         (`policy-trainer ppo`, over gRPC), KL leash on;
6. optionally PPO again with beta = 0 (no leash): reward over-optimization (Gao et al. 2022);
7. scrape the server's /metrics once, evaluate base / SFT / PPO policies on held-out prompts with
   the gold reward the system never saw, print a table, sample generations, and write PNG plots.

Every stage is the real command a user runs; their output streams through with a stage prefix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import tyro

PY = sys.executable


@dataclass
class DemoConfig:
    out: str = "out/demo"
    """Output folder: world/, sft/, rm/, ppo/, ppo_beta0/, plots and summary.json."""
    seed: int = 0
    """Seed of the world, every training run and the evaluation samples."""
    quick: bool = False
    """A shortened demo for tests (small world, few steps): a couple of minutes."""
    overopt: bool = True
    """Also run PPO with beta = 0 to show reward over-optimization."""
    kl_coef: float = 0.05
    """PPO's KL coefficient beta for the leashed run."""
    ppo_steps: int = 24
    """PPO iterations (rollout batches) of the leashed run."""
    overopt_steps: int = 24
    """PPO iterations of the beta = 0 run."""
    eval_samples: int = 256
    """Held-out samples per policy for the gold evaluation."""
    threads: int = 2
    """torch threads for every stage."""


class Stage:
    """Prints a banner and a wall-clock time per stage."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.times: dict[str, float] = {}

    def run(self, name: str, cmd: list[str], env: dict | None = None) -> None:
        print(f"\n=== [{time.perf_counter() - self.t0:5.0f}s] {name}: {' '.join(cmd[1:6])} ...",
              flush=True)
        t = time.perf_counter()
        rc = subprocess.run(cmd, env={**os.environ, **(env or {})}).returncode
        self.times[name] = time.perf_counter() - t
        if rc != 0:
            raise SystemExit(f"demo: stage {name!r} failed with exit code {rc}")


def start_rm_server(model: Path, out: Path, threads: int):
    from rm_server.launch import start_server
    return start_server(model, "--num-threads", str(max(1, threads // 2)),
                        "--max-batch-size", "64", "--model-name", "demo-rm")


def scrape(metrics_port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
    out = {}
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            if not s.labels:
                out[s.name] = s.value
    return out


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def main(argv=None) -> int:
    cfg = tyro.cli(DemoConfig, args=argv, prog="python -m demo.run",
                   description=__doc__.split("\n")[0])
    return run(cfg)


def run(cfg: DemoConfig) -> int:
    from demo import report

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    world, sft, rm, ppo, ppo0 = (out / n for n in ("world", "sft", "rm", "ppo", "ppo_beta0"))
    st = Stage()
    first_stages(cfg, st, out)
    server = start_rm_server(rm, out, cfg.threads)
    try:
        runs = [("ppo", ppo, cfg.kl_coef, cfg.ppo_steps)]
        if cfg.overopt:
            runs.append(("ppo-beta0", ppo0, 0.0, cfg.overopt_steps))
        for name, path, beta, steps in runs:
            if not (path / "config.json").exists():
                st.run(name, ppo_command(cfg, world, sft, server.address, path, beta, steps))
        metrics = scrape(server.metrics_port)
        summary = report.evaluate_all(cfg, world, sft, rm, ppo, ppo0 if cfg.overopt else None,
                                      server.address)
    finally:
        server.stop()
    summary["server_metrics"] = {k: metrics.get(k) for k in (
        "rm_samples_total", "rm_tokens_total", "rm_batch_size_sum", "rm_batch_size_count",
        "rm_padding_ratio_sum", "rm_padding_ratio_count", "rm_queue_wait_seconds_sum",
        "rm_queue_wait_seconds_count", "rm_inference_duration_seconds_sum")}
    if cfg.overopt:
        summary["overoptimization"] = report.overoptimization(ppo0)
    summary["stage_seconds"] = st.times
    summary["total_seconds"] = time.perf_counter() - st.t0
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    report.print_summary(summary)
    plotted = report.plots(out, read_log(ppo / "train_log.jsonl"),
                           read_log(ppo0 / "train_log.jsonl") if cfg.overopt else [])
    pngs = (", ppo_curves.png" + (", overoptimization.png" if cfg.overopt else "")) * plotted
    print(f"\nartifacts in {out}/ (summary.json{pngs}); total {summary['total_seconds']:.0f}s")
    return 0


def first_stages(cfg: DemoConfig, st: Stage, out: Path, *build_args: str) -> None:
    """1-3: the world, SFT and the reward model into ``out`` (each skipped when its output is
    there: a rerun, or demo.ensemble reusing a demo run's folder)."""
    world, sft, rm = out / "world", out / "sft", out / "rm"
    quick = ["--quick"] if cfg.quick else []
    threads = str(cfg.threads)
    if not (world / "world.json").exists():
        st.run("world", [PY, "-m", "demo.build", "--out", str(world), "--seed", str(cfg.seed),
                         "--threads", threads, *quick, *build_args])
    if not (sft / "config.json").exists():
        st.run("sft", [PY, "-m", "policy_trainer.cli", "sft", "--data", str(world / "demos.jsonl"),
                       "--base", str(world / "base"), "--out", str(sft), "--lr", "1e-3",
                       "--epochs", "1" if cfg.quick else "2", "--micro-batch-size", "32",
                       "--warmup-ratio", "0.05", "--eval-every", "1000000", "--checkpoint-every",
                       "1000000", "--torch-threads", threads, "--seed", str(cfg.seed)])
    if not (rm / "config.json").exists():
        st.run("rm-train", rm_train_command(cfg, world, sft, rm))


def rm_train_command(cfg, world: Path, sft: Path, out: Path, *extra: str) -> list[str]:
    return [PY, "-m", "rm_server.cli", "train", "--data", str(world / "prefs.jsonl"),
            "--base", str(sft), "--out", str(out), "--lr", "1e-3",
            "--epochs", "1" if cfg.quick else "2", "--batch-size", "32", "--eval-fraction", "0.1",
            "--save-every", "1000000", "--threads", str(cfg.threads), "--seed", str(cfg.seed),
            *extra]


def ppo_command(cfg, world, sft, address, out, beta, steps) -> list[str]:
    return [PY, "-m", "policy_trainer.cli", "ppo", "--policy", str(sft), "--rm", address,
            "--prompts", str(world / "prompts.jsonl"), "--out", str(out),
            "--kl-coef", str(beta), "--max-steps", str(steps if not cfg.quick else 2),
            "--batch-size", "64", "--mini-batch-size", "16", "--micro-batch-size", "16",
            "--generation-batch-size", "32", "--max-new-tokens", "32", "--lr", "3e-4",
            "--num-ppo-epochs", "2", "--torch-threads", str(cfg.threads), "--seed", str(cfg.seed),
            "--checkpoint-every", "1000000", "--no-progress", "--rm-client-id", out.name]


if __name__ == "__main__":
    sys.exit(main())
