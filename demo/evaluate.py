"""Sampling a policy and scoring it with the hidden gold reward: the demo's ground truth.

    python -m demo.evaluate --model DIR --prompts heldout_prompts.jsonl [--n-samples 256]

``generate`` samples plainly (temperature only: no top-k, no top-p), as PPO rollouts do, so the
gold measured here is the gold of the distribution being trained.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from demo import world


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 40,
             temperature: float = 1.0, seed: int = 0, batch_size: int = 64) -> list[str]:
    """One sampled response per prompt, decoded without specials and cut at the first EOS."""
    torch.manual_seed(seed)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation appends on the right
    out: list[str] = []
    try:
        for s in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[s:s + batch_size], return_tensors="pt", padding=True)
            ids = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0,
                                 top_p=1.0, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            for row in ids[:, enc["input_ids"].shape[1]:].tolist():  # (B, new) -> lists
                if tokenizer.eos_token_id in row:
                    row = row[:row.index(tokenizer.eos_token_id)]
                out.append(tokenizer.decode(row, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return out


def score(prompts: list[str], responses: list[str]) -> dict:
    """Gold statistics of (prompt, response) samples: mean, stderr, parse rate, and the samples."""
    golds = [world.gold(p, r) for p, r in zip(prompts, responses)]
    parsed = [world.recognizes(p, r) for p, r in zip(prompts, responses)]
    n = len(golds)
    return {
        "mean_gold": statistics.fmean(golds),
        "stderr_gold": statistics.pstdev(golds) / math.sqrt(n) if n > 1 else float("nan"),
        "parse_rate": sum(parsed) / n,
        "samples": [{"prompt": p, "response": r, "gold": g}
                    for p, r, g in zip(prompts, responses, golds)],
    }


def evaluate_policy(model_dir: str, prompts: list[str], n_samples: int = 256, seed: int = 0,
                    max_new_tokens: int = 40, temperature: float = 1.0) -> dict:
    """Mean gold of ``n_samples`` responses sampled from the causal LM in ``model_dir``.

    Prompts are used in turn (``prompts[i % len(prompts)]``), so every prompt counts equally.
    Returns {"mean_gold", "stderr_gold", "parse_rate", "samples": [{"prompt", "response", "gold"}]}.
    """
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chosen = [prompts[i % len(prompts)] for i in range(n_samples)]
    return score(chosen, generate(model, tokenizer, chosen, max_new_tokens, temperature, seed))


def read_prompts(path: str) -> list[str]:
    with open(path) as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m demo.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="causal LM directory (save_pretrained)")
    ap.add_argument("--prompts", required=True, help='JSONL of {"prompt": ...}')
    ap.add_argument("--n-samples", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--show", type=int, default=5, help="samples to print")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    res = evaluate_policy(args.model, read_prompts(args.prompts), args.n_samples, args.seed,
                          temperature=args.temperature)
    for s in res["samples"][:args.show]:
        print(f"  {s['gold']:+.2f}  {s['prompt']}|{s['response']}")
    print(f"mean gold {res['mean_gold']:+.3f} ± {res['stderr_gold']:.3f}, "
          f"parse rate {res['parse_rate']:.2f} ({args.n_samples} samples)")


if __name__ == "__main__":
    main()
