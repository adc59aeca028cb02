"""Reward-model training against TRL's ``RewardTrainer``: same data, base and hyper-parameters,
side by side, interleaved.

    python -m bench.rm_train [--reps 3] [--pairs 4000] [--epochs 3] [--batch-size 32]
        [--lr 1e-3] [--threads 1] [--trl-venv .venv-trl116] [--json FILE] [--profile]

The world: synthetic Bradley-Terry preferences with a known gold reward (demo.labeler). Each
pair is a prompt of 16-64 neutral words (conversation context, as in HH-RLHF where the prompt
is the longer part) and two responses of 6-16 words, about half of them sentiment words
(valences ~ N(0, 1); the prompt's words have none); the gold reward is the response's
sentiment per word of the conversation (:func:`gold`). The base is a tiny Llama
causal LM built from a config (hidden 64, 2 layers, no hub), saved with a word-level
tokenizer (one token per word, BOS added, its own pad token).

Both trainers see the same token ids: TRL's layout (prompt + response + EOS, tokenized with
special tokens), which ``policy-trainer rm --recipe trl`` reproduces. Both run fp32 on the CPU
with the same threads, AdamW at ``--lr`` with a cosine schedule after a 5% warm-up, gradient
clipping at 1.0, no weight decay, dropout off, no evaluation during training. TRL runs at its
fastest fair settings: bf16 autocast off (the CPU has no bf16 matmul advantage) and gradient
checkpointing off (RewardConfig turns both on by default). TRL runs twice per repetition, with
its default sampler and with its length-grouped one (``train_sampling_strategy=
"group_by_length"``: batches of similar lengths, less padding, another data order), each a side
of the interleaved comparison (``--trl-samplers``); ours is compared with each, and
``ratio_pairs_per_s`` is against the faster.

Timed: the training loop (first step to last optimizer step; model loading, tokenization,
the final save and scoring are outside), pairs/s = pairs x epochs / loop seconds. TRL runs in
its own virtual environment (``--trl-venv``, default ``.venv-trl116`` at the repository root,
ignored by git), made on first use: ``python -m venv`` + ``pip install trl==1.16.0
torch==2.13.0`` and this venv's transformers, accelerate and datasets, so both trainers run the
same model code. Ours runs as a user runs it (``policy-trainer rm``, through a wrapper that only
reads the clock at its first step and its last train_log row). Quality, of
both checkpoints by one evaluator here: held-out agreement with the labeler's choices on
``--heldout`` new pairs, and Spearman of the RM's Δ = r_a − r_b with the gold Δ on those pairs
(a Bradley-Terry reward is fixed only up to a constant per prompt).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRL_VENV = ROOT / ".venv-trl116"
# pip specs of TRL's venv: TRL 1.16.0 and our own versions of what it shares with us
TRL_PINS = ("trl==1.16.0", "torch==2.13.0")
SHARED = ("transformers", "accelerate", "datasets")
N_NEUTRAL, N_SENTIMENT = 400, 120
PROMPT_WORDS, RESPONSE_WORDS = (16, 64), (6, 16)
BASE = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


# -- the world (no project imports above here: the TRL worker imports this module too) ----------

def vocabulary() -> tuple[list[str], dict[str, float]]:
    """(every word, valence of each word): neutral words n*, sentiment words s* ~ N(0, 1)."""
    rng = random.Random(7)
    neutral = [f"n{i}" for i in range(N_NEUTRAL)]
    sentiment = [f"s{i}" for i in range(N_SENTIMENT)]
    valence = {w: 0.0 for w in neutral} | {w: rng.gauss(0.0, 1.0) for w in sentiment}
    return neutral + sentiment, valence


def gold(prompt: str, response: str, valence: dict[str, float]) -> float:
    """The response's sentiment per word of the conversation: 80 x the sum of its words'
    valences over the words of prompt and response (a mean over the sequence, which the
    last token's attention reads at once)."""
    words = response.split()
    return 80.0 * sum(valence[w] for w in words) / (len(prompt.split()) + len(words))


def make_data(n_pairs: int, seed: int) -> list[tuple[str, str, str]]:
    """(prompt, a, b) triples: prompts of neutral words, responses half sentiment words."""
    words, valence = vocabulary()
    neutral = [w for w in words if valence[w] == 0.0]
    sentiment = [w for w in words if valence[w] != 0.0]
    rng = random.Random(seed)

    def response() -> str:
        words = [rng.choice(sentiment if rng.random() < 0.5 else neutral)
                 for _ in range(rng.randint(*RESPONSE_WORDS))]
        words[rng.randrange(len(words))] = rng.choice(sentiment)  # at least one
        return " " + " ".join(words)

    return [(" ".join(rng.choice(neutral) for _ in range(rng.randint(*PROMPT_WORDS))),
             response(), response()) for _ in range(n_pairs)]


def build_base(out: Path) -> Path:
    """The tiny Llama causal LM and its word-level tokenizer (built once)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    if (out / "config.json").exists():
        return out
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {w: i for i, w in enumerate(specials + vocabulary()[0])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>",
                                   model_max_length=BASE["max_position_embeddings"])
    cfg = AutoConfig.for_model("llama", vocab_size=len(vocab), bos_token_id=1, eos_token_id=2,
                               pad_token_id=3, tie_word_embeddings=False, **BASE)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    fast.save_pretrained(out)
    return out


# -- TRL, in its own venv -------------------------------------------------------------------------

def trl_worker(a) -> None:
    """Train with TRL's RewardTrainer; print one JSON line (the loop's seconds and steps)."""
    import datasets
    import torch
    import trl
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import RewardConfig, RewardTrainer

    hf_logging.set_verbosity_error()
    torch.set_num_threads(a.threads)
    records = [json.loads(line) for line in Path(a.data).read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(a.base)
    model = AutoModelForSequenceClassification.from_pretrained(a.base, num_labels=1,
                                                               dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    times: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if "begin" not in times:
                times["begin"], times["cpu_begin"] = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            times["end"], times["cpu_end"] = time.perf_counter(), time.process_time()

    extra = {}
    if a.trl_sampler == "group_by_length":  # the sampler reads lengths from this column
        extra = dict(train_sampling_strategy="group_by_length", length_column_name="length",
                     remove_unused_columns=False)  # else the column is gone before the sampler
        for r in records:
            r["length"] = len(r["prompt"].split()) + max(len(r["chosen"].split()),
                                                         len(r["rejected"].split()))
    args = RewardConfig(output_dir=a.out, num_train_epochs=a.epochs,
                        per_device_train_batch_size=a.batch_size, learning_rate=a.lr,
                        lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.0,
                        max_grad_norm=1.0, bf16=False, gradient_checkpointing=False,
                        use_cpu=True, report_to=[], save_strategy="no", eval_strategy="no",
                        logging_steps=50, seed=0, disable_tqdm=True, dataloader_num_workers=0,
                        **extra)
    trainer = RewardTrainer(model=model, args=args, processing_class=tok,
                            train_dataset=datasets.Dataset.from_list(records),
                            callbacks=[Clock()])
    out = trainer.train()
    trainer.save_model(a.out)
    print(json.dumps({"seconds": times["end"] - times["begin"],
                      "cpu_seconds": times["cpu_end"] - times["cpu_begin"],
                      "steps": out.global_step, "train_runtime": out.metrics["train_runtime"],
                      "trl": trl.__version__, "torch": torch.__version__}))


# -- ours, as a user runs it, with a clock ------------------------------------------------------

def ours_worker(argv: list[str]) -> None:
    """``policy-trainer`` with ``argv``, timed as TRL is: from the first step's start to the
    end of the last (its train_log row, written after the optimizer step), wall and CPU."""
    from policy_trainer import cli, rm_train, runlog

    times: dict[str, float] = {}
    step, write = rm_train.train_step, runlog.RunLog.write

    def timed_step(*args, **kwargs):
        if "begin" not in times:
            times["begin"], times["cpu_begin"] = time.perf_counter(), time.process_time()
        return step(*args, **kwargs)

    def timed_write(self, row):
        write(self, row)
        if row.get("split") == "train":
            times["end"], times["cpu_end"] = time.perf_counter(), time.process_time()
            times["steps"] = row["step"]

    rm_train.train_step, runlog.RunLog.write = timed_step, timed_write
    rc = cli.main(argv)
    if rc:
        sys.exit(rc)
    print(json.dumps({"rc": rc, "seconds": times["end"] - times["begin"],
                      "cpu_seconds": times["cpu_end"] - times["cpu_begin"],
                      "steps": times["steps"]}))


# -- the runs -------------------------------------------------------------------------------------

def ensure_trl_venv(venv: Path) -> Path:
    """TRL 1.16's venv (made once; the pins above); returns its python."""
    from bench.common import ensure_venv  # here: the TRL child runs this file as a script

    return ensure_venv(venv, list(TRL_PINS), SHARED, "bench.rm_train")


