"""PPO step against TRL 1.12's ``PPOTrainer``, same tiny setup, side by side, interleaved.

TRL 1.12.0 is the last release with a PPO trainer (``trl.experimental.ppo``). It runs in its own
virtual environment (default ``.venv-trl112`` at the repository root, ignored by git), made on
first use: ``python -m venv`` + ``pip install trl==1.12.0 torch==2.13.0`` (the CPU build on this
machine's disk) and the same transformers / accelerate / datasets as ours, so both sides run the
same model code. TRL runs as a child process of that venv's Python on this very file
(``--trl-child``), which imports nothing of ours.

The setup (TRL's tiny PPO configuration):

- policy: a random-init Llama, hidden 64, 2 layers, vocabulary 8192, tied embeddings
  (``bench.ppo``'s ``policy-1m``); the reference is the same checkpoint;
- reward model and TRL's value model: the same Llama shape with a scalar head (``rm-tiny``);
  our critic is a copy of the policy's backbone with a zero head (the same shape and work);
- 64 prompts (pseudo-word lines, the same token ids on both sides: made here and handed to
  TRL), one batch of 64 rollouts a step, 16 new tokens, pure sampling at temperature 1, EOS as
  the stop token; 4 PPO epochs of one minibatch (one micro-batch of 64); lr 1e-5;
- one torch thread; every process of a run pinned to the same core (``--cpu``).

The work per step is the same: TRL scores with its reward model in process; ours sends each
generation chunk to a real ``rm-server serve`` (one torch thread) pinned to the *same* core,
so the RM's forward competes for it as TRL's does, and the gRPC round trip is paid. Our step's
split (generate / score-wait / reference / train) is from its own step log (train_log.jsonl);
the CLI runs through ``cli.main`` with a probe (``PROBE``) that adds the CPU seconds of the
trainer and of the RM server to each step record. TRL's child records its own CPU seconds. CPU
per step is less moved by other jobs' time slices than wall time.

TRL's step is measured between consecutive ``on_step_end`` callbacks: everything in its
loop, including the two ``gc.collect()`` calls per step (``empty_cache`` is a no-op on the
CPU). It runs twice: as released ("TRL"), with ``gc.collect`` timed, and with ``gc.collect``
monkeypatched to a no-op in the child ("TRL no gc": the garbage collector's automatic
generational passes still run). The first ``--warmup`` steps of every run are dropped; figures
are medians over the remaining steps, then over ``--reps`` repetitions, the runs of a
repetition in rotating order (the machine is shared: interleaving spreads others' load).

``--baseline REF`` adds our trainer at a commit (``git archive`` into the work folder, run with
``PYTHONPATH`` there); ``--ablate prime,keep,chunk,fused`` adds ours with one optimization of
the step undone by the probe (``ABLATIONS``). Results: bench/RESULTS.md.

    python -m bench.trl_ppo                    # 5 repetitions of 10 steps
    python -m bench.trl_ppo --reps 3 --steps 7 --baseline 83bff62 --ablate prime,keep
    python -m bench.trl_ppo --prompt-words 3   # short prompts: TRL's full logits cost it least
    python -m bench.trl_ppo --dry-run --ours-only   # tiny sizes, no TRL venv (the test)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRL_VENV = ROOT / ".venv-trl112"
# pip specs of TRL's venv: TRL 1.12.0 and our own versions of what it shares with us
TRL_PINS = ("trl==1.12.0", "torch==2.13.0")
SHARED = ("transformers", "accelerate", "datasets")
PHASES = ("generate", "score", "reference", "train")
RUNS = ("trl", "trl_no_gc", "ours")
# what the two trainers share: batch 64, 4 epochs of one minibatch of one micro-batch
BATCH, NEW_TOKENS, EPOCHS, LR = 64, 16, 4, 1e-5  # the defaults of --batch, --new-tokens


# ---------------------------------------------------------------- TRL's side (in its venv)

def trl_child(a) -> None:
    """Runs in TRL's venv: TRL's PPOTrainer on the prompts' ids, step times to --result."""
    import gc
    import time as _time

    import torch

    torch.set_num_threads(1)
    gc_seconds = []
    if a.no_gc:
        gc.collect = lambda *args, **kwargs: 0  # TRL calls gc.collect() as gc.collect
    else:
        real = gc.collect

        def timed(*args, **kwargs):
            t0 = _time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                gc_seconds.append(_time.perf_counter() - t0)

        gc.collect = timed

    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from transformers.utils import logging as hf_logging
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    hf_logging.set_verbosity_error()
    ids = json.loads(Path(a.prompt_ids).read_text())
    tok = AutoTokenizer.from_pretrained(a.policy)
    tok.padding_side = "left"  # TRL generates from left-padded queries
    data = Dataset.from_dict({"input_ids": ids})
    marks: list[tuple[float, float, int]] = []

    class Marks(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append((_time.perf_counter(), _time.process_time(), len(gc_seconds)))

    cfg = PPOConfig(output_dir=a.out, per_device_train_batch_size=a.batch,
                    gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=EPOCHS,
                    local_rollout_forward_batch_size=a.batch, response_length=a.new_tokens,
                    total_episodes=a.batch * a.steps, learning_rate=LR, temperature=1.0,
                    stop_token="eos", missing_eos_penalty=None, num_sample_generations=0,
                    use_cpu=True, bf16=False, report_to=[], save_strategy="no",
                    logging_steps=1, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    trainer = PPOTrainer(
        args=cfg, processing_class=tok,
        model=AutoModelForCausalLM.from_pretrained(a.policy, dtype=torch.float32),
        ref_model=AutoModelForCausalLM.from_pretrained(a.policy, dtype=torch.float32),
        reward_model=AutoModelForSequenceClassification.from_pretrained(a.rm, num_labels=1),
        value_model=AutoModelForSequenceClassification.from_pretrained(a.rm, num_labels=1),
        train_dataset=data, eval_dataset=data, callbacks=[Marks()])
    trainer.log = lambda *args, **kwargs: None  # no printing in the timed loop
    marks.append((_time.perf_counter(), _time.process_time(), 0))  # the start
    trainer.train()
    steps = [b[0] - a_[0] for a_, b in zip(marks, marks[1:])]
    cpu = [b[1] - a_[1] for a_, b in zip(marks, marks[1:])]
    gcs = [sum(gc_seconds[a_[2]:b[2]]) for a_, b in zip(marks, marks[1:])]
    Path(a.result).write_text(json.dumps({"step": steps, "cpu": cpu, "gc": gcs}))


# ---------------------------------------------------------------- our side

def ensure_trl_venv(venv: Path) -> Path:
    """TRL 1.12's venv (made once; the pins above); returns its python."""
    from bench.common import ensure_venv  # here: the TRL child runs this file as a script

    return ensure_venv(venv, list(TRL_PINS), SHARED, "bench.trl_ppo")


def ensure_rm(cache: Path, policy: Path) -> Path:
    """A Llama reward model of the policy's shape with a scalar head of real spread."""
    out = cache / "rm-tiny"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    cfg = AutoConfig.from_pretrained(policy)
    cfg.architectures, cfg.num_labels, cfg.tie_word_embeddings = None, 1, False
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_config(cfg)
    with torch.no_grad():
        w = model.score.weight
        w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
                * 2.0 / w.shape[1] ** 0.5)
    tmp = cache / f".rm-tiny.tmp{os.getpid()}"
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(policy).save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def prompt_ids(policy: Path, prompts: Path) -> list[list[int]]:
    """The token ids our trainer makes of the prompts (ppo_setup.load_prompts), for TRL."""
    from transformers import AutoTokenizer

    from policy_trainer.rollout import encode_prompts
    from protos.encoding import Encoder

    tok = AutoTokenizer.from_pretrained(policy)
    texts = [json.loads(x)["prompt"] for x in prompts.read_text().splitlines()]
    ids, cut = encode_prompts(Encoder(tok, 256, len(tok)), texts, 256)
    assert not cut
    return ids


def run_trl(a, py: Path, policy: Path, rm: Path, ids_file: Path, no_gc: bool) -> dict:
    out = Path(a.work) / ("trl-nogc" if no_gc else "trl")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    result = out / "result.json"
    # -P: bench/ not on sys.path (its http.py would shadow the standard library's)
    cmd = ["taskset", "-c", a.cpu, str(py), "-P", str(Path(__file__).resolve()), "--trl-child",
           "--policy", str(policy), "--rm", str(rm), "--prompt-ids", str(ids_file),
           "--steps", str(a.steps), "--batch", str(a.batch), "--new-tokens", str(a.new_tokens),
           "--out", str(out), "--result", str(result),
           *(["--no-gc"] if no_gc else [])]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, cwd=out)
    if r.returncode != 0:
        raise SystemExit(f"bench.trl_ppo: TRL failed ({r.returncode}):\n{r.stderr[-3000:]}")
    got = json.loads(result.read_text())
    timed = slice(a.warmup, None)
    step, cpu, gc_s = got["step"][timed], got["cpu"][timed], got["gc"][timed]
    return {"step": statistics.median(step), "cpu": statistics.median(cpu),
            "gc": statistics.median(gc_s)}


