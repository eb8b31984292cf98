"""The architecture's layering, checked from the source: cli -> api -> studies -> agents -> envs -> engine.

The engine is itself layered, by the steps of an episode, bottom to top: ``errors``, ``common``,
``model``, ``data``, ``units``, ``cost``, ``evaluate``, ``reconstruct``, ``prune``, ``finetune``,
``task``, ``export`` (each a subpackage of ``autoprune``, ``errors`` a module).

A module may import its own layer and the layers below it, never one above (lazy imports inside
functions included: they run too; imports under ``if TYPE_CHECKING:`` do not run and are not
counted), and no two modules may import each other, directly or round a circle. The package's
``__init__`` is the facade: its lazy ``__getattr__`` re-exports the API.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

FOLDERS = {"autoprune": "autoprune", "envs": "autoprune.envs", "agents": "autoprune.agents",
           "studies": "autoprune.studies"}
ENGINE = ["errors", "common", "model", "data", "units", "cost", "evaluate", "reconstruct", "prune", "finetune",
          "task", "export"]
LAYERS = [*ENGINE, "envs", "agents", "studies", "api", "cli"]  # bottom to top


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


def layer(module: str) -> str:
    """The layer of a module: ``autoprune.<layer>[.<module>]``."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    raise AssertionError(f"{module} is in no layer: put it in one of {', '.join(LAYERS)}")


def _runtime_nodes(tree: ast.AST):
    """Every node, less the bodies of ``if TYPE_CHECKING:`` (imports for annotations never run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The autoprune modules ``path`` imports, at module level or inside functions."""
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in modules}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {m: _imports(p, set(modules)) - {m} for m, p in modules.items()}
    graph.pop("autoprune")  # the facade (lazy re-exports by name, see its __getattr__)
    for deps in graph.values():
        # importing a subpackage runs its __init__ only: `from autoprune.envs import X` is an import
        # of the envs layer, whose __init__ is checked on its own
        deps.discard("autoprune")
    return graph


def test_the_layers_are_known():
    graph = _graph()
    assert {layer(m) for m in graph} == set(LAYERS)  # every module is in a layer, every layer has one
    assert layer("autoprune.cli") == "cli" and layer("autoprune.task.task") == "task"
    assert "autoprune.studies.runner" in graph["autoprune.api"]  # the check sees real edges
    assert "autoprune.units.channels" in graph["autoprune.units.table"]


def test_the_top_of_autoprune_is_the_public_face():
    """Only the API, the CLI and the error type sit beside the engine's subpackages."""
    loose = sorted(p.name for p in (REPO / "autoprune").glob("*.py"))
    assert loose == ["__init__.py", "api.py", "cli.py", "errors.py"]


def test_no_import_runs_upward():
    upward = [f"{m} ({layer(m)}) imports {d} ({layer(d)})"
              for m, deps in _graph().items() for d in sorted(deps)
              if LAYERS.index(layer(d)) > LAYERS.index(layer(m))]
    assert upward == []


def test_no_import_circle():
    graph = _graph()
    circles, state = [], {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                circles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert circles == []


def test_no_function_runs_over_80_lines():
    """A function a reader cannot hold in one screen is split into its phases (STYLE.md)."""
    long = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{module}.{node.name}: {lines} lines")
    assert long == []
