"""``python -m demo.ensemble``: does an ensemble of reward models hold over-optimization off?

    python -m demo.ensemble --out out/ensemble --seeds 0 1 2 [--members 5] [--quick]
        [--arms ens_min_beta0 ens_uwo_beta0 ...]   # a subset of the runs; more later, reused

In the demo world (demo/build.py: a hidden gold reward, a simulated Bradley-Terry labeler), for
each seed, with the demo's own stages (demo/run.py; a folder a demo run left is reused):

1. world, SFT and the single reward model, as ``make demo`` builds them;
2. an ensemble of ``--members`` heads on one backbone (``rm-server train --ensemble K``), from
   the same SFT model on the same preferences with the same settings;
3. both served (``rm-server serve``, one process each);
4. PPO from the SFT policy, same seed and steps, with β = 0 and with the demo's β, against the
   single RM, and against the ensemble with worst-case (``--reward-aggregation min``) and
   uncertainty-weighted rewards (``uwo``: mean − λ·std, Coste et al. 2023); at β = 0 also:
   the ensemble's plain mean and uwo with a large λ (``--strong-uncertainty-coef``), to tell
   the members' averaging from the uncertainty penalty, and a single RM trained with the
   ensemble's centering (``--center-coef 0.01``), to tell either from the centering;
5. every final policy judged by the gold reward on held-out prompts; gold, KL and the members'
   spread over the steps from the logged rollouts; figures over the seeds against the bar.

Writes OUT/ensemble.json (every figure), OUT/ensemble.png (gold against KL per run) and prints
the table (demo/ensemble_report.py).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import tyro

from demo.run import DemoConfig, Stage, first_stages, ppo_command, rm_train_command

# (run name, served by, --reward-aggregation, at β = 0?, λ: "uwo" or "strong");
# the single RM's runs ("ppo_beta0", "ppo") are the demo's own.
ARMS = (("ppo_beta0", "rm", None, True, None), ("ens_mean_beta0", "ens", "mean", True, None),
        ("ens_min_beta0", "ens", "min", True, None), ("ens_uwo_beta0", "ens", "uwo", True, "uwo"),
        ("ens_uwo_strong_beta0", "ens", "uwo", True, "strong"),
        ("centered_beta0", "centered", None, True, None),
        ("ppo", "rm", None, False, None), ("ens_min", "ens", "min", False, None),
        ("ens_uwo", "ens", "uwo", False, "uwo"))


@dataclass
class EnsembleDemoConfig:
    out: str = "out/ensemble"
    """Output folder: seed-N/ per seed (a demo run's folder: reused where its stages are done),
    ensemble.json and ensemble.png."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds: of the world, every training run and the evaluation."""
    members: int = 5
    """Ensemble members (heads on one backbone)."""
    uncertainty_coef: float = 1.0
    """λ of uwo = mean − λ·std."""
    strong_uncertainty_coef: float = 10.0
    """λ of the second uwo run at β = 0 (the members' std is small here: λ = 1 barely moves
    the reward)."""
    kl_coef: float = 0.05
    """β of the leashed runs (the demo's)."""
    steps: int = 24
    """PPO steps of every run (the demo's)."""
    eval_samples: int = 256
    """Held-out samples per final policy for the gold evaluation."""
    threads: int = 2
    """torch threads for every stage."""
    quick: bool = False
    """A shortened run for tests: the demo's quick world, 2 PPO steps, few samples."""
    arms: tuple[str, ...] = ()
    """Only these runs (names as in ARMS; default: all): a shorter proof on a busy machine.
    Steps, seeds and settings are the same whichever are chosen; a later call with more arms
    reuses the runs already there. The single RM's run at each β chosen is always included."""


def main(argv=None) -> int:
    cfg = tyro.cli(EnsembleDemoConfig, args=argv, prog="python -m demo.ensemble",
                   description=__doc__.split("\n")[0])
    return run(cfg)


def chosen_arms(cfg: EnsembleDemoConfig) -> tuple:
    """The ARMS rows to run: ``cfg.arms`` (all by default) plus the single RM's at their β."""
    names = [a[0] for a in ARMS]
    if unknown := [n for n in cfg.arms if n not in names]:
        raise SystemExit(f"--arms: unknown run(s) {unknown}; choose from {names}")
    if not cfg.arms:
        return ARMS
    wanted = set(cfg.arms)
    wanted |= {"ppo_beta0" if n.endswith("_beta0") else "ppo" for n in cfg.arms}
    return tuple(a for a in ARMS if a[0] in wanted)


def run(cfg: EnsembleDemoConfig) -> int:
    import torch

    from demo import ensemble_report

    torch.set_num_threads(cfg.threads)  # the evaluation runs here (2 threads on 2 busy cores
    # ran PPO's tiny model 50x slower than 1 here)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    st = Stage()
    results = {}
    for seed in cfg.seeds:
        t0 = time.perf_counter()
        results[seed] = one_seed(cfg, seed, out / f"seed-{seed}", st)
        results[seed]["seconds"] = time.perf_counter() - t0  # what was not there already
    summary = ensemble_report.summarize(results, [a[0] for a in chosen_arms(cfg)])
    summary["config"] = asdict(cfg)
    summary["stage_seconds"] = st.times
    summary["total_seconds"] = time.perf_counter() - st.t0
    (out / "ensemble.json").write_text(json.dumps(summary, indent=1) + "\n")
    ensemble_report.print_summary(summary)
    plotted = ensemble_report.plot(summary, out / "ensemble.png")
    print(f"\nwrote {out}/ensemble.json{', ensemble.png' if plotted else ''}; "
          f"total {summary['total_seconds']:.0f}s")
    return 0


def one_seed(cfg: EnsembleDemoConfig, seed: int, root: Path, st: Stage) -> dict:
    """Steps 1-5 for one seed; {run name: its figures}."""
    from rm_server.launch import start_server

    demo = DemoConfig(out=str(root), seed=seed, quick=cfg.quick, kl_coef=cfg.kl_coef,
                      ppo_steps=cfg.steps, overopt_steps=cfg.steps,
                      eval_samples=cfg.eval_samples, threads=cfg.threads)
    root.mkdir(parents=True, exist_ok=True)
    arms = chosen_arms(cfg)
    served = {a[1] for a in arms}
    # 1. world, SFT, the single RM; the base pretrains all its steps however busy the machine
    # (demo.build stops at a time budget), so that every seed's world is built alike
    first_stages(demo, st, root, "--max-seconds", "1e9")
    world, sft, ens = root / "world", root / "sft", root / "rm_ensemble"
    if not (ens / "config.json").exists():  # 2. the ensemble, trained as the single RM was
        st.run(f"seed {seed} rm-ensemble", rm_train_command(
            demo, world, sft, ens, "--ensemble", str(cfg.members),
            "--uncertainty-coef", str(cfg.uncertainty_coef)))
    centered = root / "rm_centered"  # the control: one head, the ensemble's centering
    if "centered" in served and not (centered / "config.json").exists():
        st.run(f"seed {seed} rm-centered", rm_train_command(demo, world, sft, centered,
                                                            "--center-coef", "0.01"))
    servers = {}
    coefs = {"uwo": cfg.uncertainty_coef, "strong": cfg.strong_uncertainty_coef}
    todo = {a[1] for a in arms if not (root / a[0] / "config.json").exists()}
    try:  # 3. served: the models of the runs not yet done
        for key, model in (("rm", root / "rm"), ("ens", ens), ("centered", centered)):
            if key not in todo:
                continue
            servers[key] = start_server(model, "--num-threads", str(max(1, cfg.threads // 2)),
                                        "--max-batch-size", "64", "--model-name", key)
        for name, served_by, aggregation, beta0, coef in arms:  # 4. PPO
            path = root / name
            if (path / "config.json").exists():
                continue
            extra = [] if aggregation is None else ["--reward-aggregation", aggregation]
            extra += [] if coef is None else ["--uncertainty-coef", str(coefs[coef])]
            st.run(f"seed {seed} {name}", ppo_command(
                demo, world, sft, servers[served_by].address, path,
                0.0 if beta0 else cfg.kl_coef, cfg.steps) + extra)
    finally:
        for server in servers.values():
            server.stop()
    ens_eval = json.loads((ens / "eval.json").read_text()).get("ensemble", {})
    figures = {"runs": {name: cached_figures(root / name, world, cfg.eval_samples, seed)
                        for name, *_ in arms},  # 5. gold
               "rm_accuracy": json.loads((root / "rm" / "eval.json").read_text())["accuracy"],
               "ensemble": ens_eval}
    print(f"seed {seed}: " + ", ".join(f"{n} {r['final_gold']:+.3f}"
                                       for n, r in figures["runs"].items()), flush=True)
    return figures


def cached_figures(run: Path, world: Path, eval_samples: int, seed: int) -> dict:
    """``run_figures``, kept in RUN/ensemble_figures.json and reused while the run's policy and
    the evaluation's settings are those it was computed for (a later call with more arms, or
    the summary over seeds whose runs were done by separate calls)."""
    from demo.ensemble_report import run_figures

    key = {"eval_samples": eval_samples, "seed": seed,
           "policy_mtime": (run / "config.json").stat().st_mtime}
    cache = run / "ensemble_figures.json"
    if cache.exists():
        kept = json.loads(cache.read_text())
        if kept.get("key") == key:
            return kept["figures"]
    figures = run_figures(run, world, eval_samples, seed)
    cache.write_text(json.dumps({"key": key, "figures": figures}) + "\n")
    return figures


if __name__ == "__main__":
    sys.exit(main())