# `policy-trainer ppo` as its console script runs it (cli.main), with one probe: each step
# record also carries the CPU seconds used so far by the trainer process and by the RM server
# (/proc), so the bench can report CPU per step beside wall time (the machine is shared).
# BENCH_ABLATE undoes named optimizations of the step (--ablate; ABLATIONS says what each is).
PROBE = """
import os, sys, time
import kernels
from policy_trainer import cli, experience, optim, runlog
ablate = set(filter(None, os.environ.get("BENCH_ABLATE", "").split(",")))
op = sys.modules["kernels.token_logprobs_cpu"]
if "prime" in ablate:
    rollout_logprobs = experience.rollout_logprobs
    experience.rollout_logprobs = lambda *args, prime=False: rollout_logprobs(*args)
if "keep" in ablate:
    op.KEEP_LOGITS_MAX = 0
if "chunk" in ablate:
    op.chunk_budget = lambda hidden_size: 1 << 22
if "fused" in ablate:
    optim.can_fuse = lambda params: False
rm_pid, tick = int(os.environ["BENCH_RM_PID"]), os.sysconf("SC_CLK_TCK")
def rm_cpu():
    fields = open(f"/proc/{rm_pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / tick  # utime + stime
write = runlog.StepLog.write
def probed(self, record):
    if "time/step" in record:
        record = {**record, "bench/cpu": time.process_time(), "bench/rm_cpu": rm_cpu()}
    return write(self, record)
runlog.StepLog.write = probed
sys.exit(cli.main(sys.argv[1:]))
"""


