"""Training at the sizes users have: the flags every stage shares (``--dtype``,
``--gradient-checkpointing``, ``--lora-*``; FSDP2 whenever torchrun starts several ranks), and
:class:`Run`, which applies them: to a model, to checkpoints, to the final output.

A model goes through ``prepare`` in this order (each step says why it comes where it does):

1. gradient checkpointing, on the transformers model (peft and FSDP2 keep it: it wraps each
   layer's ``forward``, inside FSDP's hooks);
2. LoRA (``lora.py``): adapters on, everything else frozen;
3. frozen matmul weights stored in bf16 with ``--dtype bfloat16`` (``precision.py``): only now
   is it known what is frozen;
4. the heads computing in fp32, and the entry methods (``forward``, ``generate``) under bf16
   autocast (``precision.py``);
5. FSDP2 under torchrun (``sharding.py``), else onto the device.

Checkpoints: a single-process run that trains every weight writes a loadable Hugging Face
directory per checkpoint, as always (``checkpoint.py``). A sharded or LoRA run writes its
trainable tensors and optimizer states with DCP (each rank its shards) into step-N/dcp, beside
``trainer_state.pt`` and the tokenizer; resuming loads the base again, prepares it the same
way, and loads the shards into it, re-sharded to however many ranks the resumed run has.

The final output is always a plain transformers directory, gathered to rank 0, the LoRA
adapter merged in, in fp32: exactly the weights that were trained (frozen ones as they were
stored), loadable without peft (``rm-server serve``, ``policy-trainer``, ``from_pretrained``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from policy_trainer import checkpoint, distributed, lora, precision, sharding
from policy_trainer.errors import UserError


@dataclass(kw_only=True)
class ScaleConfig:
    """The flags of every stage that decide how big a model it can train."""

    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute precision. bfloat16: forward and backward under bf16 autocast; trainable weights
    and AdamW state stay fp32 (the master copy, saved exactly); frozen matmul weights (PPO's
    reference, a LoRA base) are stored in bf16; heads and log-probs compute in fp32."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of keeping them (about
    a third more compute for a fraction of the activation memory)."""
    lora_r: int = 0
    """LoRA rank (peft): train rank-r adapters on a frozen base; 0 trains every weight. The
    output is the base with the adapter merged in, a plain checkpoint."""
    lora_alpha: float = 16.0
    """LoRA alpha: the adapter's update is scaled by alpha / r."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input (SFT and the reward model; PPO runs with dropout off)."""
    lora_target_modules: tuple[str, ...] = ("all-linear",)
    """Module names (or suffixes) that get adapters; "all-linear": every linear layer but the
    LM head (peft's shorthand)."""

    @property
    def lora(self) -> bool:
        return self.lora_r > 0

    def validate_scale(self) -> None:
        if self.lora_r < 0 or self.lora_alpha <= 0 or not 0.0 <= self.lora_dropout < 1.0:
            raise UserError("--lora-r must be >= 0, --lora-alpha > 0, --lora-dropout in [0, 1)")
        if self.lora and not self.lora_target_modules:
            raise UserError("--lora-target-modules: name at least one module (or all-linear)")


