"""Scoring recipes: how an input becomes the token ids a given reward model scores.

The same (prompt, response) becomes different token ids in different libraries, and a reward
model scores well only the layout it was trained on. A :class:`Recipe` names one layout
explicitly, as data (so it can be stored next to the weights, reported by ``GetModelInfo`` and
hashed into the fingerprint clients compare):

- ``join``: how prompt and response join. "ids": the prompt tokenized alone with the recipe's
  special tokens, then the response's ids without any (a PPO trainer's layout: prompt ids,
  then generated ids); "text": the texts concatenated and tokenized once; "pair": the
  tokenizer's own pair encoding ``tokenizer(prompt, response)`` (e.g. ``[CLS] p [SEP] r [SEP]``
  with ``token_type_ids``), the encoder reward models' layout.
- ``special_tokens``: whether the tokenizer adds its special tokens (BOS, CLS...), to the
  prompt ("ids", even an empty one) or to the whole text ("text").
- ``eos``: what ends the text. "none"; "append": ``eos_token`` appended to the response unless
  it already ends with it (TRL ``RewardTrainer``); "openrlhf": trailing newlines stripped from
  prompt + response, then ``" " + eos_token`` unless it ends with it (OpenRLHF).
- ``chat``: conversations. "tokenize": the chat template applied with ``tokenize=True``
  (whole conversation, no generation prompt, no EOS rule); "text": the template rendered to
  text, the ``eos`` rule applied, tokenized with no special tokens (TRL GRPO, OpenRLHF).
- ``position``: the scored token. "last-non-pad": HF's ``*ForSequenceClassification`` rule
  (the rightmost id != pad; with pad == eos a trailing EOS is skipped); "last": the last token
  of the sequence whatever its id (OpenRLHF reads the value at the last attended position).

A whole text with the model's own special tokens written out (``FullText``) and token ids are
taken as they are by every recipe; only ``position`` applies to them.

Imports nothing heavy: the client library and the training side use it as the server does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

RECIPE_FILE = "scoring_recipe.json"
JOINS = ("ids", "text", "pair")
EOS_RULES = ("none", "append", "openrlhf")
CHAT_RULES = ("tokenize", "text")
POSITIONS = ("last-non-pad", "last")
# config.model_type of encoder families: their reward models score the tokenizer's pair encoding
# (OpenAssistant's DeBERTa RMs: ``tokenizer(question, answer)``).
ENCODER_TYPES = frozenset({
    "albert", "bert", "camembert", "deberta", "deberta-v2", "distilbert", "electra", "ernie",
    "megatron-bert", "modernbert", "mpnet", "roberta", "xlm-roberta", "xlm-roberta-xl"})


@dataclass(frozen=True)
class Recipe:
    """One explicit text -> token-ids layout (see the module docstring for each field)."""

    name: str
    join: str = "ids"
    special_tokens: bool = True
    eos: str = "none"
    chat: str = "tokenize"
    position: str = "last-non-pad"
    summary: str = ""
    """One line for logs and the README."""
    source: str = ""
    """Where the rule is defined (library, file, function)."""

    def __post_init__(self):
        for name, allowed in (("join", JOINS), ("eos", EOS_RULES), ("chat", CHAT_RULES),
                              ("position", POSITIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"recipe {self.name!r}: {name} must be one of {allowed}, "
                                 f"got {getattr(self, name)!r}")

    def rules(self) -> dict:
        """The fields that decide the token ids and the scored position (no name, no prose)."""
        return {k: v for k, v in asdict(self).items() if k not in ("name", "summary", "source")}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict, where: str = "recipe") -> Recipe:
        known = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or not data.get("name") or set(data) - known:
            raise ValueError(f"{where}: expected an object with a name and fields among "
                             f"{sorted(known)}")
        return cls(**data)

    def finish_text(self, text: str, eos_token: str | None) -> str:
        """The ``eos`` rule on a whole text (OpenRLHF's, or none; TRL's acts on the response)."""
        if self.eos == "openrlhf" and eos_token:
            text = text.rstrip("\n")
            return text if text.endswith(eos_token) else text + " " + eos_token
        return text

    def join_text(self, prompt: str, response: str, eos_token: str | None) -> str:
        """The one text a "text" recipe tokenizes for (prompt, response)."""
        if self.eos == "append" and eos_token and not response.endswith(eos_token):
            response = response + eos_token  # TRL: add_eos acts on the completion alone
        return self.finish_text(prompt + response, eos_token)


RECIPES = {r.name: r for r in (
    Recipe("rm-server", "ids", True, "none", "tokenize", "last-non-pad",
           "this project's own: prompt with special tokens (BOS, even for an empty prompt) + "
           "response ids without; no EOS",
           "protos/encoding.py (rm-server train, the PPO trainer's token ids)"),
    Recipe("trl", "text", True, "append", "tokenize", "last-non-pad",
           "TRL RewardTrainer: prompt + response + eos_token (unless the response ends with "
           "it), tokenized with special tokens; chats: the template, tokenize=True",
           "trl 1.16 trainer/reward_trainer.py RewardTrainer._prepare_dataset; "
           "data_utils._tokenize"),
    Recipe("trl-grpo", "text", False, "none", "text", "last-non-pad",
           "TRL GRPO's in-process reward model: prompt + response text, "
           "add_special_tokens=False; chats rendered by the template to text first",
           "trl 1.16 trainer/grpo_trainer.py GRPOTrainer._calculate_rewards"),
    Recipe("openrlhf", "text", False, "openrlhf", "text", "last",
           "OpenRLHF: (prompt + response).rstrip('\\n') + ' ' + eos_token (unless it ends with "
           "it), add_special_tokens=False; the value at the last token, even when pad == eos",
           "openrlhf 0.11.2 datasets/reward_dataset.py RewardDataset.__getitem__; "
           "cli/serve_rm.py tokenize_fn; models/model.py RewardModel.forward"),
    Recipe("encoder-pair", "pair", True, "none", "tokenize", "last-non-pad",
           "encoder RMs: the tokenizer's pair encoding tokenizer(prompt, response), e.g. "
           "[CLS] p [SEP] r [SEP] with token_type_ids; the model's own forward",
           "transformers PreTrainedTokenizer.__call__(text, text_pair)"),
)}
DEFAULT_RECIPE = RECIPES["rm-server"]


def load_recipe(spec: str) -> Recipe:
    """A built-in recipe by name, or one stored as JSON in a file (``scoring_recipe.json``)."""
    if spec in RECIPES:
        return RECIPES[spec]
    path = Path(spec)
    if path.suffix == ".json" or path.is_file():
        try:
            return Recipe.from_dict(json.loads(path.read_text()), str(path))
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"recipe {spec}: {e}") from None
    raise ValueError(f"unknown scoring recipe {spec!r}: one of {sorted(RECIPES)}, or a JSON file")


def choose_recipe(requested: str | None, model_dir: str | Path | None,
                  model_type: str | None) -> tuple[Recipe, str]:
    """The recipe for a checkpoint, and why: the flag; else the one stored in the checkpoint
    (``scoring_recipe.json``, written by ``rm-server train``); else "trl" when the model card
    carries TRL's ``reward-trainer`` tag (what TRL writes with a checkpoint and pushes to the
    hub); else "encoder-pair" for an encoder family; else the default, "rm-server"."""
    if requested:
        return load_recipe(requested), "--recipe"
    stored = Path(model_dir) / RECIPE_FILE if model_dir is not None else None
    if stored is not None and stored.is_file():
        return load_recipe(str(stored)), f"stored in the checkpoint ({RECIPE_FILE})"
    if model_dir is not None and _card_tags(Path(model_dir) / "README.md") & {"reward-trainer"}:
        return RECIPES["trl"], "detected: the model card's reward-trainer tag (TRL)"
    if model_type in ENCODER_TYPES:
        return RECIPES["encoder-pair"], f"detected: an encoder ({model_type}) scores pairs"
    return DEFAULT_RECIPE, ("default: no recipe stored in the checkpoint (pass --recipe trl, "
                            "trl-grpo, openrlhf or encoder-pair for one trained elsewhere)")


def _card_tags(card: Path) -> set[str]:
    """The ``tags:`` list of a model card's YAML front matter (none if no card)."""
    try:
        text = card.read_text(errors="replace") if card.is_file() else ""
    except OSError:
        return set()
    if not text.startswith("---"):
        return set()
    front = text[3:].split("\n---", 1)[0].splitlines()
    tags, inside = set(), False
    for line in front:
        if line.startswith("tags:"):
            inside = True
        elif inside and line.lstrip().startswith("- "):
            tags.add(line.strip()[2:].strip().strip("'\""))
        elif inside and line.strip():
            inside = False
    return tags


def save_recipe(directory: str | Path, recipe: Recipe) -> Path:
    """Write ``scoring_recipe.json`` into a checkpoint directory."""
    path = Path(directory) / RECIPE_FILE
    path.write_text(recipe.to_json())
    return path


def recipe_digest(recipe: Recipe) -> bytes:
    """What the fingerprint hashes of a recipe: its rules, canonically (not its name)."""
    return hashlib.sha256(json.dumps(recipe.rules(), sort_keys=True).encode()).digest()
