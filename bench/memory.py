"""Peak memory per rank, and step time, of one PPO step and one reward-model training step at a
few hundred million parameters: fp32 full, bf16 full, bf16 + LoRA, bf16 full FSDP2 over 2 ranks.

    python -m bench.memory [--layers 12] [--hidden 1024] [--steps 2] [--json]

The model is a Llama built from a config (no download; 12 layers of 1024, vocabulary 32000,
untied embeddings: 220M parameters as a causal LM, 187M as a reward model). Every (task,
variant) runs in a fresh process, through the trainer's own code (``scaling.Run``,
``ppo_nets.build``, ``ppo_update``, ``rm_train.train_step``); FSDP2 runs under torchrun, 2 ranks
on gloo, one thread each. Each process builds its models, then resets its peak RSS (VmHWM,
``/proc/self/clear_refs``) and runs ``--steps`` steps:

- PPO step (per rank: 8 rollouts, prompts of 64 random tokens, 32 sampled tokens): generate,
  reference log-probs and values, π_old in the first epoch's layout, rewards/GAE/whitening on
  random scores (no RM), one epoch of one minibatch of 2 micro-batches of 4, both AdamWs;
- RM step (per rank: 8 pairs of 128 tokens, micro-batches of 4): Bradley-Terry forward and
  backward, clip, AdamW.

Reported per rank: the peak RSS over the steps (weights, gradients, AdamW moments, activations,
allocator and the process itself: python + torch + transformers, given as ``base``), the bytes
of the training state counted from the tensors (parameters as stored, an fp32 gradient per
trainable parameter, AdamW's moments), and the time of the last step (the first allocates the
AdamW state). Figures and the machine they were measured on: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {  # name -> (--dtype, --lora-r, ranks)
    "fp32 full": ("float32", 0, 1),
    "bf16 full": ("bfloat16", 0, 1),
    "bf16 + LoRA r16": ("bfloat16", 16, 1),
    "bf16 full FSDP2 x2": ("bfloat16", 0, 2),
}
PROMPT, RESPONSE, ROLLOUTS, PAIRS, PAIR_LEN, MICRO = 64, 32, 8, 8, 128, 4


def _vm(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _config(args):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "llama", hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64, vocab_size=args.vocab, max_position_embeddings=512,
        tie_word_embeddings=False, num_labels=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _state_bytes(modules, optimizers) -> dict:
    """Bytes on this rank: parameters as stored (a shard under FSDP), a gradient per trainable
    parameter (fp32, the size of its master), AdamW's moments."""
    def local(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = {id(p): p for m in modules for p in m.parameters()}.values()
    state = sum(local(v) for opt in optimizers for s in opt.state.values() for v in s.values()
                if hasattr(v, "numel") and v.dim() > 0)
    return {"params": sum(local(p) for p in params),
            "grads": sum(local(p) for p in params if p.requires_grad),
            "optimizer": state,
            "n_params": sum(p.numel() for p in params),
            "n_trainable": sum(p.numel() for p in params if p.requires_grad)}


def _ppo(args, run, dtype: str, lora_r: int):
    import torch
    from transformers import AutoModelForCausalLM

    from policy_trainer import ppo_nets, ppo_setup, rollout
    from policy_trainer.experience import reference_forwards
    from policy_trainer.ppo_config import PPOConfig
    from policy_trainer.ppo_loop import rewards_and_advantages
    from policy_trainer.ppo_update import layout, ppo_update, rollout_logprobs

    world = run.dist.world_size
    cfg = PPOConfig(policy="-", rm="127.0.0.1:1", prompts="-", out="-", dtype=dtype,
                    lora_r=lora_r, lora_alpha=2.0 * max(lora_r, 1), batch_size=ROLLOUTS * world,
                    mini_batch_size=ROLLOUTS * world, micro_batch_size=MICRO,
                    max_new_tokens=RESPONSE, num_ppo_epochs=1)
    run.cfg = cfg
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(_config(args))
    reference = None if lora_r else AutoModelForCausalLM.from_config(_config(args))
    if reference is not None:
        reference.load_state_dict(lm.state_dict())
    nets = ppo_nets.build(cfg, run, lm, reference, None)
    models = ppo_setup.Models(None, lm.config, 0, 2, [2], None, None, nets=nets)
    everything = ppo_setup.build_optimizers(cfg, models, args.steps)
    optimizers = (everything["optimizer"], everything["value_optimizer"])
    gen = rollout.sampling_config(RESPONSE, 1.0, 0, 1.0, [2], 0)
    gen.min_new_tokens = RESPONSE  # every response full length: the same work every step
    g = torch.Generator().manual_seed(run.dist.rank)

    def step(s: int) -> dict:
        times = {}
        t0 = time.perf_counter()
        prompts = torch.randint(3, args.vocab, (ROLLOUTS, PROMPT), generator=g).tolist()
        ro = rollout.generate(nets.policy, prompts, list(range(ROLLOUTS)), gen, [2], 0, s,
                              run.device)
        times["generate"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        reference_forwards(ro, nets, 1.0)
        first = layout(ROLLOUTS, cfg, ROLLOUTS, s, run.dist.rank, 0)
        primed = rollout_logprobs(ro, nets, cfg, [mb for mini in first for mb in mini],
                                  prime=True)
        times["reference"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        rewards_and_advantages(ro, torch.randn(ROLLOUTS, generator=g), 0.05, (0.0, 1.0), cfg,
                               run.dist)
        ppo_update(ro, nets, optimizers, cfg, run, s, ROLLOUTS, primed)
        times["train"] = time.perf_counter() - t2
        return times

    modules = [nets.policy] if nets.shared else [nets.policy, nets.critic, nets.reference]
    return step, modules, optimizers


def _rm(args, run, dtype: str, lora_r: int):
    import torch
    from transformers import AutoModelForSequenceClassification

    from policy_trainer.optim import build_optimizer
    from policy_trainer.prefs import EncodedPair
    from policy_trainer.rm_train import TrainConfig, train_step

    cfg = TrainConfig(data="-", base="-", out="-", dtype=dtype, lora_r=lora_r,
                      lora_alpha=2.0 * max(lora_r, 1), batch_size=PAIRS * run.dist.world_size,
                      micro_batch_size=MICRO)
    run.cfg = cfg
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(_config(args))
    model = run.prepare(model, "SEQ_CLS").train()
    opt, _ = build_optimizer(model, args.steps, lr=1e-5, schedule="constant", warmup_ratio=0.0)
    g = torch.Generator().manual_seed(0)

    def step(s: int) -> dict:
        t0 = time.perf_counter()
        pairs = [EncodedPair(*(torch.randint(3, args.vocab, (2, PAIR_LEN), generator=g)
                               .tolist()), 0.0, i) for i in range(cfg.batch_size)]
        run.mean(train_step(model, run.share(pairs), cfg, MICRO, run.device))
        run.clip_grad_norm(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {"train": time.perf_counter() - t0}

    return step, [model], [opt]


def child(args) -> None:
    """One (task, variant) in this process (one rank of it under torchrun)."""
    import torch

    from policy_trainer.scaling import Run, ScaleConfig

    torch.set_num_threads(args.threads)
    base = _vm("VmRSS:")  # python + torch + transformers + ours, imported
    dtype, lora_r, _ = VARIANTS[args.variant]
    run = Run(ScaleConfig(dtype=dtype, lora_r=lora_r), torch.device("cpu"))
    step, modules, optimizers = (_ppo if args.task == "ppo" else _rm)(args, run, dtype, lora_r)
    before = _vm("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
    times = [step(s) for s in range(args.steps)]
    record = {"task": args.task, "variant": args.variant, "rank": run.dist.rank,
              "world": run.dist.world_size, "base_rss": base, "setup_rss": before,
              "peak_rss": _vm("VmHWM:"), "last_step": times[-1],
              "step_s": sum(times[-1].values()), **_state_bytes(modules, optimizers)}
    Path(args.result_dir, f"rank{run.dist.rank}.json").write_text(json.dumps(record))
    run.close()


def measure(args, task: str, variant: str) -> list[dict]:
    """Run one (task, variant) in fresh processes; the record of every rank."""
    ranks = VARIANTS[variant][2]
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["-m", "bench.memory", "--child", task, "--variant", variant, "--result-dir",
                tmp, "--threads", str(1 if ranks > 1 else args.threads), "--steps",
                str(args.steps), "--layers", str(args.layers), "--hidden", str(args.hidden),
                "--vocab", str(args.vocab)]
        if ranks > 1:
            argv = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                    str(ranks), *argv]
        env = {**os.environ, "OMP_NUM_THREADS": "1" if ranks > 1 else str(args.threads),
               "TOKENIZERS_PARALLELISM": "false"}
        subprocess.run([sys.executable, *argv], check=True, env=env,
                       cwd=Path(__file__).resolve().parents[1])
        return [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def report(results: dict) -> str:
    lines = []
    for task, rows in results.items():
        fp32 = max((r["peak_rss"] for r in rows.get("fp32 full", [])), default=math.nan)
        bf16_state = sum(rows["bf16 full"][0][k] for k in ("params", "grads", "optimizer")) \
            if "bf16 full" in rows else math.nan
        lines += [f"\n{task.upper()} step, per rank (GiB; state = params + grads + AdamW)",
                  "| variant | params (trainable) | state | peak RSS | peak - base | "
                  "vs fp32 peak | state vs 1-rank bf16 | step s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for variant, recs in rows.items():
            r = max(recs, key=lambda x: x["peak_rss"])  # the worst rank
            state = sum(r[k] for k in ("params", "grads", "optimizer"))
            lines.append(
                f"| {variant} | {r['n_params'] / 1e6:.0f}M ({r['n_trainable'] / 1e6:.1f}M) | "
                f"{gib(state)} | {gib(r['peak_rss'])} | {gib(r['peak_rss'] - r['base_rss'])} "
                f"| {r['peak_rss'] / fp32:.2f}x | {state / bf16_state:.2f}x | "
                f"{r['step_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch threads, one-rank variants")
    ap.add_argument("--tasks", default="ppo,rm")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json", action="store_true", help="print every record as JSON too")
    ap.add_argument("--child", choices=("ppo", "rm"), help=argparse.SUPPRESS)
    ap.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--result-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.task = args.child
        child(args)
        return 0
    results = {}
    for task in args.tasks.split(","):
        results[task] = {v: measure(args, task, v) for v in args.variants.split(",")}
        print(f"{task}: done", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=1))
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
