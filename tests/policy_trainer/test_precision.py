"""``--dtype bfloat16`` and ``--gradient-checkpointing``: fp32 master weights and AdamW state,
bf16 storage of frozen matmuls, fp32 heads, PPO's ratio exactly 1 at step 0, and checkpointing
that changes memory, not numbers. Tiny Llamas, in process."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from policy_trainer import cli, ppo, precision
from policy_trainer.logprobs import response_logprobs
from policy_trainer.ppo_config import PPOConfig
from policy_trainer.ppo_update import micro_step
from policy_trainer.rm_train import TrainConfig
from policy_trainer.sft import SFTConfig, token_loss_sum
from tests import tiny
from tests.policy_trainer import ppo_parts


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("precision")
    return {"root": root, "prompts": ppo_parts.write_prompts(root / "prompts.jsonl"),
            "policy": tiny.make_causal_lm("llama", tokenizer, root / "policy", seed=1)}


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("lora_r", [0, 4])
def test_ratio_is_exactly_one_at_step_0_in_bf16(world, tmp_path, lora_r):
    """π_old is computed micro-batch by micro-batch in the layout epoch 0 trains on, the LM
    head and log-softmax in fp32: every micro-batch of the first epoch starts at ratio 1 with
    no rounding at all (tolerance 0), so clipfrac and approx_kl are 0, not bf16 noise.
    (The same log-probs computed for the whole batch at once differ by ~1e-4 here, ~1e-3 on a
    256-wide model: what this layout removes.)"""
    cfg, _, models, found = ppo_parts.build(world["policy"], world["prompts"], tmp_path,
                                            dtype="bfloat16", lora_r=lora_r)
    ro, first_epoch = ppo_parts.rollouts(cfg, models, found)
    ppo_loop_advantages(ro, cfg)
    for minibatch in first_epoch:
        for idx in minibatch:
            mb = ro.subset(idx)
            new = models.nets.logprobs(*ppo_parts.inputs(mb), temperature=cfg.temperature,
                                       with_entropy=True)[0]  # with grad, as training runs
            mask = mb.response_mask.bool()
            assert torch.equal(torch.exp(new - mb.logprobs)[mask], torch.ones(int(mask.sum())))
            stats = micro_step(mb, models.nets, cfg, 0.5)
            assert stats["clipfrac"] == 0.0 and stats["approx_kl"] == 0.0


@pytest.mark.parametrize("dtype,lora_r", [("float32", 0), ("bfloat16", 0), ("bfloat16", 4)])
def test_the_primed_first_micro_batch_changes_no_number(world, tmp_path, dtype, lora_r):
    """Step 3b keeps the graph of epoch 0's first micro-batch and step 7 backpropagates through
    it instead of running that forward again (ppo_update.Primed): π_old, every statistic and
    every weight after the update are bit for bit those of the run that recomputes it."""
    from policy_trainer import ppo_setup, rollout
    from policy_trainer.experience import reference_forwards
    from policy_trainer.ppo_update import layout, ppo_update, rollout_logprobs

    got = []
    for prime in (False, True):
        torch.manual_seed(0)
        cfg, run, models, found = ppo_parts.build(world["policy"], world["prompts"], tmp_path,
                                                  dtype=dtype, lora_r=lora_r, num_ppo_epochs=2)
        gen = rollout.sampling_config(cfg.max_new_tokens, cfg.temperature, 0, 1.0,
                                      models.stop_ids, models.pad_id)
        ro = rollout.generate(models.nets.policy, found.ids[:8], list(range(8)), gen,
                              models.stop_ids, models.pad_id, 1, torch.device("cpu"))
        reference_forwards(ro, models.nets, cfg.temperature)
        first = [mb for mini in layout(8, cfg, cfg.mini_batch_size, 0, 0, 0) for mb in mini]
        primed = rollout_logprobs(ro, models.nets, cfg, first, prime=prime)
        assert (primed is not None) == prime
        ppo_loop_advantages(ro, cfg)
        opts = ppo_setup.build_optimizers(cfg, models, 2)
        start = [p.detach().clone() for group in models.nets.trainable() for p in group]
        stats = ppo_update(ro, models.nets, (opts["optimizer"], opts["value_optimizer"]), cfg,
                           run, 0, cfg.mini_batch_size, primed)
        weights = [p.detach().clone() for group in models.nets.trainable() for p in group]
        got.append((ro.logprobs, stats, weights, start))
    (lp0, stats0, w0, start), (lp1, stats1, w1, _) = got
    assert torch.equal(lp0, lp1)
    assert stats0 == stats1
    # the update moved the weights: not trivially equal (approx_kl alone is no such proof: in
    # bf16 with a fresh LoRA adapter epoch 1's log-probs can round to epoch 0's, KL exactly 0,
    # on CPUs with native bf16 arithmetic)
    assert any(not torch.equal(a, b) for a, b in zip(start, w0))
    assert all(torch.equal(a, b) for a, b in zip(w0, w1))


def ppo_loop_advantages(ro, cfg):
    from policy_trainer.ppo_loop import rewards_and_advantages

    rewards_and_advantages(ro, torch.linspace(-1, 1, len(ro)), 0.05, (0.0, 1.0), cfg)


def test_master_weights_and_adam_state_are_fp32_frozen_matmuls_bf16(world, tmp_path):
    from policy_trainer import ppo_setup

    cfg, _, models, found = ppo_parts.build(world["policy"], world["prompts"], tmp_path,
                                            dtype="bfloat16")
    nets = models.nets
    policy_params, critic_params = nets.trainable()
    assert {p.dtype for p in policy_params + critic_params} == {torch.float32}
    ref = nets.reference.lm
    assert ref.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert ref.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    for kept in (ref.lm_head.weight, ref.model.embed_tokens.weight, ref.model.norm.weight):
        assert kept.dtype == torch.float32  # read outside autocast's matmuls: exact in fp32
    assert not any(p.requires_grad for p in ref.parameters())
    # the frozen bf16 reference computes what the fp32 policy does before its first update
    ro, _ = ppo_parts.rollouts(cfg, models, found)
    args = ppo_parts.inputs(ro)
    with torch.no_grad():
        pol = nets.logprobs(*args, temperature=cfg.temperature)
        assert torch.equal(nets.ref_logprobs(*args, temperature=cfg.temperature), pol)
    # an optimizer step keeps masters and moments in fp32
    opts = ppo_setup.build_optimizers(cfg, models, 2)
    ppo_loop_advantages(ro, cfg)
    micro_step(ro.subset(torch.arange(4)), nets, cfg, 1.0)
    opts["optimizer"].step()
    assert {s["exp_avg"].dtype for s in opts["optimizer"].state.values()} == {torch.float32}
    assert {p.dtype for p in nets.policy.parameters()} == {torch.float32}


def test_bf16_logprobs_take_the_head_in_fp32(world):
    """Under autocast the backbone is bf16, the head is not: the log-probs equal an fp32
    log-softmax of fp32 logits over the same hidden states, not of bf16 logits."""
    lm = AutoModelForCausalLM.from_pretrained(world["policy"]).eval()
    ids = torch.randint(8, 300, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad(), precision.autocast("bfloat16", "cpu"):
        got = response_logprobs(lm, ids, mask, 4)
        hidden = lm.model(input_ids=ids).last_hidden_state[:, 3:-1]
    logits = hidden.float() @ lm.lm_head.weight.t()  # (3, 8, V) fp32
    want = torch.log_softmax(logits, -1).gather(-1, ids[:, 4:, None])[..., 0]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    bf16_logits = torch.log_softmax(logits.bfloat16().float(), -1).gather(-1, ids[:, 4:, None])
    assert (bf16_logits[..., 0] - want).abs().max() > 1e-4  # what the fp32 head avoids


def test_gradient_checkpointing_recomputes_and_changes_no_number(world, monkeypatch):
    """SFT's loss and gradients with and without checkpointing (fp32: to 1e-6); the layers
    really run twice; and in PPO, whose models stay in eval mode, checkpointing is on too."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    calls = []
    mlp_forward = LlamaMLP.forward
    monkeypatch.setattr(LlamaMLP, "forward", lambda self, x: calls.append(1) or
                        mlp_forward(self, x))  # module hooks do not fire in the recompute
    batch = {"input_ids": torch.randint(8, 300, (2, 16), generator=torch.Generator()
                                        .manual_seed(1))}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["labels"] = batch["input_ids"].clone()

    def loss_and_grads(checkpointing: bool, eval_mode: bool = False):
        lm = AutoModelForCausalLM.from_pretrained(world["policy"])
        lm.eval() if eval_mode else lm.train()
        calls.clear()
        if checkpointing:
            precision.enable_checkpointing(lm)
            if eval_mode:
                precision.checkpoint_in_eval(lm)
        loss = token_loss_sum(lm, batch)
        loss.backward()
        return loss.item(), [p.grad for p in lm.parameters()], len(calls)

    loss, grads, n_calls = loss_and_grads(False)
    for eval_mode in (False, True):
        ck_loss, ck_grads, ck_calls = loss_and_grads(True, eval_mode)
        assert ck_loss == pytest.approx(loss, abs=1e-6)
        for a, b in zip(grads, ck_grads):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        assert (n_calls, ck_calls) == (2, 4)  # 2 layers: forward, then the recompute


