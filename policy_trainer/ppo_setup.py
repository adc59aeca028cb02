"""Setting up ``policy-trainer ppo`` (step 0): the policy, the frozen reference and the critic
(loaded here, prepared in ``ppo_nets.py``);
the prompts; the connection to the reward service (input form by tokenizer fingerprint, reward
normalization statistics); the optimizers, their schedules and the KL controller. Each raises
``UserError`` (exit 2) or ``RMError`` (exit 1) with a one-line message, before any training
starts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from policy_trainer import ppo, ppo_nets, rollout
from policy_trainer.data import max_sequence_length, read_prompts
from policy_trainer.errors import UserError
from policy_trainer.logprobs import check_logprob_path
from policy_trainer.optim import build_optimizer
from policy_trainer.ppo_config import PPOConfig
from policy_trainer.ppo_nets import Nets
from policy_trainer.scaling import Run
from policy_trainer.scoring import RMError, RMScorer, choose_input_mode
from protos.encoding import Encoder, tokenizer_fingerprint

log = logging.getLogger("policy_trainer.ppo")


@dataclass
class Models:
    tokenizer: object
    config: object        # the policy's transformers config
    pad_id: int
    eos_id: int
    stop_ids: list[int]
    lm: torch.nn.Module | None            # the loaded policy, until build_nets prepares it
    reference_lm: torch.nn.Module | None  # the loaded reference (None with LoRA: adapters off)
    critic_dir: Path | None = None        # a plain checkpoint's critic, to resume
    nets: Nets | None = None              # policy, reference and critic as PPO runs them


@dataclass
class Prompts:
    ids: list[list[int]]  # policy token ids, cut to max_prompt_length
    texts: list[str]      # what a text/chat RM sees (the kept tail when cut)
    sha256: str


def load_models(cfg: PPOConfig, run: Run, resume_from: Path | None) -> Models:
    """The tokenizer and the fp32 models as loaded (``build_nets`` prepares them)."""
    for name in ("policy", "reference"):
        path = getattr(cfg, name)
        if path is not None and not Path(path).is_dir():
            raise UserError(f"--{name} {path}: no such directory")
    if cfg.lora and cfg.reference:
        raise UserError("--reference with --lora-r: the reference is the --policy base the "
                        "adapters sit on, with the adapters disabled")
    weights = run.weights_from(resume_from, cfg.policy)
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.policy)
        lm = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32)
        reference_lm = None if cfg.lora else AutoModelForCausalLM.from_pretrained(
            cfg.reference or cfg.policy, dtype=torch.float32)
    except OSError as e:
        raise UserError(f"cannot load a causal LM and tokenizer: "
                        f"{str(e).splitlines()[0]}") from None
    if cfg.reference:
        try:
            ref_tok = AutoTokenizer.from_pretrained(cfg.reference)
        except (OSError, ValueError):
            ref_tok = None  # no tokenizer saved there: trust the user
        if (ref_tok is not None
                and tokenizer_fingerprint(ref_tok) != tokenizer_fingerprint(tokenizer)):
            raise UserError(f"--reference {cfg.reference} has another tokenizer than --policy")
    if tokenizer.eos_token_id is None:
        raise UserError(f"the tokenizer in {cfg.policy} has no EOS token")
    stop_ids = [tokenizer.eos_token_id]
    if cfg.stop_token:
        ids = tokenizer(cfg.stop_token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise UserError(f"--stop-token {cfg.stop_token!r} is {len(ids)} tokens, not one")
        stop_ids.append(ids[0])
    pad_id = tokenizer.pad_token_id
    if pad_id is None:  # padding is masked everywhere, so any id will do
        pad_id = tokenizer.eos_token_id
    critic_dir = resume_from / "value" if resume_from is not None and weights == resume_from \
        else None
    return Models(tokenizer, lm.config, pad_id, tokenizer.eos_token_id, stop_ids,
                  lm.to(run.device).eval(), reference_lm, critic_dir)


def build_nets(cfg: PPOConfig, run: Run, m: Models) -> None:
    """The loaded models prepared as PPO runs them (bf16, LoRA, FSDP2: ``ppo_nets.py``)."""
    m.nets = ppo_nets.build(cfg, run, m.lm, m.reference_lm, m.critic_dir)
    m.lm = m.reference_lm = None


def load_prompts(cfg: PPOConfig, m: Models) -> Prompts:
    limit = max_sequence_length(m.config, m.tokenizer)
    max_len = min(cfg.max_prompt_length, limit - cfg.max_new_tokens)
    if max_len < 1:
        raise UserError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for a prompt in "
                        f"the {limit} tokens the policy takes")
    found = read_prompts(cfg.prompts, strict=cfg.strict)
    found.report(log)
    if not found.records:
        raise UserError(f"{cfg.prompts}: no usable prompts")
    texts = [p.prompt for p in found.records]
    encoder = Encoder(m.tokenizer, max_len, len(m.tokenizer))
    ids, cut = rollout.encode_prompts(encoder, texts, max_len)
    if cut:
        log.info("%s: cut %d prompts longer than %d tokens from the left", cfg.prompts, cut,
                 max_len)
        full = [encoder.encode_text(t, "")[0] for t in texts]
        texts = [t if len(f) == len(i) else m.tokenizer.decode(i, skip_special_tokens=True)
                 for t, f, i in zip(texts, full, ids)]
    return Prompts(ids, texts, found.sha256)


def check_policy_head(cfg: PPOConfig, m: Models, prompts: Prompts, device) -> None:
    """Our log-prob path (backbone + LM head through kernels.token_logprobs) against the
    model's own logits on two short samples: refuse a head we would compute wrongly."""
    n = min(2, len(prompts.ids))
    gen = rollout.sampling_config(4, cfg.temperature, 0, 1.0, m.stop_ids, m.pad_id)
    probe = rollout.generate(m.lm, prompts.ids[:n], list(range(n)), gen, m.stop_ids,
                             m.pad_id, cfg.seed, device)
    try:
        check_logprob_path(m.lm, probe.query_responses, probe.attention_mask,
                           probe.context_length, cfg.temperature)
    except ValueError as e:
        raise UserError(str(e)) from None