ABLATIONS = {
    "prime": "epoch 0's first micro-batch forward run again in step 7 (not kept from 3b)",
    "keep": "the log-prob kernel's backward recomputes the logits (not kept from its forward)",
    "chunk": "16 MiB vocabulary chunks on the CPU (not sized by H to stay in L2)",
    "fused": "the for-loop AdamW (not torch's fused kernel)",
}


def run_ours(a, policy: Path, rm: Path, prompts: Path, extra: list[str],
             root: Path = ROOT, name: str = "ours", ablate: str = "") -> dict:
    """``root``: the checkout whose trainer and server run (another one: --baseline);
    ``ablate``: what the probe undoes (ABLATIONS)."""
    from rm_server.launch import start_server

    out = Path(a.work) / name.replace(" ", "-")
    shutil.rmtree(out, ignore_errors=True)
    env = {**_env(), "PYTHONPATH": str(root), "BENCH_ABLATE": ablate}
    server = start_server(rm, "--num-threads", "1", cpus=a.cpu, timeout=300, env=env)
    try:
        cmd = ["taskset", "-c", a.cpu, sys.executable, "-c", PROBE, "ppo",
               "--policy", str(policy), "--rm", server.address, "--prompts", str(prompts),
               "--out", str(out), "--max-steps", str(a.steps), "--batch-size", str(a.batch),
               "--mini-batch-size", str(a.batch), "--micro-batch-size", str(a.batch),
               "--generation-batch-size", str(a.generation_batch_size),
               "--rm-chunk-size", str(a.batch), "--max-new-tokens", str(a.new_tokens),
               "--num-ppo-epochs", str(EPOCHS), "--lr", str(LR), "--torch-threads", "1",
               "--no-progress", "--no-tensorboard", "--checkpoint-every", "0",
               "--log-rollouts", "0", "--log-every", "1000000", "--seed", "0", *extra]
        r = subprocess.run(cmd, env={**env, "BENCH_RM_PID": str(server.proc.pid)},
                           capture_output=True, text=True, cwd=root)
    finally:
        server.stop()
    if r.returncode != 0:
        raise SystemExit(f"bench.trl_ppo: policy-trainer ppo failed ({r.returncode}):\n"
                         f"{r.stderr[-3000:]}")
    recs = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [x for x in recs if "time/step" in x]
    timed = steps[a.warmup:]
    got = {"step": statistics.median(x["time/step"] for x in timed)}
    # CPU per step: trainer + RM server over the timed steps (the server's clock ticks are
    # 10 ms: averaged over the steps rather than a median of per-step differences)
    first = steps[a.warmup - 1] if a.warmup else None
    if first is not None:
        last = timed[-1]
        got["cpu"] = ((last["bench/cpu"] - first["bench/cpu"])
                      + (last["bench/rm_cpu"] - first["bench/rm_cpu"])) / len(timed)
        got["rm_cpu"] = (last["bench/rm_cpu"] - first["bench/rm_cpu"]) / len(timed)
    for p in PHASES:
        got[p] = statistics.median(x[f"time/{p}"] for x in timed)
    got["failed"] = sum(x["failed_samples"] for x in timed)
    return got


