"""The PPO loop's pieces, in process: rollouts, log-probs, the critic, failed-sample masking,
RM input forms, metrics. The real CLI against real servers is in test_ppo_e2e.py."""

from __future__ import annotations

import json
import math
import urllib.request

import pytest
import torch
from transformers import AutoModelForCausalLM

from policy_trainer import cli, rollout
from policy_trainer.critic import PolicyAndValue, ValueModel
from policy_trainer.errors import UserError
from policy_trainer.logprobs import check_logprob_path, response_logprobs
from policy_trainer.metrics import PPOMetrics
from policy_trainer.ppo_config import PPOConfig
from policy_trainer.ppo_loop import rewards_and_advantages
from policy_trainer.scoring import RMError, RMScorer, choose_input_mode, make_sample
from protos import reward_pb2 as pb
from protos.encoding import tokenizer_fingerprint
from tests import tiny


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, tokenizer):
    return tiny.make_causal_lm("llama", tokenizer, tmp_path_factory.mktemp("ppo") / "policy")


@pytest.fixture(scope="module")
def policy(policy_dir):
    return AutoModelForCausalLM.from_pretrained(policy_dir).eval()


def prompt_ids(tokenizer, texts):
    return [tokenizer(t)["input_ids"] for t in texts]


# ---------------------------------------------------------------- rollouts

def test_truncate_at_stop_keeps_the_stop_token_and_flags_unfinished_rows():
    eos, stop, pad = 2, 9, 2  # pad == eos: the padding after EOS looks like more EOS
    response = torch.tensor([[5, 6, eos, pad, pad],
                             [5, stop, 7, 8, pad],
                             [5, 6, 7, 8, 4]])
    mask, ended = rollout.truncate_at_stop(response, [eos, stop])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert ended.tolist() == [True, True, False]


