"""What to render: procedural seeds, a local folder of meshes, or Objaverse-LVIS (main environment).

Each source turns into an ordered list of :class:`~training.render.layout.ObjectJob`. The order is deterministic, so
``--count N`` always means the same N objects and every shard agrees on the set it partitions.

Objaverse-LVIS (spec §6: the paper trained on its 46k objects in 1,156 categories) goes through the ``objaverse``
package (0.1.x): the LVIS annotations (category → uids), the object paths (uid → ``glbs/<folder_id>/<uid>.glb``,
whose folder ids ``000-000 … 000-159`` are the reference's ``folder_id`` buckets) and the GLB downloads, all cached
under ``<cache>/hf-objaverse-v1`` (default ``~/.objaverse``). Downloads happen here, in the main process, and only for
the objects this shard still has to render; the Blender process then receives plain file paths (the ``objaverse``
package is not installed in Blender's Python).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from server.common.errors import BadInputError
from training.render.layout import ObjectJob, folder_id_for_index, stable_hash

MESH_SUFFIXES: tuple[str, ...] = (".glb", ".gltf", ".obj", ".ply", ".fbx")
"""Files a local-folder source picks up (case-insensitive)."""

SPLITS: tuple[str, ...] = ("train", "val", "all")
"""Values of ``--split``."""


def procedural_jobs(count: int, first_seed: int = 0) -> list[ObjectJob]:
    """``count`` procedural objects with seeds ``first_seed …``; uid ``proc-<seed>``, 1000 per folder bucket."""
    if count < 0 or first_seed < 0:
        raise BadInputError(f"--count {count} / --first-seed {first_seed} must be ≥ 0")
    return [
        ObjectJob(f"proc-{seed:06d}", folder_id_for_index(seed), seed=seed)
        for seed in range(first_seed, first_seed + count)
    ]


def _safe_uid(text: str) -> str:
    """A file stem as a folder-safe uid (other characters become ``_``)."""
    uid = re.sub(r"[^A-Za-z0-9_.-]", "_", text).lstrip("._-")[:100]
    return uid or "object"


def directory_jobs(folder: str | os.PathLike[str], count: int | None = None) -> list[ObjectJob]:
    """Every GLB/GLTF/OBJ/PLY/FBX file under ``folder`` (recursively, sorted by relative path).

    The uid is the file stem (made folder-safe); stems that occur twice get a short hash of the relative path. Folder
    buckets follow the sorted order (1000 per bucket).

    Raises:
        BadInputError: the folder does not exist or holds no mesh file.
    """
    root = Path(folder)
    if not root.is_dir():
        raise BadInputError(
            f"--source {str(folder)!r} is neither 'procedural', 'objaverse' nor an existing folder of mesh files"
        )
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in MESH_SUFFIXES)
    if not files:
        raise BadInputError(f"folder {root} holds no mesh file ({', '.join(MESH_SUFFIXES)})")
    files = files if count is None else files[:count]
    stems = [_safe_uid(p.stem) for p in files]
    jobs = []
    for index, (path, stem) in enumerate(zip(files, stems, strict=True)):
        relative = path.relative_to(root).as_posix()
        uid = stem if stems.count(stem) == 1 else f"{stem}-{stable_hash(relative) % 16**8:08x}"
        jobs.append(ObjectJob(uid, folder_id_for_index(index), path=str(path.resolve())))
    return jobs


# ---------------------------------------------------------------------------------------------------------------------
# Objaverse-LVIS
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LvisSelection:
    """Which Objaverse-LVIS objects to render."""

    categories: tuple[str, ...] = ()
    """LVIS category names (e.g. ``"chair"``); empty = all 1,156."""
    split: str = "train"
    """``train``, ``val`` or ``all``."""
    split_file: str | None = None
    """The reference's ``lvis_split_cc_by.json`` (``{"train": [{"folder_id", "uid"}, …], "val": […]}``): when given,
    the split comes from it (and objects it lists in neither split are dropped — its subset is CC-BY only)."""
    val_fraction: float = 0.02
    """Without a split file: fraction of uids (by a hash of the uid) that form ``val``."""

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise BadInputError(f"--split {self.split!r} is not one of {', '.join(SPLITS)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise BadInputError(f"--val-fraction {self.val_fraction} must be in [0, 1)")


def read_split_file(path: str | os.PathLike[str]) -> dict[str, set[str]]:
    """``lvis_split_cc_by.json`` → {"train": uids, "val": uids}; raises BadInputError on another layout."""
    import json

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return {name: {str(item["uid"]) for item in data[name]} for name in ("train", "val")}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BadInputError(
            f"split file {path} is not usable ({type(err).__name__}: {err}); expected JSON with lists 'train' and "
            '\'val\' of {"folder_id", "uid"} objects, like the reference\'s lvis_split_cc_by.json'
        ) from None


def select_lvis(annotations: Mapping[str, Iterable[str]], selection: LvisSelection) -> list[str]:
    """The uids of the selected categories and split, in a deterministic pseudo-random order.

    The order is by a hash of the uid, so the first N are a spread over all selected categories (sorting by name
    would take them from one category), and it does not change when other categories are added.

    Args:
        annotations: LVIS category → uids (``objaverse.load_lvis_annotations()``).
        selection: categories and split.

    Raises:
        BadInputError: an unknown category, or nothing selected.
    """
    unknown = [c for c in selection.categories if c not in annotations]
    if unknown:
        known = sorted(annotations)
        raise BadInputError(
            f"unknown LVIS categories: {', '.join(unknown)} (there are {len(known)}, e.g. {', '.join(known[:5])})"
        )
    categories = selection.categories or tuple(annotations)
    uids = {str(uid) for category in categories for uid in annotations[category]}
    if selection.split_file is not None:
        splits = read_split_file(selection.split_file)
        wanted = splits["train"] | splits["val"] if selection.split == "all" else splits[selection.split]
        uids &= wanted
    elif selection.split != "all":
        threshold = round(selection.val_fraction * 10_000)
        is_val = {uid: stable_hash(f"split:{uid}") % 10_000 < threshold for uid in uids}
        uids = {uid for uid in uids if is_val[uid] == (selection.split == "val")}
    if not uids:
        raise BadInputError(f"the selection {selection} contains no Objaverse-LVIS object")
    return sorted(uids, key=lambda uid: (stable_hash(f"order:{uid}"), uid))


class ObjaverseSource:
    """Thin wrapper over the ``objaverse`` package: annotations, object paths and cached GLB downloads.

    Args:
        cache_dir: where ``objaverse`` keeps ``hf-objaverse-v1/`` (annotations, paths, ``glbs/``); default
            ``~/.objaverse``. Point all shards at one shared folder.
        processes: parallel downloads.
        api: the ``objaverse`` module (tests pass a stand-in).
    """

    def __init__(self, cache_dir: str | os.PathLike[str] | None = None, processes: int = 4, api: Any = None) -> None:
        if api is None:
            try:
                import objaverse as api
            except ImportError:
                raise BadInputError(
                    "--source objaverse needs the 'objaverse' package", fix="pip install 'one2345-blender[training]'"
                ) from None
        if cache_dir is not None and isinstance(api, ModuleType):
            # objaverse 0.1.x keeps its cache location in module globals.
            api.BASE_PATH = str(Path(cache_dir).expanduser())
            api._VERSIONED_PATH = os.path.join(api.BASE_PATH, "hf-objaverse-v1")
        self.api = api
        self.processes = max(1, int(processes))

    def annotations(self) -> dict[str, list[str]]:
        """LVIS category → uids (downloads ``lvis-annotations.json.gz`` once)."""
        return self.api.load_lvis_annotations()

    def object_paths(self) -> dict[str, str]:
        """uid → ``glbs/<folder_id>/<uid>.glb`` (downloads ``object-paths.json.gz`` once; no GLBs)."""
        return self.api._load_object_paths()

    def download(self, uids: list[str]) -> dict[str, str]:
        """uid → local GLB path, downloading what the cache lacks."""
        return self.api.load_objects(uids, download_processes=self.processes) if uids else {}


def objaverse_jobs(
    source: ObjaverseSource,
    selection: LvisSelection,
    count: int | None,
    keep: Callable[[ObjectJob], bool] = lambda job: True,
) -> list[ObjectJob]:
    """Objaverse-LVIS jobs: select, keep what ``keep`` accepts (this shard, not done), then download only those.

    Args:
        source: the package wrapper.
        selection: categories and split.
        count: take the first ``count`` selected uids (before ``keep``: the count defines the data set, shards
            partition it); None = all.
        keep: predicate on a job whose ``path`` is still the repository path; only kept jobs are downloaded.

    Returns:
        Jobs with local GLB paths; uids that fail to download are dropped with a warning by the package.
    """
    uids = select_lvis(source.annotations(), selection)
    uids = uids if count is None else uids[:count]
    paths = source.object_paths()
    planned = []
    for uid in uids:
        if uid not in paths:
            continue
        job = ObjectJob(uid, Path(paths[uid]).parent.name, path=paths[uid])
        if keep(job):
            planned.append(job)
    local = source.download([job.uid for job in planned])
    return [ObjectJob(job.uid, job.folder_id, path=str(local[job.uid])) for job in planned if job.uid in local]
