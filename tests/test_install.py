"""The install split of pyproject.toml: each package's third-party imports are declared where
its users install it from.

- ``protos`` and ``rm_client`` (the light client, ``pip install rlhf-rm-service``): the core
  dependencies alone (tests/rm_client/test_light_install.py runs it with only those);
- ``rm_server`` (with ``kernels``, which it imports): core + ``[serve]``, the Triton kernels
  optional (``[triton]``);
- ``policy_trainer``: core + ``[train]``, with the optional ``[plots]``, ``[datasets]``,
  ``[lora]`` and ``[triton]``;
- the Dockerfiles install core + ``[serve]``; ``[all]`` and ``[dev]`` bring every extra.

Imports are read with ast from every module (function-level ones too) and mapped to their
distributions by ``importlib.metadata.packages_distributions()``.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"protos", "rm_client", "rm_server", "policy_trainer", "feedback", "kernels", "demo",
        "bench", "tests"}
# package -> (the extras its users install, the optional extras it imports only when there)
USERS = {
    "protos": ((), ()),
    "rm_client": ((), ()),
    "rm_server": (("serve",), ("triton",)),
    "kernels": (("serve",), ("triton",)),
    "policy_trainer": (("train",), ("plots", "datasets", "lora", "triton")),
}
DEV_ONLY = {ROOT / "protos" / "generate.py"}  # `make protos`: grpcio-tools, from [dev]


def _project() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli", reason="Python < 3.11 needs tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[ ;<>=!~\[(]", requirement.strip())[0]).lower()


def _declared(project: dict, extras) -> set[str]:
    names = {_name(r) for r in project["dependencies"]}
    for extra in extras:
        names |= {_name(r) for r in project["optional-dependencies"][extra]}
    return names


def _third_party_imports(package: str) -> dict[str, str]:
    """top-level module -> the first file importing it, over every module of ``package``."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        if path in DEV_ONLY or "_pb2" in path.name:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in OURS and top not in sys.stdlib_module_names and top != "__future__":
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("package", sorted(USERS))
def test_every_third_party_import_is_declared_for_the_packages_users(package):
    project, dists = _project(), packages_distributions()
    required, optional = USERS[package]
    allowed = _declared(project, required + optional)
    missing = {}
    for module, where in _third_party_imports(package).items():
        names = {_name(d) for d in dists.get(module, [module])}
        if not names & allowed:
            missing[module] = where
    assert not missing, (f"{package} imports {missing} (module: first file), not declared in "
                         f"the core dependencies or extras {required + optional}")


def test_the_extras_that_bring_everything():
    project = _project()
    extras = project["optional-dependencies"]
    assert set(extras) >= {"serve", "train", "datasets", "lora", "plots", "triton", "all", "dev"}
    assert "rlhf-rm-service[serve,train,datasets,lora,plots]" in extras["all"]
    assert "rlhf-rm-service[all,triton]" in extras["dev"]  # `make test` installs .[dev]
    assert "trl" in {_name(r) for r in extras["dev"]}  # the TRL adapter tests run in CI


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_the_images_install_the_core_and_the_serve_extra(name):
    text = (ROOT / "deploy" / name).read_text()
    assert 'p["dependencies"] + p["optional-dependencies"]["serve"]' in text
