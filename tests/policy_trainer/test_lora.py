"""LoRA (peft) in every stage: PPO's reference is the base with the adapters off (one copy of
the base), the critic its own adapter; adapters merge out of place into plain checkpoints that
load without peft, a trained LoRA reward model serves as it is, and a LoRA SFT run resumes from
its (DCP) checkpoint. Tiny models, in process."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from policy_trainer import cli, lora, precision, sft
from policy_trainer.logprobs import response_logprobs
from policy_trainer.rm_train import TrainConfig, train
from policy_trainer.scaling import ScaleConfig
from rm_server.model import RewardModel
from tests import tiny
from tests.policy_trainer import ppo_parts


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("lora")
    return {"root": root, "prompts": ppo_parts.write_prompts(root / "prompts.jsonl"),
            "policy": tiny.make_causal_lm("llama", tokenizer, root / "policy", seed=1)}


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def randomize(model, adapter: str, seed: int = 0, matrices=("lora_B",)) -> None:
    """Give ``adapter``'s B matrices (zero at init: a no-op adapter) real values (and its A
    matrices, with ``matrices``)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(f"{m}.{adapter}." in name for m in matrices):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_reference_is_the_base_with_adapters_off(world, tmp_path, dtype):
    """After the adapters moved, the reference's log-probs equal a separately loaded SFT
    model's, in the same precision (fp32, or under the same bf16 autocast): tolerance 0, it is
    the same weights. One base in memory: the reference and the critic are the policy module."""
    cfg, _, models, found = ppo_parts.build(world["policy"], world["prompts"], tmp_path,
                                            lora_r=4, dtype=dtype)
    nets = models.nets
    assert nets.reference is nets.policy and nets.critic is nets.policy
    randomize(nets.policy.lm, lora.POLICY)
    randomize(nets.policy.lm, lora.VALUE, seed=1)
    ro, _ = ppo_parts.rollouts(cfg, models, found)
    args = ppo_parts.inputs(ro)
    sft_model = AutoModelForCausalLM.from_pretrained(world["policy"]).eval()
    with torch.no_grad():
        ref = nets.ref_logprobs(*args, temperature=cfg.temperature)
        with precision.autocast(dtype, "cpu"):
            want = response_logprobs(sft_model, *args, cfg.temperature)
        policy = nets.logprobs(*args, temperature=cfg.temperature)
    mask = ro.response_mask.bool()
    assert torch.equal(ref[mask], want[mask])
    assert (policy - ref)[mask].abs().max() > 1e-2  # the adapter is live for the policy
    base = sum(p.numel() for p in sft_model.parameters())
    held = sum(p.numel() for p in nets.policy.parameters())
    trainable = sum(p.numel() for group in nets.trainable() for p in group)
    assert held == base + trainable  # the base once, plus two adapters and the value head


def test_the_critic_trains_its_own_adapter_only(world, tmp_path):
    cfg, _, models, found = ppo_parts.build(world["policy"], world["prompts"], tmp_path,
                                            lora_r=4)
    nets = models.nets
    ro, _ = ppo_parts.rollouts(cfg, models, found)
    args = ppo_parts.inputs(ro)
    with torch.no_grad():
        before = nets.logprobs(*args, temperature=cfg.temperature)
    randomize(nets.policy.lm, lora.VALUE)
    nets.policy.value_head.weight.data.normal_()
    with nets.critic_scope():
        values = nets.values(*args)
        values.sum().backward()
    with torch.no_grad():  # the value adapter moved; the policy did not
        assert torch.equal(nets.logprobs(*args, temperature=cfg.temperature), before)
        assert not torch.equal(nets.values(*args), values)  # outside: the policy adapter
    policy_params, critic_params = nets.trainable()
    assert all(p.grad is None for p in policy_params)
    assert all(p.grad is not None for p in critic_params)
    # outside the scope the policy adapter is active again, both still trainable
    assert nets.policy.lm.active_adapter == lora.POLICY
    assert all(p.requires_grad for p in policy_params + critic_params)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_out_of_place_equals_peft_merge_and_unload(tokenizer, arch):
    """``merged_state_dict`` (used for every export) against peft's own merge, GPT-2's
    transposed Conv1D included; the base in memory is left as it was."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny.make_config(arch, tokenizer))
    flags = ScaleConfig(lora_r=4, lora_alpha=8.0)
    peft_model = lora.add_lora(model, flags, "CAUSAL_LM")
    randomize(peft_model, lora.POLICY)
    state = {k: v.clone() for k, v in lora.unwrap(peft_model).state_dict().items()}
    merged = lora.merged_state_dict(state, peft_model)
    assert state.keys() == lora.unwrap(peft_model).state_dict().keys()  # nothing merged in place
    want = peft_model.merge_and_unload().state_dict()
    assert merged.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(merged[k], want[k], atol=1e-6, rtol=1e-6)


def test_lm_head_and_non_linear_targets_are_refused(tokenizer):
    from policy_trainer.errors import UserError

    model = AutoModelForCausalLM.from_config(tiny.make_config("llama", tokenizer))
    with pytest.raises(UserError, match="LM head"):
        lora.add_lora(model, ScaleConfig(lora_r=4, lora_target_modules=("lm_head",)),
                      "CAUSAL_LM")
    model = AutoModelForCausalLM.from_config(tiny.make_config("llama", tokenizer))
    with pytest.raises(UserError, match="embed_tokens"):
        lora.add_lora(model, ScaleConfig(lora_r=4, lora_target_modules=("embed_tokens",)),
                      "CAUSAL_LM")


def test_lora_reward_model_serves_as_it_is(tmp_path, tokenizer):
    """`policy-trainer rm --lora-r 4 --dtype bfloat16` writes a plain checkpoint (no adapter
    files); rm_server's RewardModel loads it and scores what transformers scores, to 1e-5."""
    base = tiny.make_causal_lm("llama", tokenizer, tmp_path / "base", seed=2)
    rng = random.Random(0)
    rows = [{"prompt": "review?", "chosen": " great fun " + rng.choice(tiny.WORDS),
             "rejected": " awful dull " + rng.choice(tiny.WORDS)} for _ in range(24)]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rm"
    assert train(TrainConfig(data=str(data), base=str(base), out=str(out), batch_size=8,
                             max_steps=3, lr=1e-2, progress=False, lora_r=4, lora_alpha=8.0,
                             dtype="bfloat16", gradient_checkpointing=True)) == 0
    assert not (out / "adapter_config.json").exists()
    assert (out.parent / "rm.checkpoints" / "step-3" / "dcp").is_dir()  # adapters + head only
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    served = RewardModel(out)
    seqs = [served.encoder.encode_text("review?", r["chosen"])[0] for r in rows[:6]]
    got = served.score(seqs)
    with torch.no_grad():
        want = [hf(input_ids=torch.tensor([s])).logits[0, 0].item() for s in seqs]
    assert [float(g) for g in got] == pytest.approx(want, abs=1e-5)
    base_score = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    assert not torch.equal(hf.model.layers[0].self_attn.q_proj.weight,
                           base_score.model.layers[0].self_attn.q_proj.weight)  # merged in


