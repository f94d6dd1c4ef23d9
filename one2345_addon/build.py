"""Build the installable extension zip: ``python -m one2345_addon.build --out DIR``.

The manifest lives at the repository root and the code in ``one2345_addon/``, but Blender wants
``blender_manifest.toml`` next to ``__init__.py``. This stages both into ``DIR/stage/one2345``, runs Blender's own
extension tooling on it (``validate``, then ``build``, which applies the manifest's ``[build]`` exclusions and checks
the manifest again), and prints the zip's path on the last line.

Blender's tooling is ``bl_pkg/cli/blender_ext.py``, shipped with Blender and with the ``bpy`` wheel (it is what
``blender --command extension validate|build`` runs). It is found through a Blender Python (a ``bpy`` environment:
``--blender-python``, ``$ONE2345_BLENDER_PYTHON``, or the repository's ``.venv-bpy42``/``.venv-bpy50``), or a
``blender`` binary given with ``--blender``. This module is a developer tool and is excluded from the zip.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
MANIFEST = REPO_ROOT / "blender_manifest.toml"
_FIND_TOOL = ("import bpy, os; print(os.path.join(bpy.utils.system_resource('SCRIPTS'), 'addons_core', 'bl_pkg', "
              "'cli', 'blender_ext.py'))")


def find_blender_python(explicit: str | None = None) -> Path:
    """A Python that can ``import bpy``: the argument, ``$ONE2345_BLENDER_PYTHON``, or a bpy venv in the repo.

    Raises:
        FileNotFoundError: none found (the message says how to make one).
    """
    candidates = [explicit, os.environ.get("ONE2345_BLENDER_PYTHON"),
                  REPO_ROOT / ".venv-bpy42" / "bin" / "python", REPO_ROOT / ".venv-bpy50" / "bin" / "python"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise FileNotFoundError("No Blender Python found for Blender's extension validator: pass --blender-python "
                            "(a venv with the bpy wheel), --blender (a blender binary), or run .ci/blender-envs.")


def extension_tool(blender_python: Path) -> list[str]:
    """The command prefix that runs Blender's ``blender_ext.py`` with the given bpy interpreter."""
    done = subprocess.run([str(blender_python), "-c", _FIND_TOOL], capture_output=True, text=True, check=False)
    tool = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    if done.returncode != 0 or not Path(tool).is_file():
        raise FileNotFoundError(f"{blender_python} could not locate Blender's extension tool "
                                f"(bl_pkg/cli/blender_ext.py): {done.stderr.strip()[-500:]}")
    return [str(blender_python), tool]


def stage(out: Path) -> Path:
    """Copy the manifest and the add-on package into ``out/stage/one2345``; return that folder."""
    folder = out / "stage" / "one2345"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(PACKAGE_DIR, folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
    shutil.copyfile(MANIFEST, folder / "blender_manifest.toml")
    return folder


def run_tool(prefix: list[str], args: list[str]) -> str:
    """Run one ``blender_ext.py``/``blender --command extension`` subcommand; raise with its output on failure."""
    done = subprocess.run([*prefix, *args], capture_output=True, text=True, check=False)
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0 or "FATAL_ERROR" in output:
        raise RuntimeError(f"Blender's extension {args[0]} failed:\n{output}")
    return output


def build(out: Path, blender_python: str | None = None, blender: str | None = None) -> Path:
    """Stage, validate and zip the extension into ``out``; return the zip's path.

    Raises:
        FileNotFoundError: no Blender tooling available.
        RuntimeError: validation or packaging failed (the message holds Blender's explanation).
    """
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    folder = stage(out)
    prefix = [blender, "--factory-startup", "--command", "extension"] if blender else extension_tool(
        find_blender_python(blender_python))
    print(run_tool(prefix, ["validate", str(folder)]), file=sys.stderr)
    manifest = (folder / "blender_manifest.toml").read_text()
    version = next(line.split("=", 1)[1].strip().strip('"') for line in manifest.splitlines()
                   if line.startswith("version"))
    zip_path = out / f"one2345-{version}.zip"
    zip_path.unlink(missing_ok=True)
    print(run_tool(prefix, ["build", "--source-dir", str(folder), "--output-filepath", str(zip_path)]),
          file=sys.stderr)
    if not zip_path.is_file():
        raise RuntimeError(f"Blender's extension build reported success but wrote no {zip_path}.")
    return zip_path


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints the zip's path on the last line."""
    parser = argparse.ArgumentParser(prog="python -m one2345_addon.build", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Output folder for the zip (and the staging folder).")
    parser.add_argument("--blender-python", help="A Python with the bpy wheel (default: the repo's .venv-bpy42).")
    parser.add_argument("--blender", help="A blender binary to use instead of a bpy Python.")
    args = parser.parse_args(argv)
    try:
        zip_path = build(args.out, args.blender_python, args.blender)
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(zip_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
