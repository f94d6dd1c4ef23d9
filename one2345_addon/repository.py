"""A remote extension repository: a folder of extension zips and the ``index.json`` Blender reads from it.

``python -m one2345_addon.build --repo DIR`` builds the zip into ``DIR`` and calls :func:`write_index`; served over
HTTP(S), ``DIR`` is a repository that a user adds once (Preferences ▸ Get Extensions ▸ Repositories ▸ + ▸ Add Remote
Repository, with the URL of ``DIR/index.json``), after which Blender installs and updates the add-on itself.

The index has the schema ``blender --command extension server-generate`` writes (Blender 4.2 – 5.0,
``bl_pkg/cli/blender_ext.py``): ``{"version": "v1", "blocklist": [], "data": [entry, ...]}``, each entry the
manifest's fields in Blender's order (``schema_version`` … ``platforms``; absent ones left out, ``[build]`` and other
tables dropped) plus ``archive_url`` (``./<file name>``, relative to the index), ``archive_size`` and
``archive_hash`` (``sha256:<hex>``). One difference, on purpose: Blender lists every zip and warns when two versions
of one id overlap, which leaves clients to pick one; here only the newest version of each id is listed (older zips
stay on disk, unlisted, so that nothing already published is deleted). Plain Python 3.10+, no Blender; a developer
tool, excluded from the extension's zip.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    from . import build_rules
except ImportError:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from one2345_addon import build_rules  # type: ignore[no-redef]

INDEX_NAME = "index.json"
"""Blender's ``PKG_REPO_LIST_FILENAME``."""
INDEX_SCHEMA = "v1"
MANIFEST_FIELDS = ("schema_version", "id", "name", "tagline", "version", "type", "maintainer", "license",
                   "blender_version_min", "blender_version_max", "website", "copyright", "permissions", "tags",
                   "platforms")
"""The manifest fields an index entry carries, in the order of Blender's ``PkgManifest`` (its ``wheels`` is not
listed; an extension with ``wheels`` gets ``python_versions`` from Blender's generator, which this one refuses)."""
_VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$")


class RepositoryError(RuntimeError):
    """The repository folder cannot be indexed; the message names the file and the fix."""


@dataclass(frozen=True)
class Archive:
    """One extension zip in the repository folder."""

    path: Path
    manifest: dict[str, Any]

    @property
    def key(self) -> tuple[str, tuple]:
        return str(self.manifest["id"]), version_key(str(self.manifest["version"]))


def version_key(version: str) -> tuple:
    """Semantic-versioning order: ``0.1.10`` > ``0.1.9`` > ``0.1.9-rc.1`` (a pre-release sorts before its release).

    Raises:
        RepositoryError: not a semantic version.
    """
    found = _VERSION.match(version)
    if not found:
        raise RepositoryError(f"version {version!r} is not a semantic version (MAJOR.MINOR.PATCH)")
    numbers = tuple(int(found.group(i)) for i in (1, 2, 3))
    pre = found.group(4)
    if pre is None:
        return (*numbers, 1, ())
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    return (*numbers, 0, parts)


def read_manifest(zip_path: Path) -> dict[str, Any]:
    """The ``blender_manifest.toml`` of an extension zip (at the archive's root, or in its single top folder, as
    Blender accepts), checked with the validator's rules.

    Raises:
        RepositoryError: not a zip, no manifest, or the manifest breaks a rule (named).
    """
    try:
        with zipfile.ZipFile(zip_path) as archive:
            names = archive.namelist()
            candidates = [n for n in names if n == build_rules.MANIFEST_NAME
                          or (n.count("/") == 1 and n.endswith("/" + build_rules.MANIFEST_NAME))]
            if not candidates:
                raise RepositoryError(f"{zip_path.name} holds no {build_rules.MANIFEST_NAME} (is it an extension "
                                      "zip from `python -m one2345_addon.build`?)")
            text = archive.read(sorted(candidates, key=len)[0]).decode("utf-8")
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError) as exc:
        raise RepositoryError(f"{zip_path.name} cannot be read as an extension zip: {exc}") from exc
    try:
        manifest = _loads_toml(text, f"{zip_path.name}:{build_rules.MANIFEST_NAME}")
        build_rules.validate_manifest(manifest, f"{zip_path.name}:{build_rules.MANIFEST_NAME}")
    except build_rules.ManifestError as exc:
        raise RepositoryError(str(exc)) from exc
    if manifest.get("wheels"):
        raise RepositoryError(f"{zip_path.name} lists [wheels]; their Python versions are not worked out here: "
                              "generate the index with `blender --command extension server-generate --repo-dir DIR`")
    return manifest


