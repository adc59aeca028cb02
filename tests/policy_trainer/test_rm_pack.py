"""The packed training forward (policy_trainer/rm_pack.py) against the plain padded one: the same
scores, loss and gradients, per family, recipe and head count; where it does not apply, the
plain forward runs and says why."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from policy_trainer import rm_ensemble, rm_pack, rm_scored_rows
from policy_trainer.prefs import EncodedPair
from policy_trainer.rm_config import TrainConfig
from policy_trainer.rm_model import (
    forward_heads,
    forward_pair_heads,
    load_model,
    packed_forward_off,
)
from policy_trainer.rm_train import train_step
from policy_trainer.scaling import Run
from protos.recipes import RECIPES
from tests import tiny

DECODERS = ["llama", "qwen2", "qwen3", "mistral", "gpt2", "gpt_neox"]
QWEN3 = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=128)  # not in tiny


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pairs_of(tok, n: int = 12, seed: int = 0, eos: bool = False) -> list[tuple[list, list]]:
    """Token-id pairs with a shared prompt of varied length (empty too), responses of varied
    length, one response a prefix of the other, identical first tokens past the prompt, and
    (``eos``) TRL's appended EOS."""
    rng = random.Random(seed)
    ids = list(range(8, len(tok)))
    out = []
    for i in range(n):
        prompt = [tok.bos_token_id] + rng.sample(ids, rng.randint(0, 9))
        a = rng.sample(ids, rng.randint(1, 7))
        b = a[: rng.randint(0, len(a) - 1)] + rng.sample(ids, rng.randint(1, 5))
        if i % 4 == 1:
            b = a + rng.sample(ids, 2)  # chosen a prefix of rejected
        end = [tok.eos_token_id] if eos else []
        out.append((prompt + a + end, prompt + b + end))
    return out


def model_for(arch: str, tmp_path, pad: str = "own", members: int = 1, seed: int = 0):
    tok = tiny.train_tokenizer(pad=pad)
    base = tmp_path / f"base-{arch}-{pad}"
    if arch == "qwen3":
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(AutoConfig.for_model(
            "qwen3", vocab_size=len(tok), pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            **QWEN3)).save_pretrained(base)
        tok.save_pretrained(base)
    else:
        tiny.make_causal_lm(arch, tok, base, seed=seed)
    model, _ = load_model(base, seed, True, members)
    if tok.pad_token_id is not None:
        model.config.get_text_config().pad_token_id = tok.pad_token_id
    return model.train(), tok


def loss_and_grads(model, fn, margin=None, center=0.0, counts=None):
    model.zero_grad(set_to_none=True)
    r_w, r_l = fn()
    loss = rm_ensemble.member_loss(r_w, r_l, counts, margin, center)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return r_w.detach(), r_l.detach(), loss.detach(), grads


