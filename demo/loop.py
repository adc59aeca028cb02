"""``python -m demo.loop``: does the live loop (issue 20) correct the reward hacking PPO shows
against a frozen reward model?

    python -m demo.loop --out out/loop --seeds 0 1 2 [--leashed] [--quick]

In the demo world (demo/build.py: a hidden gold reward, a simulated Bradley-Terry labeler), for
each seed, with the demo's own stages (demo/run.py; a folder a demo run left is reused):

1. world, SFT and the reward model, as ``make demo`` builds them;
2. **frozen**: PPO from the SFT policy against the RM as trained, β = 0 (``policy-trainer ppo``);
3. **loop**: the same PPO (same seed, steps, settings) as ``policy-trainer loop``: a reward
   server with an admin token, a feedback server (``feedback-server serve``), and the simulated
   labeler answering through the labeling API (lease → submit, on a thread here: it sees the
   prompt and the two responses in the drawn order, nothing else). The trainer sends
   ``--feedback-budget`` pairs per step (of ``--feedback-fraction`` of the prompts sampled
   twice), and every ``--refresh-every`` steps the RM is refreshed on the judgments and
   hot-swapped into the server when it is at least as good on held-out fresh judgments;
4. with ``--leashed`` also both at the demo's β;
5. each final policy judged by the gold reward on held-out prompts; gold and KL over the steps
   (logged rollouts); labels as a fraction of PPO rollouts; the RM's accuracy against the gold
   order on the policy's own samples after each refresh (the segment's same-prompt pairs),
   the RM before the refresh and after; the bar per seed (demo/loop_report.py).

Writes OUT/loop.json (every figure), OUT/loop.png and prints the table.
"""

from __future__ import annotations

import json
import secrets
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import tyro

from demo.run import DemoConfig, Stage, first_stages, ppo_command


@dataclass
class LoopDemoConfig:
    out: str = "out/loop"
    """Output folder: seed-N/ per seed (a demo run's folder: reused where its stages are done),
    loop.json and loop.png."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds: of the world, every training run, the labeler and the evaluation."""
    steps: int = 24
    """PPO steps of every run (the demo's)."""
    refresh_every: int = 4
    """PPO steps between refreshes of the loop."""
    feedback_fraction: float = 0.125
    """Prompts per step sampled twice (candidate pairs)."""
    feedback_budget: int = 3
    """Pairs labeled per step at most: 3 of the demo's 64 rollouts a step is 4.7%."""
    replay_ratio: float = 2.0
    """Original preference lines replayed per fresh judgment in a refresh."""
    refresh_lr: float = 5e-4
    """Learning rate of a refresh's continued RM training."""
    refresh_epochs: int = 4
    """Epochs of a refresh's continued RM training."""
    leashed: bool = False
    """Also both arms at the demo's β."""
    kl_coef: float = 0.05
    """The demo's β (the leashed runs)."""
    eval_samples: int = 256
    """Held-out samples per final policy for the gold evaluation."""
    threads: int = 2
    """torch threads for every stage."""
    quick: bool = False
    """A shortened run for tests: the demo's quick world, 4 PPO steps, a refresh every 2."""
    runs_only: bool = False
    """Run the arms and stop (no evaluation or report): seeds run side by side as separate
    processes, then one run without it reports on them all (it reuses every finished run)."""

    def __post_init__(self):
        if self.quick:  # the shortened run
            self.steps, self.refresh_every, self.eval_samples = 4, 2, 32


def main(argv=None) -> int:
    cfg = tyro.cli(LoopDemoConfig, args=argv, prog="python -m demo.loop",
                   description=__doc__.split("\n")[0])
    return run(cfg)


