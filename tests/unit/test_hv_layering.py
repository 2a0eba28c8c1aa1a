"""The hv modules import each other without cycles (typing-only imports included), so each
can be read, and tested, on top of the ones it names."""

from __future__ import annotations

import ast
from pathlib import Path

import xenpv.hv

HV = Path(xenpv.hv.__file__).parent


def hv_imports() -> dict[str, set[str]]:
    modules = {path.stem for path in HV.glob("*.py")} - {"__init__"}
    graph: dict[str, set[str]] = {}
    for name in modules:
        deps: set[str] = set()
        for node in ast.walk(ast.parse((HV / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "xenpv.hv":
                deps |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("xenpv.hv."):
                deps.add((node.module or "").split(".")[2])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[2] for a in node.names if a.name.startswith("xenpv.hv.")}
        graph[name] = deps & modules
    return graph


def test_no_import_cycles_among_hv_modules() -> None:
    graph = hv_imports()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        for dep in sorted(graph[name]):
            assert dep not in path, f"import cycle: {' -> '.join([*path, dep])}"
            if dep not in done:
                visit(dep, [*path, dep])
        done.add(name)

    for name in sorted(graph):
        visit(name, [name])


def test_the_link_knows_nothing_of_grants() -> None:
    assert not hv_imports()["link"] & {"mapping", "peergrants", "granter", "mapper", "domain"}
