"""``python -m demo.refresh_probe``: does a refresh make the reward model better on the samples
the policy writes next? The live loop's proof (demo/loop.py) runs PPO end to end, where a
refresh's effect is mixed up with PPO's own chance; this probe asks the RM question alone.

    python -m demo.refresh_probe --out out/loop --seeds 0 1 2 [--labels 12] [--settings ...]

Per seed, on the frozen β = 0 run of demo.loop (OUT/seed-N/frozen_beta0, made here when
missing, with the world, SFT model and RM): at each refresh step s (every ``refresh_every`` of
the run's steps) the policy's same-prompt pairs of steps s-N+1..s are the candidates; the
``--labels`` the current RM is least sure of (policy_trainer.pair_select, the trainer's own
choice) are labeled by the demo's simulated human; a candidate is trained from the current RM
on every label so far plus the replay, exactly as ``policy-trainer refresh`` trains it
(refresh.train_candidate), and both are judged against the *gold* reward on the policy's next
samples (steps s+1..s+N, which no RM trained on): Spearman's ρ of RM score and gold over all of
them, and the accuracy on their same-prompt pairs; the frozen RM is judged on the same samples.
The candidate then becomes the current RM (every refresh promoted: the question is what
training does, not the gate).

A setting is ``NAME:LR:EPOCHS:REPLAY_RATIO[:LABELS]``; the first default is demo.loop's own.
``--labeler-temperature 0`` labels by the gold order (noise-free): the most any labels on those
pairs could teach this RM. Writes OUT/refresh_probe.json (OUT/refresh_probe-SELECT-tT.json with
``--select`` or a temperature) and prints one row per seed and setting.
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

from demo import world as gold_world
from demo.loop import LoopDemoConfig


@dataclass
class ProbeConfig:
    out: str = "out/loop"
    """demo.loop's output folder: seed-N/ (reused, or made: world, SFT, RM, frozen_beta0)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    settings: tuple[str, ...] = ("loop:5e-4:4:2", "stronger:1e-3:8:2", "fresh-only:5e-4:4:0",
                                 "all-pairs:1e-3:4:1:1000")
    """NAME:LR:EPOCHS:REPLAY_RATIO[:LABELS per refresh] (default labels: --labels)."""
    labels: int = 12
    """Labels per refresh: demo.loop's 3 a step × 4 steps."""
    select: Literal["uncertain", "confident", "random"] = "uncertain"
    """Which candidate pairs get labels: the trainer's (smallest margin), the largest margin
    first, or a random draw."""
    labeler_temperature: float = 1.0
    """The simulated human's noise (demo.labeler's temperature): 1 is demo.loop's labeler; 0
    labels by the gold order itself, what perfect labels on the same pairs would teach."""
    refresh_every: int = 4
    steps: int = 24
    threads: int = 1
    quick: bool = False
    """The demo's quick world, 4 steps, a refresh every 2 (tests)."""


@dataclass
class _RefreshSettings:  # what refresh.train_candidate reads of a RefreshConfig
    current: str
    refresh_lr: float
    refresh_epochs: int
    refresh_batch_size: int = 16
    seed: int = 0
    refresh_device: str = "cpu"
    refresh_threads: int | None = 1


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's ρ (average ranks for ties)."""
    def ranks(x: list[float]) -> list[float]:
        order = sorted(range(len(x)), key=x.__getitem__)
        out = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in order[i:j + 1]:
                out[k] = (i + j) / 2
            i = j + 1
        return out
    return statistics.correlation(ranks(a), ranks(b))


def same_prompt_pairs(rollouts: list[dict], first: int, last: int) -> list[tuple[str, str, str]]:
    """(prompt, a, b): consecutive responses to one prompt in steps first..last, a != b."""
    by_prompt: dict[str, list[str]] = {}
    for r in rollouts:
        if first <= r["step"] <= last:
            by_prompt.setdefault(r["prompt"], []).append(r["response"])
    return [(p, a, b) for p, rs in by_prompt.items() for a, b in zip(rs[::2], rs[1::2])
            if a != b]