def test_generate_is_seeded_cut_at_eos_and_padded(policy, tokenizer):
    ids = prompt_ids(tokenizer, ["the movie was", "a", "i loved this film and the music"])
    gen = rollout.sampling_config(10, 1.0, 0, 1.0, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    args = (policy, ids, [0, 1, 2], gen, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    cpu = torch.device("cpu")
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = rollout.generate(*args, seed=7, device=cpu)
    assert torch.equal(torch.rand(1), before)  # fork_rng: the global stream is untouched
    b = rollout.generate(*args, seed=7, device=cpu)
    c = rollout.generate(*args, seed=8, device=cpu)
    assert torch.equal(a.response, b.response) and not torch.equal(a.response, c.response)
    assert a.query[1, :-len(ids[1])].eq(tokenizer.pad_token_id).all()  # left-padded prompts
    assert a.query[1, -len(ids[1]):].tolist() == ids[1]
    # every response token after the mask is padding; the mask ends at EOS where there is one
    assert a.response[~a.response_mask.bool()].eq(tokenizer.pad_token_id).all()
    for row, n, ended in zip(a.response, a.lengths.tolist(), a.ended.tolist()):
        assert (row[n - 1] == tokenizer.eos_token_id) == ended


def test_sampling_draws_from_pi_over_temperature_whatever_the_checkpoint_says(policy, tokenizer):
    ids = prompt_ids(tokenizer, ["the movie was"] * 64)
    gen = rollout.sampling_config(1, 0.7, 0, 1.0, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    saved = policy.generation_config.to_dict()
    policy.generation_config.top_k, policy.generation_config.repetition_penalty = 1, 5.0
    try:
        ro = rollout.generate(policy, ids, list(range(64)), gen, [tokenizer.eos_token_id],
                              tokenizer.pad_token_id, 11, torch.device("cpu"))
    finally:
        policy.generation_config.top_k = saved.get("top_k")
        policy.generation_config.repetition_penalty = saved.get("repetition_penalty")
    with torch.no_grad():
        logits = policy(torch.tensor(ids)).logits[:, -1].float()  # (64, V)
    torch.manual_seed(11)  # HF's sampler: multinomial(softmax(logits / T)), nothing else
    want = torch.multinomial(torch.softmax(logits / 0.7, -1), 1)[:, 0]
    assert torch.equal(ro.response[:, 0], want)
    assert len(set(want.tolist())) > 1  # the checkpoint's top_k = 1 was not applied


def test_concat_and_subset_keep_response_columns_aligned(policy, tokenizer):
    gen = rollout.sampling_config(6, 1.0, 0, 1.0, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    stop = [tokenizer.eos_token_id]
    cpu = torch.device("cpu")
    c1 = rollout.generate(policy, prompt_ids(tokenizer, ["a"]), [0], gen, stop,
                          tokenizer.pad_token_id, 1, cpu)
    c2 = rollout.generate(policy, prompt_ids(tokenizer, ["the plot was really boring", "b"]),
                          [1, 2], gen, stop, tokenizer.pad_token_id, 2, cpu)
    for c in (c1, c2):
        c.logprobs = response_logprobs(policy, c.query_responses, c.attention_mask,
                                       c.context_length).detach()
    b = rollout.concat([c1, c2], tokenizer.pad_token_id)
    assert b.prompt_index == [0, 1, 2] and b.query.size(1) == c2.query.size(1)
    assert torch.equal(b.response[0, :c1.response.size(1)], c1.response[0])
    # log-probs recomputed on the merged (more padded) layout agree with the chunk's own
    lp = response_logprobs(policy, b.query_responses, b.attention_mask, b.context_length)
    m = b.response_mask.bool()
    assert torch.allclose(lp[m], b.logprobs[m], atol=1e-5)
    sub = b.subset(torch.tensor([2, 0]))
    assert sub.query.size(1) == max(len(prompt_ids(tokenizer, [t])[0]) for t in ["a", "b"])
    assert sub.response.size(1) == int(b.lengths[[2, 0]].max())
    lp_sub = response_logprobs(policy, sub.query_responses, sub.attention_mask, sub.context_length)
    ms = sub.response_mask.bool()
    assert torch.allclose(lp_sub[ms], sub.logprobs[ms], atol=1e-5)


# ---------------------------------------------------------------- log-probs and the critic

def test_logprobs_match_the_models_own_logits_and_have_gradients(policy, tokenizer):
    gen = rollout.sampling_config(8, 0.7, 0, 1.0, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    ro = rollout.generate(policy, prompt_ids(tokenizer, ["the film", "i hated the acting"]),
                          [0, 1], gen, [tokenizer.eos_token_id], tokenizer.pad_token_id, 3,
                          torch.device("cpu"))
    args = (ro.query_responses, ro.attention_mask, ro.context_length)
    assert check_logprob_path(policy, *args, temperature=0.7) < 1e-4
    logp, ent = response_logprobs(policy, *args, temperature=0.7, with_entropy=True)
    (logp.sum() + ent.sum()).backward()
    assert policy.get_output_embeddings().weight.grad.abs().sum() > 0
    assert policy.base_model.embed_tokens.weight.grad.abs().sum() > 0
    policy.zero_grad(set_to_none=True)
    # a head that is not the one the model's forward uses is refused, not trained on
    real = policy.get_output_embeddings

    def scaled():
        head = torch.nn.Linear(real().in_features, real().out_features, bias=False)
        head.weight.data = real().weight.data * 2.0
        return head
    policy.get_output_embeddings = scaled
    try:
        with pytest.raises(ValueError, match="not a plain linear map"):
            check_logprob_path(policy, *args, temperature=0.7)
    finally:
        del policy.get_output_embeddings


def test_critic_starts_at_zero_is_separate_and_round_trips(policy, tokenizer, tmp_path):
    critic = ValueModel.from_policy(policy)
    ids = torch.tensor([tokenizer("the movie was great")["input_ids"]])
    am = torch.ones_like(ids)
    assert critic(ids, am, 2).abs().max() == 0  # zero head: V = 0 before training
    critic.head.weight.data.normal_()
    v = critic(ids, am, 2)
    assert v.shape == (1, ids.size(1) - 2)
    assert critic.backbone.embed_tokens.weight.data_ptr() != \
        policy.base_model.embed_tokens.weight.data_ptr()  # its own weights
    PolicyAndValue(policy, critic).save_pretrained(tmp_path / "ckpt")
    back = ValueModel.from_pretrained(tmp_path / "ckpt" / "value").eval()
    assert torch.allclose(back(ids, am, 2), v, atol=1e-6)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt") is not None


# ---------------------------------------------------------------- failed samples

def fake_batch(B=4, R=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 3, 4, 2])[:B]
    mask = (torch.arange(R)[None, :] < lengths[:, None]).long()
    return rollout.Rollouts(torch.ones(B, 2, dtype=torch.long),
                            torch.ones(B, 2, dtype=torch.long), torch.ones(B, R, dtype=torch.long),
                            mask, torch.tensor([True, True, False, True])[:B], list(range(B)),
                            logprobs=-torch.rand(B, R, generator=g),
                            ref_logprobs=-torch.rand(B, R, generator=g),
                            values=torch.randn(B, R, generator=g))


def test_failed_samples_get_zero_weight_and_no_made_up_reward():
    cfg = PPOConfig(policy="p", rm="r", prompts="x", out="o", missing_eos_penalty=0.5)
    scores = torch.tensor([1.0, math.nan, -2.0, 0.5])  # row 1: the RM finally failed on it
    b = fake_batch()
    sums, _ = rewards_and_advantages(b, scores, kl_coef=0.1, reward_norm=(0.0, 1.0), cfg=cfg)
    assert sums["n_valid"] == 3
    assert b.train_mask[1].sum() == 0 and b.advantages[1].abs().sum() == 0
    assert b.returns[1].abs().sum() == 0
    assert not torch.isnan(b.advantages).any()
    # the scored rows get exactly what they would get if the failed row had never existed
    keep = torch.tensor([0, 2, 3])
    alone = fake_batch().subset(keep)
    sums_alone, _ = rewards_and_advantages(alone, scores[keep], kl_coef=0.1,
                                           reward_norm=(0.0, 1.0), cfg=cfg)
    assert torch.allclose(b.advantages[keep], alone.advantages, atol=1e-6)
    assert sums["score"] == pytest.approx(sums_alone["score"])
    # row 2 ran out of tokens without EOS: the penalty comes off its score, on its last token
    logp, ref = b.logprobs[2], b.ref_logprobs[2]
    want = -2.0 - 0.5 - 0.1 * float(logp[3] - ref[3])
    assert float(b.rewards[2, 3]) == pytest.approx(want)
    assert float(b.rewards[0, 4]) == pytest.approx(1.0 - 0.1 * float(
        b.logprobs[0, 4] - b.ref_logprobs[0, 4]))


def test_a_dead_rm_fails_samples_instead_of_scoring_them():
    scorer = RMScorer("127.0.0.1:9", token=None, timeout=2.0, max_attempts=2, backoff_max=0.01,
                      client_id="t", chunk_size=2)
    try:
        with pytest.raises(RMError, match="cannot reach"):
            scorer.model_info()
        scorer.submit([make_sample("tokens", f"id{i}", [1, 5], [6], "", None) for i in range(3)])
        got = scorer.collect()
        assert got.results == {} and sorted(got.failed) == ["id0", "id1", "id2"]
        assert scorer.retries >= 1
    finally:
        scorer.close()


# ---------------------------------------------------------------- RM input forms

def test_input_mode_follows_the_tokenizer_fingerprint(tokenizer):
    ours = tokenizer_fingerprint(tokenizer)
    same = pb.ModelInfo(tokenizer_fingerprint=ours, has_chat_template=True)
    other = pb.ModelInfo(tokenizer_fingerprint="0" * 16, has_chat_template=False)
    assert choose_input_mode("auto", same, tokenizer) == "tokens"
    assert choose_input_mode("auto", other, tokenizer) == "text"
    assert choose_input_mode("chat", same, tokenizer) == "chat"
    with pytest.raises(RMError, match="differs"):
        choose_input_mode("tokens", other, tokenizer)
    with pytest.raises(RMError, match="chat template"):
        choose_input_mode("chat", other, tokenizer)
    p = tokenizer("the movie")["input_ids"]
    r = tokenizer(" was great", add_special_tokens=False)["input_ids"]
    s = make_sample("tokens", "a", p, r, "the movie", tokenizer)
    assert list(s.tokens.ids) == p + r and s.tokens.prompt_length == len(p)
    s = make_sample("text", "b", p, r, "the movie", tokenizer)
    assert (s.text.prompt, s.text.response) == ("the movie", " was great")
    s = make_sample("chat", "c", p, r, "the movie", tokenizer)
    assert [(m.role, m.content) for m in s.conversation.messages] == [
        ("user", "the movie"), ("assistant", " was great")]


# ---------------------------------------------------------------- config and metrics

def test_batch_sizes_must_divide():
    cfg = PPOConfig(policy="p", rm="r", prompts="x", out="o", batch_size=8, mini_batch_size=4,
                    micro_batch_size=2)
    assert cfg.local_sizes(1) == (8, 4) and cfg.local_sizes(2) == (4, 2)
    with pytest.raises(UserError, match="multiples of the 3 ranks"):
        cfg.local_sizes(3)
    with pytest.raises(UserError, match="micro-batch-size"):
        PPOConfig(policy="p", rm="r", prompts="x", out="o", mini_batch_size=4,
                  micro_batch_size=3).local_sizes(1)


def test_prometheus_metrics_are_served():
    m = PPOMetrics()
    port = m.serve(0, "127.0.0.1")
    try:
        record = {"step": 3, "score": 0.5, "kl": 0.1, "kl_coef": 0.05, "approx_kl": 0.01,
                  "clipfrac": 0.1, "entropy": 2.0, "explained_variance": math.nan,
                  "response_length": 12.0, "lr": 1e-5, "rollouts": 8, "scored": 7,
                  "failed_samples": 1, "time/step": 1.0,
                  **{f"time/{p}": 0.25 for p in ("generate", "score", "reference", "train")}}
        m.observe(record, [0.1, 0.2], new_retries=2)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        m.close()
    for line in ("ppo_step 3.0", "ppo_score_mean 0.5", "ppo_kl_coef 0.05",
                 "ppo_failed_samples_total 1.0", "ppo_rm_retries_total 2.0",
                 "ppo_rollouts_total 8.0", 'ppo_step_phase_seconds_count{phase="score"} 1.0',
                 "ppo_rm_latency_seconds_count 2.0"):
        assert line in text, line
    assert "ppo_explained_variance 0.0" in text  # NaN is skipped, the gauge keeps its value


def test_cli_errors_are_one_line(policy_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "the movie"}) + "\n")
    base = ["ppo", "--policy", str(policy_dir), "--rm", "127.0.0.1:9", "--prompts", str(prompts),
            "--torch-threads", "1", "--rm-max-attempts", "2", "--rm-backoff-max", "0.01",
            "--batch-size", "4", "--mini-batch-size", "2", "--micro-batch-size", "2"]
    n = torch.get_num_threads()
    cases = [  # (extra args, exit code, message)
        (["--out", str(tmp_path / "o1"), "--micro-batch-size", "3"], 2, "--micro-batch-size"),
        (["--out", str(tmp_path / "o2"), "--policy", str(tmp_path / "nope")], 2,
         "no such directory"),
        (["--out", str(tmp_path / "o3"), "--stop-token", "the movie was"], 2, "not one"),
        (["--out", str(tmp_path / "o4")], 1, "cannot reach the reward model"),
    ]
    try:
        for extra, code, message in cases:
            capsys.readouterr()
            assert cli.main(base + extra) == code, extra
            err = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
            assert len(err) == 1 and message in err[0], err
    finally:
        torch.set_num_threads(n)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))  # nothing half-written


