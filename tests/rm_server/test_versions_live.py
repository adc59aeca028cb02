"""Model versions on a live `rm-server` (issue 19): three swaps and a rollback under load from 8
clients lose no sample and every score is the HF forward of the version it names; broken
checkpoints disturb nothing; pins work and fail cleanly (gRPC, HTTP, the client library); the
admin API answers only its own token; memory returns after unloads. The registry alone, without
sockets: test_versions.py. Figures print with a ``FIGURE`` prefix (``pytest -s``)."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import AutoModelForSequenceClassification

from protos import reward_pb2 as pb
from protos import reward_pb2_grpc as pb_grpc
from rm_client import AsyncRewardClient, RewardClient, ScoringError, token_sample
from rm_client.admin import AdminClient
from rm_client.admin import main as admin_main
from rm_server.checkpoint import weights_version
from rm_server.launch import start_server
from tests import tiny
from tests.rm_server.test_reliability import metric, rss_mb

ADMIN, SCORING = "admin-secret", "scoring-secret"
ADMIN_MD = (("authorization", f"Bearer {ADMIN}"),)
N_SEQS = 200


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    """Four versions of one RM (same tokenizer, other weights), the tokens, and each version's
    HF scores of a corpus, every sequence alone."""
    root = tmp_path_factory.mktemp("versions")
    dirs = [tiny.make_reward_model("llama", tokenizer, root / f"v{i + 1}", seed=20 + i)
            for i in range(4)]
    (root / "admin.token").write_text(ADMIN)
    (root / "scoring.token").write_text(SCORING)
    rng = random.Random(0)
    seqs = [[rng.randrange(8, 300) for _ in range(rng.randint(4, 40))] for _ in range(N_SEQS)]
    refs = {}
    for d in dirs:
        model = AutoModelForSequenceClassification.from_pretrained(d).eval()
        with torch.no_grad():
            refs[weights_version(d)] = [model(torch.tensor([s])).logits[0, 0].item()
                                        for s in seqs]
    return SimpleNamespace(root=root, dirs=dirs, hashes=[weights_version(d) for d in dirs],
                           seqs=seqs, refs=refs, tokenizer=tokenizer)


def serve(w, *args, admin=True):
    tokens = ["--auth-token-file", str(w.root / "scoring.token")]
    if admin:
        tokens += ["--admin-token-file", str(w.root / "admin.token")]
    return start_server(w.dirs[0], *tokens, "--version-label", "v1", *args)


def check_scores(w, results, key=lambda r: int(r.id.split(":")[-1])) -> None:
    """Each result's reward is the HF forward of the version it names (1e-4)."""
    wrong = [r.id for r in results if abs(r.reward - w.refs[r.version][key(r)]) > 1e-4]
    assert not wrong, f"{len(wrong)} scores differ from their version's HF forward: {wrong[:5]}"


# -- under load ---------------------------------------------------------------------------------

def test_three_swaps_and_a_rollback_under_load_from_8_clients(w_server_load):
    w, server, out = w_server_load
    results, generated, health, steps = out
    ids = [r.id for r in results]
    assert len(ids) == sum(generated.values()), "lost samples"
    assert len(set(ids)) == len(ids), "answered twice"
    check_scores(w, results)
    by_version = {h: sum(r.version == h for r in results) for h in w.hashes}
    print(f"\nFIGURE versions under load: {len(ids)} samples, by version "
          f"{[by_version[h] for h in w.hashes]}, {len(health)} health checks")
    assert all(by_version.values()), "every version scored under load"
    assert set(health) == {health_pb2.HealthCheckResponse.SERVING}
    labels = {r.version: r.version_label for r in results}
    assert labels == dict(zip(w.hashes, ("v1", "v2", "v3", "v4")))
    # the operator's view: each load the new default, the oldest unloaded past --max-versions 2
    v1, v2, v3, v4 = w.hashes
    assert [s.default_version for s in steps] == [v2, v3, v4, v3]  # ... then the rollback
    assert [[u.version for u in s.unloaded] for s in steps] == [[], [v1], [v2], []]
    assert [v.version for v in steps[-1].resident] == [v3, v4]
    for c, last in last_by_client(results).items():  # after the rollback: v3 again
        assert last.version == v3, c
    assert metric(server, "rm_version_loads_total", {"result": "ok"}) == 4
    assert metric(server, "rm_version_unloads_total") == 2
    assert metric(server, "rm_version_default_changes_total") == 5
    assert {h for h in w.hashes if metric(server, "rm_version_info", {"version": h})} == {v3, v4}
    assert "Traceback" not in server.log() and "internal error" not in server.log()


