"""The HTTP/JSON door (rm_server/http.py), end to end: a real `rm-server serve --http-port 0`
on loopback, driven by the clients trainers use: OpenRLHF's own request code (when openrlhf is
installed; its exact request otherwise), curl, aiohttp; beside gRPC clients on the same server.
Scores are checked against the HF forward of each sample alone."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import aiohttp
import grpc
import pytest
import torch
from google.protobuf import json_format
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from protos import reward_pb2 as pb
from protos import reward_pb2_grpc as pb_grpc
from protos.encoding import FullTextInput, TextInput, TokenInput
from protos.recipes import RECIPES
from rm_client import AsyncRewardClient, text_sample
from rm_server.config import ServeConfig, check_config
from rm_server.errors import InvalidArgument
from rm_server.http_protocols import vllm_samples
from rm_server.launch import start_server
from tests import tiny
from tests.rm_server.test_server import scrape

TOKEN = "http-door-token-7"


@pytest.fixture(scope="module")
def model_dir(rm_dirs):
    return rm_dirs["llama"]


@pytest.fixture(scope="module")
def server(model_dir):
    s = start_server(model_dir, "--http-port", "0", "--max-wait-ms", "2")
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture(scope="module")
def base(server):
    return f"http://127.0.0.1:{server.http_port}"


@pytest.fixture(scope="module")
def hf(model_dir):
    """The HF forward on one sequence alone, and the checkpoint's tokenizer."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()

    def score(ids):
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0, 0].item()

    score.tok = tok
    score.text = lambda text, special: score(tok(text, add_special_tokens=special)["input_ids"])
    return score