def test_a_malformed_rm_address_is_one_line_before_anything_loads(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "the movie"}) + "\n")
    # --policy does not exist: the address is refused first, before any model would load.
    base = ["ppo", "--policy", str(tmp_path / "nope"), "--prompts", str(prompts),
            "--out", str(tmp_path / "o")]
    for rm, message in (("http://127.0.0.1:50051", "no http:// scheme"),
                        ("localhost", "no port (gRPC would dial 443)"),
                        ("127.0.0.1:99999", "not a number in 1..65535")):
        capsys.readouterr()
        assert cli.main(base + ["--rm", rm]) == 2, rm
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("policy-trainer ppo: error: --rm: "), err
        assert message in err[0], err
    assert not (tmp_path / "o").exists()


def test_an_unreachable_rm_at_start_prints_waiting_lines_then_one_error(policy_dir, tmp_path,
                                                                        capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "the movie"}) + "\n")
    n = torch.get_num_threads()
    try:
        code = cli.main(["ppo", "--policy", str(policy_dir), "--rm", "127.0.0.1:9", "--prompts",
                         str(prompts), "--out", str(tmp_path / "o"), "--torch-threads", "1",
                         "--rm-max-attempts", "3", "--rm-backoff-max", "0.01",
                         "--rm-chunk-timeout", "30", "--batch-size", "4",
                         "--mini-batch-size", "2", "--micro-batch-size", "2"])
    finally:
        torch.set_num_threads(n)
    err = capsys.readouterr().err.splitlines()
    waiting = [ln for ln in err if "waiting for the reward model at 127.0.0.1:9" in ln]
    assert code == 1 and len(waiting) == 2, err  # attempts 2 and 3 announced
    assert "attempt 2 of 3" in waiting[0] and "WARNING" in waiting[0]
    assert "attempt 3 of 3" in waiting[1]
    assert err[-1].startswith("policy-trainer ppo: error: cannot reach the reward model"), err


def test_rm_timeouts_are_validated():
    with pytest.raises(UserError, match="rm-chunk-timeout"):
        PPOConfig(policy="p", rm="h:1", prompts="x", out="o", rm_chunk_timeout=0).validate()
    assert PPOConfig(policy="p", rm="h:1", prompts="x", out="o").rm_chunk_timeout > 0