def run(cfg: LoopDemoConfig) -> int:
    import torch

    from demo import loop_report

    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    st = Stage()
    results = {}
    for seed in cfg.seeds:
        t0 = time.perf_counter()
        results[seed] = one_seed(cfg, seed, out / f"seed-{seed}", st)
        results[seed]["seconds"] = time.perf_counter() - t0
    if cfg.runs_only:
        return 0
    summary = loop_report.summarize(results, arms(cfg))
    summary["config"] = asdict(cfg)
    summary["stage_seconds"] = st.times
    summary["total_seconds"] = time.perf_counter() - st.t0
    (out / "loop.json").write_text(json.dumps(summary, indent=1) + "\n")
    loop_report.print_summary(summary)
    plotted = loop_report.plot(summary, out / "loop.png")
    print(f"\nwrote {out}/loop.json{', loop.png' if plotted else ''}; "
          f"total {summary['total_seconds']:.0f}s")
    return 0


def arms(cfg: LoopDemoConfig) -> list[tuple[str, float, bool]]:
    """(run name, β, loop?)."""
    out = [("frozen_beta0", 0.0, False), ("loop_beta0", 0.0, True)]
    if cfg.leashed:
        out += [("frozen", cfg.kl_coef, False), ("loop", cfg.kl_coef, True)]
    return out


def demo_config(cfg: LoopDemoConfig, seed: int, root: Path) -> DemoConfig:
    return DemoConfig(out=str(root), seed=seed, quick=cfg.quick, kl_coef=cfg.kl_coef,
                      ppo_steps=cfg.steps, overopt_steps=cfg.steps,
                      eval_samples=cfg.eval_samples, threads=cfg.threads)


def make_frozen_run(cfg: LoopDemoConfig, seed: int, root: Path, st: Stage) -> None:
    """1-2 of one seed: the world, SFT, RM and the frozen β = 0 run (demo.refresh_probe)."""
    demo = demo_config(cfg, seed, root)
    root.mkdir(parents=True, exist_ok=True)
    first_stages(demo, st, root, "--max-seconds", "1e9")
    if not (root / "frozen_beta0" / "config.json").exists():
        run_frozen_arm(cfg, demo, seed, root, root / "frozen_beta0", 0.0, st)


def one_seed(cfg: LoopDemoConfig, seed: int, root: Path, st: Stage) -> dict:
    from demo import loop_report

    demo = demo_config(cfg, seed, root)
    root.mkdir(parents=True, exist_ok=True)
    first_stages(demo, st, root, "--max-seconds", "1e9")  # 1.
    for name, beta, loop in arms(cfg):
        path = root / name
        if (path / "config.json").exists():
            continue
        if loop:
            run_loop_arm(cfg, demo, seed, root, path, beta, st)
        else:
            run_frozen_arm(cfg, demo, seed, root, path, beta, st)
    if cfg.runs_only:
        return {}
    figures = {"runs": {name: loop_report.run_figures(root / name, root, cfg, seed)
                        for name, *_ in arms(cfg)}}
    print(f"seed {seed}: " + ", ".join(f"{n} {r['final_gold']:+.3f}"
                                       for n, r in figures["runs"].items()), flush=True)
    return figures


def ppo_args(cfg: LoopDemoConfig, demo: DemoConfig, root: Path, address: str, path: Path,
             beta: float) -> list[str]:
    cmd = ppo_command(demo, root / "world", root / "sft", address, path, beta, cfg.steps)
    i = cmd.index("--max-steps")
    cmd[i + 1] = str(cfg.steps)  # --quick's own step count, not the demo's 2
    return cmd