def test_lora_sft_resumes_from_its_checkpoint_and_writes_a_plain_model(tmp_path, world,
                                                                      monkeypatch):
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps({"prompt": p, "response": " great movie"}) + "\n"
                             for p in tiny.corpus(24, seed=1)))
    args = ["sft", "--data", str(demos), "--base", str(world["policy"]), "--micro-batch-size",
            "4", "--lr", "1e-2", "--torch-threads", "1", "--no-progress", "--max-steps", "4",
            "--checkpoint-every", "2", "--lr-schedule", "constant", "--warmup-ratio", "0",
            "--eval-fraction", "0", "--lora-r", "4", "--dtype", "bfloat16",
            "--gradient-checkpointing"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert cli.main(args + ["--out", str(straight)]) == 0
    real, calls = sft.train_step, []

    def crash_after_two(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(sft, "train_step", crash_after_two)
    assert cli.main(args + ["--out", str(resumed)]) == 130
    monkeypatch.undo()
    assert (resumed / "checkpoints" / "step-2" / "dcp").is_dir()
    assert cli.main(args + ["--out", str(resumed), "--resume"]) == 0

    def losses(out):
        recs = [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]
        return [r["loss"] for r in recs if "loss" in r]

    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-5)
    assert not (straight / "adapter_config.json").exists()
    a = AutoModelForCausalLM.from_pretrained(straight).state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_checkpointing_replays_each_adapter_in_its_own_backward(world, tmp_path):
    """With gradient checkpointing the backward re-runs the layers with whatever adapter is
    active then: the critic's backward runs inside its scope, so the gradients of both
    adapters and the value head equal those without checkpointing (fp32, 1e-6)."""
    from policy_trainer.ppo_loop import rewards_and_advantages
    from policy_trainer.ppo_update import micro_step

    grads = []
    for checkpointing in (False, True):
        cfg, _, models, found = ppo_parts.build(world["policy"], world["prompts"], tmp_path,
                                                lora_r=4, gradient_checkpointing=checkpointing)
        nets = models.nets
        for adapter, seed in ((lora.POLICY, 0), (lora.VALUE, 1)):  # A too: peft draws it
            randomize(nets.policy.lm, adapter, seed, matrices=("lora_A", "lora_B"))
        nets.policy.value_head.weight.data.fill_(0.1)
        ro, first_epoch = ppo_parts.rollouts(cfg, models, found)
        rewards_and_advantages(ro, torch.linspace(-1, 1, len(ro)), 0.05, (0.0, 1.0), cfg)
        micro_step(ro.subset(first_epoch[0][0]), nets, cfg, 1.0)
        grads.append([p.grad.clone() for group in nets.trainable() for p in group])
    assert len(grads[0]) == len(grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert all(g.abs().sum() > 0 for g in grads[1][-3:])  # the critic's end got gradient