def rm_scores(model: Path, items: list[tuple[str, str]], work: Path, threads: int) -> list[float]:
    """``policy-trainer rm-eval``'s reward of each (prompt, response), in this process."""
    from policy_trainer import cli

    data = work.with_suffix(".jsonl")
    data.write_text("".join(json.dumps({"prompt": p, "chosen": y, "rejected": y + " ."}) + "\n"
                            for p, y in items))  # rejected: any other text, unused
    with contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(["rm-eval", "--model", str(model), "--data", str(data), "--out", str(work),
                       "--no-progress", "--threads", str(threads)])
    if rc != 0:
        raise SystemExit(f"refresh_probe: rm-eval of {model} failed ({rc})")
    rows = (work / "eval_scores.jsonl").read_text().splitlines()
    return [json.loads(x)["r_chosen"] for x in rows]


def against_gold(model: Path, rollouts: list[dict], first: int, last: int, work: Path,
                 threads: int) -> dict:
    """ρ(RM, gold) over the policy's samples of steps first..last, and the RM's accuracy on
    their same-prompt pairs ordered by gold (gold ties left out)."""
    items = [(r["prompt"], r["response"]) for r in rollouts if first <= r["step"] <= last]
    r = rm_scores(model, items, work, threads)
    g = [gold_world.gold(p, y) for p, y in items]
    at: dict[str, list[int]] = {}
    for i, (p, _) in enumerate(items):
        at.setdefault(p, []).append(i)
    right = [(r[i] - r[j]) * (g[i] - g[j]) > 0 for ii in at.values()
             for i, j in zip(ii[::2], ii[1::2]) if g[i] != g[j]]
    return {"rho": spearman(r, g), "accuracy": sum(right) / max(1, len(right)),
            "pairs": len(right), "samples": len(items)}


def pick(candidates: list, budget: int, how: str, seed: int) -> list:
    """The labeled pairs: the trainer's choice (``uncertain``: pair_select.select), the
    ``confident`` ones (largest margin first) or a seeded ``random`` draw."""
    import random

    from policy_trainer.pair_select import margin, select, usable

    if how == "uncertain":
        return select(candidates, budget)
    kept = [c for c in candidates if usable(c)]
    if how == "confident":
        return sorted(kept, key=margin, reverse=True)[:budget]
    return random.Random(seed).sample(kept, min(budget, len(kept)))


def variant(cfg: ProbeConfig) -> str:
    """The suffix of a non-default probe's files: ``-SELECT``, ``-tTEMPERATURE``."""
    return ("" if cfg.select == "uncertain" else f"-{cfg.select}") + (
        "" if cfg.labeler_temperature == 1.0 else f"-t{cfg.labeler_temperature:g}")