def call(url, body=None, headers=None, method=None):
    """(HTTP status, JSON body, headers); ``body``: a dict (sent as JSON) or raw bytes."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def queries(hf, n=6):
    """Full texts as OpenRLHF builds them: prompt + generated ids (EOS included), decoded with
    the special tokens kept."""
    tok, out = hf.tok, []
    for i in range(n):
        prompt = tok(f"<|user|>the movie {'was ' * i}", add_special_tokens=False)["input_ids"]
        action = tok(" great acting" + " and plot" * (i % 3), add_special_tokens=False)["input_ids"]
        out.append((tok.decode(prompt + action + [tok.eos_token_id], skip_special_tokens=False),
                    tok.decode(prompt, skip_special_tokens=False)))
    return out


# -- OpenRLHF: POST /get_reward -------------------------------------------------------------------

def test_get_reward_through_openrlhfs_own_client(base, hf):
    agent = pytest.importorskip("openrlhf.utils.agent")
    executor = agent.SingleTurnAgentExecutor(remote_rm_url=f"{base}/get_reward")
    for query, prompt in queries(hf, 3):
        [info] = asyncio.run(executor._fetch_rewards_via_http([query], [prompt], [None]))
        assert info["rewards"] == pytest.approx([hf.text(query, False)], abs=1e-5)
        assert info["scores"] == info["rewards"]
        assert set(info["extra_logs"]) == {"rm_num_tokens", "rm_truncated"}
        # OpenRLHF turns each extra_logs entry into a float tensor for its logs
        assert torch.tensor([info["extra_logs"]["rm_truncated"]]).dtype == torch.float32


def test_get_reward_as_openrlhf_posts_it(base, hf):
    """OpenRLHF 0.11.2's request (utils/agent.py `_fetch_rewards_via_http`): aiohttp,
    json={query, prompts, labels}, raise_for_status, response.json(); a batch of queries."""
    pairs = queries(hf)
    payload = {"query": [q for q, _ in pairs], "prompts": [p for _, p in pairs],
               "labels": [None] * len(pairs)}

    async def post():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as session:
            async with session.post(f"{base}/get_reward", json=payload) as response:
                response.raise_for_status()
                return await response.json()

    out = asyncio.run(post())
    expected = [hf.text(q, False) for q, _ in pairs]
    assert out["rewards"] == pytest.approx(expected, abs=1e-5)
    lengths = [len(hf.tok(q, add_special_tokens=False)["input_ids"]) for q, _ in pairs]
    assert out["extra_logs"] == {"rm_num_tokens": lengths, "rm_truncated": [0.0] * len(pairs)}


def test_get_reward_equals_openrlhfs_own_rm_server(tokenizer, tmp_path):
    """OpenRLHF's setting end to end: pad == eos (its get_tokenizer's), queries ending in EOS,
    --recipe openrlhf: /get_reward equals OpenRLHF's serve_rm (tokenizer(query,
    add_special_tokens=False), RewardModel.forward's value at the last token), not HF's rule."""
    from tests.rm_server.test_recipes import openrlhf_rewards

    tok = tiny.train_tokenizer(pad="eos")
    path = tiny.make_reward_model("llama", tok, tmp_path / "orl", seed=3)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    texts = ["the movie was great", "boring plot and bad acting", "i loved it"]
    queries = [f"<|user|>rate it<|assistant|>{t}{tok.eos_token}" for t in texts]
    seqs = [tok(q, add_special_tokens=False)["input_ids"] for q in queries]
    want = openrlhf_rewards(model, seqs, tok.pad_token_id)
    with torch.no_grad():  # HF's rule skips the trailing EOS (pad == eos): not OpenRLHF's
        hf_rule = [model(torch.tensor([ids])).logits[0, 0].item() for ids in seqs]
    assert max(abs(a - b) for a, b in zip(want, hf_rule)) > 1e-3
    s = start_server(path, "--http-port", "0", "--recipe", "openrlhf")
    try:
        status, out, _ = call(f"http://127.0.0.1:{s.http_port}/get_reward",
                              {"query": queries, "prompts": ["<|user|>rate it"] * 3})
        assert status == 200 and out["rewards"] == pytest.approx(want, abs=1e-5)
    finally:
        assert s.stop() == 0, s.log()


# -- curl -----------------------------------------------------------------------------------------

def curl(*args: str) -> tuple[int, dict]:
    out = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", *args], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    body, _, status = out.rpartition("\n")
    return int(status), json.loads(body)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_one_liners(base, hf):
    status, out = curl("-d", '{"query": ["<s>the movie was great</s>"]}', f"{base}/get_reward")
    assert status == 200
    assert out["rewards"] == pytest.approx([hf.text("<s>the movie was great</s>", False)],
                                           abs=1e-5)
    body = {"samples": [{"id": "a", "text": {"prompt": "the movie", "response": " was great"}}]}
    status, out = curl("-H", "Content-Type: application/json", "-d", json.dumps(body),
                       f"{base}/v1/score")
    ids = hf.tok("the movie")["input_ids"] + hf.tok(" was great",
                                                   add_special_tokens=False)["input_ids"]
    assert status == 200 and out["results"][0]["id"] == "a"
    assert out["results"][0]["reward"] == pytest.approx(hf(ids), abs=1e-5)
    assert out["results"][0]["num_tokens"] == len(ids) and out["results"][0]["truncated"] is False
    status, out = curl("-d", '{"query": ["a", 3]}', f"{base}/get_reward")
    assert (status, out["error"]["code"]) == (400, "INVALID_ARGUMENT")
    assert out["error"]["message"].startswith("query[1]:")


# -- vLLM: POST /pooling and /classify -----------------------------------------------------------

def test_pooling_and_classify_shapes_score_like_hf(base, hf):
    texts = ["the movie was great", "boring plot"]
    ids = [5, 17, 42, 9]
    status, out, _ = call(f"{base}/pooling", {"model": "llama", "input": texts})
    assert status == 200 and out["object"] == "list" and out["model"] == "llama"
    assert out["id"].startswith("pool-") and isinstance(out["created"], int)
    assert [d["index"] for d in out["data"]] == [0, 1]
    assert {d["object"] for d in out["data"]} == {"pooling"}
    for d, text in zip(out["data"], texts):  # vLLM's default: add_special_tokens=true
        assert d["data"] == pytest.approx([hf.text(text, True)], abs=1e-5)
    n_tokens = sum(len(hf.tok(t)["input_ids"]) for t in texts)
    assert out["usage"] == {"prompt_tokens": n_tokens, "total_tokens": n_tokens,
                            "completion_tokens": 0, "prompt_tokens_details": None}

    _, out, _ = call(f"{base}/pooling", {"input": texts[0], "add_special_tokens": False})
    assert out["data"][0]["data"] == pytest.approx([hf.text(texts[0], False)], abs=1e-5)
    _, out, _ = call(f"{base}/pooling", {"input": [ids, ids[:2]]})
    assert [d["data"][0] for d in out["data"]] == pytest.approx([hf(ids), hf(ids[:2])], abs=1e-5)
    chat = [{"role": "user", "content": "rate this"}, {"role": "assistant", "content": "great"}]
    _, out, _ = call(f"{base}/pooling", {"messages": chat})
    chat_ids = hf.tok.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
    assert out["data"][0]["data"] == pytest.approx([hf(list(chat_ids))], abs=1e-5)

    status, out, _ = call(f"{base}/classify", {"model": "llama", "input": ids})
    assert status == 200 and out["id"].startswith("classify-")
    [d] = out["data"]
    assert (d["index"], d["label"], d["num_classes"]) == (0, "LABEL_0", 1)
    assert d["probs"] == pytest.approx([hf(ids)], abs=1e-5)  # raw, unlike vLLM's default
    _, out, _ = call(f"{base}/classify", {"input": ids, "use_activation": True})
    sigmoid = torch.sigmoid(torch.tensor(hf(ids))).item()
    assert out["data"][0]["probs"] == pytest.approx([sigmoid], abs=1e-6)

    status, out, _ = call(f"{base}/classify", {"model": "other", "input": "x"})
    assert (status, out["error"]["code"]) == (404, "NOT_FOUND")
    status, out, _ = call(f"{base}/v1/models")
    assert status == 200 and out["data"][0]["id"] == "llama"


def test_vllm_texts_take_special_tokens_only_where_exact():
    """add_special_tokens true (vLLM's default) is tokenizer(text, add_special_tokens=True): the
    "rm-server" recipe's prompt; under a recipe that would score another layout it is refused."""
    [(sid, item)] = vllm_samples({"input": "x"}, RECIPES["rm-server"])
    assert (sid, item) == ("input[0]", TextInput("x", ""))
    for name in RECIPES:
        [(_, item)] = vllm_samples({"input": ["x"], "add_special_tokens": False}, RECIPES[name])
        assert item == FullTextInput("x")
        [(_, item)] = vllm_samples({"input": [5, 6]}, RECIPES[name])
        assert item == TokenInput((5, 6), 0)
    with pytest.raises(InvalidArgument, match=r"add_special_tokens: true .*\('trl'\)"):
        vllm_samples({"input": "x"}, RECIPES["trl"])


def test_multi_head_rm_every_head_in_every_shape(tokenizer, tmp_path):
    """num_labels = 2: /pooling and /classify carry both heads (classify's label: the higher),
    /get_reward logs each head beside the reward, /v1/score fills head_scores."""
    path = tiny.make_reward_model("llama", tokenizer, tmp_path / "two", seed=5, num_labels=2,
                                  id2label={0: "helpful", 1: "safe"})
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    ids = [5, 17, 42, 9]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].tolist()
    s = start_server(path, "--http-port", "0", "--head-weights", "helpful=0.5,safe=2")
    base = f"http://127.0.0.1:{s.http_port}"
    try:
        _, out, _ = call(f"{base}/pooling", {"input": [ids]})
        assert out["data"][0]["data"] == pytest.approx(logits, abs=1e-5)
        _, out, _ = call(f"{base}/classify", {"input": [ids]})
        [d] = out["data"]
        assert d["probs"] == pytest.approx(logits, abs=1e-5) and d["num_classes"] == 2
        assert d["label"] == ("helpful" if logits[0] > logits[1] else "safe")
        _, out, _ = call(f"{base}/classify", {"input": [ids], "use_activation": True})
        assert out["data"][0]["probs"] == pytest.approx(
            torch.softmax(torch.tensor(logits), 0).tolist(), abs=1e-6)
        text = "<s>the movie was great"
        _, out, _ = call(f"{base}/get_reward", {"query": [text]})
        with torch.no_grad():
            heads = model(**AutoTokenizer.from_pretrained(path)(
                text, add_special_tokens=False, return_tensors="pt")).logits[0].tolist()
        assert out["rewards"] == pytest.approx([0.5 * heads[0] + 2 * heads[1]], abs=1e-5)
        assert out["extra_logs"]["rm_head_helpful"] == pytest.approx([heads[0]], abs=1e-5)
        assert out["extra_logs"]["rm_head_safe"] == pytest.approx([heads[1]], abs=1e-5)
        _, out, _ = call(f"{base}/v1/score", {"samples": [{"id": "a", "tokens": {"ids": ids}}]})
        assert out["results"][0]["head_scores"] == pytest.approx(logits, abs=1e-5)
    finally:
        assert s.stop() == 0, s.log()


