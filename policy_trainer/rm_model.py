"""The reward model as it trains: a base loaded as a 1-label sequence classifier, and its
scores for batches of token ids.

A causal-LM base gets a scalar head on the last token (InstructGPT), initialized
N(0, 1/(H+1)) as in Stiennon et al. (2020); a sequence-classification base keeps its head.
Weights train in fp32. With no pad token, pad = eos on the tokenizer and the config, so the
checkpoint scores batches.

Scoring pads on the right with the checkpoint's ``pad_token_id`` and reads the model's own
``*ForSequenceClassification`` output, so a batch scores exactly what each sequence scores
alone (HF's rule: the last non-pad token), and what ``rm-server serve`` returns for it. The
scoring recipe (protos/recipes.py, attached by :func:`use_recipe`) may read the last token
whatever its id instead (OpenRLHF's rule: its EOS even when pad == eos); ids that carry
``token_type_ids`` (an encoder's pair encoding) pass them to the model.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import torch

from policy_trainer import precision, rm_pack
from policy_trainer.data import pad
from policy_trainer.errors import UserError
from policy_trainer.prefs import EncodedPair
from protos.recipes import DEFAULT_RECIPE, Recipe, choose_recipe

DROPOUT_KEYS = ("dropout", "attention_dropout", "hidden_dropout", "attn_pdrop", "resid_pdrop",
                "embd_pdrop", "summary_first_dropout", "hidden_dropout_prob",
                "attention_probs_dropout_prob", "classifier_dropout")


def load_model(path: str | Path, seed: int, disable_dropout: bool, members: int = 1):
    """A sequence-classification model in fp32 with one label, or ``members`` labels (an
    ensemble's heads, rm_ensemble.py); (model, names of new head weights)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path)
    archs = config.architectures or []
    classifier = any(a.endswith("ForSequenceClassification") for a in archs)
    if classifier and config.num_labels != members:
        what = "a reward model has 1" if members == 1 else f"--ensemble asks for {members}"
        raise UserError(f"{path} is a classifier with {config.num_labels} labels; {what}")
    names = ["reward"] if members == 1 else [f"member_{k}" for k in range(members)]
    config.num_labels = members
    config.id2label, config.label2id = dict(enumerate(names)), {n: k for k, n in enumerate(names)}
    if disable_dropout:
        text = config.get_text_config()
        for obj in {id(config): config, id(text): text}.values():
            for k in DROPOUT_KEYS:
                if isinstance(getattr(obj, k, None), float):
                    setattr(obj, k, 0.0)
    torch.manual_seed(seed)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        path, config=config, dtype=torch.float32, output_loading_info=True)
    prefix = model.base_model_prefix + "."
    missing = sorted(info["missing_keys"])
    backbone = [k for k in missing if k.startswith(prefix) and "pooler" not in k]
    if backbone:
        raise UserError(f"{path}: {len(backbone)} backbone weights missing (e.g. {backbone[0]}): "
                        f"is it a checkpoint of {type(model).__name__}'s architecture?")
    head = [k for k in missing if not k.startswith(prefix)]
    with torch.no_grad():  # Stiennon et al. 2020: reward head ~ N(0, 1/(d_model + 1))
        for name in head:
            p = model.get_parameter(name)
            p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1] + 1)) if p.dim() == 2 else p.zero_()
    if disable_dropout:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    # nn.Embedding(padding_idx=pad) zeroes the gradient of every occurrence of the pad id. A base
    # built with no pad id has none; its checkpoint, saved with pad = eos, would freeze the EOS
    # row that chat templates use mid-sequence, and a resumed run would train differently from
    # an uninterrupted one. Padding sits right of the scored token (causal) or is masked, so it
    # sends no gradient anyway: let every row train, whatever the load path.
    emb = model.get_input_embeddings()
    if getattr(emb, "padding_idx", None) is not None:
        emb.padding_idx = None
    return model, head


def ensure_pad(tokenizer, config) -> str:
    """Make sure the checkpoint can score batches; returns a note for the summary."""
    text = config.get_text_config()
    note = ""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise UserError("the tokenizer has neither a pad nor an eos token; "
                            "add a pad token to the base")
        tokenizer.pad_token = tokenizer.eos_token
        note = " (pad = eos, set by train)"
    if text.pad_token_id is None:
        text.pad_token_id = tokenizer.pad_token_id
    return f"pad_token_id {text.pad_token_id}{note}"


def use_recipe(model, requested: str | None, source: str | Path) -> Recipe:
    """The scoring recipe (``--recipe``; else the one stored in ``source``; an encoder's pair
    encoding; "rm-server"), attached to ``model`` for :func:`forward_rewards`; says which."""
    try:
        recipe, why = choose_recipe(requested, source, model.config.model_type)
    except ValueError as e:
        raise UserError(str(e)) from None
    model.scoring_recipe = recipe
    print(f"recipe: {recipe.name} ({why}): {recipe.summary}")
    return recipe


def recipe_of(model) -> Recipe:
    return getattr(model, "scoring_recipe", None) or DEFAULT_RECIPE


def forward_rewards(model, seqs: list[list[int]], device: torch.device) -> torch.Tensor:
    """Scalar rewards (B,) fp32 of the model's own forward (its first head); with grad if grad
    is enabled."""
    return forward_heads(model, seqs, device)[:, 0]