def _plain_class(module: nn.Module) -> type:
    """The module's own class (FSDP2 swaps in a subclass ``FSDP<Name>``)."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(module)
    if issubclass(cls, FSDPModule):
        cls = next(b for b in cls.__bases__ if b is not FSDPModule)
    return cls


def _heads(hf: nn.Module, task: str | None) -> tuple[nn.Module, ...]:
    """The output heads: the LM head of a causal LM, the score head of a classifier (peft's
    trainable copy of it, under LoRA)."""
    if task == "CAUSAL_LM":
        return (hf.get_output_embeddings(),)
    return tuple(h for h in (getattr(hf, "score", None), getattr(hf, "classifier", None))
                 if isinstance(h, nn.Module))


def prefix_of(root: nn.Module, module: nn.Module) -> str:
    """The state-dict prefix of ``module`` inside ``root`` ("" for root itself)."""
    for name, m in root.named_modules():
        if m is module:
            return f"{name}." if name else ""
    raise ValueError(f"{type(module).__name__} is not inside {type(root).__name__}")


class Run:
    """One process of a run: its device and rank, the scale flags, and what they do."""

    def __init__(self, cfg: ScaleConfig, device: torch.device):
        cfg.validate_scale()
        if cfg.dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("--dtype bfloat16: this GPU has no bf16 support")
        self.cfg = cfg
        self.dist = distributed.init_from_env(device.type)
        self.device = distributed.rank_device(self.dist, device)
        self.dcp = self.dist.enabled or cfg.lora  # checkpoints through DCP
        self.nets: dict[str, tuple[nn.Module, list]] = {}  # what DCP saves, by name

    def close(self) -> None:
        """Leave the process group (torchrun)."""
        distributed.shutdown(self.dist)

    # ------------------------------------------------------------ models

    def prepare_lm(self, model: nn.Module, task: str | None) -> nn.Module:
        """Steps 1-3 and fp32 heads on a transformers model (task: SEQ_CLS or CAUSAL_LM)."""
        if self.cfg.gradient_checkpointing:
            precision.enable_checkpointing(model)
        if self.cfg.lora:
            model = lora.add_lora(model, self.cfg, task)
        heads = _heads(lora.unwrap(model), task)
        precision.store_frozen(model, self.cfg.dtype, keep=heads)
        if self.cfg.dtype != "float32":
            for head in heads:
                precision.head_in_fp32(head)
        return model

    def wrap_root(self, root: nn.Module, methods: tuple[str, ...] = ("forward",)) -> nn.Module:
        """Steps 4-5 on the module the trainer calls: autocast on its entry ``methods``, then
        FSDP2 across ranks, or onto the device."""
        precision.autocast_methods(root, self.cfg.dtype, self.device, methods)
        if self.dist.enabled:
            return sharding.shard(root, self.dist, self.device, self.cfg.dtype,
                                  tuple(m for m in methods if m != "forward"))
        return root.to(self.device)

    def prepare(self, model: nn.Module, task: str) -> nn.Module:
        """A transformers model ready to train (SFT, the reward model)."""
        return self.wrap_root(self.prepare_lm(model, task))

    # ------------------------------------------------------------ steps

    def share(self, items: list) -> list:
        return distributed.share(self.dist, items)

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        return distributed.mean_across(self.dist, values)

    def total(self, values: dict[str, float]) -> dict[str, float]:
        return distributed.sum_across(self.dist, values)

    def clip_grad_norm(self, params, max_norm: float, sync: bool = True):
        """Clip to ``max_norm`` (0: measure only); the norm before clipping (a float, or with
        ``sync=False`` a 0-dim tensor on the device)."""
        return sharding.grad_norm(list(params), max_norm if max_norm > 0 else float("inf"),
                                  sync)

    # ------------------------------------------------------------ checkpoints

    def register(self, name: str, module: nn.Module, *optimizers) -> None:
        """``module`` and its optimizers go into this run's DCP checkpoints as ``name``."""
        self.nets[name] = (module, list(optimizers))

    def stateful(self, objects: dict) -> dict:
        """What ``trainer_state.pt`` pickles: ``objects`` less the optimizers DCP saves."""
        in_dcp = {id(o) for _, opts in self.nets.values() for o in opts} if self.dcp else set()
        return {k: v for k, v in objects.items() if id(v) not in in_dcp}

    def weights_from(self, resume_from: Path | None, base) -> Path:
        """Where the model loads from: a plain checkpoint, or the base (DCP shards follow; a
        one-process run resumes a sharded one too: DCP re-shards to whatever loads it)."""
        if resume_from is None:
            return Path(base)
        saved = checkpoint.load_state(resume_from).get("config", {})
        for flag in ("lora_r", "lora_target_modules"):
            was, now = saved.get(flag, getattr(self.cfg, flag)), getattr(self.cfg, flag)
            if (tuple(was) if isinstance(was, (list, tuple)) else was) != now:
                raise UserError(f"{resume_from} was trained with --{flag.replace('_', '-')} "
                                f"{was}: resume with the same")
        if (resume_from / sharding.DCP_DIR).is_dir():
            self.dcp = True
            return Path(base)
        if self.dcp:
            raise UserError(f"{resume_from} is a plain one-process checkpoint: resume it in "
                            "one process")
        return resume_from

    def load_shards(self, resume_from: Path) -> None:
        if self.dcp:
            sharding.load_dcp(resume_from / sharding.DCP_DIR, self.nets, self.cfg.lora)

    def save_checkpoint(self, root: Path, step: int, model, tokenizer, state: dict,
                        keep: int) -> None:
        """Every rank calls it. Plain: rank 0 writes ``model.save_pretrained``; else DCP."""
        if not self.dcp:
            if self.dist.is_main:
                checkpoint.save_checkpoint(root, step, model, tokenizer, state, keep)
            return
        checkpoint.save_checkpoint(
            root, step, None, tokenizer, state, keep, dist=self.dist,
            write_shards=lambda d: sharding.save_dcp(d / sharding.DCP_DIR, self.nets,
                                                     self.cfg.lora))

    # ------------------------------------------------------------ the output

    def gather(self, root: nn.Module) -> dict[str, torch.Tensor] | None:
        """Every tensor of ``root`` on rank 0 (None elsewhere); every rank must call it."""
        state = sharding.full_state_dict(root)
        return state if self.dist.is_main else None

    def save_pretrained(self, root: nn.Module, out: Path, hf: nn.Module | None = None,
                        adapter: str = lora.POLICY) -> None:
        """The transformers model ``hf`` inside ``root`` (default: root, unwrapped from peft)
        as a plain directory in ``out``, ``adapter`` merged; every rank must call it."""
        hf = hf or lora.unwrap(root)
        if not self.dcp:  # one process, every weight trained: the model saves itself
            hf.save_pretrained(out)
            return
        state = self.gather(root)
        if state is not None:
            peft = next((m for m in root.modules() if lora.is_peft(m)), None)
            if peft is not None:
                state = lora.merged_state_dict(state, peft, adapter,
                                               prefix_of(root, lora.unwrap(peft)))
                sub = prefix_of(lora.unwrap(peft), hf)
            else:
                sub = prefix_of(root, hf)
            self.write_pretrained(hf, {k[len(sub):]: v for k, v in state.items()
                                       if k.startswith(sub)}, out)
        distributed.barrier(self.dist)

    def write_pretrained(self, hf: nn.Module, state: dict[str, torch.Tensor], out: Path) -> None:
        """``state`` (fp32) saved as ``hf``'s class would save itself, from a weightless
        skeleton (no second copy of the model is built)."""
        with torch.device("meta"):
            skeleton = _plain_class(hf)(hf.config)
        if getattr(hf, "generation_config", None) is not None:
            skeleton.generation_config = hf.generation_config
        skeleton.save_pretrained(out, state_dict={k: v.float() for k, v in state.items()})