# -- ours: POST /v1/score, GET /v1/model_info, GET /healthz ---------------------------------------

def test_json_score_and_model_info_equal_grpc(server, base):
    request = pb.ScoreRequest(samples=[
        pb.Sample(id="t", text=pb.TextPair(prompt="the movie", response=" was good")),
        pb.Sample(id="k", tokens=pb.TokenIds(ids=[7] * 60 + [9], prompt_length=3)),
        pb.Sample(id="c", conversation=pb.Conversation(messages=[
            pb.ChatMessage(role="user", content="hi"), pb.ChatMessage(role="assistant",
                                                                      content="great")]))])
    with grpc.insecure_channel(server.address) as ch:
        stub = pb_grpc.RewardServiceStub(ch)
        grpc_response = stub.Score(request, timeout=10)
        grpc_info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    status, out, _ = call(f"{base}/v1/score", json_format.MessageToDict(request))  # lowerCamel
    assert status == 200
    assert json_format.ParseDict(out, pb.ScoreResponse()) == grpc_response
    assert {"id", "reward", "num_tokens", "truncated"} <= set(out["results"][0])  # proto names
    status, info, _ = call(f"{base}/v1/model_info")
    assert status == 200 and json_format.ParseDict(info, pb.ModelInfo()) == grpc_info
    assert info["max_length"] == 128 and isinstance(info["num_parameters"], int)
    assert call(f"{base}/healthz")[:2] == (200, {"status": "SERVING"})


