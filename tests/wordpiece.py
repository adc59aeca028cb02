"""A tiny BERT pair reward model for tests: a WordPiece vocabulary trained locally (no model
hub), wrapped in ``BertTokenizerFast`` (``tokenizer(p, r)`` gives ``[CLS] p [SEP] r [SEP]``
with ``token_type_ids``), and a random-init ``BertForSequenceClassification`` whose score head
pooler and token-type embeddings have real spread (type ids must matter for a parity test to mean
anything)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import BertWordPieceTokenizer
from transformers import AutoConfig, AutoModelForSequenceClassification, BertTokenizerFast

from tests import tiny


def bert_tokenizer(tmp: Path, vocab_size: int = 300) -> BertTokenizerFast:
    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(tiny.corpus(), vocab_size=vocab_size)
    tmp.mkdir(parents=True, exist_ok=True)
    wp.save_model(str(tmp))
    return BertTokenizerFast.from_pretrained(str(tmp), model_max_length=128)


def make_bert_pair_rm(out: Path, num_labels: int = 1, seed: int = 0,
                      id2label: dict | None = None) -> Path:
    """Save a BERT pair RM (tokenizer included) to ``out``."""
    tok = bert_tokenizer(out.parent / f"{out.name}-vocab")
    cfg = AutoConfig.for_model("bert", **tiny.ARCH_KW["bert"], vocab_size=len(tok),
                               num_labels=num_labels, pad_token_id=tok.pad_token_id,
                               type_vocab_size=2, initializer_range=0.3)
    if id2label:
        cfg.id2label, cfg.label2id = id2label, {v: k for k, v in id2label.items()}
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(cfg)
    tiny.spread_head(model, seed)
    with torch.no_grad():  # segment B must move the score: make the type embeddings differ
        model.bert.embeddings.token_type_embeddings.weight.normal_(0.0, 1.0)
        dense = model.bert.pooler.dense  # BERT's head reads tanh(dense([CLS])): spread it too
        dense.weight.normal_(0.0, 2.0 / dense.weight.shape[1] ** 0.5)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
