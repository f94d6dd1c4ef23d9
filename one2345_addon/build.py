"""Build the installable extension zip: ``python -m one2345_addon.build --out DIR`` (plain Python 3.10+, no Blender).

The manifest lives at the repository root and the code in ``one2345_addon/``, but Blender wants
``blender_manifest.toml`` next to ``__init__.py``. The build:

1. checks that the versions agree: ``[project] version`` in pyproject.toml, ``server.__version__`` and the manifest's
   ``version`` (the add-on and the server it installs are released together);
2. checks the manifest against the rules of Blender's extension validator (``build_rules``: id, versions, tagline,
   licence, permissions, tags, ``[build]``);
3. writes a wheel of the server package (``server/``: all the server imports at run time, no training, no add-on)
   into the staged extension, ``server_wheel/one2345_blender-<version>-py3-none-any.whl``, with the ``server``
   extra's requirements and the ``one2345`` command — written with ``zipfile``, no build backend, no network;
4. stages the add-on, the manifest and the wheel into ``DIR/stage/one2345``, selects the files with the manifest's
   ``[build]`` exclusions (as Blender's build does), refuses forbidden files, and writes ``DIR/one2345-<version>.zip``
   with the layout of Blender's ``extension build`` (files at the root, wheels stored, the rest deflated);
5. when Blender's own tooling is at hand — a Blender Python (``--blender-python``, ``$ONE2345_BLENDER_PYTHON``, the
   repository's ``.venv-bpy42``/``.venv-bpy50``) or a ``blender`` binary (``--blender``, or on PATH) — also runs
   its validator on the staged folder and on the zip, and its build, whose file list must equal ours.

It prints which checks ran on stderr and the zip's path on the last line of stdout. ``--no-blender`` skips step 5.

``--repo DIR`` (instead of, or with, ``--out``) also puts the zip into ``DIR`` and writes ``DIR/index.json``, so that
``DIR`` served over HTTP(S) is a remote extension repository (see ``repository``); the index's path is then the last
line of stdout. ``--repo DIR --index-only`` only rewrites the index from the zips already in ``DIR``.
This module, ``build_rules`` and ``repository`` are developer tools and are excluded from the zip.
"""

from __future__ import annotations

import argparse
import ast
import base64
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

try:
    from . import build_rules, repository
except ImportError:  # run as a script: python one2345_addon/build.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from one2345_addon import build_rules, repository  # type: ignore[no-redef]

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
MANIFEST = REPO_ROOT / "blender_manifest.toml"
PYPROJECT = REPO_ROOT / "pyproject.toml"
SERVER_DIR = REPO_ROOT / "server"
WHEEL_SUBDIR = "server_wheel"
DIST_NAME = "one2345-blender"
WHEEL_DATE = (1980, 1, 1, 0, 0, 0)
"""Timestamp of every wheel entry, so the same sources give the same wheel bytes."""
SERVER_MODULES = ("server",)
"""Top-level packages the server wheel holds (``server`` imports no other first-party package at run time)."""
STAGE_IGNORE = shutil.ignore_patterns(WHEEL_SUBDIR)
"""What is never copied into the stage from the source folder (the wheel is written there fresh)."""


class BuildError(RuntimeError):
    """The build refused; the message names what is wrong and how to fix it."""


# -- 1. versions --------------------------------------------------------------------------------------------------

