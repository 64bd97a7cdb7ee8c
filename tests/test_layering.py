"""The arrows point one way: ``visenv`` imports neither ``rl`` nor ``baselines``, at module level or lazily."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

VISENV = Path(__file__).resolve().parent.parent / "visenv"
UPPER = ("rl", "baselines")


def _upper(name: str | None) -> bool:
    return name is not None and name.split(".")[0] in UPPER


def upward_imports(source: str) -> list[tuple[int, str]]:
    """(line, statement) of every import of rl or baselines in ``source``: ``import``, ``from ... import``,
    ``importlib.import_module("...")`` and ``__import__("...")`` with a literal name, wherever they stand."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if _upper(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _upper(node.module):
            found.append((node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str) \
                    and _upper(node.args[0].value):
                found.append((node.lineno, f"{name}({node.args[0].value!r})"))
    return found


def test_visenv_imports_neither_rl_nor_baselines():
    files = sorted(VISENV.rglob("*.py"))
    assert len(files) > 50  # the walk found the package
    offenders = [f"{path.relative_to(VISENV.parent)}:{line}: {what}"
                 for path in files for line, what in upward_imports(path.read_text(encoding="utf-8"))]
    assert not offenders, "visenv must not import rl or baselines:\n" + "\n".join(offenders)


@pytest.mark.parametrize("source", [
    "import rl.grpo",
    "import numpy, baselines",
    "from rl.config import PolicyConfig",
    "def f():\n    from baselines.workflow_agent import WorkflowAgent",
    "import importlib\nimportlib.import_module('rl.hf')",
    "from importlib import import_module\nimport_module('baselines')",
    "__import__('rl')",
])
def test_the_walk_finds_every_kind_of_upward_import(source):
    assert len(upward_imports(source)) == 1


@pytest.mark.parametrize("source", ["import rlcard", "from visenv.rewards import rl_reward",
                                    "from . import rl", "importlib.import_module(name)"])
def test_the_walk_leaves_other_imports_alone(source):
    assert upward_imports(source) == []