def baseline_checkout(ref: str, work: Path) -> Path:
    """``ref`` of this repository, exported (git archive) to a folder of its own."""
    out = work / f"baseline-{ref.replace('/', '_')}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", ref], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def run(a) -> dict:
    from bench.ppo import cpu_model, ensure_policy, write_prompts

    cache = Path(a.cache)
    policy = ensure_policy("policy-1m", cache)
    rm = ensure_rm(cache, policy)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    prompts = write_prompts(work / "prompts.jsonl", a.batch, a.prompt_words)
    ids_file = work / "prompt_ids.json"
    ids_file.write_text(json.dumps(prompt_ids(policy, prompts)))
    runs = ["ours"] if a.ours_only else list(RUNS)
    before = None
    if a.baseline:
        before = baseline_checkout(a.baseline, work)
        runs.append("before")
    ablations = [x for x in a.ablate.split(",") if x] if a.ablate else []
    unknown = set(ablations) - set(ABLATIONS)
    if unknown:
        raise SystemExit(f"bench.trl_ppo: --ablate {','.join(sorted(unknown))}: "
                         f"not one of {','.join(ABLATIONS)}")
    runs += [f"without {x}" for x in ablations]
    py = None if a.ours_only else ensure_trl_venv(Path(a.trl_venv))
    extra = a.ours_args.split() if a.ours_args else []
    load = [os.getloadavg()[0]]
    reps = []
    for rep in range(a.reps):
        order = runs[rep % len(runs):] + runs[:rep % len(runs)]
        got = {}
        for name in order:
            if name == "ours":
                got[name] = run_ours(a, policy, rm, prompts, extra)
            elif name == "before":
                got[name] = run_ours(a, policy, rm, prompts, extra, before, "before")
            elif name.startswith("without "):
                got[name] = run_ours(a, policy, rm, prompts, extra, name=name,
                                     ablate=name.split()[1])
            else:
                got[name] = run_trl(a, py, policy, rm, ids_file, no_gc=name == "trl_no_gc")
            load.append(os.getloadavg()[0])
            print(f"rep {rep} {name:9s} " + "  ".join(f"{k} {v:.3f}" for k, v in got[name].items()
                                                     if isinstance(v, float)), flush=True)
        for key, base in (("ratio", "trl_no_gc"), ("ratio_before", "before"),
                          *((f"ratio_{n}", n) for n in got if n.startswith("without "))):
            if base in got:
                got[key] = got["ours"]["step"] / got[base]["step"]
                if "cpu" in got["ours"]:
                    got[key + "_cpu"] = got["ours"]["cpu"] / got[base]["cpu"]
        reps.append(got)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": cpu_model(),
              "load_average_1min": {"min": min(load), "max": max(load)},
              "config": {k: v for k, v in vars(a).items() if k != "json_out"}, "reps": reps}
    for name in runs:
        result[name] = {k: statistics.median(r[name][k] for r in reps) for k in reps[0][name]}
    for key in reps[0]:
        if key.startswith("ratio"):
            result[key] = statistics.median(r[key] for r in reps)
    return result