def last_by_client(results):
    out = {}
    for r in results:
        c, i, _ = r.id.split(":")
        if c not in out or int(i) > int(out[c].id.split(":")[1]):
            out[c] = r
    return out


@pytest.fixture(scope="module")
def w_server_load(world):
    server = serve(world, "--max-versions", "2", "--max-batch-size", "16", "--max-wait-ms", "2")
    try:
        out = asyncio.run(asyncio.wait_for(swaps_under_load(world, server), 300))
        yield world, server, out
    finally:
        assert server.stop() == 0, server.log()


async def swaps_under_load(w, server):
    """4 streaming and 4 unary clients score until the operator has loaded v2, v3 and v4 (each
    the new default) and rolled back to v3; health is polled meanwhile."""
    done = asyncio.Event()
    generated: dict[str, int] = {}
    health: list = []

    def endless(c):
        rng, i = random.Random(c), 0
        while True:
            k = rng.randrange(N_SEQS)
            generated[f"c{c}"] = i + 1
            yield token_sample(f"c{c}:{i}:{k}", w.seqs[k])
            i += 1

    async def stream_client(c):  # as a trainer: a stream per generation chunk of 200
        got, samples = [], endless(c)
        async with AsyncRewardClient(server.address, token=SCORING, client_id=f"s{c}") as rm:
            while not done.is_set() or len(got) < 50:
                chunk = [next(samples) for _ in range(200)]
                got += [r async for r in rm.score_stream(chunk, chunk_size=25)]
        return got

    async def unary_client(c):
        got, samples = [], endless(c)
        async with AsyncRewardClient(server.address, token=SCORING, client_id=f"u{c}") as rm:
            while not done.is_set() or len(got) < 50:
                got += await rm.score([next(samples) for _ in range(25)])
        return got

    async def watch_health():
        async with grpc.aio.insecure_channel(server.address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while not done.is_set():
                health.append((await stub.Check(health_pb2.HealthCheckRequest(),
                                                timeout=10)).status)
                await asyncio.sleep(0.02)

    async def operator():
        steps = []
        async with grpc.aio.insecure_channel(server.address) as ch:
            admin = pb_grpc.AdminServiceStub(ch)
            await asyncio.sleep(1.0)
            for i in (1, 2, 3):
                steps.append(await admin.LoadVersion(pb.LoadVersionRequest(
                    path=str(w.dirs[i]), label=f"v{i + 1}", make_default=True),
                    metadata=ADMIN_MD, timeout=120))
                await asyncio.sleep(1.0)
            steps.append(await admin.SetDefaultVersion(pb.SetDefaultVersionRequest(
                version="v3"), metadata=ADMIN_MD, timeout=30))
            await asyncio.sleep(1.0)
        done.set()
        return steps

    *per_client, _, steps = await asyncio.gather(
        *(stream_client(c) for c in range(4)), *(unary_client(c) for c in range(4, 8)),
        watch_health(), operator())
    return [r for got in per_client for r in got], generated, health, steps


# -- broken checkpoints -------------------------------------------------------------------------

def broken_checkpoints(w) -> dict[str, tuple[Path, str]]:
    """name -> (directory, what the one-line error says)."""
    root = w.root / "broken"
    out = {}
    truncated = shutil.copytree(w.dirs[1], root / "truncated", dirs_exist_ok=True)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    out["truncated"] = (truncated, "truncated or corrupt")
    shapes = shutil.copytree(w.dirs[1], root / "shapes", dirs_exist_ok=True)
    config = json.loads((shapes / "config.json").read_text())
    config["intermediate_size"] = 80
    (shapes / "config.json").write_text(json.dumps(config))
    out["shapes"] = (shapes, "ignore_mismatched_sizes")
    out["causal_lm"] = (tiny.make_causal_lm("llama", w.tokenizer, root / "lm"),
                        "causal language model")
    out["missing"] = (root / "nowhere", "no config.json")
    return out


def test_a_broken_checkpoint_leaves_the_default_serving_and_answers_one_line(world):
    w = world
    server = serve(w, "--max-batch-size", "8")
    errors, results = [], []

    async def main():
        done = asyncio.Event()

        async def traffic():
            async with AsyncRewardClient(server.address, token=SCORING) as rm:
                i = 0
                while not done.is_set():
                    results.extend(await rm.score([token_sample(f"t:{i + j}:{(i + j) % N_SEQS}",
                                                                w.seqs[(i + j) % N_SEQS])
                                                   for j in range(10)]))
                    i += 10

        async def operator():
            async with grpc.aio.insecure_channel(server.address) as ch:
                admin = pb_grpc.AdminServiceStub(ch)
                for name, (path, says) in broken_checkpoints(w).items():
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await admin.LoadVersion(pb.LoadVersionRequest(
                            path=str(path), label="v2", make_default=True),
                            metadata=ADMIN_MD, timeout=120)
                    errors.append((name, e.value.code(), e.value.details(), says, str(path)))
                    await asyncio.sleep(0.2)
            done.set()

        await asyncio.gather(traffic(), operator())

    try:
        asyncio.run(main())
        with RewardClient(server.address, token=SCORING) as rm:
            info = rm.model_info()
    finally:
        assert server.stop() == 0, server.log()
    for name, code, details, says, path in errors:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, code, details)
        assert details.startswith(f"load {path}: ") and says in details, (name, details)
        assert "\n" not in details
    assert len(results) > 0 and {r.version for r in results} == {w.hashes[0]}
    check_scores(w, results)
    assert info.version == info.default_version == w.hashes[0]
    assert [v.version for v in info.resident_versions] == [w.hashes[0]]