def test_the_scale_flags_exist_on_every_command():
    flags = ["--dtype", "bfloat16", "--gradient-checkpointing", "--lora-r", "8",
             "--lora-alpha", "32", "--lora-dropout", "0.05", "--lora-target-modules", "q_proj",
             "v_proj"]
    for cls, required in ((SFTConfig, ["--data", "d", "--base", "b", "--out", "o"]),
                          (TrainConfig, ["--data", "d", "--base", "b", "--out", "o"]),
                          (PPOConfig, ["--policy", "p", "--rm", "h:1", "--prompts", "x",
                                       "--out", "o"])):
        cfg = cli.parse_config(cls, required + flags, "test")
        assert (cfg.dtype, cfg.gradient_checkpointing, cfg.lora_r, cfg.lora_alpha,
                cfg.lora_dropout, cfg.lora_target_modules) == (
                    "bfloat16", True, 8, 32.0, 0.05, ("q_proj", "v_proj"))
        assert cli.parse_config(cls, required, "test").dtype == "float32"  # the default


def test_whitening_from_sums_is_masked_whiten():
    g = torch.Generator().manual_seed(0)
    x, mask = torch.randn(4, 7, generator=g), torch.rand(4, 7, generator=g) > 0.3
    for shift in (True, False):
        torch.testing.assert_close(
            ppo.whiten_from_sums(x, mask, ppo.masked_sums(x, mask), shift_mean=shift),
            ppo.masked_whiten(x, mask, shift_mean=shift), atol=1e-6, rtol=1e-5)
