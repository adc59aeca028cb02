"""CLI flags generated from a config dataclass: one flag per field, its docstring as the help.

Each entry point (serve, train, eval, sft, ppo) has one ``@dataclass`` config with a docstring
under every field; this module turns it into argparse flags (``max_batch_size`` ->
``--max-batch-size``) and back, so the CLI and the config cannot drift apart.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing


def field_docs(cls) -> dict[str, str]:
    """The string literal under each field of a dataclass (read from its source)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _base_type(tp):
    """(python type, is_optional) for the annotations we use: str, int, float, bool, X | None."""
    args = typing.get_args(tp)
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def add_dataclass_args(parser: argparse.ArgumentParser, cls, required: tuple[str, ...] = ()) -> None:
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, optional = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = None if f.default is dataclasses.MISSING else f.default
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        help_text = docs.get(f.name, "")
        if default is not None and tp is not bool:
            help_text += f" (default: {default})"
        is_required = f.name in required or (f.default is dataclasses.MISSING
                                             and f.default_factory is dataclasses.MISSING)  # type: ignore[misc]
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
        else:
            choices = typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else None
            conv = type(choices[0]) if choices else tp
            parser.add_argument(flag, dest=f.name, type=conv, choices=choices, default=default,
                                required=is_required, help=help_text)


def from_args(cls, ns: argparse.Namespace):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(ns).items() if k in names})
