"""What a reward-model checkpoint directory must hold, checked before any weights load.

``rm-server serve`` runs :func:`check_checkpoint` before it binds a port, and
:class:`rm_server.model.RewardModel` runs it first thing, so the common ways a ``--model`` is
wrong end in one line naming the problem (README: "a checkpoint that cannot be loaded prints
one line and exits 1") instead of a library traceback or, worse, a server that starts:

- no ``config.json``, or one that is not JSON;
- a causal LM (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ...) or another model that is not a
  ``*ForSequenceClassification``: loaded as a reward model it would get a randomly initialised
  score head and serve noise, so we refuse it and say how to train an RM from it;
- no tokenizer files: transformers then falls back to converting a slow tokenizer and fails with
  a message about sentencepiece that does not name the real problem;
- a truncated or corrupt ``.safetensors`` file: the header (a length, then JSON naming every
  tensor's byte range) must parse and its ranges must cover the file exactly, which is what the
  safetensors loader itself requires, read here without torch.

``--model`` (and ``--tokenizer``) may also be a hub id, ``org/name`` with ``--revision``:
:func:`resolve_model` turns it into a local snapshot (downloaded, or from the local hub cache);
with the hub unreachable (``HF_HUB_OFFLINE=1``, or no network) and no cached copy, that is one
line saying so. With ``--trust-remote-code`` a config whose ``auto_map`` names a custom
``AutoModelForSequenceClassification`` class is accepted.

Pure Python (json, struct; huggingface_hub for hub ids): the server checks before importing
torch or transformers.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path


class ModelLoadError(Exception):
    """The checkpoint cannot be served (missing, unreadable, not a scalar reward model)."""


# Class-name endings of HF generative heads: a base LM, not a reward model.
GENERATIVE_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
# Files AutoTokenizer can build a tokenizer from (fast tokenizer.json; slow vocabularies;
# sentencepiece and tiktoken models). tokenizer_config.json alone is not enough.
TOKENIZER_PATTERNS = ("tokenizer.json", "vocab.*", "merges.txt", "*.model", "*.tiktoken")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name: a hub id, not a path


def check_source(model: str | Path, revision: str | None = None, tokenizer: str | None = None,
                 trust_remote_code: bool = False) -> Path:
    """The local checkpoint directory for ``--model`` (a hub id resolved), checked."""
    path = resolve_model(model, revision)
    check_checkpoint(path, trust_remote_code, tokenizer_given=tokenizer is not None)
    return path


def resolve_model(spec: str | Path, revision: str | None = None, flag: str = "--model") -> Path:
    """A local directory for ``spec``: the directory itself, or the snapshot of the hub id
    ``org/name`` at ``revision`` (downloaded, or found in the local hub cache when offline)."""
    path = Path(spec)
    if path.exists() or not HUB_ID.fullmatch(str(spec)):
        if revision and flag == "--model":
            raise ModelLoadError(f"--revision {revision}: {spec} is a local path, not a hub id")
        return path
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import (
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise ModelLoadError(f"{flag} {spec}: no such directory (hub ids need the "
                             "huggingface_hub package)") from None
    try:
        return Path(snapshot_download(str(spec), revision=revision))
    except RevisionNotFoundError:
        raise ModelLoadError(f"{flag} {spec}: no revision {revision!r} on the hub") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"{flag} {spec}: no such directory, and no such model on the "
                             "hub (or it is gated: log in with `hf auth login`)") from None
    except LocalEntryNotFoundError:
        why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "no network")
        raise ModelLoadError(
            f"{flag} {spec}: not a local directory, and the Hugging Face hub is unreachable "
            f"({why}) with no copy in the local cache {constants.HF_HUB_CACHE}: download it "
            f"where the hub is reachable (hf download {spec}) and pass the directory, or set "
            "HF_HOME to a cache that holds it") from None
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ModelLoadError(f"{flag} {spec}: cannot fetch from the hub: {first}") from None


def check_checkpoint(path: str | Path, trust_remote_code: bool = False,
                     tokenizer_given: bool = False) -> dict:
    """Raise :class:`ModelLoadError` (one line) if ``path`` cannot be a reward model; its config.

    ``tokenizer_given``: the tokenizer comes from elsewhere (``--tokenizer``), so the directory
    need not hold one."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path} is not a checkpoint directory (no config.json)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {config_file}: {e}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_file} is not a JSON object")
    remote = trust_remote_code and "AutoModelForSequenceClassification" in (
        config.get("auto_map") or {})
    if not remote:
        _check_architecture(path, config.get("architectures") or [])
    if not tokenizer_given and not any(any(path.glob(p)) for p in TOKENIZER_PATTERNS):
        raise ModelLoadError(
            f"{path} has no tokenizer files (tokenizer.json, or a vocabulary): the server "
            "tokenizes text as the model was trained; save the tokenizer next to the weights "
            "(tokenizer.save_pretrained(DIR)), or name one with --tokenizer")
    for weights in sorted(path.glob("*.safetensors")):
        check_safetensors(weights)
    return config


def _check_architecture(path: Path, archs: list[str]) -> None:
    """A config that names its classes must name a *ForSequenceClassification (none: allowed)."""
    if not archs or any(a.endswith("ForSequenceClassification") for a in archs):
        return
    if any(a.endswith(GENERATIVE_SUFFIXES) for a in archs):
        raise ModelLoadError(
            f"{path} is a causal language model ({archs[0]}), not a reward model; train one "
            f"from it with `rm-server train --base {path} --data prefs.jsonl --out RM_DIR`, "
            "then serve RM_DIR")
    raise ModelLoadError(
        f"{path} holds a {archs[0]}, not a *ForSequenceClassification reward model (loaded "
        "as one, its score head would be random)")


def check_safetensors(path: Path) -> None:
    """The header parses and its tensors' byte ranges end exactly at the end of the file."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            if size < 8:
                raise ValueError("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a {size}-byte file")
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"),
                  default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise ModelLoadError(f"{path} is not a readable safetensors file ({e}): "
                             "truncated or corrupt? copy it again") from None
    if 8 + n + end != size:
        raise ModelLoadError(f"{path} holds {size} bytes but its header describes {8 + n + end}: "
                             "truncated or corrupt? copy it again")


def read_reward_stats(path: Path) -> dict | None:
    """{"mean", "std"} of rewards from ``reward_stats.json`` (written by rm-server train)."""
    p = path / "reward_stats.json"
    if not p.is_file():
        return None
    stats = json.loads(p.read_text())
    return {"mean": float(stats["mean"]), "std": float(stats["std"])}


def weights_version(path: Path) -> str:
    """sha256 (16 hex digits) of the weight files, in name order."""
    h = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:16]