def forward_heads(model, seqs: list[list[int]], device: torch.device) -> torch.Tensor:
    """Every head's score (B, K) fp32 of the model's own forward (K = 1 for a plain RM, the
    members of an ensemble); with grad if grad is enabled."""
    pad_id = model.config.get_text_config().pad_token_id
    if pad_id is None:  # HF refuses batches without a pad id: score one at a time
        return torch.cat([_heads_one(model, s, device) for s in seqs])
    if recipe_of(model).position == "last":  # the last token, whatever its id (OpenRLHF)
        pad_id = _absent_last_id(seqs, pad_id)
    ids, mask = pad(seqs, pad_id)  # (B, T) each, right-padded
    with _pad_token_id(model, pad_id):
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                    **_type_ids(seqs, ids.shape[1], device))
    return out.logits.float()  # (B, K)


def forward_pair_heads(model, chosen: list[list[int]], rejected: list[list[int]],
                       device: torch.device, packed: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every head's scores of m pairs: (r_chosen, r_rejected), each (m, K) fp32, with grad if
    grad is enabled. ``packed``: a pair's prompt once, pairs packed, the head on the scored rows
    (rm_pack.py), where :func:`packed_forward_off` finds nothing against it; else (or with
    ``packed`` False) the plain padded forward of the 2m sequences. Both give the same scores
    and gradients up to float rounding."""
    m = len(chosen)
    if packed and packed_forward_off(model, chosen + rejected) is None:
        with precision.autocast(getattr(model, "compute_dtype", "float32"), device):
            return rm_pack.forward_pairs(model, chosen, rejected, device,
                                         recipe_of(model).position)
    r = forward_heads(model, list(chosen) + list(rejected), device)
    return r[:m], r[m:]


def packed_forward_off(model, seqs: list[list[int]] = ()) -> str | None:
    """Why the packed forward does not apply (None: it does)."""
    if any(getattr(s, "token_type_ids", None) is not None for s in seqs):
        return "the ids carry token_type_ids"
    return rm_pack.unpackable(model, max((len(s) for s in seqs), default=0))


def forward_rewards_one(model, seq: list[int], device: torch.device) -> torch.Tensor:
    return _heads_one(model, seq, device)[:, 0]


def _heads_one(model, seq: list[int], device: torch.device) -> torch.Tensor:
    ids = torch.tensor([seq], dtype=torch.long, device=device)
    return model(input_ids=ids, **_type_ids([seq], len(seq), device)).logits.float()  # (1, K)


def _type_ids(seqs: list[list[int]], t: int, device) -> dict:
    """``token_type_ids`` (B, T), right-padded with 0, when the ids carry them."""
    typed = [getattr(s, "token_type_ids", None) for s in seqs]
    if all(x is None for x in typed):
        return {}
    types = torch.zeros((len(seqs), t), dtype=torch.long)
    for b, x in enumerate(typed):
        if x is not None:
            types[b, : len(x)] = torch.as_tensor(x, dtype=torch.long)
    return {"token_type_ids": types.to(device)}


def _absent_last_id(seqs: list[list[int]], pad_id: int) -> int:
    """A pad id that ends no sequence, so HF's rule (the rightmost id != pad) finds each
    sequence's last token: padding is masked and right of it, so its id changes nothing."""
    last = {s[-1] for s in seqs}
    return pad_id if pad_id not in last else min(set(range(len(last) + 1)) - last)


@contextmanager
def _pad_token_id(model, pad_id: int):
    """The model reads ``config.pad_token_id`` to find the scored token: set it for a call."""
    configs = list({id(c): c for c in (model.config, model.config.get_text_config())}.values())
    old = [c.pad_token_id for c in configs]
    for c in configs:
        c.pad_token_id = pad_id
    try:
        yield
    finally:
        for c, v in zip(configs, old):
            c.pad_token_id = v


@torch.no_grad()
def score_pairs(model, pairs: list[EncodedPair], device: torch.device, batch_size: int = 32,
                progress: bool = False, heads: bool = False, packed: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected), each (N,) fp32 on the CPU (the first head), or (N, K) with
    ``heads`` (every head: an ensemble's members), in the order of ``pairs``.

    Pairs are scored in length-sorted batches (less padding), packed where the model allows
    (:func:`forward_pair_heads`); the order is restored.
    """
    from tqdm.auto import tqdm

    order = sorted(range(len(pairs)), key=lambda i: pairs[i].length)
    k = model.config.num_labels if heads else 1
    r_w, r_l = torch.empty(len(pairs), k), torch.empty(len(pairs), k)
    starts = range(0, len(order), batch_size)
    for s in tqdm(starts, desc="scoring", unit="batch", disable=not progress, leave=False):
        idx = order[s:s + batch_size]
        w, r = forward_pair_heads(model, [pairs[i].chosen for i in idx],
                                  [pairs[i].rejected for i in idx], device, packed)
        r_w[idx], r_l[idx] = w[:, :k].cpu(), r[:, :k].cpu()  # (m, k) each
    return (r_w, r_l) if heads else (r_w[:, 0], r_l[:, 0])
