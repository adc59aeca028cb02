"""Prefix-shared scoring against the unshared path: k responses to one prompt.

    python -m bench.prefix [--k 8] [--response 64] [--prompt-mult 4] [--repeats 7] [--threads 2]

Builds a ~30M-parameter Llama-style reward model from a config (no hub), then scores the same
batch of k sequences (one prompt of ``prompt_mult x response`` tokens, k different responses)
with ``RewardModel.score`` twice per repeat, sharing on and off, interleaved. Prints medians,
the speed-up, and the largest score difference between the two paths.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build_model(out: Path, vocab: int = 8000) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedTokenizerFast

    if (out / "config.json").exists():
        return out
    words = {f"w{i}": i + 4 for i in range(vocab - 4)}
    words.update({"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    cfg = AutoConfig.for_model("llama", vocab_size=vocab, hidden_size=512, intermediate_size=1536,
                               num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
                               max_position_embeddings=2048, num_labels=1, pad_token_id=3,
                               bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(cfg)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--response", type=int, default=64)
    ap.add_argument("--prompt-mult", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model-dir", default=str(Path(tempfile.gettempdir()) / "rm-bench-30m"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from rm_server.model import RewardModel

    rm = RewardModel(build_model(Path(args.model_dir)))
    n_params = rm.num_parameters
    rng = random.Random(0)
    prompt = [rng.randrange(4, 8000) for _ in range(args.prompt_mult * args.response)]
    seqs = [prompt + [rng.randrange(4, 8000) for _ in range(args.response)] for _ in range(args.k)]
    times = {True: [], False: []}
    scores = {}
    for sharing in (True, False):  # warm-up
        rm.prefix_sharing = sharing
        scores[sharing] = rm.score(seqs)
    for _ in range(args.repeats):
        for sharing in (True, False):  # interleaved: both see the same machine state
            rm.prefix_sharing = sharing
            t0 = time.perf_counter()
            rm.score(seqs)
            times[sharing].append(time.perf_counter() - t0)
    shared, plain = statistics.median(times[True]), statistics.median(times[False])
    diff = max(abs(a - b) for a, b in zip(scores[True], scores[False]))
    print(f"model: {n_params / 1e6:.1f}M params, threads {args.threads}; k={args.k}, "
          f"prompt {len(prompt)} tokens, responses {args.response} tokens")
    print(f"unshared: median {plain * 1e3:.1f} ms   shared: median {shared * 1e3:.1f} ms   "
          f"speed-up {plain / shared:.2f}x   max |score diff| {diff:.2e}")


if __name__ == "__main__":
    main()
