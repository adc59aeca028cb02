"""The light install: the client library works with only grpcio and protobuf installed.

`pip install rlhf-rm-service` installs the core dependencies alone (pyproject.toml): grpcio and
protobuf. A fresh virtual environment per test run would be slow to build, so a subprocess of
this one installs an import hook first that refuses every module not shipped by the Python
standard library, by grpcio, protobuf or what they require, or by the client's own packages
(rm_client, protos), wherever else it could be found: then it imports rm_client and scores
against a running server, sync, async and as a TRL-style reward function. That the declared
core dependencies are exactly those is checked against pyproject.toml.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rm_client import RewardClient, text_sample
from rm_server.launch import start_server

REPO = Path(__file__).resolve().parents[2]
CORE = {"grpcio", "protobuf"}

# Runs in the subprocess: argv[1] is the server address, argv[2] the repository root.
LIGHT_CLIENT = r'''
import importlib.abc, importlib.machinery, importlib.metadata as md, json, re, sys
from pathlib import Path

address, repo = sys.argv[1], Path(sys.argv[2]).resolve()
OURS = {"protos", "rm_client"}
OTHER_PACKAGES = {"rm_server", "policy_trainer", "kernels", "demo", "bench", "tests"}


def closure(names):
    """The distributions ``names`` need (requirements without extras), names normalized."""
    seen, todo = set(), list(names)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name not in seen:
            seen.add(name)
            todo += [re.split(r"[ ;<>=!~\[(]", r.strip())[0]
                     for r in md.requires(name) or [] if "extra ==" not in r]
    return seen


ALLOWED_DISTS = closure(sys.argv[3].split(","))
ALLOWED_FILES = {str(Path(md.distribution(d).locate_file(f)).resolve())
                 for d in ALLOWED_DISTS for f in md.files(d) or ()}


class LightInstall(importlib.abc.MetaPathFinder):
    """Refuse what a light install would not have, wherever this environment has it."""

    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in sys.stdlib_module_names or name in sys.builtin_module_names:
            return None
        if top in OTHER_PACKAGES:
            raise ModuleNotFoundError(f"light install: {name} is not the client", name=name)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.origin in (None, "namespace"):
            return None  # a namespace package (google) holds no code; its modules are checked
        origin = Path(spec.origin).resolve()
        mine = top in OURS and origin.is_relative_to(repo / top)
        if not (mine or str(origin) in ALLOWED_FILES):
            raise ModuleNotFoundError(f"light install: {name} ({origin}) is not installed",
                                      name=name)
        return None  # allowed: the usual finders load it


before = set(sys.modules)
sys.meta_path.insert(0, LightInstall())

import asyncio

from rm_client import (AsyncRemoteRewardFunction, AsyncRewardClient, RemoteRewardFunction,
                       RewardClient, text_sample)

for heavy in ("torch", "transformers", "numpy", "tokenizers"):  # the hook's own check
    try:
        __import__(heavy)
    except ModuleNotFoundError as e:
        assert "light install" in str(e), e
    else:
        raise AssertionError(f"{heavy} imported despite the hook")

samples = [text_sample("a", "the movie was", " great fun"), text_sample("b", "i", " hated it")]
with RewardClient(address) as rm:
    info = rm.model_info()
    sync = [r.reward for r in rm.score(samples)]


async def run_async():
    async with AsyncRewardClient(address) as rm:
        return [r.reward for r in await rm.score_all(samples)]


f = RemoteRewardFunction(address, name="light")
as_fn = f(prompts=["the movie was", "i"], completions=[" great fun", " hated it"],
          completion_ids=[[1], [2]])
f.close()
g = AsyncRemoteRewardFunction(address, name="light_async")


async def run_fn():
    try:
        return await g(["the movie was", "i"], [" great fun", " hated it"])
    finally:
        await g.close()


loaded = {m.split(".")[0] for m in set(sys.modules) - before}
print(json.dumps({"sync": sync, "async": asyncio.run(run_async()), "fn": as_fn,
                  "fn_async": asyncio.run(run_fn()), "model": info.name,
                  "third_party": sorted(m for m in loaded
                                        if m not in sys.stdlib_module_names and m[:1] != "_")}))
'''


def test_the_core_dependencies_are_grpcio_and_protobuf():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli", reason="Python < 3.11 needs tomli")

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip() for d in deps}
    assert names == CORE


@pytest.fixture(scope="module")
def server(rm_dirs):
    s = start_server(rm_dirs["gpt2"])
    yield s
    assert s.stop() == 0


def test_the_client_imports_and_scores_with_only_grpcio_and_protobuf(server):
    proc = subprocess.run([sys.executable, "-c", LIGHT_CLIENT, server.address, str(REPO),
                           ",".join(sorted(CORE))], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    with RewardClient(server.address) as rm:
        want = [r.reward for r in rm.score([text_sample("a", "the movie was", " great fun"),
                                            text_sample("b", "i", " hated it")])]
    for key in ("sync", "async", "fn", "fn_async"):
        assert got[key] == pytest.approx(want, abs=1e-6), key
    assert got["model"] == "gpt2"
    # cython_runtime: a module object grpc's Cython extension registers, no file of its own
    assert set(got["third_party"]) <= {"grpc", "google", "typing_extensions", "cython_runtime",
                                       "protos", "rm_client"}, got["third_party"]
    assert {"grpc", "google", "protos", "rm_client"} <= set(got["third_party"])


def test_the_hook_refuses_what_a_light_install_lacks(server):
    script = LIGHT_CLIENT.replace("\nimport asyncio\n", "\nimport asyncio\nimport torch\n")
    proc = subprocess.run([sys.executable, "-c", script, server.address, str(REPO),
                           ",".join(sorted(CORE))], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "light install: torch" in proc.stderr, proc.stderr[-2000:]


# A client-only install has the console scripts too: serve and train must say which extra
# they need in one line instead of a ModuleNotFoundError traceback.
CLI_WITHOUT_EXTRAS = r'''
import importlib.abc, sys

MISSING = {"torch", "transformers", "tyro", "yaml", "numpy", "tokenizers", "safetensors"}


class NoExtras(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in MISSING:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NoExtras())
from rm_server.cli import main as rm_server_main
from policy_trainer.cli import main as trainer_main

codes = [rm_server_main(["serve", "--model", "m"]),
         trainer_main(["sft", "--data", "d", "--base", "b", "--out", "o"])]
sys.exit(10 * codes[0] + codes[1])
'''


def test_commands_without_their_extras_say_which_to_install_in_one_line():
    out = subprocess.run([sys.executable, "-c", CLI_WITHOUT_EXTRAS], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 22, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 2, out.stderr
    assert "rm-server serve: error:" in lines[0] and "[serve]" in lines[0]
    assert "policy-trainer sft: error:" in lines[1] and "[train]" in lines[1]