def run_trl(a, work: Path, rep: int, sampler: str = "default") -> dict:
    out = work / f"trl-{sampler}-{rep}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [a.trl_python, "-m", "bench.rm_train", "--trl-worker",
           "--data", str(work / "train.jsonl"), "--base", str(work / "base"), "--out", str(out),
           "--threads", str(a.threads),
           "--epochs", str(a.epochs), "--batch-size", str(a.batch_size), "--lr", str(a.lr),
           "--trl-sampler", sampler]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"TRL failed:\n{p.stderr[-4000:]}")
    result = json.loads(p.stdout.strip().splitlines()[-1])
    return {**result, "wall": time.perf_counter() - t0, "out": str(out)}


def ours_command(a, work: Path, out: Path) -> list[str]:
    """The flags of ``policy-trainer`` (the benchmark runs them through :func:`ours_worker`)."""
    return ["rm", "--data", str(work / "train.jsonl"),
            "--base", str(work / "base"), "--out", str(out), "--recipe", "trl",
            "--epochs", str(a.epochs), "--batch-size", str(a.batch_size), "--lr", str(a.lr),
            "--schedule", "cosine", "--warmup-ratio", "0.05", "--max-grad-norm", "1.0",
            "--eval-fraction", "0", "--save-every", "0", "--threads", str(a.threads),
            "--no-progress", "--log-every", "0", *a.ours_args]


