"""``--compile``: the padded path under torch.compile scores as HF does, and warmup compiles
every graph serving needs (a compile in the middle of serving would stall every caller)."""

from __future__ import annotations

import grpc
import pytest
import torch
from torch._dynamo.utils import counters

from protos import reward_pb2 as pb
from protos import reward_pb2_grpc as pb_grpc
from rm_server.checkpoint import ModelLoadError
from rm_server.launch import start_server
from rm_server.model import RewardModel
from tests.rm_server.test_model import assert_close, hf_alone, random_batch


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module")
def compiled(rm_dirs):
    # One thread, as the servers here run (start_server: --num-threads 1): inductor's CPU code
    # depends on the thread count, so the server's start below compiles from this one's cache.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rm = RewardModel(rm_dirs["llama"], compile=True)
        before = graphs()
        rm.warmup()
        assert graphs() > before, "warmup compiled nothing"
        yield rm
    finally:
        torch.set_num_threads(threads)


def test_compiled_scores_equal_hf_and_nothing_compiles_after_warmup(compiled, rm_dirs,
                                                                    tokenizer):
    after_warmup = graphs()
    seqs = random_batch(len(tokenizer), n=12, seed=7,
                        specials=(tokenizer.pad_token_id, tokenizer.eos_token_id))
    one = seqs[-5]  # random_batch's length-1 sequence
    assert len(one) == 1
    prompt = seqs[0] * 2  # long enough to be shared: the eager shared-prefix path
    batches = [seqs, [seqs[3]], [one], [one, one, one], [seqs[2]] * 4,
               [prompt + [9, 10], prompt + [11], prompt + [12, 13, 14]]]
    got = sum((compiled.score(b) for b in batches), [])
    want = sum((hf_alone(rm_dirs["llama"], b) for b in batches), [])
    assert_close(got, want, 1e-5)
    assert graphs() == after_warmup, "a batch shape compiled after warmup"


def test_compiled_path_runs_the_compiled_module(compiled, rm_dirs):
    """The padded path goes through the OptimizedModule, the shared-prefix path does not."""
    calls = []
    module = compiled._padded_module
    assert isinstance(module, torch._dynamo.eval_frame.OptimizedModule)
    hook = module._orig_mod.register_forward_pre_hook(
        lambda m, a, kw: calls.append(kw["input_ids"].shape), with_kwargs=True)
    try:
        compiled.score([[5, 6, 7], [8, 9]])
    finally:
        hook.remove()
    assert [tuple(c) for c in calls] == [(2, 3)]


def test_compile_failure_is_one_clear_load_error(rm_dirs, monkeypatch):
    def broken(self, module):
        def run(**kw):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")
        return run

    monkeypatch.setattr(RewardModel, "_compile", broken)
    rm = RewardModel(rm_dirs["llama"], compile=True)
    with pytest.raises(ModelLoadError, match=r"^--compile: torch.compile failed: RuntimeError: "
                                             r"InvalidCxxCompiler: No working C\+\+ compiler "
                                             r"found$"):
        rm.warmup()


def test_server_with_compile_serves_hf_scores(rm_dirs, compiled):
    """``rm-server serve --compile`` end to end (the in-process fixture warmed inductor's
    on-disk cache, so this start compiles from cache)."""
    s = start_server(rm_dirs["llama"], "--compile", timeout=300)
    try:
        seqs = [[5, 6, 7, 8], [9, 10], [11]]
        with grpc.insecure_channel(s.address) as ch:
            stub = pb_grpc.RewardServiceStub(ch)
            resp = stub.Score(pb.ScoreRequest(samples=[
                pb.Sample(id=str(i), tokens=pb.TokenIds(ids=ids)) for i, ids in enumerate(seqs)]),
                timeout=60)
        got = [r.reward for r in sorted(resp.results, key=lambda r: int(r.id))]
        want = hf_alone(rm_dirs["llama"], seqs)
        assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-5
        assert "compiled" in s.log()
    finally:
        assert s.stop() == 0, s.log()