@pytest.mark.parametrize("path, body, field", [
    ("/get_reward", b"{\"query\": [", "request body: not JSON"),
    ("/get_reward", b"", "request body: not JSON"),
    ("/get_reward", b"[1, 2]", "request body: expected a JSON object"),
    ("/get_reward", {"prompts": ["a"]}, "query: missing"),
    ("/get_reward", {"query": "one text"}, "query: expected a list"),
    ("/get_reward", {"query": ["ok", ""]}, "sample 'query[1]': full_text: empty sequence"),
    ("/pooling", {"model": "llama"}, "input: missing"),
    ("/pooling", {"input": []}, "input: expected"),
    ("/pooling", {"input": ["ok", [1, "x"]]}, "input[1]: expected a text or a list of integer"),
    ("/pooling", {"input": [[1, 10**6]]}, "sample 'input[0]': tokens.ids: id 1000000"),
    ("/pooling", {"messages": [{"role": "user"}]}, "messages[0].content: expected a string"),
    ("/pooling", {"messages": [{"role": "wizard", "content": "x"}]},
     "sample 'messages': conversation.messages[0].role"),
    ("/classify", {"input": "x", "use_activation": "yes"}, "use_activation: expected"),
    ("/classify", {"input": "x", "encoding_format": "base64"}, "encoding_format"),
    ("/v1/score", {"samples": [{"id": "a", "txt": {}}]}, "has no field named \"txt\""),
    ("/v1/score", {"samples": []}, "samples: empty request"),
    ("/v1/score", {"samples": [{"id": "a"}]}, "sample 'a': input: no input set"),
    ("/v1/score", {"samples": [{"id": "d", "tokens": {"ids": [5]}},
                               {"id": "d", "tokens": {"ids": [6]}}]}, "sample 'd': id: duplicate"),
])
def test_bad_requests_are_400_naming_the_field(base, path, body, field):
    status, out, _ = call(base + path, body)
    assert status == 400 and out["error"]["code"] == "INVALID_ARGUMENT", out
    assert field in out["error"]["message"], out