def assert_same(a, b, rtol=1e-4, atol=1e-5):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(a[1], b[1], rtol=rtol, atol=atol)
    torch.testing.assert_close(a[2], b[2], rtol=rtol, atol=atol)
    assert a[3].keys() == b[3].keys()
    for name in a[3]:
        scale = a[3][name].abs().max().clamp_min(1e-6)
        torch.testing.assert_close(a[3][name] / scale, b[3][name] / scale, rtol=1e-4, atol=2e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


def plain(model, pairs):
    r = forward_heads(model, [c for c, _ in pairs] + [r for _, r in pairs], torch.device("cpu"))
    return r[: len(pairs)], r[len(pairs):]


def packed(model, pairs, scored_rows=True):
    return rm_pack.forward_pairs(model, [c for c, _ in pairs], [r for _, r in pairs],
                                 torch.device("cpu"), "last-non-pad", scored_rows)


@pytest.mark.parametrize("arch", DECODERS + ["llama-eager", "gpt2-eager"])
def test_packed_scores_loss_and_gradients_equal_the_padded_forward(arch, tmp_path):
    """sdpa takes the boolean mask; eager adds a float one."""
    arch, _, attn = arch.partition("-")
    model, tok = model_for(arch, tmp_path, members=3)
    if attn:
        model.set_attn_implementation(attn)
    assert packed_forward_off(model) is None
    pairs = pairs_of(tok, 12)
    rows = rm_pack.pack([c for c, _ in pairs], [r for _, r in pairs], tok.pad_token_id,
                        hidden=model.config.hidden_size).ids.shape[0]
    assert rows <= len(pairs) // 2  # rows hold several pairs: the block mask keeps them apart
    margin = torch.linspace(0.0, 1.0, len(pairs))
    counts = torch.randint(0, 3, (len(pairs), 3)).float()
    want = loss_and_grads(model, lambda: plain(model, pairs), margin, 0.01, counts)
    for rows in (True, False):  # with and without the last layer's MLP on the scored rows
        got = loss_and_grads(model, lambda rows=rows: packed(model, pairs, rows), margin, 0.01,
                             counts)
        assert_same(want, got)


@pytest.mark.parametrize("arch", DECODERS)
def test_the_last_layer_computes_the_scored_rows_only(arch, tmp_path):
    """The Llama family's last layer runs its queries, output projection and MLP on the 2m
    scored rows only and its keys and values on every slot; the others' attention and MLP
    outputs are constant (zero, or a bias) at every other position: the surgery is in place
    for each family (the test above shows it changes no score)."""
    model, tok = model_for(arch, tmp_path)
    pairs = pairs_of(tok, 6, seed=6)
    backbone = model.base_model
    layer = rm_scored_rows.last_layer(backbone)
    assert rm_scored_rows.final_norm(backbone) is not None  # it too runs on the scored rows
    p = rm_pack.pack([c for c, _ in pairs], [r for _, r in pairs], tok.pad_token_id,
                     hidden=model.config.get_text_config().hidden_size)
    scored = torch.cat([p.chosen_at, p.rejected_at])
    seen = {}

    def watch(name, m):
        return m.register_forward_hook(lambda mod, i, o: seen.__setitem__(
            name, (i[0], o[0] if isinstance(o, tuple) else o)))

    direct = rm_scored_rows.direct_layer(backbone, layer)
    assert direct == (arch in ("llama", "qwen2", "qwen3", "mistral"))
    if direct:
        attn = layer.self_attn
        hooks = [watch(n, getattr(attn, n)) for n in ("q_proj", "k_proj", "o_proj")]
        hooks.append(watch("mlp", layer.mlp))
    else:
        hooks = [watch("attention", rm_scored_rows._attention_of(layer)),
                 watch("mlp", layer.mlp)]
    packed(model, pairs)
    for h in hooks:
        h.remove()
    if direct:
        Q = int(torch.bincount(scored // p.ids.shape[1]).max())  # scored slots per row, at most
        assert seen["k_proj"][0].shape[:2] == p.ids.shape  # keys at every slot
        assert seen["q_proj"][0].shape[:2] == (p.ids.shape[0], Q)  # queries at the scored ones
        assert seen["o_proj"][0].shape[0] == seen["mlp"][0].shape[0] == len(scored)
        assert "forward" not in vars(layer)  # restored
        return
    for name, (_, out) in seen.items():
        flat = out.reshape(-1, out.shape[-1])
        others = flat[[i for i in range(len(flat)) if i not in set(scored.tolist())]]
        assert torch.equal(others, others[:1].expand_as(others)), name
        assert not torch.equal(flat[scored], others[:1].expand(len(scored), -1)), name
    assert layer.mlp._rows_mlp.at is None and not hasattr(
        rm_scored_rows._attention_of(layer), "_rm_pack_rows")  # restored


@pytest.mark.parametrize("pad", ["eos", "none"])
def test_pad_is_eos_skips_trls_eos_and_no_pad_id_reads_the_last_token(pad, tmp_path):
    """pad == eos: HF's rule reads the token before TRL's appended EOS (the packed forward drops
    the EOS: it feeds nothing). No pad id: HF scores one sequence at a time, the last token."""
    model, tok = model_for("llama", tmp_path, pad=pad)
    pairs = pairs_of(tok, 10, seed=1, eos=True)
    want = loss_and_grads(model, lambda: plain(model, pairs))
    got = loss_and_grads(model, lambda: packed(model, pairs))
    assert_same(want, got)
    if pad == "eos":  # the appended EOS is not in the packed rows
        p = rm_pack.pack([c for c, _ in pairs], [r for _, r in pairs], tok.eos_token_id)
        assert not (p.ids == tok.eos_token_id).any()


def test_the_last_token_recipe_scores_an_eos_even_when_pad_is_eos(tmp_path):
    """OpenRLHF's position ("last"): the trailing EOS is the scored token."""
    model, tok = model_for("llama", tmp_path, pad="eos")
    model.scoring_recipe = RECIPES["openrlhf"]
    pairs = pairs_of(tok, 8, seed=2, eos=True)
    want = loss_and_grads(model, lambda: plain(model, pairs))
    got = loss_and_grads(model, lambda: forward_pair_heads(
        model, [c for c, _ in pairs], [r for _, r in pairs], torch.device("cpu")))
    assert_same(want, got)


def test_a_pairs_prompt_runs_once_and_pairs_share_rows():
    chosen = [[1, 5, 6, 7, 8], [9], [1, 9, 4]]
    rejected = [[1, 5, 6, 3], [10], [1, 9, 2, 0, 0]]  # 0: the pad id
    p = rm_pack.pack(chosen, rejected, pad_id=0)
    assert rm_pack.split_pair(chosen[0], rejected[0], 0, "last-non-pad") == (
        [1, 5, 6], [7, 8], [3])
    assert rm_pack.split_pair(chosen[2], rejected[2], 0, "last-non-pad") == (
        [1, 9], [4], [2])  # the padding after the scored token goes
    assert p.tokens == 6 + 2 + 4  # every prompt once
    assert p.ids.shape == (2, 6)  # the two short pairs share the second row
    # the rejected suffix sees its prompt and itself, never the chosen suffix
    row, at = divmod(int(p.rejected_at[0]), 6)
    assert p.mask[row, 0, at].tolist() == [True, True, True, False, False, True]
    assert p.positions[row].tolist() == [0, 1, 2, 3, 4, 3]


def test_train_step_packed_equals_padded_with_lora_and_ensemble(tmp_path):
    """The step the trainer takes (micro-batches, margins, an ensemble's bootstrap counts, LoRA
    adapters): the same loss, statistics and gradients either way."""
    tok = tiny.train_tokenizer(pad="eos")
    base = tiny.make_causal_lm("qwen2", tok, tmp_path / "base", seed=3)
    rng = random.Random(3)
    batch = [EncodedPair(c, r, rng.random(), i) for i, (c, r) in enumerate(pairs_of(tok, 10))]
    counts = torch.randint(0, 3, (10, 2)).float()
    results = []
    for packed_forward in (False, True):
        cfg = TrainConfig(data="x", base=str(base), out="o", ensemble=2, lora_r=4,
                          lora_alpha=8.0, center_coef=0.01, packed_forward=packed_forward)
        model, _ = load_model(base, 0, True, 2)
        model.config.pad_token_id = tok.pad_token_id
        model = Run(cfg, torch.device("cpu")).prepare(model, "SEQ_CLS").train()
        assert packed_forward_off(model) is None
        stats = train_step(model, batch, cfg, 4, torch.device("cpu"), counts)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((stats, grads))
    (s0, g0), (s1, g1) = results
    assert s0 == pytest.approx(s1, rel=1e-5, abs=1e-6)
    assert g0.keys() == g1.keys() and any("lora" in n for n in g0)
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_and_bf16_keep_the_packed_forward(tmp_path):
    """Checkpointing recomputes each layer (the last layer runs on every row then: same
    result); bf16 runs under the same autocast as the model's own forward, with and without
    checkpointing (without: the last layer on the scored rows, rm_scored_rows.py)."""
    tok = tiny.train_tokenizer()
    base = tiny.make_causal_lm("llama", tok, tmp_path / "base", seed=4)
    batch = [EncodedPair(c, r, 0.0, i) for i, (c, r) in enumerate(pairs_of(tok, 8, seed=4))]
    for dtype, tol, ckpt in (("float32", 1e-5, True), ("bfloat16", 3e-2, True),
                             ("bfloat16", 3e-2, False)):
        losses = []
        for packed_forward in (False, True):
            cfg = TrainConfig(data="x", base=str(base), out="o", dtype=dtype,
                              gradient_checkpointing=ckpt, packed_forward=packed_forward)
            model, _ = load_model(base, 0, True)
            model = Run(cfg, torch.device("cpu")).prepare(model, "SEQ_CLS").train()
            losses.append(train_step(model, batch, cfg, 8, torch.device("cpu"))["loss"])
        assert losses[1] == pytest.approx(losses[0], rel=tol), (dtype, ckpt)


def test_where_the_packed_forward_does_not_apply_the_padded_one_runs(tmp_path):
    bert, tok = model_for("bert", tmp_path)
    assert "bert" in packed_forward_off(bert)
    llama, tok = model_for("llama", tmp_path)
    llama.config._attn_implementation = "flash_attention_2"
    assert "4D mask" in packed_forward_off(llama)
    mistral, tok = model_for("mistral", tmp_path)
    mistral.config.sliding_window = 4
    pairs = pairs_of(tok, 6, seed=5)
    seqs = [s for p in pairs for s in p]
    assert "sliding window" in packed_forward_off(mistral, seqs)
    want = plain(mistral, pairs)  # and forward_pair_heads is that forward
    got = forward_pair_heads(mistral, [c for c, _ in pairs], [r for _, r in pairs],
                             torch.device("cpu"))
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    mistral.config.sliding_window = 64  # covers every sequence: the same as full attention
    assert packed_forward_off(mistral, seqs) is None
