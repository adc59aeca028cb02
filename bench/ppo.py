"""PPO step benchmark: the overlapped pipeline against a strictly sequential one.

The trainer (`policy-trainer ppo`, the real CLI) and a real `rm-server serve` subprocess run on
different cores (`taskset`), as they would on different machines, with one torch thread each.
Both pipelines run the same models, prompts, seeds and sizes; they differ only in when the
trainer waits for the RM (ppo_loop.generate_and_score):

  overlapped   each generation chunk goes out on a ScoreStream as soon as it is generated; the
               RM scores it while the trainer computes the chunk's reference log-probs and
               values and generates the next chunk; the trainer waits once, after the last one;
  sequential   `--no-rm-overlap`: after each chunk the trainer waits for its scores before
               doing anything else (generate, score, reference, one after the other).

Per step the trainer logs seconds per phase (train_log.jsonl): generate, score (time spent
*waiting* for the RM: the whole round trip when sequential, only what is left uncovered when
overlapped), reference and train. The first step of every run is a warm-up and is dropped;
the figures are medians over the remaining steps and over --reps runs of each pipeline, run in
alternating order. "speed-up" is the median over repetitions of (sequential step time /
overlapped step time) within a repetition. "score / generate" (sequential) says how the RM's
round trip compares with generation; the overlap can hide at most the smaller of the two
(plus the reference forward).

Models: a random-init Llama policy (the reference is the same checkpoint) sharing the 8k BPE of
bench/common.py with the RM (so token ids go on the wire), and the RM named by --rm-model from
bench/common.py. Prompts are lines of the same pseudo-word corpus. The untrained policy rarely
samples EOS, so responses run to --max-new-tokens: the work per step is fixed.

    python -m bench.ppo                    # rm-30m, 64 rollouts a step, 8 steps, 2 repetitions
    python -m bench.ppo --quick            # 1 repetition of 3 steps (under 2 minutes)
    python -m bench.ppo --rm-model rm-7m --json-out ppo.json
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

from bench.common import DEFAULT_CACHE, _pseudo_corpus, ensure_model
from rm_server.launch import start_server

PHASES = ("generate", "score", "reference", "train")
MODES = {"overlapped": [], "sequential": ["--no-rm-overlap"]}
# Llama policy sizes (vocab 8192, tied embeddings): a tiny decoder is what the CPU affords.
POLICIES = {
    "policy-1m": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2),
    "policy-3m": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4),
}


def ensure_policy(name: str, cache: Path) -> Path:
    """A random-init causal LM with the benchmark tokenizer, built once and cached."""
    out = cache / name
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    ensure_model("rm-7m", cache)  # builds and saves the shared tokenizer
    tok = AutoTokenizer.from_pretrained(cache / "tokenizer")
    cfg = AutoConfig.for_model("llama", vocab_size=max(8192, len(tok)),
                               max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               tie_word_embeddings=True, **POLICIES[name])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    tmp = cache / f".{name}.tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def write_prompts(path: Path, n: int = 512, words: int = 12) -> Path:
    lines = [" ".join(line.split()[:words]) for line in _pseudo_corpus(n, seed=1)]
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in lines))
    return path


def run_trainer(args, policy: Path, prompts: Path, address: str, out: Path,
                mode: str) -> list[dict]:
    cmd = ["taskset", "-c", args.trainer_cpus, sys.executable, "-m", "policy_trainer.cli", "ppo",
           "--policy", str(policy), "--rm", address, "--prompts", str(prompts), "--out", str(out),
           "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--mini-batch-size", str(args.batch_size // 4),
           "--micro-batch-size", str(args.batch_size // 4),
           "--generation-batch-size", str(args.generation_batch_size),
           "--rm-chunk-size", str(args.generation_batch_size),
           "--max-new-tokens", str(args.max_new_tokens), "--num-ppo-epochs", str(args.ppo_epochs),
           "--lr", "1e-5", "--torch-threads", "1", "--no-progress", "--no-tensorboard",
           "--checkpoint-every", "0", "--log-rollouts", "0", "--log-every", "1000000",
           "--rm-client-id", mode, "--seed", "0", *MODES[mode]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"bench.ppo: the {mode} trainer failed ({r.returncode}):\n"
                         f"{r.stderr[-3000:]}")
    recs = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    return [r for r in recs if "time/step" in r]


def summarize(steps: list[dict]) -> dict:
    """Medians over the timed steps (the first step of the run is dropped as warm-up)."""
    timed = steps[1:] or steps
    out = {"step": statistics.median(r["time/step"] for r in timed)}
    for p in PHASES:
        out[p] = statistics.median(r[f"time/{p}"] for r in timed)
    out["rm_round_trip"] = statistics.median(r["rm_latency"] for r in timed)
    out["response_length"] = statistics.mean(r["response_length"] for r in timed)
    out["failed"] = sum(r["failed_samples"] for r in steps)
    return out


def run(args) -> dict:
    cache = Path(args.cache)
    rm_dir = ensure_model(args.rm_model, cache)
    policy = ensure_policy(args.policy_model, cache)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    prompts = write_prompts(work / "prompts.jsonl")
    server = start_server(rm_dir, "--num-threads", "1", "--model-name", args.rm_model,
                          cpus=args.server_cpus, timeout=300)
    reps: list[dict] = []
    try:
        for rep in range(args.reps):
            order = list(MODES) if rep % 2 == 0 else list(MODES)[::-1]
            got = {}
            for mode in order:
                out = work / f"{mode}-{rep}"
                shutil.rmtree(out, ignore_errors=True)
                got[mode] = summarize(run_trainer(args, policy, prompts, server.address, out,
                                                  mode))
                print(f"rep {rep} {mode:10s} " + "  ".join(
                    f"{k} {v:.3f}s" for k, v in got[mode].items()
                    if k in ("step", *PHASES)), flush=True)
            got["speedup"] = got["sequential"]["step"] / got["overlapped"]["step"]
            reps.append(got)
    finally:
        server.stop()
    result = {"config": {k: v for k, v in vars(args).items() if k not in ("json_out",)},
              "date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(), "reps": reps}
    for mode in MODES:
        result[mode] = {k: statistics.median(r[mode][k] for r in reps) for k in reps[0][mode]}
    result["speedup"] = statistics.median(r["speedup"] for r in reps)
    seq = result["sequential"]
    result["score_over_generate"] = seq["score"] / seq["generate"] if seq["generate"] else None
    return result


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def table(result: dict) -> str:
    rows = ["| pipeline | step s | generate s | score (wait) s | reference s | train s "
            "| RM round trip per chunk s |", "|---|---|---|---|---|---|---|"]
    for mode in MODES:
        r = result[mode]
        rows.append(f"| {mode} | {r['step']:.3f} | {r['generate']:.3f} | {r['score']:.3f} "
                    f"| {r['reference']:.3f} | {r['train']:.3f} | {r['rm_round_trip']:.3f} |")
    rows.append("")
    rows.append(f"speed-up (sequential / overlapped step time, median of {len(result['reps'])} "
                f"repetitions): {result['speedup']:.2f}x; sequential score / generate = "
                f"{result['score_over_generate']:.2f}; rollouts failed: "
                f"{sum(r[m]['failed'] for r in result['reps'] for m in MODES)}")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 repetition of 3 steps")
    ap.add_argument("--rm-model", default="rm-30m", choices=["rm-7m", "rm-30m"])
    ap.add_argument("--policy-model", default="policy-3m", choices=sorted(POLICIES))
    ap.add_argument("--steps", type=int, default=8, help="PPO steps per run (the first is warm-up)")
    ap.add_argument("--reps", type=int, default=2, help="runs of each pipeline, alternating")
    ap.add_argument("--batch-size", type=int, default=64, help="rollouts per PPO step")
    ap.add_argument("--generation-batch-size", type=int, default=16,
                    help="prompts per generate call (= chunk sent to the RM)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--ppo-epochs", type=int, default=1)
    ap.add_argument("--trainer-cpus", default="0", help="taskset CPU list of the trainer")
    ap.add_argument("--server-cpus", default="1", help="taskset CPU list of the RM server")
    ap.add_argument("--cache", default=str(DEFAULT_CACHE), help="benchmark model cache")
    ap.add_argument("--work", default="/tmp/rm-bench-ppo", help="scratch folder for the runs")
    ap.add_argument("--json-out", help="also write the result as JSON here")
    args = ap.parse_args(argv)
    if args.quick:
        args.reps, args.steps = 1, 3
    if args.batch_size % 4 or args.batch_size % args.generation_batch_size:
        ap.error("--batch-size must be a multiple of 4 and of --generation-batch-size")
    result = run(args)
    print()
    print(table(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
