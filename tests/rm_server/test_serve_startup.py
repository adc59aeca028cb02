"""`rm-server serve` starting up, as a new user meets it (issue 15).

- A decoder RM of a family outside the fast path, whose tokenizer has no pad token, is served
  with HF's scores (HF itself refuses to batch such a model).
- Ports: out of range, held by another process (gRPC or metrics) -> one line, exit 1; grpc's
  default SO_REUSEPORT is off; the default metrics port is not Prometheus's own.
- Checkpoints that cannot be a reward model (truncated weights, no tokenizer, a causal LM) ->
  one line on stderr naming the problem, exit 1, through the real CLI.
- /metrics: known series at zero from the start, the process and Python collectors, 404 on
  other paths.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from protos import reward_pb2 as pb
from protos import reward_pb2_grpc as pb_grpc
from rm_client import token_sample
from rm_server.config import ServeConfig, check_config
from rm_server.launch import start_server
from rm_server.model import LAST_TOKEN_FAMILIES, RewardModel
from rm_server.ports import add_grpc_port
from rm_server.server import server_options
from tests import tiny

# Decoder families outside LAST_TOKEN_FAMILIES whose HF classifier refuses batches > 1 with no
# pad id. OPT and BLOOM have a `score` head (served by gathering rows); CTRL's head is named
# `classifier` (served one sample at a time).
PADLESS = {
    "opt": (dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=128, word_embed_proj_dim=32), "rows"),
    "bloom": (dict(hidden_size=32, n_layer=2, n_head=4), "rows"),
    "ctrl": (dict(n_embd=32, n_layer=2, n_head=4, dff=64, n_positions=128), "single"),
}


def make_padless(arch: str, out):
    tok = tiny.train_tokenizer(pad="none")
    assert tok.pad_token_id is None
    cfg = AutoConfig.for_model(arch, vocab_size=len(tok), num_labels=1, pad_token_id=None,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               **PADLESS[arch][0])
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(cfg)
    head = getattr(model, "score", None) or model.classifier
    with torch.no_grad():  # spread: a near-zero random head makes parity trivial
        head.weight.normal_(0.0, 2.0 / head.weight.shape[1] ** 0.5)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def hf_alone(path, seqs) -> list[float]:
    ref = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return [ref(torch.tensor([s])).logits[0, 0].item() for s in seqs]


def batch(n: int = 8, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    seqs = [[rng.randrange(8, 300) for _ in range(rng.randint(1, 30))] for _ in range(n)]
    return seqs + [seqs[0] + [2, 2]]  # trailing EOS: with no pad id it is scored, not skipped


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory):
    return make_padless("opt", tmp_path_factory.mktemp("padless") / "opt")


@pytest.fixture(scope="module")
def llama_rm(rm_dirs):
    return rm_dirs["llama"]


@pytest.fixture(scope="module")
def llama_server(llama_rm):
    """A fast-path RM served, and its /metrics page scraped before any request."""
    s = start_server(llama_rm)
    try:
        fresh = urllib.request.urlopen(f"http://127.0.0.1:{s.metrics_port}/metrics",
                                       timeout=5).read().decode()
        yield s, fresh
    finally:
        assert s.stop() == 0, s.log()


# -- 1. pad-less decoders outside the fast path -------------------------------------------------

@pytest.mark.parametrize("arch", sorted(PADLESS))
def test_padless_decoder_batches_score_like_hf_alone(arch, tmp_path):
    assert arch not in LAST_TOKEN_FAMILIES
    path = make_padless(arch, tmp_path / arch)
    rm = RewardModel(path)
    assert (rm.scoring_path, rm.forward_mode) == ("forward", PADLESS[arch][1])
    seqs = batch()
    got, want = rm.score(seqs), hf_alone(path, seqs)
    assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-5
    assert max(want) - min(want) > 0.1  # scores differ, so parity means something


def test_padless_decoder_is_served_with_hf_scores(opt_dir):
    server = start_server(opt_dir, "--max-wait-ms", "20", "--metrics-port", "-1")
    try:
        seqs = batch(seed=1)
        with grpc.insecure_channel(server.address) as ch:
            stub = pb_grpc.RewardServiceStub(ch)
            req = pb.ScoreRequest(samples=[token_sample(str(i), s) for i, s in enumerate(seqs)])
            got = {r.id: r.reward for r in stub.Score(req, timeout=30).results}
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    finally:
        assert server.stop() == 0, server.log()
    assert info.pad_token_id == -1 and info.model_type == "opt"
    want = hf_alone(opt_dir, seqs)
    assert max(abs(got[str(i)] - w) for i, w in enumerate(want)) <= 1e-5
    assert "forward path (rows)" in server.log()


# -- 2. ports -----------------------------------------------------------------------------------

def serve_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real CLI; a server that starts when it should not is killed at ``timeout``."""
    cmd = [sys.executable, "-m", "rm_server.cli", "serve", "--num-threads", "1", *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"rm-server serve {' '.join(args)} kept running instead of refusing")


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("rm-server serve: error: "), proc.stderr
    return lines[0]


