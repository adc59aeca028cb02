"""The floor plan, read from the code: who may import whom, no cycles, files that fit in one head.

Every product file (the packages the distribution installs) is parsed with ``ast``; every
import counts, at module level or inside a function, relative or absolute, plus
``importlib.import_module("...")`` / ``__import__("...")`` with a literal name. The rules:

- ``policy_trainer`` (training) never imports ``rm_server`` (serving): the trainer talks to
  the RM through the contract and the client;
- ``rm_server`` imports neither ``policy_trainer`` nor ``rm_client``; ``rm-server train`` /
  ``eval`` reach the training side through the ``rm_server.commands`` entry-point group, so
  no string in rm_server's code names a training or client module either;
- ``rm_client`` imports only ``protos`` of ours (a light client install);
- ``protos`` (the contract) and ``kernels`` (pure tensor math) import nothing of ours;
- ``feedback`` (the feedback service) talks to the others through contracts: it may import
  ``protos`` and ``rm_client``, never ``rm_server`` or ``policy_trainer``; the others import
  only its client surface (``feedback.client``, ``feedback.sender``, the records and errors
  they use, and ``feedback.export``'s judgment → preference record), which imports nothing
  but the standard library and itself;
- no product package imports ``demo``, ``bench`` or ``tests`` (not installed);
- no cycle between our packages;
- no product file over 350 lines (generated gRPC stubs excepted).
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("rm_server", "rm_client", "protos", "policy_trainer", "kernels", "feedback")
OURS = set(PRODUCT) | {"demo", "bench", "tests"}
# package -> the packages of ours it may import (itself always allowed)
ALLOWED = {
    "policy_trainer": {"protos", "rm_client", "kernels", "feedback"},  # feedback: its client
    "rm_server": {"protos", "kernels"},
    "rm_client": {"protos"},
    "protos": set(),
    "kernels": set(),
    "feedback": {"protos", "rm_client"},
}
# What other packages may import of feedback: the client and what it is made of.
FEEDBACK_CLIENT = {"feedback.client", "feedback.sender", "feedback.pairs", "feedback.errors",
                   "feedback.export"}
MAX_LINES = 350
GENERATED = re.compile(r"_pb2(_grpc)?\.pyi?$")
# A module path of the training side or the client, as a string (import_module, entry points).
MODULE_PATH_IN_STRING = re.compile(r"\b(policy_trainer|rm_client)(\.[A-Za-z_]|:|$)")


def product_files() -> list[Path]:
    return sorted(p for pkg in PRODUCT for p in (ROOT / pkg).rglob("*.py")
                  if "__pycache__" not in p.parts)


def imports_of(tree: ast.AST, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import in ``tree``, at any depth.

    A relative import (``from . import x``) stays inside ``package``: our packages are flat.
    """
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, package if node.level else node.module or ""))
        elif (isinstance(node, ast.Call) and _dynamic_import(node.func) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    return found


def _dynamic_import(func: ast.expr) -> bool:
    """``importlib.import_module`` / ``import_module`` / ``__import__``."""
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    return name in ("import_module", "__import__")


def strings_outside_docstrings(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, text) of every string constant that is not a docstring (comments are not in
    the tree at all)."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings]


def parsed() -> list[tuple[Path, str, ast.AST]]:
    """(path, top-level package, syntax tree) of every product file."""
    out = []
    for path in product_files():
        rel = path.relative_to(ROOT)
        out.append((rel, rel.parts[0], ast.parse(path.read_text(), filename=str(rel))))
    return out


def package_edges() -> dict[str, dict[str, list[str]]]:
    """{package: {imported package of ours: ["file:line", ...]}} (self-imports left out)."""
    edges: dict[str, dict[str, list[str]]] = {pkg: {} for pkg in PRODUCT}
    for rel, pkg, tree in parsed():
        for line, module in imports_of(tree, pkg):
            top = module.split(".")[0]
            if top in OURS and top != pkg:
                edges[pkg].setdefault(top, []).append(f"{rel}:{line} ({module})")
    return edges


# ------------------------------------------------------------------------------- the rules


def test_packages_import_only_what_the_layout_allows():
    broken = []
    for pkg, targets in package_edges().items():
        for target, where in sorted(targets.items()):
            if target not in ALLOWED[pkg]:
                broken += [f"{w}: {pkg} must not import {target}" for w in where]
    assert not broken, "import rules broken:\n" + "\n".join(broken)


def test_others_import_only_the_feedback_client_which_needs_only_the_standard_library():
    broken = []
    for rel, pkg, tree in parsed():
        module = ".".join(rel.with_suffix("").parts)
        for line, name in imports_of(tree, pkg):
            top = name.split(".")[0]
            if pkg != "feedback" and top == "feedback" and name not in FEEDBACK_CLIENT:
                broken.append(f"{rel}:{line}: {pkg} imports {name} "
                              f"(only {sorted(FEEDBACK_CLIENT)})")
            if module in FEEDBACK_CLIENT and not (name in FEEDBACK_CLIENT or name == "__future__"
                                                  or top in sys.stdlib_module_names):
                broken.append(f"{rel}:{line}: the feedback client imports {name}")
    assert not broken, "feedback client rules broken:\n" + "\n".join(broken)


def test_no_import_cycle_between_packages():
    edges = {pkg: set(targets) & set(PRODUCT) for pkg, targets in package_edges().items()}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(edges[node]):
            if nxt == path[0]:
                cycles.append(" -> ".join([*path, nxt]))
            elif nxt not in path and nxt > path[0]:  # each cycle once, from its smallest name
                visit(nxt, [*path, nxt])

    for start in sorted(edges):
        visit(start, [start])
    assert not cycles, "import cycles between packages:\n" + "\n".join(cycles)


def test_rm_server_names_no_training_or_client_module_in_strings():
    """A string such as "policy_trainer.cli" handed to importlib would dodge the import rule;
    the serving CLI finds train / eval through entry points instead."""
    found = [f"{rel}:{line}: {text!r}" for rel, pkg, tree in parsed() if pkg == "rm_server"
             for line, text in strings_outside_docstrings(tree)
             if MODULE_PATH_IN_STRING.search(text)]
    assert not found, "module paths of other packages in rm_server strings:\n" + "\n".join(found)


def test_no_product_file_over_350_lines():
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in product_files()
            if not GENERATED.search(p.name) and (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"files over {MAX_LINES} lines (split by concept):\n" + "\n".join(long)


# --------------------------------------------------------------------- the checker itself


def test_the_scanner_sees_every_kind_of_import():
    src = '''
"""Docstring naming policy_trainer.cli is fine."""
import os, rm_server.model
from protos import reward_pb2
from . import sibling
from .. import cousin
def f():
    from policy_trainer.ppo import gae
    import importlib
    importlib.import_module("rm_client.client")
    __import__("demo")
    x = "policy_trainer.cli:main"
    return f"{x} rm_client:RewardClient"
'''
    tree = ast.parse(src)
    modules = sorted(m for _, m in imports_of(tree, "kernels"))  # ast.walk is breadth-first
    assert modules == ["demo", "importlib", "kernels", "kernels", "os", "policy_trainer.ppo",
                       "protos", "rm_client.client", "rm_server.model"]
    flagged = sorted(t for _, t in strings_outside_docstrings(tree)
                     if MODULE_PATH_IN_STRING.search(t))
    assert flagged == [" rm_client:RewardClient", "policy_trainer.cli:main", "rm_client.client"]


@pytest.mark.parametrize("text,hit", [("policy_trainer.cli", True), ("rm_client:main", True),
                                      ("policy_trainer", True), ("rm_server.commands", False),
                                      ("install rm_client first", False)])
def test_module_path_pattern(text, hit):
    assert bool(MODULE_PATH_IN_STRING.search(text)) == hit
