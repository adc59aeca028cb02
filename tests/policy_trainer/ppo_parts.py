"""PPO's networks built in process the way ``policy-trainer ppo`` builds them (load, check the
head, prepare), and rollouts sampled from them: no RM, no sockets."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from policy_trainer import ppo_setup, rollout
from policy_trainer.experience import reference_forwards
from policy_trainer.ppo_config import PPOConfig
from policy_trainer.ppo_update import layout, rollout_logprobs
from policy_trainer.scaling import Run
from tests import tiny


def write_prompts(path: Path, n: int = 16) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in tiny.corpus(n, seed=5)))
    return path


def build(policy: Path, prompts: Path, out: Path, **flags):
    """(config, run, models with nets, prompts) for a one-process run with ``flags``."""
    kw = dict(batch_size=8, mini_batch_size=4, micro_batch_size=2, max_new_tokens=8,
              num_ppo_epochs=1)
    cfg = PPOConfig(policy=str(policy), rm="127.0.0.1:1", prompts=str(prompts), out=str(out),
                    **{**kw, **flags})
    run = Run(cfg, torch.device("cpu"))
    models = ppo_setup.load_models(cfg, run, None)
    found = ppo_setup.load_prompts(cfg, models)
    ppo_setup.check_policy_head(cfg, models, found, run.device)
    ppo_setup.build_nets(cfg, run, models)
    return cfg, run, models, found


def rollouts(cfg, models, found, n: int = 8, seed: int = 1, step: int = 0):
    """``n`` rollouts through steps 1-3b: sampled, reference log-probs, values, and the
    rollout policy's log-probs in the first epoch's layout. Returns (rollouts, that layout:
    a list of minibatches of micro-batch row indices)."""
    gen = rollout.sampling_config(cfg.max_new_tokens, cfg.temperature, 0, 1.0, models.stop_ids,
                                  models.pad_id)
    ro = rollout.generate(models.nets.policy, found.ids[:n], list(range(n)), gen,
                          models.stop_ids, models.pad_id, seed, torch.device("cpu"))
    reference_forwards(ro, models.nets, cfg.temperature)
    first = layout(n, cfg, cfg.mini_batch_size, step, 0, 0)
    rollout_logprobs(ro, models.nets, cfg, [mb for mini in first for mb in mini])
    return ro, first


def inputs(ro) -> tuple:
    return ro.query_responses, ro.attention_mask, ro.context_length
