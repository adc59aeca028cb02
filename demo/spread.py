"""``python -m demo.spread``: how much of demo.loop's verdict per seed is PPO's own chance?

    python -m demo.spread --out out/loop --seeds 0 1 2 --reps 3 [--quick]

demo.loop runs each arm once per seed, and the bar's standard error is the evaluation's (256
held-out samples of one final policy), not the spread of PPO from run to run. This reruns both
β = 0 arms (the frozen RM; the live loop with demo.loop's settings) on each seed's world, SFT
policy and RM (OUT/seed-N, made by demo.loop when missing) with other PPO seeds (seed + 100·k,
k = 1..reps; the simulated labeler and the evaluation keep the world's seed), and reports per
world the final gold of every run, the paired differences loop − frozen (same world, same PPO
seed) with their mean ± SE over PPO seeds (demo.loop's own pair, PPO seed = world seed,
included), and the same over every world. Writes OUT/spread.json; finished runs are reused.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

from demo import loop as demo_loop


@dataclass
class SpreadConfig:
    out: str = "out/loop"
    """demo.loop's output folder: seed-N/ per world (reused, or made)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """World seeds."""
    reps: int = 3
    """Extra PPO seeds per world: seed + 100·k, k = 1..reps."""
    threads: int = 2
    quick: bool = False
    """The demo's quick world and demo.loop's quick run (tests)."""


def paired(diffs: list[float]) -> dict:
    """Mean ± SE (over runs) of paired differences; z = mean / SE (NaN under two runs)."""
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    return {"n": len(diffs), "mean": mean, "se": se, "z": mean / se if se > 0 else math.nan}


def one_world(cfg: demo_loop.LoopDemoConfig, seed: int, reps: int, root: Path) -> list[dict]:
    from demo.evaluate import evaluate_policy, read_prompts
    from demo.run import Stage

    demo_loop.make_frozen_run(cfg, seed, root, Stage())  # world, SFT, RM (and seed's own run)
    prompts = read_prompts(str(root / "world" / "heldout_prompts.jsonl"))
    rows = []
    for ppo_seed in [seed] + [seed + 100 * k for k in range(1, reps + 1)]:
        demo = demo_loop.demo_config(cfg, ppo_seed, root)  # PPO's --seed
        row = {"ppo_seed": ppo_seed}
        for arm, run in (("frozen", demo_loop.run_frozen_arm), ("loop", demo_loop.run_loop_arm)):
            name = f"{arm}_beta0" if ppo_seed == seed else f"{arm}_beta0_ppo{ppo_seed}"
            path = root / name
            if not (path / "config.json").exists():
                run(cfg, demo, seed, root, path, 0.0, Stage())
            res = evaluate_policy(str(path), prompts, cfg.eval_samples, seed=seed + 1)
            row[arm], row[f"{arm}_se"] = res["mean_gold"], res["stderr_gold"]
        row["diff"] = row["loop"] - row["frozen"]
        print(f"world {seed} PPO seed {ppo_seed}: frozen {row['frozen']:+.3f} ± "
              f"{row['frozen_se']:.3f}, loop {row['loop']:+.3f} ± {row['loop_se']:.3f}, "
              f"loop − frozen {row['diff']:+.3f}", flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    cfg = tyro.cli(SpreadConfig, args=argv, prog="python -m demo.spread",
                   description=__doc__.split("\n")[0])
    import torch

    torch.set_num_threads(cfg.threads)
    loop_cfg = demo_loop.LoopDemoConfig(out=cfg.out, seeds=cfg.seeds, threads=cfg.threads,
                                        quick=cfg.quick)  # --quick: demo.loop's sizes
    out = Path(cfg.out)
    worlds = {s: one_world(loop_cfg, s, cfg.reps, out / f"seed-{s}") for s in cfg.seeds}
    summary = {"config": vars(cfg), "worlds": {}}
    for s, rows in worlds.items():
        frozen = [r["frozen"] for r in rows]
        summary["worlds"][str(s)] = {
            "runs": rows, "loop_minus_frozen": paired([r["diff"] for r in rows]),
            "frozen_spread_sd": statistics.stdev(frozen) if len(frozen) > 1 else math.nan,
            "eval_se_mean": statistics.fmean(r["frozen_se"] for r in rows)}
    every = [r["diff"] for rows in worlds.values() for r in rows]
    summary["all"] = paired(every)
    (out / "spread.json").write_text(json.dumps(summary, indent=1) + "\n")
    for s, w in summary["worlds"].items():
        d = w["loop_minus_frozen"]
        print(f"world {s}: loop − frozen {d['mean']:+.3f} ± {d['se']:.3f} over {d['n']} PPO "
              f"seeds ({d['z']:+.1f} SE); frozen gold spreads {w['frozen_spread_sd']:.2f} (SD) "
              f"from run to run against an evaluation SE of {w['eval_se_mean']:.2f}")
    a = summary["all"]
    print(f"all worlds: loop − frozen {a['mean']:+.3f} ± {a['se']:.3f} over {a['n']} runs "
          f"({a['z']:+.1f} SE); wrote {out}/spread.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