def test_port_outside_0_65535_is_refused(llama_rm):
    line = one_error_line(serve_cli("--model", str(llama_rm), "--port", "70000",
                                    "--metrics-port", "-1", timeout=60))
    assert "--port" in line and "70000" in line
    for flag in ("metrics_port", "health_port"):
        with pytest.raises(ValueError, match=f"--{flag.replace('_', '-')} must be in 0-65535"):
            check_config(ServeConfig(model="m", **{flag: 65536}))
    with pytest.raises(ValueError, match="--port and --metrics-port are both 50051"):
        check_config(ServeConfig(model="m", port=50051, metrics_port=50051))


def test_second_server_on_a_held_port_is_refused(llama_server, llama_rm):
    """grpc's SO_REUSEPORT let a second server share the port: the kernel then split the
    connections between two processes."""
    server, _ = llama_server
    line = one_error_line(serve_cli("--model", str(llama_rm), "--port", str(server.port),
                                    "--metrics-port", "-1", timeout=60))
    assert f"--port {server.port}" in line and "already in use" in line


def test_metrics_port_in_use_is_one_line(llama_server, llama_rm):
    server, _ = llama_server
    line = one_error_line(serve_cli("--model", str(llama_rm), "--port", "0",
                                    "--metrics-port", str(server.metrics_port), timeout=60))
    assert f"--metrics-port {server.metrics_port}" in line and "already in use" in line


def test_grpc_server_options_refuse_a_port_shared_with_so_reuseport():
    """Even past the probe (a race), grpc itself must refuse a port a SO_REUSEPORT socket holds."""
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as grpc's own listeners
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]

        async def bind():
            server = grpc.aio.server(options=server_options(ServeConfig(model="m")))
            try:
                with pytest.raises(OSError, match=f"--port: cannot bind 127.0.0.1:{port}"):
                    add_grpc_port(server, "--port", f"127.0.0.1:{port}")
            finally:
                await server.stop(0)
        asyncio.run(bind())


def test_default_metrics_port_is_not_prometheus_own():
    port = ServeConfig(model="m").metrics_port
    assert port not in range(9090, 9095)  # Prometheus, pushgateway, alertmanager
    assert port not in range(9100, 10000)  # the exporters' allocated range


# -- 3. checkpoints that cannot be served -------------------------------------------------------

def copy_rm(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_safetensors_is_one_line(llama_rm, tmp_path):
    bad = copy_rm(llama_rm, tmp_path / "rm")
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    line = one_error_line(serve_cli("--model", str(bad), "--port", "0", "--metrics-port", "-1"))
    assert "model.safetensors" in line and "truncated or corrupt" in line


def test_corrupt_safetensors_is_one_line(llama_rm, tmp_path):
    bad = copy_rm(llama_rm, tmp_path / "rm")
    (bad / "model.safetensors").write_bytes(b"\x07not a safetensors file" * 50)
    line = one_error_line(serve_cli("--model", str(bad), "--port", "0", "--metrics-port", "-1"))
    assert "model.safetensors" in line and "truncated or corrupt" in line


def test_checkpoint_without_tokenizer_is_one_line(llama_rm, tmp_path):
    bad = copy_rm(llama_rm, tmp_path / "rm")
    for f in bad.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            f.unlink()
    line = one_error_line(serve_cli("--model", str(bad), "--port", "0", "--metrics-port", "-1"))
    assert "no tokenizer files" in line and "sentencepiece" not in line


def test_causal_lm_is_refused_with_how_to_train_an_rm(tokenizer, tmp_path):
    lm = tiny.make_causal_lm("llama", tokenizer, tmp_path / "lm")
    line = one_error_line(serve_cli("--model", str(lm), "--port", "0", "--metrics-port", "-1"))
    assert "causal language model (LlamaForCausalLM)" in line
    assert f"rm-server train --base {lm}" in line


def test_base_model_without_a_trained_head_is_refused(tokenizer, tmp_path):
    """A config that names no class: detected after loading, by the head weights it lacks."""
    lm = tiny.make_causal_lm("llama", tokenizer, tmp_path / "lm")
    config = json.loads((lm / "config.json").read_text())
    del config["architectures"]
    config.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    (lm / "config.json").write_text(json.dumps(config))
    proc = serve_cli("--model", str(lm), "--port", "0", "--metrics-port", "-1")
    assert proc.returncode == 1
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert len(errors) == 1 and "score.weight" in errors[0] and "rm-server train" in errors[0]


# -- 4. /metrics --------------------------------------------------------------------------------

def test_fresh_server_exports_known_series_at_zero(llama_server):
    _, fresh = llama_server
    for method in ("Score", "ScoreStream", "GetModelInfo"):
        assert f'rm_requests_total{{code="OK",method="{method}"}} 0.0' in fresh
        assert f'rm_request_duration_seconds_count{{method="{method}"}} 0.0' in fresh
        assert f'rm_request_duration_seconds_bucket{{le="+Inf",method="{method}"}} 0.0' in fresh
    assert 'rm_rejected_total{reason="queue_full"} 0.0' in fresh


def test_process_and_python_collectors_are_exported(llama_server):
    _, fresh = llama_server
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                 "process_start_time_seconds", "python_info", "python_gc_collections_total"):
        assert f"\n{name}" in fresh, name


def test_metrics_port_answers_404_off_metrics(llama_server):
    server, _ = llama_server
    base = f"http://127.0.0.1:{server.metrics_port}"
    assert urllib.request.urlopen(base + "/metrics", timeout=5).status == 200
    for path in ("/", "/foo", "/metrics/extra"):
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(base + path, timeout=5)
        assert exc.value.code == 404, path
