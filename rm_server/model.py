"""Loading a HuggingFace reward-model checkpoint and scoring batches of token ids.

Two scoring paths, both equal to ``AutoModelForSequenceClassification`` run on each sample
alone (the parity rule, tested per architecture):

- "last-token" (decoder RMs: GPT-2, Llama, Qwen2/3, Mistral, GPT-NeoX): the backbone runs with
  its final norm replaced by identity, then ``kernels.last_token_score`` gathers the scored row
  of each sequence, applies the final norm and the score head to those B rows only (HF runs
  norm and head over all B*T positions, then picks one row per sequence). The last decoder
  layer's MLP, too, runs on the B scored rows only (rm_server/last_token.py): its output at
  any other position feeds nothing, while its attention still sees every position.
- "forward" (anything else, e.g. BERT/DeBERTa encoder RMs, decoders of other families): the
  model's own forward on the padded batch. A decoder whose tokenizer has no pad id is the
  exception: HF's forward then reads the last position and refuses batches > 1, so we run its
  backbone on the padded batch and its ``score`` head on each sequence's last real row
  (checked against the model's own forward at load), or, for a model without that shape, run
  the samples one at a time (``forward_mode``).

``compile=True`` runs the padded batches through ``torch.compile`` (inductor, dynamic shapes)
of the same module, fusing the element-wise work between the matmuls; :meth:`warmup` compiles
every graph serving needs before the server says SERVING; the shared-prefix path stays eager.

The scored position follows the scoring recipe (protos/recipes.py): HF's rule, the rightmost
token whose id != pad_token_id (so when pad == eos a trailing EOS is skipped and the token
before it is scored; with no pad id, the last token), or OpenRLHF's, the last token whatever
its id. We compute it on each unpadded sequence, then right-pad the batch: causal attention
and position ids of the real tokens are then exactly those of the sample run alone, whatever
else shares the batch (left padding would shift Llama's positions). ``token_type_ids`` (an
encoder's pair encoding) go to the model's forward, padded with 0.

A model with ``num_labels = K`` scores K heads: :meth:`RewardModel.score_heads` returns every
head's score beside the reward, their aggregation (rm_server/heads.py).
"""

from __future__ import annotations

import inspect
import logging
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

import kernels
from protos.encoding import Encoder, tokenizer_fingerprint
from protos.recipes import choose_recipe
from rm_server.checkpoint import (
    ModelLoadError,
    check_source,
    read_reward_stats,
    resolve_model,
    weights_version,
)
from rm_server.heads import heads_of, rewards_with_heads
from rm_server.last_token import (
    FinalNorm,
    ScoredRowsMLP,
    describe_norm,
    last_layer_mlp,
    last_token_index,
    prefix_groups,
)
from rm_server.prefix_batch import cache_keyword, score_shared

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# model_type -> attribute of the backbone holding the final norm
LAST_TOKEN_FAMILIES = {"gpt2": "ln_f", "llama": "norm", "qwen2": "norm", "qwen3": "norm",
                       "mistral": "norm", "gpt_neox": "final_layer_norm"}
log = logging.getLogger("rm_server")