def test_unknown_routes_and_methods(base):
    assert call(f"{base}/nope")[0] == 404
    status, out, _ = call(f"{base}/get_reward")  # GET on a POST route
    assert (status, out["error"]["code"]) == (405, "UNIMPLEMENTED")


def test_deadline_header_drops_the_request(base, server):
    before = scrape(server)
    texts = [" ".join(["the movie was really great"] * 20)] * 256
    status, out, _ = call(f"{base}/get_reward", {"query": texts}, {"X-Timeout-Ms": "1"})
    assert (status, out["error"]["code"]) == (504, "DEADLINE_EXCEEDED"), out
    after = scrape(server)
    assert after["rm_samples_total"] - before["rm_samples_total"] < len(texts)


def test_http_and_grpc_clients_at_once_score_exactly(server, base, hf):
    """4 HTTP and 4 gRPC stream clients at once share the batcher; every score is the HF one."""
    pairs = queries(hf, 24)

    async def http_client(c):
        async with aiohttp.ClientSession() as session:
            out = []
            for i in range(c, len(pairs), 4):
                async with session.post(f"{base}/get_reward", json={"query": [pairs[i][0]]},
                                        headers={"X-Client-Id": f"h{c}"}) as r:
                    out.append((pairs[i][0], (await r.json())["rewards"][0]))
            return out

    async def grpc_client(c):
        samples = [text_sample(f"g{c}-{i}", p, q[len(p):]) for i, (q, p) in enumerate(pairs)]
        async with AsyncRewardClient(server.address, client_id=f"g{c}") as rm:
            return {r.id: r.reward async for r in rm.score_stream(iter(samples), chunk_size=5)}

    def grpc_expected(i):  # TextPair: the prompt with the special tokens, then the response
        q, p = pairs[i]
        return hf(hf.tok(p)["input_ids"] + hf.tok(q[len(p):], add_special_tokens=False)[
            "input_ids"])

    async def main():
        return await asyncio.gather(*(http_client(c) for c in range(4)),
                                    *(grpc_client(c) for c in range(4)))

    before = scrape(server)
    results = asyncio.run(main())
    after = scrape(server)
    for query, reward in (x for got in results[:4] for x in got):
        assert reward == pytest.approx(hf.text(query, False), abs=1e-5)
    for c, got in enumerate(results[4:]):
        assert [got[f"g{c}-{i}"] for i in range(len(pairs))] == pytest.approx(
            [grpc_expected(i) for i in range(len(pairs))], abs=1e-5)
    http = 'rm_requests_total{code=OK,method=/get_reward}'
    assert after[http] - before.get(http, 0) == len(pairs)
    assert after["rm_batch_size_count"] - before["rm_batch_size_count"] < 5 * len(pairs)