def probe(root: Path, setting: str, cfg: ProbeConfig, seed: int) -> dict:
    """One setting's chain of refreshes over one seed's frozen run."""
    from demo.labeler import BradleyTerryLabeler
    from policy_trainer.pair_select import Candidate
    from policy_trainer.refresh import replay_sample, train_candidate

    name, lr, epochs, ratio, *more = setting.split(":")
    budget = int(more[0]) if more else cfg.labels
    work = root / "refresh_probe" / f"{name}{variant(cfg)}"
    work.mkdir(parents=True, exist_ok=True)
    rollouts = [json.loads(x) for x in
                (root / "frozen_beta0" / "rollouts.jsonl").read_text().splitlines()]
    replay = (root / "world" / "prefs.jsonl").read_text().splitlines()
    human = BradleyTerryLabeler(gold_world.gold, seed=10_000 + seed,
                                temperature=cfg.labeler_temperature)
    current, labeled, rows = root / "rm", [], []
    n = cfg.refresh_every
    for i, s in enumerate(range(n, cfg.steps, n)):
        pairs = same_prompt_pairs(rollouts, s - n + 1, s)
        ra = rm_scores(current, [(p, a) for p, a, _ in pairs], work / f"a-{s}", cfg.threads)
        rb = rm_scores(current, [(p, b) for p, _, b in pairs], work / f"b-{s}", cfg.threads)
        offered = [Candidate(p, a, b, x, y) for (p, a, b), x, y in zip(pairs, ra, rb)]
        chosen = pick(offered, budget, cfg.select, seed + s)
        for c in chosen:
            win, lose, _ = human.label(c.prompt, c.response_a, c.response_b)
            labeled.append(json.dumps({"prompt": c.prompt, "chosen": win, "rejected": lose}))
        data = work / f"train-{s}.jsonl"
        data.write_text("".join(x + "\n" for x in labeled + replay_sample(
            replay, round(float(ratio) * len(labeled)), seed + i)))
        candidate = work / f"candidate-{s}"
        train_candidate(_RefreshSettings(str(current), float(lr), int(epochs), seed=seed + i,
                                         refresh_threads=cfg.threads), data, None, candidate)
        before = against_gold(current, rollouts, s + 1, s + n, work / f"before-{s}", cfg.threads)
        after = against_gold(candidate, rollouts, s + 1, s + n, work / f"after-{s}",
                             cfg.threads)
        frozen = (before if i == 0 else
                  against_gold(root / "rm", rollouts, s + 1, s + n, work / f"frozen-{s}",
                               cfg.threads))
        rows.append({"step": s, "labels": len(labeled), "frozen": frozen, "before": before,
                     "after": after})
        current = candidate

    def mean(key: str, a: str, b: str) -> float:
        return statistics.fmean(r[a][key] - r[b][key] for r in rows)

    return {"setting": setting, "refreshes": rows,
            "mean_rho_change": mean("rho", "after", "before"),
            "mean_accuracy_change": mean("accuracy", "after", "before"),
            "mean_rho_over_frozen": mean("rho", "after", "frozen"),
            "mean_accuracy_over_frozen": mean("accuracy", "after", "frozen")}


def main(argv=None) -> int:
    from demo import loop
    from demo.run import Stage

    cfg = tyro.cli(ProbeConfig, args=argv, prog="python -m demo.refresh_probe",
                   description=__doc__.split("\n")[0])
    if cfg.quick:
        cfg.steps, cfg.refresh_every = 4, 2
    loop_cfg = LoopDemoConfig(out=cfg.out, steps=cfg.steps, refresh_every=cfg.refresh_every,
                              threads=cfg.threads, quick=cfg.quick, runs_only=True)
    out, st, results = Path(cfg.out), Stage(), {}
    for seed in cfg.seeds:
        root = out / f"seed-{seed}"
        if not (root / "frozen_beta0" / "rollouts.jsonl").exists():
            loop.make_frozen_run(loop_cfg, seed, root, st)
        results[seed] = [probe(root, s, cfg, seed) for s in cfg.settings]
        for r in results[seed]:
            print(f"seed {seed} {r['setting']:<24} a refresh: Δρ {r['mean_rho_change']:+.3f}"
                  f" Δacc {r['mean_accuracy_change']:+.3f}; over the frozen RM: Δρ "
                  f"{r['mean_rho_over_frozen']:+.3f} Δacc {r['mean_accuracy_over_frozen']:+.3f}"
                  "; ρ frozen / before → after: " + ", ".join(
                      f"{x['frozen']['rho']:+.2f} / {x['before']['rho']:+.2f}→"
                      f"{x['after']['rho']:+.2f}" for x in r["refreshes"]), flush=True)
    name = "refresh_probe" + variant(cfg)
    (out / f"{name}.json").write_text(json.dumps(
        {"config": vars(cfg), "seeds": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