def connect_rm(cfg: PPOConfig, m: Models) -> tuple[RMScorer, str, tuple[float, float]]:
    """The scorer, the input form chosen by tokenizer fingerprint, and (mean, std) to
    normalize scores with ((0, 1) unless --normalize-reward)."""
    token = Path(cfg.rm_token_file).read_text().strip() if cfg.rm_token_file else None
    scorer = RMScorer(cfg.rm, token=token, timeout=cfg.rm_timeout,
                      max_attempts=cfg.rm_max_attempts, backoff_max=cfg.rm_backoff_max,
                      client_id=cfg.rm_client_id or f"ppo-{Path(cfg.out).resolve().name}",
                      chunk_size=cfg.rm_chunk_size, chunk_timeout=cfg.rm_chunk_timeout,
                      version=cfg.rm_version)
    try:
        info = scorer.model_info()
        mode = choose_input_mode(cfg.rm_input, info, m.tokenizer)
        norm = (0.0, 1.0)
        if cfg.reward_aggregation and len(info.head_names) < 2:
            raise RMError(f"--reward-aggregation {cfg.reward_aggregation}, but the RM has one "
                          "head, not an ensemble's members")
        if cfg.normalize_reward:
            if not info.has_reward_stats or info.reward_std <= 0:
                raise RMError("--normalize-reward, but the RM reports no reward statistics")
            norm = (info.reward_mean, info.reward_std)
    except BaseException:
        scorer.close()
        raise
    log.info("RM %s (%s, version %s) at %s: sending %s%s", info.name, info.architecture,
             info.version, cfg.rm, mode, " (tokenizers differ)" if cfg.rm_input == "auto"
             and mode != "tokens" else "")
    return scorer, mode, norm


def build_optimizers(cfg: PPOConfig, m: Models, total_steps: int) -> dict:
    """AdamW and its lr schedule for the policy and for the critic (--value-lr), and the KL
    controller: everything a checkpoint saves the state of, by its key there."""
    def adamw(params, lr):
        return build_optimizer(params, total_steps, lr=lr, schedule=cfg.lr_schedule,
                               warmup_ratio=cfg.warmup_ratio, min_lr_ratio=cfg.min_lr_ratio,
                               weight_decay=cfg.weight_decay,
                               betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                               fused=True)

    policy_params, critic_params = m.nets.trainable()
    policy_opt, policy_sched = adamw(policy_params, cfg.lr)
    value_opt, value_sched = adamw(critic_params, cfg.value_lr or cfg.lr)
    kl_ctl = (ppo.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
              if cfg.adaptive_kl else ppo.FixedKLController(cfg.kl_coef))
    return {"optimizer": policy_opt, "value_optimizer": value_opt, "scheduler": policy_sched,
            "value_scheduler": value_sched, "kl_controller": kl_ctl}