def server_version(server_dir: Path | None = None) -> str:
    """``__version__`` from ``server/__init__.py`` (read, not imported: the build needs no server dependencies)."""
    path = (server_dir or SERVER_DIR) / "__init__.py"
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if (isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            return node.value.value
    raise BuildError(f"{path} defines no __version__ = '...'")


def check_versions(manifest: dict, pyproject: dict, server: str) -> str:
    """The common version of the add-on and the server.

    Raises:
        BuildError: the three differ (all three named).
    """
    project = str(pyproject.get("project", {}).get("version", ""))
    addon = str(manifest.get("version", ""))
    if not (project == server == addon):
        raise BuildError(f"versions differ: pyproject.toml [project] version = {project!r}, server.__version__ = "
                         f"{server!r}, blender_manifest.toml version = {addon!r}; the add-on and the server it "
                         "installs are released together, so set all three to the same version")
    return addon


# -- 2. the server wheel --------------------------------------------------------------------------------------------

def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def normalise(name: str) -> str:
    """A distribution name as wheel file names spell it (PEP 427/503): ``one2345-blender`` → ``one2345_blender``."""
    return "_".join(part for part in name.replace(".", "-").replace("_", "-").lower().split("-") if part)


def write_wheel(out_dir: Path, name: str, version: str, files: dict[str, bytes], *, requires: Iterable[str] = (),
                summary: str = "", requires_python: str | None = None, license_: str | None = None,
                scripts: dict[str, str] | None = None) -> Path:
    """Write a pure-Python wheel (``py3-none-any``) that pip installs; return its path.

    Args:
        out_dir: folder for the ``.whl``.
        name, version: distribution name and version.
        files: archive path (``server/app.py``) → content.
        requires: ``Requires-Dist`` lines (PEP 508).
        summary, requires_python, license_: metadata fields.
        scripts: console scripts, name → ``module:function``.
    """
    dist = normalise(name)
    info = f"{dist}-{version}.dist-info"
    metadata = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    if summary:
        metadata.append(f"Summary: {summary}")
    if license_:
        metadata.append(f"License: {license_}")
    if requires_python:
        metadata.append(f"Requires-Python: {requires_python}")
    metadata += [f"Requires-Dist: {r}" for r in requires]
    entries = dict(sorted(files.items()))
    entries[f"{info}/METADATA"] = ("\n".join(metadata) + "\n").encode()
    entries[f"{info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: one2345_addon.build\nRoot-Is-Purelib: true\n"
                                b"Tag: py3-none-any\n")
    if scripts:
        entries[f"{info}/entry_points.txt"] = ("[console_scripts]\n" + "".join(
            f"{k} = {v}\n" for k, v in sorted(scripts.items()))).encode()
    tops = sorted({path.split("/", 1)[0].removesuffix(".py") for path in files})
    entries[f"{info}/top_level.txt"] = ("\n".join(tops) + "\n").encode()
    record = "".join(f"{path},{_record_hash(data)},{len(data)}\n" for path, data in entries.items())
    entries[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as whl:
        for arcname, data in entries.items():
            info_ = zipfile.ZipInfo(arcname, WHEEL_DATE)
            info_.compress_type = zipfile.ZIP_DEFLATED
            info_.external_attr = 0o644 << 16
            whl.writestr(info_, data)
    return path


def server_files(repo_root: Path | None = None) -> dict[str, bytes]:
    """The server package's modules: every ``.py`` under ``server/`` (no caches, no shell scripts)."""
    root = repo_root or REPO_ROOT
    files = {}
    for module in SERVER_MODULES:
        for path in sorted((root / module).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if "__pycache__" not in rel.split("/"):
                files[rel] = path.read_bytes()
    return files


def build_server_wheel(out_dir: Path, pyproject: dict, version: str, repo_root: Path | None = None) -> Path:
    """The wheel of this repository's server: the ``server`` extra becomes its requirements; only the scripts whose
    code lives in the wheel (``one2345 = server.cli:main``) are declared."""
    project = pyproject.get("project", {})
    requires = project.get("optional-dependencies", {}).get("server")
    if not requires:
        raise BuildError("pyproject.toml has no [project.optional-dependencies] server = [...]: the server wheel "
                         "needs its requirements from there")
    scripts = {name: target for name, target in project.get("scripts", {}).items()
               if target.split(":", 1)[0].split(".", 1)[0] in SERVER_MODULES}
    return write_wheel(out_dir, str(project.get("name", DIST_NAME)), version, server_files(repo_root),
                       requires=requires, summary="The One-2-3-45 inference server of the One2345 Blender add-on",
                       requires_python=project.get("requires-python"),
                       license_=project.get("license") if isinstance(project.get("license"), str) else None,
                       scripts=scripts)


# -- 3. staging, selecting and zipping --------------------------------------------------------------------------------

def stage(out: Path, manifest_path: Path, package_dir: Path, wheel: Path | None) -> Path:
    """Copy the add-on package (as it is: Blender's exclusions are applied when zipping), the manifest and the
    wheel into ``out/stage/one2345``; return that folder."""
    folder = out / "stage" / "one2345"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(package_dir, folder, symlinks=True, ignore=STAGE_IGNORE)
    shutil.copyfile(manifest_path, folder / build_rules.MANIFEST_NAME)
    if wheel is not None:
        (folder / WHEEL_SUBDIR).mkdir()
        shutil.copyfile(wheel, folder / WHEEL_SUBDIR / wheel.name)
    return folder


def write_zip(folder: Path, files: list[str], zip_path: Path) -> Path:
    """Zip ``files`` (relative to ``folder``) at the archive's root, as Blender's build does: deflate level 9, wheels
    and other archives stored; written to a hidden temporary name and then renamed."""
    temp = zip_path.with_name("." + zip_path.name)
    temp.unlink(missing_ok=True)
    try:
        with zipfile.ZipFile(temp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
            for rel in files:
                stored = rel.lower().endswith((".whl", ".zip", ".gz", ".bz2", ".xz", ".zst", ".lz4", ".lzma"))
                archive.write(folder / rel, rel, compress_type=zipfile.ZIP_STORED if stored else None)
        os.replace(temp, zip_path)
    finally:
        temp.unlink(missing_ok=True)
    return zip_path


# -- 4. Blender's own validator, when available -----------------------------------------------------------------------

@dataclass(frozen=True)
class Validator:
    """A way to run Blender's extension tooling: ``prefix + ["validate", PATH]`` etc."""

    label: str
    prefix: tuple[str, ...]
    tags: str | None = None
    """Blender's valid-tags file, passed as ``--valid-tags`` (Blender's own CLI adds it itself)."""


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def validator_from_python(python: Path) -> Validator:
    """Blender's ``blender_ext.py`` inside the ``bpy`` wheel next to a Blender Python.

    Raises:
        BuildError: that interpreter has no bpy wheel with the extension tool.
    """
    python = Path(os.path.abspath(python))  # not resolve(): a venv's python links out of the venv
    root = python.parent.parent if python.parent.name in ("bin", "Scripts") else python.parent
    tools = []
    for site in [*sorted(root.glob("lib/python3*/site-packages")), root / "Lib" / "site-packages"]:
        if (site / "bpy").is_dir():  # the bpy wheel: bpy/<4.2>/scripts/addons_core/bl_pkg/cli/blender_ext.py
            tools += [tool for version in sorted((site / "bpy").iterdir())
                      if (tool := version / "scripts" / "addons_core" / "bl_pkg" / "cli" / "blender_ext.py").is_file()]
    if not tools:
        done = subprocess.run([str(python), "-c", "import bpy, os; print(os.path.join(bpy.utils.system_resource("
                               "'SCRIPTS'), 'addons_core', 'bl_pkg', 'cli', 'blender_ext.py'))"],
                              capture_output=True, text=True, check=False, timeout=120)
        found = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
        if done.returncode != 0 or not Path(found).is_file():
            raise BuildError(f"{python} has no bpy wheel with Blender's extension tool (bl_pkg/cli/blender_ext.py): "
                             f"{done.stderr.strip()[-300:]}")
        tools = [Path(found)]
    tool = tools[-1]
    version_dir = tool.parents[4]  # .../bpy/<4.2>/scripts/addons_core/bl_pkg/cli/blender_ext.py
    tags = version_dir / "scripts" / "modules" / "_bpy_internal" / "extensions" / "tags.py"
    return Validator(f"Blender {version_dir.name} validator ({python})", (str(python), str(tool)),
                     str(tags) if tags.is_file() else None)


def find_validators(blender_python: str | None = None, blender: str | None = None,
                    no_blender: bool = False) -> list[Validator]:
    """Blender tooling to cross-check with: the explicit choices, else ``$ONE2345_BLENDER_PYTHON``, else the
    repository's bpy environments (all that exist), else a ``blender`` on PATH; none with ``no_blender``."""
    if no_blender:
        return []
    found: list[Validator] = []
    if blender_python:
        found.append(validator_from_python(Path(blender_python)))
    if blender:
        found.append(Validator(f"Blender validator ({blender})", (blender, "--factory-startup", "--command",
                                                                   "extension")))
    if found:
        return found
    if os.environ.get("ONE2345_BLENDER_PYTHON"):
        return [validator_from_python(Path(os.environ["ONE2345_BLENDER_PYTHON"]))]
    for venv in (REPO_ROOT / ".venv-bpy42", REPO_ROOT / ".venv-bpy50"):
        if _venv_python(venv).is_file():
            with_tool = None
            try:
                with_tool = validator_from_python(_venv_python(venv))
            except BuildError:
                continue
            found.append(with_tool)
    if not found and (on_path := shutil.which("blender")):
        found.append(Validator(f"Blender validator ({on_path})", (on_path, "--factory-startup", "--command",
                                                                   "extension")))
    return found


def run_validator(validator: Validator, args: list[str]) -> str:
    """Run one subcommand of Blender's tooling; raise with its output on failure."""
    cmd = [*validator.prefix, *args]
    if validator.tags and args[0] in ("validate", "build"):
        cmd.append(f"--valid-tags={validator.tags}")
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300)
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0 or "FATAL_ERROR" in output or "Error parsing" in output:
        raise BuildError(f"{validator.label} refused ({args[0]}):\n{output}")
    return output


def cross_check(validator: Validator, folder: Path, zip_path: Path, ours: list[str]) -> None:
    """Blender validates the staged folder and our zip, and its build of the folder packs exactly our files.

    Raises:
        BuildError: Blender refused, or its file list differs from ours (named).
    """
    run_validator(validator, ["validate", str(folder)])
    run_validator(validator, ["validate", str(zip_path)])
    with tempfile.TemporaryDirectory(prefix="one2345-blender-build-") as tmp:
        theirs_path = Path(tmp) / "blender.zip"
        run_validator(validator, ["build", "--source-dir", str(folder), "--output-filepath", str(theirs_path)])
        with zipfile.ZipFile(theirs_path) as archive:
            theirs = sorted(archive.namelist())
    if theirs != sorted(ours):
        only_ours, only_theirs = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
        raise BuildError(f"{validator.label}: its build packs different files than ours; only ours: {only_ours}, "
                         f"only Blender's: {only_theirs}")


# -- 5. the whole build ---------------------------------------------------------------------------------------------

def build(out: Path, blender_python: str | None = None, blender: str | None = None, *, no_blender: bool = False,
          report: list[str] | None = None) -> Path:
    """Check, stage and zip the extension into ``out``; return the zip's path.

    Args:
        out: output folder (the zip and ``stage/``).
        blender_python, blender, no_blender: which Blender validator to cross-check with (see :func:`find_validators`).
        report: receives one line per check that ran.

    Raises:
        BuildError: (a RuntimeError) a rule failed; the message names the field or file, its value and the rule.
    """
    manifest_path, package_dir = Path(MANIFEST), Path(PACKAGE_DIR)
    lines = report if report is not None else []
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        manifest = build_rules.load_toml(manifest_path)
        build_rules.validate_manifest(manifest, str(manifest_path))
    except build_rules.ManifestError as exc:
        raise BuildError(str(exc)) from exc
    version = check_versions(manifest, build_rules.load_toml(PYPROJECT), server_version())
    lines.append(f"versions agree: {version} (pyproject.toml, server.__version__, blender_manifest.toml)")
    lines.append("checked the manifest (own rules: id, versions, tagline, licence, permissions, tags, [build])")
    with tempfile.TemporaryDirectory(prefix="one2345-wheel-") as tmp:
        wheel = build_server_wheel(Path(tmp), build_rules.load_toml(PYPROJECT), version)
        folder = stage(out, manifest_path, package_dir, wheel)
    files = build_rules.select_files(folder, manifest.get("build"))
    if problems := build_rules.check_files(folder, files, str(manifest.get("type", "add-on"))):
        raise BuildError(f"{manifest_path} [build] leaves files in the zip that must not be there:\n"
                         + build_rules.describe(problems))
    wheel_rel = f"{WHEEL_SUBDIR}/{wheel.name}"
    if wheel_rel not in files:
        raise BuildError(f"{manifest_path} [build] excludes the server wheel {wheel_rel!r}; the set-up needs it")
    lines.append(f"checked the files (own rules: [build] exclusions, no caches, hidden files, backups, links or "
                 f"names Windows refuses): {len(files)} files")
    zip_path = write_zip(folder, files, out / f"{manifest['id']}-{version}.zip")
    wheel_size = (folder / wheel_rel).stat().st_size
    lines.append(f"wrote {zip_path.name}: {zip_path.stat().st_size / 1024:.0f} KiB, server wheel "
                 f"{wheel.name} {wheel_size / 1024:.0f} KiB")
    validators = find_validators(blender_python, blender, no_blender)
    if not validators:
        lines.append("Blender's validator: " + ("skipped (--no-blender)" if no_blender else
                                                "not found (no bpy environment, $ONE2345_BLENDER_PYTHON or blender "
                                                "on PATH); the own rules above ran"))
    for validator in validators:
        cross_check(validator, folder, zip_path, files)
        lines.append(f"{validator.label}: passed (the folder, the zip, and its build packs the same files)")
    return zip_path


def publish(zip_path: Path, repo_dir: Path, report: list[str]) -> Path:
    """Copy the zip into the repository folder (a hidden name first, then renamed) and rewrite its index.json;
    return the index's path.

    Raises:
        BuildError: the folder cannot be indexed (the reason named).
    """
    repo_dir = Path(repo_dir).resolve()
    repo_dir.mkdir(parents=True, exist_ok=True)
    target = repo_dir / zip_path.name
    if target != zip_path.resolve():
        if target.exists():
            report.append(f"replaced {target} (same version; clients that installed the old bytes see no update)")
        temp = repo_dir / f".{zip_path.name}.tmp"
        try:
            shutil.copyfile(zip_path, temp)
            os.replace(temp, target)
        finally:
            temp.unlink(missing_ok=True)
    return index_repository(repo_dir, report)


def index_repository(repo_dir: Path, report: list[str]) -> Path:
    """Rewrite ``repo_dir/index.json`` from its zips; return its path.

    Raises:
        BuildError: the folder cannot be indexed (the reason named).
    """
    try:
        index, listed, older = repository.write_index(Path(repo_dir))
    except repository.RepositoryError as exc:
        raise BuildError(str(exc)) from exc
    report.append(f"wrote {index}: " + ", ".join(f"{a.manifest['id']} {a.manifest['version']} ({a.path.name})"
                                                  for a in listed))
    if older:
        report.append("older versions left in the folder, not listed: " + ", ".join(a.path.name for a in older))
    report.append(f"serve {index.parent} over HTTP(S) and add the URL of {index.name} in Blender: Preferences > Get "
                  "Extensions > Repositories > + > Add Remote Repository")
    return index


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints the checks on stderr and the zip's path (with ``--repo``: then the index's)
    on the last line of stdout."""
    parser = argparse.ArgumentParser(prog="python -m one2345_addon.build", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="Output folder for the zip (and the staging folder); required "
                                                 "unless --repo is given.")
    parser.add_argument("--repo", type=Path, help="Also put the zip into this remote-repository folder and write "
                                                  "its index.json (served over HTTP(S), Blender installs and "
                                                  "updates the add-on from it).")
    parser.add_argument("--index-only", action="store_true",
                        help="With --repo: build nothing, only rewrite index.json from the zips in the folder.")
    parser.add_argument("--blender-python", help="Also run Blender's validator from this Python with the bpy wheel.")
    parser.add_argument("--blender", help="Also run the validator of this blender binary.")
    parser.add_argument("--no-blender", action="store_true",
                        help="Check with the own rules only; do not look for Blender's validator.")
    args = parser.parse_args(argv)
    if args.out is None and args.repo is None:
        parser.error("give --out DIR (the zip) or --repo DIR (the zip and a repository index), or both")
    if args.index_only and (args.repo is None or args.out is not None):
        parser.error("--index-only rewrites the index of --repo DIR and builds nothing, so it takes --repo and no "
                     "--out")
    report: list[str] = []
    printed: list[Path] = []
    try:
        if args.index_only:
            printed.append(index_repository(args.repo, report))
        else:
            with tempfile.TemporaryDirectory(prefix="one2345-build-") as tmp:
                out = args.out if args.out is not None else Path(tmp)
                zip_path = build(out, args.blender_python, args.blender, no_blender=args.no_blender, report=report)
                if args.repo is not None:
                    index = publish(zip_path, args.repo, report)
                    zip_path = Path(args.repo).resolve() / zip_path.name
                    printed += [zip_path, index]
                else:
                    printed.append(zip_path)
    except BuildError as exc:
        for line in report:
            print(line, file=sys.stderr)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for line in report:
        print(line, file=sys.stderr)
    for path in printed:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