def run_frozen_arm(cfg, demo, seed, root, path, beta, st) -> None:
    from rm_server.launch import start_server

    server = start_server(root / "rm", "--num-threads", str(max(1, cfg.threads // 2)),
                          "--max-batch-size", "64", "--model-name", "rm")
    try:
        st.run(f"seed {seed} {path.name}", ppo_args(cfg, demo, root, server.address, path, beta))
    finally:
        server.stop()


def run_loop_arm(cfg, demo, seed, root, path, beta, st) -> None:
    from rm_server.launch import start_server

    work = root / f"{path.name}.services"
    work.mkdir(parents=True, exist_ok=True)
    token = work / "admin.token"
    token.write_text(secrets.token_hex(16))
    server = start_server(root / "rm", "--num-threads", str(max(1, cfg.threads // 2)),
                          "--max-batch-size", "64", "--model-name", "rm",
                          "--admin-token-file", str(token))
    feedback = FeedbackProcess(work / "feedback.db", work, seed)
    labeler = SimulatedLabeler(feedback.url, seed)
    try:
        cmd = ppo_args(cfg, demo, root, server.address, path, beta)
        cmd[cmd.index("ppo")] = "loop"
        cmd += ["--feedback-url", feedback.url, "--feedback-fraction", str(cfg.feedback_fraction),
                "--feedback-budget", str(cfg.feedback_budget), "--rm-model", str(root / "rm"),
                "--replay", str(root / "world" / "prefs.jsonl"), "--replay-ratio",
                str(cfg.replay_ratio), "--admin-token-file", str(token), "--refresh-every",
                str(cfg.refresh_every), "--refresh-lr", str(cfg.refresh_lr), "--refresh-epochs",
                str(cfg.refresh_epochs), "--refresh-threads", str(cfg.threads)]
        st.run(f"seed {seed} {path.name}", cmd)
    finally:
        labeler.stop()
        stats = feedback.stats()
        feedback.stop()
        server.stop()
    (path / "feedback_stats.json").write_text(json.dumps(
        {**stats, "labeler_judgments": labeler.judged}, indent=1) + "\n")


class FeedbackProcess:
    """``python -m feedback serve`` on loopback ports it picks (read back from --port-file)."""

    def __init__(self, store: Path, work: Path, seed: int):
        import os
        import subprocess

        port_file = work / "feedback.port.json"
        port_file.unlink(missing_ok=True)
        self.log = (work / "feedback.log").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "feedback", "serve", "--store", str(store), "--port", "0",
             "--metrics-port", "0", "--port-file", str(port_file), "--seed", str(seed)],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ})
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise SystemExit(f"demo: the feedback server did not start (see {self.log.name})")
            time.sleep(0.1)
        time.sleep(0.1)  # the file is written whole before it appears? read until it parses
        for _ in range(50):
            try:
                self.url = f"http://127.0.0.1:{json.loads(port_file.read_text())['port']}"
                break
            except ValueError:
                time.sleep(0.1)

    def stats(self) -> dict:
        from feedback.client import FeedbackClient

        try:
            return FeedbackClient(self.url, timeout=10).stats()
        except Exception as e:  # noqa: BLE001 (a figure missing, not the run)
            return {"error": str(e)}

    def stop(self) -> None:
        from rm_server.launch import stop_process

        stop_process(self.proc, timeout=20)
        self.log.close()


class SimulatedLabeler:
    """The demo's human, through the labeling API: leases pairs, answers each with the
    Bradley-Terry labeler around the gold reward (demo/labeler.py), on a daemon thread."""

    def __init__(self, url: str, seed: int, name: str = "simulated-human"):
        from demo import world
        from demo.labeler import BradleyTerryLabeler
        from feedback.client import FeedbackClient

        self.client = FeedbackClient(url, timeout=10)
        self.bt = BradleyTerryLabeler(world.gold, seed=10_000 + seed)
        self.name = name
        self.judged = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="labeler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                leases = self.client.lease(self.name, count=8)
                for lease in leases:
                    chosen, _, _ = self.bt.label(lease.prompt, lease.left, lease.right)
                    self.client.submit(lease.lease_id, "left" if chosen == lease.left
                                       else "right")
                    self.judged += 1
            except Exception as e:  # noqa: BLE001 (the service restarting: try again)
                print(f"labeler: {e}", file=sys.stderr, flush=True)
                leases = []
            if not leases:
                self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


if __name__ == "__main__":
    sys.exit(main())