def test_a_client_that_goes_away_cancels_its_samples(server, base):
    """A disconnect cancels the handler (aiohttp's handler_cancellation): CANCELLED, and the
    request's queued samples never reach the model."""
    before = scrape(server)
    body = {"input": [[7 + i % 100] * 128 for i in range(1024)]}

    async def give_up():
        timeout = aiohttp.ClientTimeout(total=0.1)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            with pytest.raises(asyncio.TimeoutError):
                async with session.post(f"{base}/pooling", json=body) as r:
                    await r.read()

    asyncio.run(give_up())
    key = "rm_requests_total{code=CANCELLED,method=/pooling}"
    deadline = time.monotonic() + 20
    while scrape(server).get(key, 0) == before.get(key, 0):
        assert time.monotonic() < deadline, "the server never saw the client go"
        time.sleep(0.05)
    time.sleep(0.5)  # a batch in flight finishes; nothing after it starts
    after = scrape(server)
    assert after["rm_samples_total"] - before["rm_samples_total"] < 1024


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("openssl") is None,
                    reason="needs curl and openssl")
def test_https_with_the_grpc_ports_certificate(model_dir, tmp_path):
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", "key.pem", "-out", "cert.pem"], cwd=tmp_path, check=True,
                   capture_output=True)
    s = start_server(model_dir, "--http-port", "0", "--health-port", "0",
                     "--tls-cert", str(tmp_path / "cert.pem"), "--tls-key",
                     str(tmp_path / "key.pem"))
    try:
        url = f"https://127.0.0.1:{s.http_port}/get_reward"
        status, out = curl("--cacert", str(tmp_path / "cert.pem"), "-d", '{"query": ["a b"]}',
                           url)
        assert status == 200 and len(out["rewards"]) == 1
        plain = subprocess.run(["curl", "-sS", "-d", "{}", url.replace("https", "http")],
                               capture_output=True, text=True, timeout=30)
        assert plain.returncode != 0 or "rewards" not in plain.stdout  # no plaintext door
    finally:
        assert s.stop() == 0, s.log()


def test_routes_are_metric_series(server):
    fresh = scrape(server)
    for route in ("/get_reward", "/pooling", "/classify", "/v1/score", "/v1/model_info"):
        assert f"rm_requests_total{{code=OK,method={route}}}" in fresh
        assert f"rm_request_duration_seconds_count{{method={route}}}" in fresh
    assert "rm_rejected_total{reason=too_large}" in fresh


# -- auth, limits, overload -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def guarded(model_dir, tmp_path_factory):
    """Token auth and tight limits: a queue of 8, one sample per batch, 4 requests at once,
    4 KiB bodies."""
    token = tmp_path_factory.mktemp("auth") / "token"
    token.write_text(TOKEN + "\n")
    s = start_server(model_dir, "--http-port", "0", "--auth-token-file", str(token),
                     "--max-queue", "8", "--max-batch-size", "1", "--max-concurrent-rpcs", "4",
                     "--max-message-bytes", "4096")
    yield s
    assert s.stop() == 0, s.log()
    assert TOKEN not in s.log()


