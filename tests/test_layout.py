"""The README's folder table is the map of the tree: one row per package folder, each row a folder that exists, and
every package says in its docstring what it holds."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("server", "one2345_addon", "training")


def table_folders(readme: str) -> list[str]:
    """The folders named in the first column of the README's folder table: rows like ``| `server/stages/` | … |``."""
    return re.findall(r"^\| `([\w/]+/)` \|", readme, flags=re.M)


def package_folders() -> list[str]:
    return sorted(f"{p.parent.relative_to(ROOT).as_posix()}/" for pkg in PACKAGES
                  for p in (ROOT / pkg).rglob("__init__.py"))


def test_the_folder_table_has_one_row_per_package_folder():
    listed = table_folders((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(listed) == len(set(listed)), f"folders listed twice: {sorted(f for f in listed if listed.count(f) > 1)}"
    assert sorted(set(listed) - {"tests/"}) == package_folders()
    assert (ROOT / "tests").is_dir()


def test_every_package_says_what_it_holds():
    for init in (ROOT / pkg for pkg in PACKAGES):
        for path in init.rglob("__init__.py"):
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
            assert doc and len(doc) > 40, f"{path.relative_to(ROOT)} has no docstring saying what the package holds"


def test_table_folders_reads_only_table_rows():
    text = "intro `server/` here\n| folder | what |\n|---|---|\n| `server/` | x |\n| `server/common/` | y |\n"
    assert table_folders(text) == ["server/", "server/common/"]
