"""The import rules of architecture.md, read from the code itself (every import, also those inside functions).

- The add-on never imports torch or ``server`` (it runs in Blender's Python and talks HTTP).
- ``training`` imports ``server``; nothing in ``server`` imports ``training``.
- Inside ``server``: service → pipeline → stages → common, each layer importing only itself and the layers below.
- Inside the add-on: ui → ops → core, the same way.
- No import cycle inside any of the three packages (an import inside a function counts: dodging a cycle that way is
  what this test exists to catch).

The checks are pure functions over an import graph, so the last tests feed them graphs that break each rule.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("server", "training", "one2345_addon")

SERVER_LAYERS = ("server.common", "server.stages", "server.pipeline", "server.service", "server.benchmarks")
"""Bottom to top; ``server.benchmarks`` (and ``server.__main__``) may use any layer."""
ADDON_LAYERS = ("one2345_addon.core", "one2345_addon.ops", "one2345_addon.ui")
"""Bottom to top. The top-level modules (``__init__``'s register, the build tools) sit outside the layers."""

Graph = Mapping[str, set[str]]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every module ``path`` imports, anywhere in the file, as dotted names (ours resolved to the module itself)."""
    current = module_name(path)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(current, path.name == "__init__.py", node)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in known else base)
    return found


def build_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    known = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, known) for p in files}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def forbidden_imports(graph: Graph, importer: str, imported: Iterable[str]) -> list[str]:
    """``importer → target`` for every module under ``importer`` that imports something under one of ``imported``."""
    return sorted(f"{src} → {dst}" for src, dsts in graph.items() if _under(src, importer)
                  for dst in dsts for banned in imported if _under(dst, banned))


def upward_imports(graph: Graph, layers: tuple[str, ...]) -> list[str]:
    """Imports from a layer to a layer above it (``layers`` bottom to top)."""
    def level(name: str) -> int | None:
        return next((i for i, layer in enumerate(layers) if _under(name, layer)), None)

    bad = []
    for src, dsts in graph.items():
        src_level = level(src)
        for dst in dsts:
            dst_level = level(dst)
            if src_level is not None and dst_level is not None and dst_level > src_level:
                bad.append(f"{src} → {dst}")
    return sorted(bad)


def cycles(graph: Graph, package: str) -> list[list[str]]:
    """Import cycles among the modules of ``package`` (Tarjan's strongly connected components of size > 1, or a
    module importing itself). A package's ``__init__`` importing its own submodules is an edge like any other."""
    nodes = [n for n in graph if _under(n, package)]
    edges = {n: sorted(d for d in graph[n] if d in graph and _under(d, package)) for n in nodes}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in edges[node]:
                found.append(sorted(component))

    for node in nodes:
        if node not in index:
            visit(node)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return build_graph()


def test_the_graph_sees_every_package_and_function_level_imports(graph):
    names = {"server.service.cli.commands", "server.pipeline.one2345", "training.train", "one2345_addon.build"}
    assert names <= set(graph)
    # the CLI's commands import the pipeline inside functions only: the graph must still hold the edge.
    assert any(_under(d, "server.pipeline") for d in graph["server.service.cli.commands"])


def test_the_addon_never_imports_torch_or_the_server(graph):
    assert forbidden_imports(graph, "one2345_addon", ["torch", "server", "training"]) == []


def test_the_server_never_imports_training(graph):
    assert forbidden_imports(graph, "server", ["training"]) == []


def test_server_layers_import_only_downwards(graph):
    assert upward_imports(graph, SERVER_LAYERS) == []


def test_addon_layers_import_only_downwards(graph):
    assert {n for n in graph if _under(n, "one2345_addon.core")}, "the add-on's ground layer is missing"
    assert upward_imports(graph, ADDON_LAYERS) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycles(graph, package):
    assert cycles(graph, package) == []


def test_the_checks_catch_what_they_exist_for():
    """Graphs that break each rule, so the tests above cannot pass by checking nothing."""
    graph = {
        "server.common.errors": set(),
        "server.stages.elevation": {"server.stages.elevation.fit"},
        "server.stages.elevation.fit": {"server.common.errors", "server.pipeline.one2345"},  # upward
        "server.pipeline.one2345": {"server.stages.elevation", "training.data"},  # server → training
        "one2345_addon.core.jobs": {"one2345_addon.ops.tasks"},  # upward
        "one2345_addon.ops.tasks": {"one2345_addon.core.jobs", "torch"},  # torch; and a cycle with core.jobs
    }
    assert upward_imports(graph, SERVER_LAYERS) == ["server.stages.elevation.fit → server.pipeline.one2345"]
    assert upward_imports(graph, ADDON_LAYERS) == ["one2345_addon.core.jobs → one2345_addon.ops.tasks"]
    assert forbidden_imports(graph, "server", ["training"]) == ["server.pipeline.one2345 → training.data"]
    assert forbidden_imports(graph, "one2345_addon", ["torch"]) == ["one2345_addon.ops.tasks → torch"]
    assert cycles(graph, "server") == [["server.pipeline.one2345", "server.stages.elevation",
                                         "server.stages.elevation.fit"]]
    assert cycles(graph, "one2345_addon") == [["one2345_addon.core.jobs", "one2345_addon.ops.tasks"]]
    assert cycles({"training.a": {"training.a"}}, "training") == [["training.a"]]


def test_relative_imports_resolve_to_their_packages():
    source = "from . import tasks\nfrom ..core import jobs\nfrom ..core.jobs import Job\n\ndef f():\n    import torch\n"
    node = ast.parse(source)
    froms = [n for n in node.body if isinstance(n, ast.ImportFrom)]
    assert [_resolve("one2345_addon.ops.generate", False, n) for n in froms] == [
        "one2345_addon.ops", "one2345_addon.core", "one2345_addon.core.jobs"]