def table(result: dict) -> str:
    rows = ["| run | step s | CPU s/step | gc.collect s | generate s | score (wait) s "
            "| reference s | train s |", "|---|---|---|---|---|---|---|---|"]
    names = {"trl": "TRL 1.12 PPOTrainer", "trl_no_gc": "TRL, gc.collect a no-op",
             "ours": "policy-trainer ppo", "before": f"policy-trainer ppo at "
             f"{result['config'].get('baseline')}"}
    ablated = [k for k in result if k.startswith("without ")]
    for name in ablated:
        names[name] = f"policy-trainer ppo, {name}: {ABLATIONS[name.split()[1]]}"
    for name in (*RUNS, "before", *ablated):
        r = result.get(name)
        if r is None:
            continue
        cpu = f"{r['cpu']:.3f}" if "cpu" in r else ""
        if name not in ("trl", "trl_no_gc"):
            rows.append(f"| {names[name]} | {r['step']:.3f} | {cpu} | | "
                        + " | ".join(f"{r[p]:.3f}" for p in PHASES) + " |")
        else:
            rows.append(f"| {names[name]} | {r['step']:.3f} | {cpu} | {r['gc']:.3f} "
                        "| | | | |")
    n = len(result["reps"])
    for key, what in (("ratio", "ours / TRL without gc.collect"),
                      ("ratio_before", f"ours / ours at {result['config'].get('baseline')}"),
                      *((f"ratio_{n}", f"ours / ours {n}") for n in ablated)):
        if key in result:
            rows.append("")
            reps = ", ".join(format(r[key], ".2f") for r in result["reps"])
            cpu = (f"; CPU per step {result[key + '_cpu']:.2f}"
                   if key + "_cpu" in result else "")
            rows.append(f"{what}, step time (median over {n} repetitions of the within-"
                        f"repetition ratio): **{result[key]:.2f}** ({reps}){cpu}")
    load = result["load_average_1min"]
    rows.append(f"\n1-minute load average during the runs: {load['min']:.1f}-{load['max']:.1f}")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 repetition of 4 steps")
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny sizes (8 prompts, 4 tokens, 3 steps), 1 repetition: the test's")
    ap.add_argument("--ours-only", action="store_true", help="our trainer only (no TRL venv)")
    ap.add_argument("--steps", type=int, default=10, help="PPO steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="first steps of each run dropped")
    ap.add_argument("--reps", type=int, default=5, help="repetitions, runs in rotating order")
    ap.add_argument("--prompt-words", type=int, default=12,
                    help="pseudo-words per prompt (12: bench.ppo's prompts, ~28 tokens)")
    ap.add_argument("--batch", type=int, default=BATCH,
                    help="prompts = rollouts per step = the one minibatch and micro-batch")
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="response tokens")
    ap.add_argument("--generation-batch-size", type=int, default=None,
                    help="our prompts per generate call (= chunk sent to the RM; default --batch)")
    ap.add_argument("--ours-args", default="", help="more flags for policy-trainer ppo")
    ap.add_argument("--baseline", metavar="GIT_REF",
                    help="also run the trainer of this commit (git archive), interleaved")
    ap.add_argument("--ablate", metavar="LIST", default="",
                    help=f"also run ours with each of these undone, interleaved: "
                         f"{','.join(ABLATIONS)}")
    ap.add_argument("--cpu", default="0", help="taskset CPU list of every process of a run")
    ap.add_argument("--cache", default=None, help="benchmark model cache (bench.common)")
    ap.add_argument("--work", default="/tmp/rm-bench-trl-ppo", help="scratch folder")
    ap.add_argument("--trl-venv", default=str(TRL_VENV), help="TRL 1.12's virtual environment")
    ap.add_argument("--json-out", help="also write the result as JSON here")
    # the child's own flags (it runs in TRL's venv)
    ap.add_argument("--trl-child", action="store_true", help=argparse.SUPPRESS)
    for flag in ("--policy", "--rm", "--prompt-ids", "--out", "--result"):
        ap.add_argument(flag, help=argparse.SUPPRESS)
    ap.add_argument("--no-gc", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.trl_child:
        trl_child(a)
        return 0
    if a.quick:
        a.reps, a.steps, a.warmup = 1, 4, 1
    if a.dry_run:
        a.reps, a.steps, a.warmup, a.batch, a.new_tokens = 1, 3, 1, 8, 4
    a.generation_batch_size = a.generation_batch_size or a.batch
    if a.cache is None:
        from bench.common import DEFAULT_CACHE
        a.cache = str(DEFAULT_CACHE)
    result = run(a)
    print()
    print(table(result))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
