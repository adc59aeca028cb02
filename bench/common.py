"""Shared helpers for the benchmarks: benchmark models, sample pools, CPU pinning, /metrics.

Models are built from `transformers` configs (no model hub) with a locally trained byte-level
BPE (8k vocabulary, trained on a generated corpus of pseudo-words), saved under a cache
directory (default /tmp/rm-bench-models, outside the repository) and reused on later runs.
Benchmark inputs are random token ids (TokenIds), so the tokenizer only has to be real and
consistent with the embedding size; its speed never enters a measurement.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import statistics
import urllib.request
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("RM_BENCH_MODELS", "/tmp/rm-bench-models"))
VOCAB = 8192
FIRST_ID = 16  # ids below this are the special tokens (and a margin): never sent as content

# name -> Llama config. Parameter counts (tied embeddings off, vocab 8192):
#   rm-7m:  2.1M embedding + 6 x 0.79M layers  ~=  6.8M
#   rm-30m: 4.2M embedding + 8 x 3.16M layers  ~= 29.5M
#   rm-1b:  16.8M embedding + 16 x 60.8M layers ~= 990M (Llama-3.2-1B's shape: GQA 32/8 heads)
MODELS = {
    "rm-7m": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=4),
    "rm-30m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=8),
    "rm-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8),
}
# Saved in this dtype (default float32): 2 GB of bf16 instead of 4 GB of fp32 for rm-1b.
SAVE_DTYPES = {"rm-1b": "bfloat16"}
MAX_POSITIONS = 1024

# length mix -> (low, high) token counts, uniform
LENGTHS = {"short": (48, 80), "long": (448, 576), "mixed": (16, 512)}


def _pseudo_corpus(n_lines: int = 20000, seed: int = 0) -> list[str]:
    """Random syllable words with a Zipf-ish frequency: enough distinct pairs for 8k merges."""
    rng = random.Random(seed)
    cons, vows = "bcdfghjklmnprstvwz", "aeiou"
    syll = [c + v for c in cons for v in vows] + [v + c for c in cons for v in vows]
    words = ["".join(rng.choice(syll) for _ in range(rng.randint(1, 4))) for _ in range(30000)]
    # cumulative weights once: choices(words, weights) would re-add 30k weights per line (13 s);
    # the lines are the same, since choices() accumulates the weights exactly like this
    cum = list(itertools.accumulate(1.0 / (i + 1) ** 0.8 for i in range(len(words))))
    lines = []
    for _ in range(n_lines):
        k = rng.randint(5, 30)
        lines.append(" ".join(rng.choices(words, cum_weights=cum, k=k)))
    return lines


def build_tokenizer(vocab_size: int = VOCAB):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_pseudo_corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", padding_side="right",
                                   model_max_length=MAX_POSITIONS)


def ensure_model(name: str, cache: Path = DEFAULT_CACHE, device: str = "cpu") -> Path:
    """The checkpoint directory of benchmark model ``name``, built on first use.

    ``device``: where the weights are initialised (``cuda`` builds rm-1b in seconds).
    """
    out = cache / name
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cache.mkdir(parents=True, exist_ok=True)
    tok_dir = cache / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file():
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(tok_dir)
    else:
        tok = build_tokenizer()
        tok.save_pretrained(tok_dir)
    vocab = max(VOCAB, len(tok))
    cfg = AutoConfig.for_model("llama", vocab_size=vocab, num_labels=1,
                               max_position_embeddings=MAX_POSITIONS,
                               pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
                               **MODELS[name])
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForSequenceClassification.from_config(cfg)
    with torch.no_grad():  # a head with real spread (random-init heads are near zero)
        g = torch.Generator().manual_seed(0)
        w = model.score.weight
        w.copy_(torch.randn(w.shape, generator=g) * 2.0 / w.shape[1] ** 0.5)
    model.to(getattr(torch, SAVE_DTYPES.get(name, "float32")))
    tmp = cache / f".{name}.tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def num_parameters(model_dir: Path) -> int:
    import json
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    h, i, n, v = (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"],
                  cfg["vocab_size"])
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h
    return v * h + n * per_layer + h + h  # embedding, layers, final norm, head


def sample_pool(mix: str, n: int, vocab: int = VOCAB, seed: int = 0) -> list[list[int]]:
    """``n`` random token-id sequences with lengths uniform in LENGTHS[mix] (fixed by seed)."""
    rng = random.Random(f"{mix}-{seed}")
    lo, hi = LENGTHS[mix]
    return [[rng.randrange(FIRST_ID, vocab) for _ in range(rng.randint(lo, hi))]
            for _ in range(n)]


def padded_tokens(lengths_per_batch: list[list[int]]) -> int:
    return sum(max(b) * len(b) for b in lengths_per_batch if b)


def parse_cpus(spec: str | None) -> set[int] | None:
    """'0', '0,1', '0-3' -> a set of CPU ids (None or '' -> None: no pinning)."""
    if not spec:
        return None
    cpus: set[int] = set()
    for part in spec.split(","):
        if "-" in part:
            a, b = part.split("-")
            cpus.update(range(int(a), int(b) + 1))
        else:
            cpus.add(int(part))
    return cpus


def taskset_prefix(spec: str | None) -> list[str]:
    return ["taskset", "-c", spec] if spec else []


_METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)$")


def scrape(metrics_port: int | None, host: str = "127.0.0.1") -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (empty when there is no metrics port)."""
    if not metrics_port:
        return {}
    with urllib.request.urlopen(f"http://{host}:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = _METRIC_LINE.match(line.strip())
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def delta(after: dict[str, float], before: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(q / 100 * (len(s) - 1)))))
    return s[k]


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def ensure_venv(venv: Path, pins: list[str], shared: tuple[str, ...] | list[str], who: str) -> Path:
    """A baseline's own virtual environment (made once): ``pins`` plus this environment's
    versions of ``shared``; returns its python."""
    import importlib.metadata as md
    import subprocess
    import sys

    py = venv / "bin" / "python"
    marker = venv / ".installed"
    if marker.is_file():
        return py
    pins = [*pins, *(f"{p}=={md.version(p)}" for p in shared)]
    print(f"{who}: making {venv} ({' '.join(pins)})", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", *pins], check=True)
    marker.write_text(" ".join(pins) + "\n")
    return py
