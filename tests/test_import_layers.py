"""The import graph of visenv: no circles, and no import runs up the floors.

Every ``import`` in a module counts, at module level or inside a function (a lazy import still
ties the modules together); imports under ``if TYPE_CHECKING:`` are annotations only and do not.
"""

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLOORS = (
    ("visenv.error",),
    ("visenv.media", "visenv.resolutions", "visenv.protocol", "visenv.procedural_media", "visenv.mediadb",
     "visenv.scene"),
    ("visenv.tools",),
    ("visenv.tasks",),
    ("visenv.episode",),
    ("visenv.rewards",),
    ("visenv.envs", "visenv.wrappers"),
)
"""From the ground up; a module not listed (cli, evaluation, report, ...) is on the top floor."""


def module_files() -> dict[str, Path]:
    modules = {}
    for path in sorted((ROOT / "visenv").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = module_files()


def imported(source: str) -> set[str]:
    """The visenv modules that ``source`` imports (a ``from package import submodule`` names both)."""
    found = set()

    def visit(nodes) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                assert node.level == 0, "use absolute imports"
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            visit(ast.iter_child_nodes(node))

    visit([ast.parse(source)])
    return {name for name in found if name in MODULES}


GRAPH = {name: imported(path.read_text()) - {name} for name, path in MODULES.items()}


def floor(module: str) -> int:
    return next((level for level, prefixes in enumerate(FLOORS)
                 if any(module == p or module.startswith(p + ".") for p in prefixes)), len(FLOORS))


def test_the_graph_is_read_from_the_source():
    source = ("import json\nfrom visenv.tools import spec, specs as s\nimport visenv.media as m\n"
              "if TYPE_CHECKING:\n    import visenv.envs\nelse:\n    import visenv.episode\n"
              "def f():\n    from visenv.tasks.task import Task\n")
    assert imported(source) == {"visenv.tools", "visenv.tools.spec", "visenv.tools.specs", "visenv.media",
                                "visenv.episode", "visenv.tasks.task"}
    assert "visenv.tools.simulated_text" in GRAPH["visenv.tools.specs"]
    assert "visenv.tasks.workflows" not in GRAPH["visenv.tasks.planner"]  # under TYPE_CHECKING only


def test_no_import_circles():
    try:
        graphlib.TopologicalSorter(GRAPH).prepare()
    except graphlib.CycleError as error:
        pytest.fail(f"import circle: {' -> '.join(error.args[1])}")


def test_no_import_runs_up_the_floors():
    upward = [f"{module} -> {target}" for module, targets in GRAPH.items() for target in sorted(targets)
              if floor(target) > floor(module)]
    assert upward == []
