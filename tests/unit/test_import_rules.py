"""The import rules of docs/architecture.md ("Layers and import rules"), checked on the source.

The graph is built with `ast` from every `import` and `from ... import` in xenpv/, backends/
and frontends/, wherever it is written: at the top, inside a function (lazy imports) or under
`if TYPE_CHECKING:`. A node is a package (`xenpv.hv`, `xenpv.abi`, `backends.blkback`,
`frontends.netfront`, ...) or a top-level leaf module (`xenpv.errors`, `backends.switch`, ...).
A failing rule lists every offending import as `file:line: importer imports imported`.
"""

from __future__ import annotations

import ast
import functools
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOPS = ("xenpv", "backends", "frontends")


@dataclass(frozen=True, slots=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (a package's __init__ when a name is imported from it)
    where: str  # file:line

    def __str__(self) -> str:
        return f"{self.where}: {self.source} imports {self.target}"


@functools.cache
def modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the project: dotted name -> (file, is a package's __init__)."""
    found: dict[str, tuple[Path, bool]] = {}
    for top in TOPS:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = module.split(".")[: None if is_package else -1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    # `from pkg import sub` imports the module pkg.sub; `from pkg import name`, pkg itself.
    return [
        f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in modules() else prefix
        for alias in node.names
    ]


@functools.cache
def imports() -> tuple[Import, ...]:
    """Every import of a project module by a project module (deduplicated per line)."""
    found: set[Import] = set()
    for module, (path, is_package) in modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                for target in _targets(module, is_package, node):
                    if target.split(".")[0] in TOPS:
                        found.add(Import(module, target, where))
    return tuple(sorted(found, key=lambda i: (i.where, i.target)))


def package(module: str) -> str:
    """The node a module belongs to: its first two name parts (`xenpv.hv.grant` ->
    `xenpv.hv`; `xenpv.errors` is its own node)."""
    return ".".join(module.split(".")[:2])


def within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def cycles(edges: dict[str, dict[str, Import]]) -> list[list[Import]]:
    """One cycle (as the imports along it) per strongly connected component of `edges`
    (node -> successor -> an import making that edge) that has more than one node."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan; the graph is a few hundred nodes
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return [_cycle_through(component, edges) for component in components]


def _cycle_through(component: list[str], edges: dict[str, dict[str, Import]]) -> list[Import]:
    """The shortest cycle from the component's first node back to it (breadth first)."""
    start, members = component[0], set(component)
    came_from: dict[str, tuple[str, Import]] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w, edge in sorted(edges.get(v, {}).items()):
                if w not in members or w in came_from:
                    continue
                came_from[w] = (v, edge)
                if w == start:
                    path: list[Import] = []
                    node = start
                    while True:
                        node, edge = came_from[node]
                        path.append(edge)
                        if node == start:
                            return path[::-1]
                following.append(w)
        frontier = following
    raise AssertionError(f"no cycle through {component}")  # cannot happen for an SCC


def package_graph() -> dict[str, dict[str, Import]]:
    edges: dict[str, dict[str, Import]] = defaultdict(dict)
    for imp in imports():
        a, b = package(imp.source), package(imp.target)
        if a != b:
            edges[a].setdefault(b, imp)
    return edges


def module_graph() -> dict[str, dict[str, Import]]:
    edges: dict[str, dict[str, Import]] = defaultdict(dict)
    for imp in imports():
        if imp.source != imp.target:
            edges[imp.source].setdefault(imp.target, imp)
    return edges


def _show_cycles(found: list[list[Import]]) -> str:
    return "\n\n".join("import cycle:\n" + "\n".join(f"  {i}" for i in c) for c in found)


# -- the rules ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    """Modules under `importers` import nothing under `forbidden`."""

    name: str
    importers: tuple[str, ...]
    forbidden: tuple[str, ...]

    def violations(self) -> list[Import]:
        return [
            imp
            for imp in imports()
            if within(imp.source, self.importers) and within(imp.target, self.forbidden)
        ]


DRIVERS = ("backends", "frontends")
RULES = [
    pytest.param(
        Rule("abi is codecs only", ("xenpv.abi",), ("xenpv.hv", "xenpv.xenstore", *DRIVERS)),
        id="abi",
    ),
    pytest.param(Rule("hv without xenstore", ("xenpv.hv",), ("xenpv.xenstore",)), id="hv"),
    pytest.param(
        Rule(
            "drivers below the toolstack",
            DRIVERS,
            ("xenpv.toolstack", "xenpv.runtime", "xenpv.commands"),
        ),
        id="drivers",
    ),
    pytest.param(
        Rule("frontends without backends", ("frontends",), ("backends",)),
        id="frontends",
    ),
    pytest.param(
        Rule(
            "xenstore stands alone",
            ("xenpv.xenstore",),
            ("xenpv.hv", "xenpv.abi", *DRIVERS, "xenpv.toolstack", "xenpv.runtime"),
        ),
        id="xenstore",
    ),
]


@pytest.mark.parametrize("rule", RULES)
def test_rule(rule: Rule) -> None:
    bad = rule.violations()
    assert not bad, f"{rule.name}: {len(bad)} forbidden imports:\n" + "\n".join(
        f"  {i}" for i in bad
    )


def test_no_cycles_between_packages() -> None:
    found = cycles(package_graph())
    assert not found, _show_cycles(found)


def test_no_cycles_between_modules() -> None:
    found = cycles(module_graph())
    assert not found, _show_cycles(found)


# -- the checker itself ---------------------------------------------------------------------------


def test_lazy_and_type_checking_imports_are_seen() -> None:
    seen = {(i.source, i.target) for i in imports()}
    # a lazy import inside a function, and one under `if TYPE_CHECKING:`
    assert ("xenpv.runtime.domain_process", "backends.switch") in seen
    assert ("xenpv.runtime.workload", "frontends.blkfront") in seen
    # a relative import resolves like an absolute one
    assert all(not i.target.startswith(".") for i in imports())


def test_cycles_are_found_and_shown_with_their_imports() -> None:
    def imp(a: str, b: str) -> Import:
        return Import(a, b, f"{a}.py:1")

    edges = {
        "a": {"b": imp("a", "b")},
        "b": {"c": imp("b", "c"), "d": imp("b", "d")},
        "c": {"a": imp("c", "a")},
        "d": {},
    }
    (cycle,) = cycles(edges)
    assert [(i.source, i.target) for i in cycle] == [("a", "b"), ("b", "c"), ("c", "a")]
    assert "a.py:1: a imports b" in _show_cycles([cycle])
    assert cycles({"a": {"b": imp("a", "b")}, "b": {}}) == []


def test_a_forbidden_import_is_reported_with_file_and_line() -> None:
    rule = Rule("runtime below commands", ("xenpv.runtime",), ("xenpv.commands",))
    assert rule.violations() == []
    rule = Rule("no hv in the runtime", ("xenpv.runtime",), ("xenpv.hv",))
    assert any(
        str(i).startswith("xenpv/runtime/") and ": xenpv.runtime." in str(i)
        for i in rule.violations()
    )