# -- pins, GetModelInfo, HTTP, the admin token ---------------------------------------------------

@pytest.fixture(scope="module")
def canary_server(world):
    """v1 the default, v2 loaded beside it as a canary (label "canary"), over HTTP too."""
    server = serve(world, "--http-port", "0")
    try:
        with AdminClient(server.address, ADMIN) as admin:
            admin.load(str(world.dirs[1]), "canary", make_default=False)
        yield server
    finally:
        assert server.stop() == 0, server.log()


def test_pinning_works_and_fails_cleanly(world, canary_server):
    w, server = world, canary_server
    v1, v2 = w.hashes[:2]
    samples = [token_sample(f"p:{k}:{k}", w.seqs[k]) for k in range(20)]
    with RewardClient(server.address, token=SCORING) as rm:
        default = rm.score(samples)
        by_label = rm.score(samples, version="canary")
        by_hash = rm.score_all(samples, chunk_size=7, version=v2)  # a stream, every request
        stream = list(rm.score_stream(samples, chunk_size=5, version="v1"))
        assert {r.version for r in default} == {v1} and {r.version_label for r in default} == {
            "v1"}
        assert {(r.version, r.version_label) for r in by_label + by_hash} == {(v2, "canary")}
        assert {r.version for r in stream} == {v1}
        for got in (default, by_label, by_hash, stream):
            check_scores(w, got)
        with pytest.raises(ScoringError) as e:
            rm.score(samples, version="v9")
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert (f"'v9' is not resident on this server; resident: {v1} (v1, default), "
                f"{v2} (canary)") in str(e.value)
        info, canary = rm.model_info(), rm.model_info(version="canary")
        with pytest.raises(ScoringError, match="FAILED_PRECONDITION"):
            rm.model_info(version="v9")
    assert (info.version, info.version_label, info.default_version) == (v1, "v1", v1)
    assert [(v.version, v.label, v.is_default) for v in info.resident_versions] == [
        (v1, "v1", True), (v2, "canary", False)]
    assert (canary.version, canary.version_label, canary.default_version) == (v2, "canary", v1)
    assert canary.tokenizer_fingerprint == info.tokenizer_fingerprint


