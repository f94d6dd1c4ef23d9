"""Install this checkout's extension from inside Blender, without a terminal.

In Blender 4.2 or later: Scripting workspace ▸ Text ▸ Open… ▸ this file (``one2345_addon/install.py`` of the
downloaded or cloned repository) ▸ Run Script (▶). It builds the zip exactly as ``python -m one2345_addon.build``
does (into ``dist/`` of the checkout, Blender's own Python running the build), then installs it into the "user_default"
extension repository and enables it. The result is printed in the Info editor and the system console.

Blender's bundled Python cannot import ``bpy`` in a subprocess, so the build checks the manifest with its own rules
only; the installation then applies Blender's validator itself. This script is a developer tool like ``build.py``
and is excluded from the zip.
"""

from __future__ import annotations

import sys
from pathlib import Path

import bpy

REPOSITORY = "user_default"
"""Blender's default user extension repository (present in every 4.2+ installation)."""


def script_path() -> Path:
    """This file's path. Run from the Text Editor, ``__file__`` is the text block's name, not its file; the text
    block that was opened from disk knows the real path."""
    given = Path(globals().get("__file__", ""))
    if given.is_file():
        return given.resolve()
    for text in bpy.data.texts:
        if text.filepath and Path(text.name).name == given.name:
            return Path(bpy.path.abspath(text.filepath)).resolve()
    raise RuntimeError("Cannot tell where install.py is: open it from disk in the Text Editor (Text ▸ Open…), then "
                       "press Run Script.")


def install(repo_root: Path) -> tuple[Path, str]:
    """Build the zip from ``repo_root`` and install and enable it; returns (zip, the add-on's module name)."""
    if str(repo_root) not in sys.path:
        sys.path.insert(0, str(repo_root))
    from one2345_addon import build  # the checkout's builder, run by Blender's Python

    report: list[str] = []
    zip_path = build.build(repo_root / "dist", no_blender=True, report=report)
    for line in report:
        print(f"[one2345 install] {line}")
    result = bpy.ops.extensions.package_install_files(filepath=str(zip_path), repo=REPOSITORY,
                                                      enable_on_install=True)
    module = f"bl_ext.{REPOSITORY}.one2345"
    if "FINISHED" not in result or module not in bpy.context.preferences.addons:
        raise RuntimeError(f"Blender did not install {zip_path} ({sorted(result)}); see the Info editor.")
    return zip_path, module


if __name__ == "__main__":
    zip_file, name = install(script_path().parent.parent)
    bpy.context.preferences.is_dirty = True  # so that "Save Preferences" keeps the extension enabled
    print(f"[one2345 install] installed and enabled {name} from {zip_file}; open the One2345 tab of the 3D "
          "Viewport's sidebar (N), and Preferences > Add-ons > One2345 to set up the server.")