class RewardModel:
    """A loaded reward model: tokenizer, encoder, and ``score(list of id lists) -> rewards``."""

    def __init__(self, path: str | Path, dtype: str = "float32", device: str = "cpu",
                 max_length: int | None = None, truncation: str = "left",
                 name: str | None = None, prefix_sharing: bool = True, min_shared_prefix: int = 16,
                 compile: bool = False, *, tokenizer: str | None = None,
                 chat_template: str | None = None, trust_remote_code: bool = False,
                 revision: str | None = None, recipe: str | None = None,
                 reward_head: str | None = None, head_weights: str | None = None,
                 reward_aggregation=(None, None), weights_hash: str | None = None):
        self.path = check_source(path, revision, tokenizer, trust_remote_code)
        if dtype not in DTYPES:
            raise ModelLoadError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        tok_path = resolve_model(tokenizer, None, "--tokenizer") if tokenizer else self.path
        self._load(tok_path, dtype, trust_remote_code, chat_template)
        self.model = self.model.to(device).eval()
        self.name = name or (self.path.resolve().name if Path(path).exists() else str(path))
        self.prefix_sharing, self.min_shared_prefix = prefix_sharing, min_shared_prefix
        self.dtype, self.device = dtype, torch.device(device)
        self.pad_token_id = self.model.config.pad_token_id
        self.vocab_size = self.model.get_input_embeddings().weight.shape[0]
        self.max_length = self._max_length(max_length)
        self.recipe, self.recipe_reason = self._choose_recipe(recipe)
        # the pad id of the scored-position rule: None reads the last token (OpenRLHF)
        self.position_pad = self.pad_token_id if self.recipe.position == "last-non-pad" else None
        try:
            self.heads = heads_of(self.config, self.model.config.num_labels, reward_head,
                                  head_weights, reward_aggregation)  # ensembles: config.json
        except ValueError as e:
            raise ModelLoadError(str(e)) from None
        self.version = weights_hash or weights_version(self.path)  # known: not read again
        self.num_parameters = sum(p.numel() for p in self.model.parameters())
        self.architecture = type(self.model).__name__
        self._final_norm: FinalNorm | None = None
        self._rows_mlp: ScoredRowsMLP | None = None
        self.scoring_path = self._setup_last_token()
        self.takes_types = (self.scoring_path == "forward" and "token_type_ids"
                            in inspect.signature(self.model.forward).parameters)
        type_vocab = getattr(self.config, "type_vocab_size", None) if self.takes_types else None
        self.encoder = Encoder(self.tokenizer, self.max_length, self.vocab_size, truncation,
                               self.recipe, type_vocab or None)
        self.tokenizer_fingerprint = tokenizer_fingerprint(self.tokenizer, self.recipe)
        self.forward_mode = self._setup_forward() if self.scoring_path == "forward" else None
        self.reward_stats = read_reward_stats(self.path)
        self.compiled = compile
        on_backbone = self.scoring_path == "last-token" or self.forward_mode == "rows"
        module = self._backbone if on_backbone else self.model
        self._padded_module = self._compile(module) if compile else module

    def _load(self, tok_path: Path, dtype: str, trust_remote_code: bool,
              chat_template: str | None) -> None:
        """Config, tokenizer and model; whatever the loaders raise, the user sees one line."""
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        remote = {"trust_remote_code": True} if trust_remote_code else {}
        try:
            self.config = AutoConfig.from_pretrained(self.path, **remote)
            self.tokenizer = AutoTokenizer.from_pretrained(tok_path, **remote)
            self.model, info = AutoModelForSequenceClassification.from_pretrained(
                self.path, dtype=DTYPES[dtype], output_loading_info=True, **remote)
            if chat_template:
                self.tokenizer.chat_template = Path(chat_template).read_text()
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise ModelLoadError(f"cannot load {self.path}: {type(e).__name__}: {first}") from None
        self._check_loaded(info["missing_keys"])

    def _choose_recipe(self, requested: str | None):
        try:
            recipe, why = choose_recipe(requested, self.path, self.config.model_type)
        except ValueError as e:
            raise ModelLoadError(str(e)) from None
        log.info("scoring recipe %s (%s): %s", recipe.name, why, recipe.summary)
        return recipe, why

    def _check_loaded(self, missing_keys: list[str]) -> None:
        """Every weight from the checkpoint: a head that transformers had to initialise (a
        base model saved under a classifier's config) would score noise."""
        if missing_keys:
            raise ModelLoadError(
                f"{self.path} lacks {len(missing_keys)} weights of {type(self.model).__name__} "
                f"(e.g. {sorted(missing_keys)[0]}): not a trained reward model; train one with "
                f"`rm-server train --base {self.path} ...`")

    def _max_length(self, requested: int | None) -> int:
        cfg = self.model.config
        limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        candidates = [x for x in (limit, requested) if x]
        if tok_max and tok_max < 1_000_000 and not requested:
            candidates.append(tok_max)
        return int(min(candidates)) if candidates else 2048

    def _setup_last_token(self) -> str:
        """Detach the backbone's final norm so it runs on B rows in the kernel, not B*T."""
        norm_attr = LAST_TOKEN_FAMILIES.get(self.model.config.model_type)
        backbone = getattr(self.model, self.model.base_model_prefix, None)
        head = getattr(self.model, "score", None)
        if norm_attr is None or backbone is None or not isinstance(head, nn.Linear):
            return "forward"
        final_norm = describe_norm(getattr(backbone, norm_attr, None))
        if final_norm is None:
            return "forward"
        self._backbone, self._head, self._final_norm = backbone, head, final_norm
        self.cache_keyword = cache_keyword(backbone)  # prefix_batch.py: `cache` or the old name
        setattr(backbone, norm_attr, nn.Identity())
        mlp = last_layer_mlp(backbone)
        self._rows_mlp = ScoredRowsMLP(mlp) if mlp is not None else None
        return "last-token"

    def _setup_forward(self) -> str:
        """How the forward path batches: "batch" (the model's own forward), "rows" or "single".

        With no pad id HF's forward reads the last position and refuses batches > 1: a decoder
        head (``score``, a Linear) then runs on each sequence's last real row ("rows") if that
        reproduces the model's own forward on a probe; else one sample at a time ("single").
        """
        if self.pad_token_id is not None and self.position_pad is not None:
            return "batch"  # the model's own forward reads HF's rule, the recipe's
        backbone = getattr(self.model, self.model.base_model_prefix, None)
        head = getattr(self.model, "score", None)
        if not isinstance(backbone, nn.Module) or not isinstance(head, nn.Linear):
            return self._single()
        self._backbone, self._head = backbone, head
        ids = torch.tensor([self.encoder.encode_text("a probe", " of the head")[0] or [0]],
                           device=self.device)  # (1, T)
        with torch.inference_mode():
            want = self.model(input_ids=ids).logits[0, 0].float().item()
            hidden = backbone(input_ids=ids, use_cache=False).last_hidden_state  # (1, T, H)
            got = head(hidden[:, -1]).float()[0, 0].item()
        tol = 1e-4 if self.dtype == "float32" else 2e-2
        return "rows" if abs(got - want) <= tol * max(1.0, abs(want)) else self._single()

    def _single(self) -> str:
        """The model's own forward, one sample at a time: its rule for the scored token is
        HF's, so a recipe scoring the last token whatever its id needs a pad-less model."""
        if self.position_pad is None and self.pad_token_id is not None:
            raise ModelLoadError(f"recipe {self.recipe.name} scores the last token, but "
                                 f"{self.architecture}'s head cannot be applied to a chosen "
                                 "row: pass another --recipe")
        return "single"

    def _compile(self, module: nn.Module) -> nn.Module:
        """The padded path's module under ``torch.compile(dynamic=True)``.

        One graph for every batch size and length >= 2; dynamo specializes 0 and 1, so a
        batch of one is a second graph (warmup compiles it), and the last-token path pads to
        length >= 2 (causal attention hides the pad column) instead of a third. On the forward
        path a one-token batch compiles once more, on its first use.
        """
        return torch.compile(module, dynamic=True)

    def _scored_rows(self, index: torch.Tensor | None):
        """Within: the last layer's MLP runs on rows ``index`` only (None: on none)."""
        return self._rows_mlp.rows(index) if self._rows_mlp is not None else nullcontext()

    def collate(self, seqs: list[list[int]], min_length: int = 1
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-pad to (B, T) ids and mask; the scored index of each row, computed unpadded."""
        t = max(min_length, max(len(s) for s in seqs))
        fill = self.pad_token_id if self.pad_token_id is not None else 0
        ids = torch.full((len(seqs), t), fill, dtype=torch.long)
        mask = torch.zeros((len(seqs), t), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = torch.as_tensor(s, dtype=torch.long)
            mask[b, : len(s)] = 1
        index = torch.tensor([last_token_index(s, self.position_pad) for s in seqs])
        return ids, mask, index

    def _type_ids(self, typed: list[list[int] | None], t: int) -> dict:
        """``token_type_ids`` (B, T), right-padded with 0, when any sequence has them and the
        model takes them; else no argument at all."""
        if not self.takes_types or all(x is None for x in typed):
            return {}
        types = torch.zeros((len(typed), t), dtype=torch.long)
        for b, x in enumerate(typed):
            if x is not None:
                types[b, : len(x)] = torch.as_tensor(x, dtype=torch.long)
        return {"token_type_ids": types.to(self.device)}

    def score(self, seqs: list[list[int]], token_type_ids: list | None = None) -> list[float]:
        """Rewards (fp32) for a batch of token-id sequences (:meth:`score_heads`)."""
        return self.score_heads(seqs, token_type_ids)[0]

    @torch.inference_mode()
    def score_heads(self, seqs: list[list[int]], token_type_ids: list | None = None
                    ) -> tuple[list[float], list[tuple[float, ...]]]:
        """Rewards (fp32) and every head's score (empty for one head) for a batch of token-id
        sequences, on the model thread. ``token_type_ids``: one list or None per sequence
        (default: what the ids carry, ``protos.encoding.TypedIds``). Samples that share a long
        prefix (k responses to one prompt) run it once, their suffixes against its KV cache
        (rm_server/prefix_batch.py)."""
        if token_type_ids is None:
            token_type_ids = [getattr(s, "token_type_ids", None) for s in seqs]
        groups, rest = ([], list(range(len(seqs))))
        if self.prefix_sharing and self.scoring_path == "last-token":
            groups, rest = prefix_groups(seqs, self.position_pad, self.min_shared_prefix)
        parts = [(members, score_shared(self, [seqs[i] for i in members], p,
                                        [last_token_index(seqs[i], self.position_pad)
                                         for i in members]))
                 for p, members in groups]
        if rest:
            parts.append((rest, self._score_padded([seqs[i] for i in rest],
                                                   [token_type_ids[i] for i in rest])))
        out = torch.empty(len(seqs), parts[0][1].shape[1], device=self.device)  # (B, K)
        for members, scores in parts:
            out[torch.tensor(members, device=self.device)] = scores.float()
        return rewards_with_heads(out, self.heads)  # one device->host sync per batch

    def _score_padded(self, seqs: list[list[int]], types: list) -> torch.Tensor:
        if self.forward_mode == "single":  # HF's forward on each sample alone, as it allows
            return torch.cat([self._forward_padded([s], [t]) for s, t in zip(seqs, types)])
        return self._forward_padded(seqs, types)

    def _forward_padded(self, seqs: list[list[int]], types: list) -> torch.Tensor:
        """Head scores (B, K) of a right-padded batch."""
        last_token = self.scoring_path == "last-token"
        min_length = 2 if self.compiled and last_token else 1  # see _compile
        ids, mask, index = (x.to(self.device) for x in self.collate(seqs, min_length))
        if last_token:
            with self._scored_rows(index):
                hidden = self._padded_module(input_ids=ids, attention_mask=mask,
                                             use_cache=False).last_hidden_state  # (B, T, H)
            rewards = self._head_on_rows(hidden, index)
        elif self.forward_mode == "rows":
            hidden = self._padded_module(input_ids=ids, attention_mask=mask,
                                         use_cache=False).last_hidden_state  # (B, T, H)
            rows = hidden[torch.arange(len(seqs), device=self.device), index]  # (B, H)
            rewards = self._head(rows).float()  # (B, K)
        else:
            rewards = self._padded_module(input_ids=ids, attention_mask=mask,
                                          **self._type_ids(types, ids.shape[1])).logits  # (B, K)
        return rewards  # (B, K) head scores

    def _head_on_rows(self, hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        n = self._final_norm
        return kernels.last_token_score(hidden, index, self._head.weight, self._head.bias,
                                        n.kind, n.weight, n.bias, n.eps)  # (B, K)

    @torch.inference_mode()  # as score(): dynamo guards on the grad mode
    def warmup(self) -> None:
        """One small batch through the whole path (allocations, lazy init) before SERVING.

        Compiled: the padded path's two graphs instead, a batch of one and one of two rows
        of unequal length, so both exist before the first request (a compile costs seconds to
        minutes; inductor caches it on disk for the next start).
        """
        probe = self.encoder.encode_text("warm up", " the model")[0] or [0]
        if not self.compiled:
            self.score([probe, probe[: max(1, len(probe) // 2)]])
            return
        try:
            self._score_padded([probe], [None])
            self._score_padded([probe + probe, probe], [None, None])
        except Exception as e:  # no C++ compiler, an op inductor cannot lower, ...
            msg = (str(e).strip().splitlines() or [""])[0]
            raise ModelLoadError(f"--compile: torch.compile failed: {type(e).__name__}: "
                                 f"{msg}") from e