def http(server, path, body=None, token=SCORING, headers=()):
    req = urllib.request.Request(f"http://127.0.0.1:{server.http_port}{path}",
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {token}", **dict(headers)})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def test_the_http_door_pins_and_names_versions(world, canary_server):
    w, server = world, canary_server
    v1, v2 = w.hashes[:2]
    body = {"samples": [{"id": "a", "tokens": {"ids": w.seqs[0]}}], "version": "canary"}
    status, headers, out = http(server, "/v1/score", body)
    assert status == 200 and headers["X-RM-Version"] == v2
    assert out["results"][0]["version"] == v2 and out["results"][0]["version_label"] == "canary"
    assert out["results"][0]["reward"] == pytest.approx(w.refs[v2][0], abs=1e-4)
    text = w.tokenizer.decode(w.seqs[1])
    for pin, version in (("", v1), ("canary", v2)):
        status, headers, out = http(server, "/get_reward", {"query": [text]},
                                    headers={"X-RM-Version": pin} if pin else {})
        assert status == 200 and headers["X-RM-Version"] == version
    status, _, out = http(server, "/pooling", {"input": [w.seqs[2]]},
                          headers={"X-RM-Version": "v9"})
    assert status == 400 and out["error"]["code"] == "FAILED_PRECONDITION"
    assert "resident:" in out["error"]["message"]
    status, _, out = http(server, "/v1/model_info")
    assert out["default_version"] == v1 and len(out["resident_versions"]) == 2


def test_the_admin_api_answers_only_its_own_token(world, canary_server, capsys):
    w, server = world, canary_server
    with grpc.insecure_channel(server.address) as ch:
        admin, reward = pb_grpc.AdminServiceStub(ch), pb_grpc.RewardServiceStub(ch)
        request = pb.SetDefaultVersionRequest(version="v1")
        for token in (SCORING, "", "wrong"):
            with pytest.raises(grpc.RpcError) as e:
                admin.SetDefaultVersion(request, metadata=(("authorization", f"Bearer {token}"),))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:  # and the admin token does not score
            reward.GetModelInfo(pb.GetModelInfoRequest(), metadata=ADMIN_MD)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            admin.UnloadVersion(pb.UnloadVersionRequest(version="v1"), metadata=ADMIN_MD)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "is the default" in e.value.details()
    assert http(server, "/v1/admin/default", {"version": "v1"})[0] == 401  # scoring token
    status, _, out = http(server, "/v1/admin/default", {"version": "canary"}, token=ADMIN)
    assert status == 200 and out["default_version"] == w.hashes[1]
    status, _, out = http(server, "/v1/admin/default", {"version": "v1"}, token=ADMIN)
    assert status == 200 and out["default_version"] == w.hashes[0]
    # the operator's command line: a refusal is one line and exit 1
    token_file = str(w.root / "admin.token")
    assert admin_main(["--rm", server.address, "--token-file", token_file, "default",
                       "v9"]) == 1
    assert capsys.readouterr().err.startswith("rm_client.admin default: FAILED_PRECONDITION: ")
    assert admin_main(["--rm", server.address, "--scoring-token-file",
                       str(w.root / "scoring.token"), "list"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [v["label"] for v in listed["resident"]] == ["v1", "canary"]


def test_without_an_admin_token_there_is_no_admin_api(world):
    server = serve(world, "--http-port", "0", admin=False)
    try:
        with grpc.insecure_channel(server.address) as ch:
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.AdminServiceStub(ch).LoadVersion(
                    pb.LoadVersionRequest(path=str(world.dirs[1])), metadata=ADMIN_MD)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        status, _, out = http(server, "/v1/admin/load", {"path": str(world.dirs[1])})
        assert status == 404 and "--admin-token-file" in out["error"]["message"]
    finally:
        assert server.stop() == 0, server.log()


# -- memory -------------------------------------------------------------------------------------

def test_memory_returns_after_unload_over_10_swaps(tmp_path, tokenizer, world):
    """Three ~50 MB checkpoints loaded in turn, ten times, with --max-versions 2 and light
    traffic: the RSS after the tenth swap stays within one model of the RSS after the second
    (every swap unloads one model: a leak would add 50 MB per swap)."""
    size = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=8)
    dirs = [tiny.make_reward_model("llama", tokenizer, tmp_path / f"m{i}", seed=i, **size)
            for i in range(3)]
    model_mb = (dirs[0] / "model.safetensors").stat().st_size / 2**20
    server = start_server(dirs[0], "--admin-token-file", str(world.root / "admin.token"),
                          "--max-versions", "2")
    rss = []
    try:
        with AdminClient(server.address, ADMIN) as admin, RewardClient(server.address) as rm:
            for swap in range(1, 11):
                admin.load(str(dirs[swap % 3]), f"s{swap}")
                got = rm.score([token_sample(f"{swap}-{i}", world.seqs[i]) for i in range(16)])
                assert {r.version_label for r in got} == {f"s{swap}"}
                time.sleep(0.3)  # the unloaded version's release runs
                rss.append(rss_mb(server.proc.pid))
    finally:
        assert server.stop() == 0, server.log()
    print(f"\nFIGURE versions memory: model {model_mb:.0f} MB; RSS after each swap "
          f"{[round(x) for x in rss]} MB")
    assert max(rss[2:]) - rss[1] < model_mb, rss