def test_bearer_token_and_basic_auth_from_a_url(guarded):
    base = f"http://127.0.0.1:{guarded.http_port}"
    body = {"query": ["the movie"]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic !!"}):
        status, out, h = call(f"{base}/get_reward", body, headers)
        assert (status, out["error"]["code"]) == (401, "UNAUTHENTICATED")
        assert h["WWW-Authenticate"].startswith("Bearer")
    assert call(f"{base}/get_reward", body, {"Authorization": f"Bearer {TOKEN}"})[0] == 200
    assert call(f"{base}/v1/model_info")[0] == 401
    assert call(f"{base}/healthz")[:2] == (200, {"status": "SERVING"})  # probes: no token

    async def openrlhf_style():  # a URL is all OpenRLHF takes: aiohttp sends its user as Basic
        async with aiohttp.ClientSession() as session:
            url = f"http://rm:{TOKEN}@127.0.0.1:{guarded.http_port}/get_reward"
            async with session.post(url, json=body) as response:
                response.raise_for_status()
                return await response.json()

    assert len(asyncio.run(openrlhf_style())["rewards"]) == 1
    after = scrape(guarded)
    assert after["rm_rejected_total{reason=unauthenticated}"] >= 4


def test_body_over_the_limit_is_413(guarded):
    base = f"http://127.0.0.1:{guarded.http_port}"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    status, out, _ = call(f"{base}/get_reward", {"query": ["x" * 5000]}, headers)
    assert (status, out["error"]["code"]) == (413, "RESOURCE_EXHAUSTED")
    assert "--max-message-bytes" in out["error"]["message"]


def test_overload_is_503_with_retry_after_and_concurrency_429(guarded):
    """64 requests of 3 texts at once into a queue of 8: past 4 requests at once (waiting on the
    tokenizer or the model) RESOURCE_EXHAUSTED (429); with the queue full UNAVAILABLE (503 and
    Retry-After); the rest scored."""
    base = f"http://127.0.0.1:{guarded.http_port}"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    seen: dict[int, list] = {}

    async def one(session, i):
        body = {"input": [f"the movie {'was great ' * (i % 7)}"] * 3}
        async with session.post(f"{base}/pooling", json=body, headers=headers) as r:
            seen.setdefault(r.status, []).append((await r.json(), r.headers.get("Retry-After")))

    async def main():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            await asyncio.gather(*(one(session, i) for i in range(64)))

    for _ in range(5):  # bounded: until both refusals showed up
        asyncio.run(main())
        if 503 in seen and 429 in seen:
            break
    assert set(seen) <= {200, 429, 503} and 200 in seen and 503 in seen and 429 in seen
    for out, retry_after in seen[503]:
        assert out["error"]["code"] == "UNAVAILABLE" and out["error"]["retry_after_ms"] >= 10
        assert int(retry_after) >= 1
    assert {out["error"]["code"] for out, _ in seen[429]} == {"RESOURCE_EXHAUSTED"}
    after = scrape(guarded)
    assert after["rm_rejected_total{reason=queue_full}"] > 0
    assert after["rm_requests_total{code=UNAVAILABLE,method=/pooling}"] == len(seen[503])


# -- lifecycle, flags -----------------------------------------------------------------------------

def test_sigterm_lets_http_requests_in_flight_finish(model_dir):
    s = start_server(model_dir, "--http-port", "0", "--max-batch-size", "1",
                     "--drain-delay-seconds", "1")
    base = f"http://127.0.0.1:{s.http_port}"
    answer = {}
    long_request = threading.Thread(target=lambda: answer.setdefault(
        "r", call(f"{base}/pooling", {"input": [[7] * 100] * 1000})))
    try:
        long_request.start()
        time.sleep(0.2)
        s.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while call(f"{base}/healthz")[0] != 503:  # NOT_SERVING while draining
            assert time.monotonic() < deadline
            time.sleep(0.05)
        long_request.join(60)
        status, out, _ = answer["r"]
        assert status == 200 and len(out["data"]) == 1000
    finally:
        assert s.stop() == 0, s.log()


def test_http_port_flags_are_checked_like_the_others():
    with pytest.raises(ValueError, match="--port and --http-port are both 50051"):
        check_config(ServeConfig(model="m", port=50051, http_port=50051))
    with pytest.raises(ValueError, match="--http-port must be in 0-65535"):
        check_config(ServeConfig(model="m", http_port=70000))
    assert ServeConfig(model="m").http_port is None  # off unless asked for


def test_http_port_in_use_is_one_line(server, model_dir):
    proc = subprocess.run(
        [*start_cmd(model_dir), "--http-port", str(server.http_port)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"rm-server serve: error: --http-port {server.http_port}: "
                                   f"127.0.0.1:{server.http_port} is already in use by another "
                                   "process")


def start_cmd(model_dir) -> list[str]:
    return [sys.executable, "-m", "rm_server.cli", "serve", "--model", str(model_dir),
            "--port", "0", "--metrics-port", "-1", "--num-threads", "1"]
