"""Tiny real checkpoints for tests: a locally trained BPE tokenizer and random-init models.

No model hub: every test model is built from a `transformers` config. Score heads are
re-initialized with real spread (random-init heads are near zero, and a parity test against
near-zero scores passes trivially).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedTokenizerFast,
)

WORDS = ("the a movie film plot actor acting great terrible boring wonderful awful good bad "
         "really very quite not story music scene ending loved hated it was is and but "
         "i you we they this that with without more less best worst fun dull").split()

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20))) for _ in range(n)]


def train_tokenizer(vocab_size: int = 300, pad: str = "own", padding_side: str = "right",
                    bos: bool = True, chat: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE. ``pad``: "own" (a <pad> token), "eos" (pad == eos) or "none"."""
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>",
                "<|tool|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    if bos:
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos_id)])
    kwargs = dict(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                  padding_side=padding_side, model_max_length=128)
    if pad == "own":
        kwargs["pad_token"] = "<pad>"
    elif pad == "eos":
        kwargs["pad_token"] = "</s>"
    fast = PreTrainedTokenizerFast(**kwargs)
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


ARCH_KW = {
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=128),
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    "qwen2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    "mistral": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                    sliding_window=None),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=128),
    "bert": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=128),
}


def make_config(arch: str, tok: PreTrainedTokenizerFast, **overrides):
    kw = dict(ARCH_KW[arch], vocab_size=len(tok), num_labels=1,
              pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
              eos_token_id=tok.eos_token_id)
    kw.update(overrides)
    return AutoConfig.for_model(arch, **kw)


def spread_head(model: torch.nn.Module, seed: int = 0) -> None:
    """Give the score head real spread so scores differ across inputs by O(1)."""
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    g = torch.Generator().manual_seed(seed)
    lin = head if isinstance(head, torch.nn.Linear) else head.out_proj
    with torch.no_grad():
        scale = 2.0 / lin.weight.shape[1] ** 0.5
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * scale)
        if lin.bias is not None:
            lin.bias.fill_(0.1)


def make_reward_model(arch: str, tok: PreTrainedTokenizerFast, out: Path, seed: int = 0,
                      **overrides) -> Path:
    """Save a random-init ``*ForSequenceClassification`` + tokenizer to ``out``."""
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(make_config(arch, tok, **overrides))
    spread_head(model, seed)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_causal_lm(arch: str, tok: PreTrainedTokenizerFast, out: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    cfg = make_config(arch, tok)
    cfg.num_labels = 2  # unused by causal LMs; keep the config plain
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
