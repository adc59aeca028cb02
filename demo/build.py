"""``python -m demo.build --out DIR``: build the demo world's artifacts (no model hub needed).

    DIR/base/                  tiny Llama causal LM + byte-level BPE tokenizer (save_pretrained)
    DIR/demos.jsonl            {"prompt", "response"}             for policy-trainer sft
    DIR/prefs.jsonl            {"prompt", "chosen", "rejected"}   for rm-server train
    DIR/prompts.jsonl          {"prompt"}                         for policy-trainer ppo
    DIR/heldout_prompts.jsonl  {"prompt"}   prompts no stage trains on, for gold evaluation
    DIR/world.json             sizes, label noise (Bayes agreement), gold of corpus/demos/ceiling
                               and of the base LM's samples, the pretraining loss curve

The base LM is pretrained with next-token loss on "prompt + continuation </s>" texts of mixed
sentiment, so it writes grammatical reviews of either polarity and knows to stop; SFT then
tilts it positive, and PPO against the RM has room above that up to the ceiling.
Seeded end to end: the same --seed gives the same data (torch training is reproducible on one
machine and thread count).
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from demo import world
from demo.evaluate import evaluate_policy

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


@dataclass
class BuildConfig:
    out: str
    """Output directory (created)."""
    seed: int = 0
    """Seed of every random choice: corpus, data sets, labels, weights."""
    quick: bool = False
    """A small world for tests (overrides the sizes below): a smaller model, ~10 s of training."""
    corpus_size: int = 20000
    """Pretraining texts (prompt + continuation, mixed sentiment)."""
    n_demos: int = 2000
    """SFT demonstrations."""
    n_prefs: int = 4000
    """Labeled preference pairs for the reward model."""
    n_prompts: int = 2000
    """PPO training prompts (drawn with replacement from the training prompts)."""
    n_heldout: int = 256
    """Evaluation prompts, drawn from the held-out prompt openings."""
    vocab_size: int = 600
    """BPE vocabulary size, specials included."""
    hidden_size: int = 128
    """Model width."""
    num_layers: int = 3
    """Transformer blocks."""
    max_positions: int = 96
    """max_position_embeddings: prompt + response must fit (texts here are < 50 tokens)."""
    steps: int = 600
    """Pretraining optimizer steps."""
    batch_size: int = 32
    """Texts per step."""
    lr: float = 3e-3
    """Peak learning rate (AdamW; linear warm-up, cosine decay to a tenth)."""
    max_seconds: float = 85.0
    """Wall-clock budget of pretraining: on a busy machine the schedule anneals on time and stops
    here, with fewer steps (world.json records how many)."""
    eval_samples: int = 256
    """Base-LM samples scored with the gold reward for world.json."""
    threads: int = 0
    """torch.set_num_threads; 0 = auto: 2, or 1 when the load average says the cores are busy
    (on 2 shared cores, 2 threads ran a step of this tiny model 3-7x slower than 1)."""

    def __post_init__(self):
        if self.quick:  # sizes for a test: the whole build in ~15 s on 2 cores
            self.corpus_size, self.n_demos, self.n_prefs = 4000, 200, 300
            self.n_prompts, self.n_heldout, self.eval_samples = 200, 64, 96
            self.hidden_size, self.num_layers = 64, 2
            self.steps, self.lr, self.max_seconds = 200, 5e-3, 12.0


def pick_threads(requested: int) -> int:
    """``requested`` if > 0; else 2 when two cores are idle (1-minute load average), else 1."""
    if requested > 0:
        return requested
    cpus = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return 2 if cpus - load >= 2 else 1


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes, no <unk>), BOS prepended, right padding with <pad>."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    # The BOS gives the first real token a context to be predicted from (SFT and the RM both
    # tokenize the prompt with special tokens, then the response without).
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", padding_side="right",
                                   model_max_length=96)


def make_model(cfg: BuildConfig, tokenizer) -> torch.nn.Module:
    config = AutoConfig.for_model(
        "llama", vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
        intermediate_size=2 * cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=cfg.max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(config)


def pretrain(model, tokenizer, texts: list[str], cfg: BuildConfig) -> list[tuple[int, float]]:
    """Next-token loss on "<s> text </s>"; returns the curve [(step, mean loss of the last 25)].

    The cosine schedule runs on progress = max(step / steps, elapsed / max_seconds): on a busy
    machine training ends inside the time budget with the learning rate annealed, not cut off
    at its peak.
    """
    seqs = [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts)["input_ids"]]
    rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    warmup = max(1, cfg.steps // 20)
    model.train()
    curve, recent, t0 = [], [], time.monotonic()
    bar = tqdm(range(cfg.steps), desc="pretrain", unit="step", file=sys.stderr, mininterval=1.0)
    queue: list[list[list[int]]] = []
    for step in bar:
        if not queue:  # draw 8 batches' worth, cut by length: little padding, still random
            pool = sorted(rng.sample(seqs, 8 * cfg.batch_size), key=len)
            queue = [pool[i:i + cfg.batch_size] for i in range(0, len(pool), cfg.batch_size)]
            rng.shuffle(queue)
        batch = queue.pop()
        T = max(map(len, batch))
        ids = torch.full((len(batch), T), tokenizer.pad_token_id)  # (B, T), right-padded
        for i, s in enumerate(batch):
            ids[i, :len(s)] = torch.tensor(s)
        labels = ids.masked_fill(ids == tokenizer.pad_token_id, -100)
        progress = max(step / cfg.steps, (time.monotonic() - t0) / cfg.max_seconds)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / warmup) * (
                0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))
        # Right padding under a causal mask: real tokens never see the pads, so no attention mask.
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent.append(loss.item())
        if (step + 1) % 25 == 0 or step + 1 == cfg.steps:
            curve.append((step + 1, statistics.fmean(recent[-25:])))
            bar.set_postfix(loss=f"{curve[-1][1]:.3f}")
        if time.monotonic() - t0 > cfg.max_seconds:
            tqdm.write(f"pretrain: time budget {cfg.max_seconds:.0f}s reached at step {step + 1} "
                       "(a busy machine); the schedule annealed on time")
            if not curve or curve[-1][0] != step + 1:
                curve.append((step + 1, statistics.fmean(recent[-25:])))
            break
    bar.close()
    model.eval()
    return curve


def write_jsonl(path: Path, rows) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def gold_stats(pairs: list[tuple[str, str]]) -> dict:
    g = [world.gold(p, r) for p, r in pairs]
    return {"mean": round(statistics.fmean(g), 4), "std": round(statistics.pstdev(g), 4)}


def build(cfg: BuildConfig) -> dict:
    """Build everything into cfg.out; returns the world.json summary."""
    threads = pick_threads(cfg.threads)
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    log = lambda msg: tqdm.write(msg, file=sys.stderr)  # noqa: E731 (keeps order with the bar)

    log(f"[1/5] corpus of {cfg.corpus_size} texts, {cfg.n_demos} demos, {cfg.n_prompts} prompts")
    corpus_pairs = world.corpus_pairs(cfg.corpus_size, rng)
    corpus = [p + r for p, r in corpus_pairs]
    demos = world.make_demos(cfg.n_demos, rng)
    prompts = world.make_prompts(cfg.n_prompts, rng)
    heldout = world.make_prompts(cfg.n_heldout, rng, heldout=True)
    log(f"[2/5] {cfg.n_prefs} preference pairs labeled by the Bradley-Terry labeler")
    prefs = world.make_preference_pairs(cfg.n_prefs, rng)
    write_jsonl(out / "demos.jsonl", ({"prompt": p, "response": r} for p, r in demos))
    write_jsonl(out / "prefs.jsonl", ({"prompt": x.prompt, "chosen": x.chosen,
                                       "rejected": x.rejected} for x in prefs))
    write_jsonl(out / "prompts.jsonl", ({"prompt": p} for p in prompts))
    write_jsonl(out / "heldout_prompts.jsonl", ({"prompt": p} for p in heldout))

    log(f"[3/5] byte-level BPE tokenizer, vocab {cfg.vocab_size}")
    tokenizer = train_tokenizer(corpus, cfg.vocab_size)
    model = make_model(cfg, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[4/5] pretraining a {n_params / 1e6:.2f}M-parameter Llama for {cfg.steps} steps")
    t0, c0 = time.monotonic(), time.process_time()
    curve = pretrain(model, tokenizer, corpus, cfg)
    seconds, cpu_seconds = time.monotonic() - t0, time.process_time() - c0
    model.save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")
    log("        loss " + "  ".join(f"{s}:{loss:.2f}"
                                    for s, loss in curve[:: max(1, len(curve) // 8)])
        + f"  final {curve[-1][1]:.3f} ({seconds:.1f}s wall, {cpu_seconds:.1f}s CPU, "
          f"{threads} thread{'s' * (threads > 1)})")

    log(f"[5/5] scoring {cfg.eval_samples} base-LM samples with the gold reward")
    base = evaluate_policy(str(out / "base"), heldout, cfg.eval_samples, seed=cfg.seed)
    summary = {
        "seed": cfg.seed, "quick": cfg.quick,
        "sizes": {"corpus": len(corpus), "demos": len(demos), "prefs": len(prefs),
                  "prompts": len(prompts), "heldout_prompts": len(heldout),
                  "vocab": len(tokenizer), "params": n_params},
        "labels": {"bayes_agreement": round(world.bayes_agreement(prefs), 4),
                   "mean_p_chosen": round(statistics.fmean(x.p_chosen for x in prefs), 4)},
        "gold": {"corpus": gold_stats(corpus_pairs),
                 "demos": gold_stats(demos),
                 "ceiling": round(world.ceiling(random.Random(cfg.seed + 1),
                                                 n_prompts=50 if cfg.quick else 200), 4),
                 "base_lm": {"mean": round(base["mean_gold"], 4),
                             "stderr": round(base["stderr_gold"], 4),
                             "parse_rate": round(base["parse_rate"], 4)}},
        "pretrain": {"steps": curve[-1][0], "seconds": round(seconds, 1),
                     "cpu_seconds": round(cpu_seconds, 1), "threads": threads,
                     "final_loss": round(curve[-1][1], 4), "curve": curve},
    }
    (out / "world.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv=None) -> None:
    cfg = tyro.cli(BuildConfig, args=argv, prog="python -m demo.build",
                   description=__doc__.split("\n")[0])
    s = build(cfg)
    g = s["gold"]
    print(f"world built in {cfg.out}: {s['sizes']['params'] / 1e6:.2f}M params, "
          f"pretrain {s['pretrain']['seconds']}s, final loss {s['pretrain']['final_loss']:.3f}")
    print(f"gold: base LM {g['base_lm']['mean']:+.3f} ± {g['base_lm']['stderr']:.3f} "
          f"(parse rate {g['base_lm']['parse_rate']:.2f}), corpus {g['corpus']['mean']:+.3f}, "
          f"demos {g['demos']['mean']:+.3f}, ceiling {g['ceiling']:+.3f}; "
          f"label Bayes agreement {s['labels']['bayes_agreement']:.3f}")


if __name__ == "__main__":
    main()
