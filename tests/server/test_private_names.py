"""A name one module takes from another is public: no ``from m import _x`` and no ``m._x`` of a ``server`` module
in another module of ``server`` or ``training`` (issue #27). A helper that two modules share gets a public name, or
moves to where both can import it; a leading underscore then really means "only this module uses it".

Tests may still reach private names (to patch or call them directly): only product code is checked."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GUARDED = ("server",)
"""Packages whose private names no other module may use (everything in them)."""


def _guarded(module: str) -> bool:
    return any(module == g or module.startswith(g + ".") for g in GUARDED)


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def private_uses(path: Path, module: str) -> list[str]:
    """``line: what`` for each private name of a guarded module that ``path`` (the module ``module``) uses."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                if _is_module(f"{node.module}.{alias.name}") and _guarded(f"{node.module}.{alias.name}"):
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
                elif (_guarded(node.module) and node.module != module and alias.name.startswith("_")
                      and not alias.name.startswith("__")):
                    found.append(f"{node.lineno}: from {node.module} import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if _guarded(alias.name) and alias.asname:
                    aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and aliases[node.value.id] != module and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            found.append(f"{node.lineno}: {node.value.id}.{node.attr}")
    return sorted(found, key=lambda line: int(line.split(":")[0]))


def test_no_module_uses_another_modules_private_names() -> None:
    uses = {}
    for path in sorted([*(ROOT / "server").rglob("*.py"), *(ROOT / "training").rglob("*.py")]):
        parts = path.relative_to(ROOT).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if found := private_uses(path, module):
            uses[str(path.relative_to(ROOT))] = found
    assert uses == {}


def test_the_check_sees_both_forms(tmp_path: Path) -> None:
    """The checker itself: an import of a private name and an attribute of an imported module are both found."""
    source = tmp_path / "user.py"
    source.write_text("from server.common.weights.table import _x, weight_file\n"
                      "from server.common.weights import integrity\n"
                      "import server.common.mesh_io as mesh_io\n"
                      "integrity._y()\nmesh_io._z\nintegrity.read_records\n")
    assert private_uses(source, "user") == ["1: from server.common.weights.table import _x", "4: integrity._y",
                                            "5: mesh_io._z"]