def _loads_toml(text: str, name: str) -> dict[str, Any]:
    try:
        import tomllib
    except ImportError:
        return build_rules.parse_toml_subset(text, name)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise build_rules.ManifestError(name, [f"not valid TOML: {exc}"]) from exc


def sha256_of(path: Path) -> tuple[int, str]:
    """(size, ``sha256:<hex>``) of a file, read in 1 MiB blocks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
            size += len(block)
    return size, f"sha256:{digest.hexdigest()}"


def index_entry(archive: Archive) -> dict[str, Any]:
    """An ``index.json`` entry for one zip, as Blender's ``server-generate`` writes it."""
    entry = {key: archive.manifest[key] for key in MANIFEST_FIELDS if archive.manifest.get(key) is not None}
    size, digest = sha256_of(archive.path)
    entry["archive_url"] = "./" + urllib.request.pathname2url(archive.path.name)
    entry["archive_size"] = size
    entry["archive_hash"] = digest
    return entry


def scan(repo_dir: Path) -> tuple[list[Archive], list[Archive]]:
    """The zips of ``repo_dir``: (the newest of each id, sorted by id; the older ones). Hidden files are skipped, as
    Blender's generator skips its own temporary files.

    Raises:
        RepositoryError: a zip that is not an extension, or two zips of the same id and version.
    """
    archives = [Archive(path, read_manifest(path)) for path in sorted(repo_dir.glob("*.zip"))
                if not path.name.startswith(".") and path.is_file()]
    by_id: dict[str, list[Archive]] = {}
    for archive in archives:
        by_id.setdefault(archive.key[0], []).append(archive)
    newest, older = [], []
    for ident in sorted(by_id):
        group = sorted(by_id[ident], key=lambda a: a.key[1])
        if len(group) > 1 and group[-1].key == group[-2].key:
            raise RepositoryError(f"{group[-2].path.name} and {group[-1].path.name} are both {ident} "
                                  f"{group[-1].manifest['version']}: remove one of them from {repo_dir}")
        newest.append(group[-1])
        older += group[:-1]
    return newest, older


def write_index(repo_dir: Path) -> tuple[Path, list[Archive], list[Archive]]:
    """(Re)write ``repo_dir/index.json`` from the zips there; return (its path, the archives listed, those left out
    as older versions). Written to a hidden temporary file and renamed, so a client never reads half an index.

    Raises:
        RepositoryError: ``repo_dir`` is not a folder, holds no extension zip, or a zip is unusable (named).
    """
    repo_dir = Path(repo_dir)
    if not repo_dir.is_dir():
        raise RepositoryError(f"{repo_dir} is not a folder")
    if (repo_dir / "blender_repo.toml").exists():
        raise RepositoryError(f"{repo_dir / 'blender_repo.toml'} (a blocklist) is not read here: generate the index "
                              "with `blender --command extension server-generate --repo-dir DIR`")
    listed, older = scan(repo_dir)
    if not listed:
        raise RepositoryError(f"{repo_dir} holds no extension zip to list")
    index = {"version": INDEX_SCHEMA, "blocklist": [], "data": [index_entry(a) for a in listed]}
    path = repo_dir / INDEX_NAME
    temp = repo_dir / f".{INDEX_NAME}.tmp"
    try:
        with open(temp, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path, listed, older