def run_ours(a, work: Path, rep: int) -> dict:
    out = work / f"ours-{rep}"
    for d in (out, out.parent / f"{out.name}.checkpoints"):  # a fresh run, not a resume
        shutil.rmtree(d, ignore_errors=True)
    cmd = [sys.executable, "-m", "bench.rm_train", "--ours-worker",
           *ours_command(a, work, out)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"policy-trainer rm failed:\n{p.stderr[-4000:]}")
    result = json.loads(p.stdout.strip().splitlines()[-1])
    forward = next((x for x in p.stdout.splitlines() if x.startswith("forward:")), "")
    return {**result, "wall": wall, "out": str(out), "forward": forward}


def quality(model_dir: str, heldout: list[tuple[str, str, str, bool]], valence) -> dict:
    """Held-out agreement with the labels, and Spearman of the RM's Δ = r_a − r_b with the
    gold Δ over the held-out pairs (offset-free: Bradley-Terry fixes a reward only up to a
    constant per prompt, so scores of different prompts are not comparable)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from policy_trainer.rm_metrics import spearman
    from policy_trainer.rm_model import forward_rewards
    from protos.encoding import Encoder, TextInput
    from protos.recipes import RECIPES

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    enc = Encoder(tok, BASE["max_position_embeddings"], len(tok), recipe=RECIPES["trl"])
    seqs = [enc.encode(TextInput(x, y)).ids for x, ya, yb, _ in heldout for y in (ya, yb)]
    with torch.no_grad():
        r = torch.cat([forward_rewards(model, seqs[i:i + 256], torch.device("cpu"))
                       for i in range(0, len(seqs), 256)])
    ra, rb = r[0::2], r[1::2]
    a_wins = torch.tensor([w for *_, w in heldout])
    agree = ((ra > rb) == a_wins).float().mean().item()
    gold_delta = [gold(x, ya, valence) - gold(x, yb, valence) for x, ya, yb, _ in heldout]
    return {"agreement": agree, "spearman": spearman((ra - rb).numpy(), gold_delta)}


def profile_steps(a, work: Path) -> None:
    """What pays, in process: one training step (forward, backward, AdamW) per batch of the
    same data, each variant in turn, interleaved; median ms per step and the token slots the
    backbone computes (padding included)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    from policy_trainer import rm_pack, rm_scored_rows
    from policy_trainer.rm_model import forward_heads, load_model
    from protos.encoding import Encoder, TextInput
    from protos.recipes import RECIPES

    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(work / "base")
    model, _ = load_model(work / "base", 0, True)
    model.config.pad_token_id = tok.pad_token_id
    model.train()
    enc = Encoder(tok, BASE["max_position_embeddings"], len(tok), recipe=RECIPES["trl"])
    rows = [json.loads(x) for x in (work / "train.jsonl").read_text().splitlines()]
    rows = rows[: a.batch_size * a.profile_steps]
    pairs = [(enc.encode(TextInput(r["prompt"], r["chosen"])).ids,
              enc.encode(TextInput(r["prompt"], r["rejected"])).ids) for r in rows]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    cpu = torch.device("cpu")

    def padded(c, r):
        x = forward_heads(model, c + r, cpu)
        return x[: len(c)], x[len(c):]

    def packed(share, scored_rows, direct=True):
        def fn(c, r):
            rm_scored_rows.direct_layer = real if direct else lambda backbone, layer: False
            try:
                return rm_pack.forward_pairs(model, c, r, cpu, "last-non-pad", scored_rows,
                                             share)
            finally:
                rm_scored_rows.direct_layer = real
        return fn

    real = rm_scored_rows.direct_layer
    variants = {"padded (TRL's layout; ours before)": (padded, None),
                "packed, each prompt twice": (packed(False, False), False),
                "packed, a pair's prompt once": (packed(True, False), True),
                "+ last layer's attention fn, MLP on rows": (packed(True, True, False), True),
                "+ last layer on the scored rows (Llama)": (packed(True, True), True)}
    times = {k: [] for k in variants}
    slots = {k: 0 for k in variants}
    batches = [pairs[i:i + a.batch_size] for i in range(0, len(pairs), a.batch_size)]
    for batch in batches:
        c, r = [x for x, _ in batch], [y for _, y in batch]
        for name, (fn, share) in variants.items():
            t0 = time.perf_counter()
            r_w, r_l = fn(c, r)
            (-F.logsigmoid(r_w - r_l).mean()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - t0)
            slots[name] += (len(batch) * 2 * max(len(s) for s in c + r) if share is None else
                            rm_pack.pack(c, r, tok.pad_token_id, share=share,
                                         hidden=BASE["hidden_size"]).slots)
    base_ms = statistics.median(times["padded (TRL's layout; ours before)"]) * 1e3
    print(f"{len(batches)} steps of {a.batch_size} pairs, {a.threads} thread(s), median ms/step:")
    for name in variants:
        ms = statistics.median(times[name]) * 1e3
        print(f"  {name:42s} {ms:7.1f} ms  {base_ms / ms:4.2f}x  "
              f"{slots[name] / len(batches):7.0f} token slots/step")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=4000)
    ap.add_argument("--heldout", type=int, default=4000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of each trainer (1: robust on a shared machine)")
    ap.add_argument("--trl-venv", default=str(TRL_VENV),
                    help="TRL 1.16's virtual environment (made on first use)")
    ap.add_argument("--ours-only", action="store_true", help="our trainer only (no TRL venv)")
    ap.add_argument("--trl-samplers", default="default,group_by_length",
                    help="TRL's samplers to run (train_sampling_strategy), comma-separated, "
                         "each a side of the interleaved comparison: default, group_by_length")
    ap.add_argument("--trl-group-by-length", action="store_true",
                    help="TRL with its length-grouped sampler only (--trl-samplers "
                         "group_by_length)")
    ap.add_argument("--ours-args", nargs=argparse.REMAINDER, default=[],
                    help="extra flags for policy-trainer rm (last on the line)")
    ap.add_argument("--profile", action="store_true",
                    help="time one step of each forward variant in process (what pays)")
    ap.add_argument("--profile-steps", type=int, default=40)
    ap.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    ap.add_argument("--json", default=None, help="write the results here")
    # the TRL worker (run by the benchmark under --trl-python)
    ap.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--trl-sampler", default="default", help=argparse.SUPPRESS)
    if sys.argv[1:2] == ["--ours-worker"]:
        return ours_worker(sys.argv[2:])
    a = ap.parse_args()
    if a.trl_worker:
        return trl_worker(a)

    from demo.labeler import BradleyTerryLabeler

    work = Path(a.work or tempfile.mkdtemp(prefix="bench-rm-train-"))
    work.mkdir(parents=True, exist_ok=True)
    build_base(work / "base")
    _, valence = vocabulary()
    lab = BradleyTerryLabeler(lambda x, y: gold(x, y, valence), seed=1)
    with (work / "train.jsonl").open("w") as f:
        for x, ya, yb in make_data(a.pairs, seed=1):
            f.write(json.dumps(lab.record(x, ya, yb)) + "\n")
    heldout = []
    for x, ya, yb in make_data(a.heldout, seed=2):
        chosen, _, _ = lab.label(x, ya, yb)
        heldout.append((x, ya, yb, chosen == ya))
    bayes = lab.bayes_agreement([(x, ya, yb) for x, ya, yb, _ in heldout])
    if a.profile:
        return profile_steps(a, work)
    pairs_trained = a.pairs * a.epochs
    print(f"{a.pairs} pairs x {a.epochs} epochs, batch {a.batch_size}, lr {a.lr}, "
          f"{a.threads} threads; held-out Bayes agreement {bayes:.3f}; work dir {work}")
    print(f"ours: policy-trainer {' '.join(ours_command(a, work, work / 'ours-N'))}")
    samplers = [] if a.ours_only else trl_samplers(a)
    a.trl_python = str(ensure_trl_venv(Path(a.trl_venv))) if samplers else None
    who_all = [*(TRL_KEY[s] for s in samplers), "ours"]
    runs: dict[str, list[dict]] = {"trl": [], **{w: [] for w in who_all}}
    for rep in range(a.reps):
        k = rep % len(who_all)  # each side in each place of the order in turn
        for who in who_all[k:] + who_all[:k]:
            r = (run_ours(a, work, rep) if who == "ours" else
                 run_trl(a, work, rep, SAMPLER_OF[who]))
            r |= quality(r["out"], heldout, valence)
            r["pairs_per_s"] = pairs_trained / r["seconds"]
            r["pairs_per_cpu_s"] = pairs_trained / r["cpu_seconds"]
            r["load_avg"] = os.getloadavg()
            runs[who].append(r)
            print(f"rep {rep} {who:22s}: loop {r['seconds']:6.2f} s ({r['pairs_per_s']:5.0f} "
                  f"pairs/s), CPU {r['cpu_seconds']:6.2f} s ({r['pairs_per_cpu_s']:5.0f} "
                  f"pairs/CPU-s), process {r['wall']:6.2f} s, agreement {r['agreement']:.4f}, "
                  f"Spearman {r['spearman']:.4f}, load {r['load_avg'][0]:.2f}", flush=True)
    write_json(a, runs, summarize(runs, [TRL_KEY[s] for s in samplers], bayes))


TRL_KEY = {"default": "trl", "group_by_length": "trl_group_by_length"}  # sampler -> runs key
SAMPLER_OF = {v: k for k, v in TRL_KEY.items()}
KEYS = ("seconds", "cpu_seconds", "pairs_per_s", "pairs_per_cpu_s", "agreement", "spearman")


def trl_samplers(a) -> list[str]:
    samplers = ["group_by_length"] if a.trl_group_by_length else a.trl_samplers.split(",")
    bad = [s for s in samplers if s not in TRL_KEY]
    if bad:
        sys.exit(f"--trl-samplers: unknown {bad} (known: {', '.join(TRL_KEY)})")
    return samplers


def summarize(runs: dict[str, list[dict]], trl_keys: list[str], bayes: float) -> dict:
    """Medians of each side; ours against each TRL variant (median pairs/s over median pairs/s,
    and per repetition), ``ratio_pairs_per_s`` against the fastest of them."""

    def med(who, key):
        return statistics.median(r[key] for r in runs[who])

    summary = {f"{who}_{k}": med(who, k) for who in ("ours", *trl_keys) for k in KEYS}
    summary["bayes_agreement"] = bayes
    print(f"median: ours {summary['ours_seconds']:.2f} s ({summary['ours_pairs_per_s']:.0f} "
          f"pairs/s, CPU {summary['ours_cpu_seconds']:.2f} s); agreement "
          f"{summary['ours_agreement']:.4f}, Spearman {summary['ours_spearman']:.4f}")
    for t in trl_keys:
        sm = {"ratio_pairs_per_s": med("ours", "pairs_per_s") / med(t, "pairs_per_s"),
              "ratio_pairs_per_cpu_s": med("ours", "pairs_per_cpu_s") / med(t, "pairs_per_cpu_s"),
              "ratio_per_rep": [o["pairs_per_s"] / x["pairs_per_s"]
                                for o, x in zip(runs["ours"], runs[t])],
              "agreement_diff_points": 100 * (med("ours", "agreement") - med(t, "agreement")),
              "spearman_diff": med("ours", "spearman") - med(t, "spearman")}
        summary[f"vs_{t}"] = sm
        print(f"  vs {t:20s}: {summary[f'{t}_seconds']:.2f} s ({summary[f'{t}_pairs_per_s']:.0f} "
              f"pairs/s, CPU {summary[f'{t}_cpu_seconds']:.2f} s): ours "
              f"{sm['ratio_pairs_per_s']:.2f}x (per rep "
              f"{', '.join(f'{x:.2f}' for x in sm['ratio_per_rep'])}; per CPU second "
              f"{sm['ratio_pairs_per_cpu_s']:.2f}x); agreement {summary[f'{t}_agreement']:.4f} "
              f"({sm['agreement_diff_points']:+.2f} points), Spearman "
              f"{summary[f'{t}_spearman']:.4f} ({sm['spearman_diff']:+.4f})")
    if trl_keys:
        fastest = max(trl_keys, key=lambda t: summary[f"{t}_pairs_per_s"])
        summary |= {"fastest_trl": fastest, **summary[f"vs_{fastest}"]}
    return summary


def write_json(a, runs: dict, summary: dict) -> None:
    if a.json:
        Path(a.json).write_text(json.dumps({
            "args": {k: v for k, v in vars(a).items() if k not in ("data", "base", "out")},
            "machine": f"{platform.machine()} {os.cpu_count()} CPUs", "runs": runs,
            "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
