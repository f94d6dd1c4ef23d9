"""What a rendered object looks like on disk, and the settings that produce it (spec §3, §6).

Shared by the BlenderProc script (Blender's Python: numpy and the standard library only — never torch) and by the
driver in the main environment.

Layout of one object, ``<out>/<folder_id>/<uid>/`` (the reference's ``zero12345_narrow`` layout plus three files):

* ``view_{k}.png`` — k = 0..7, RGBA 8-bit, the 8 target views (straight alpha, transparent background);
* ``view_{k}_depth_mm.png`` — uint16 z-depth along the optical axis in millimetres, 0 = background;
* ``view_{k}_depth.exr`` — float32 z-depth in metres (0 = background), only with ``--exr-depth``;
* ``view_{k}_{j}_10.png`` — j = 0..3, the 32 nearby views (±10° in polar, then in azimuth), RGBA 8-bit;
* ``pose.json`` — exactly the inference format (:class:`server.common.cameras.PoseFile`): intrinsics, near_far and one
  OpenGL c2w per image id;
* ``mesh.ply`` — the normalised object (the frame of pose.json), binary PLY triangles, for geometry checks and
  evaluation (off with ``--no-mesh``);
* ``meta.json`` — uid, source, polar, normalisation, the file ↔ id map, timings. Written last: its presence in the
  final folder is the "done" marker (the folder is assembled under a temporary name and renamed atomically).

Mapping between pose.json ids and file names: ``pose.json`` lists the 8 stage-1 ids in order (``0.png`` … ``7.png``
when polar ≤ 75, ``0.png`` … ``3.png``, ``8.png`` … ``11.png`` above); the k-th of them is ``view_{k}.png``, and its
nearby id ``<i>_<j>.png`` is ``view_{k}_{j}_10.png``. So for polar ≤ 75 the names are literal (``0_1.png`` ↔
``view_0_1_10.png``), and for polar > 75 ``8.png`` ↔ ``view_4.png`` and ``8_2.png`` ↔ ``view_4_2_10.png``.
:func:`view_file_names` gives the map; ``meta.json`` stores it too.

Elevation-only objects (``--views elevation``, for evaluating the elevation estimator) hold the same files for just
five cameras: the first stage-1 view (``0.png`` ↔ ``view_0.png``, with its depth) and its four nearby views
(``0_<j>.png`` ↔ ``view_0_<j>_10.png``), with exactly the poses the full layout gives them; ``pose.json`` lists those
five ids and ``meta.json`` records ``"views": "elevation"``. They are not training objects (see
:func:`require_full_views`).

Mask and depth agree exactly: alpha > 0 ⇔ depth > 0 (see :func:`reconcile_alpha_depth`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from server.common.cameras import FOCAL, IMAGE_SIZE, NEAR_FAR, PoseFile, calc_pose, stage1_indices, view_angles
from server.common.errors import BadInputError
from training.render.procedural import SURFACES

META_NAME = "meta.json"
"""Written last into an object's folder: its presence marks the object as done."""

MANIFEST_GLOB = "manifest-*.jsonl"
"""Per-shard manifests at the output root (one JSON record per finished or failed object)."""

EVENT_PREFIX = "@@one2345-render "
"""Prefix of the machine-readable progress lines the Blender process prints (the rest of the line is JSON)."""

OBJECTS_PER_FOLDER = 1000
"""Objects per ``folder_id`` bucket for sources without their own buckets (procedural, local folders)."""

VIEW_SETS: tuple[str, ...] = ("all", "elevation")
"""Values of ``--views``: all 40 cameras, or the 5 of the elevation estimator (stage-1 view 0 and its nearby views)."""

_UID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


# ---------------------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolarSpec:
    """Polar angle of the ring of stage-1 views 0–3, fixed or drawn per object.

    The reference shares one pose file across all objects, at a polar angle the spec leaves unconfirmed (§6). The
    default draws an integer polar uniformly from [45, 105] per object (deterministic: seeded by the uid). That covers
    the angles the elevation estimator returns for typical photographs (within ±45° of the horizon) and both stage-1b
    branches (views 4–7 at polar + 30 for polar ≤ 75, views 8–11 at polar − 30 above), so the network sees the camera
    layouts it meets at inference. ``--polar 75`` reproduces a single shared layout.
    """

    low: int = 45
    """Smallest polar angle in degrees (inclusive)."""
    high: int = 105
    """Largest polar angle in degrees (inclusive); equal to ``low`` for a fixed polar."""

    @classmethod
    def parse(cls, text: str) -> PolarSpec:
        """``"75"`` (fixed) or ``"45:105"`` (uniform integers, inclusive) → PolarSpec; raises BadInputError."""
        parts = str(text).split(":")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            values = []
        if len(values) not in (1, 2) or len(parts) != len(values):
            raise BadInputError(f"--polar {text!r} is not usable: give an integer (75) or a range LOW:HIGH (45:105)")
        low, high = values[0], values[-1]
        # Views sit at polar ± 30 ± 10, so the ring must keep them off the poles (0 and 180 degrees).
        if not 10 <= low <= high <= 170:
            raise BadInputError(f"--polar {text!r} is not usable: need 10 <= LOW <= HIGH <= 170 degrees")
        return cls(low, high)

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}:{self.high}"

    def for_uid(self, uid: str) -> int:
        """The polar angle (integer degrees) of this object: fixed, or drawn from a hash of the uid."""
        if self.low == self.high:
            return self.low
        return self.low + stable_hash(f"polar:{uid}") % (self.high - self.low + 1)


@dataclass(frozen=True)
class RenderSettings:
    """How every object is rendered. Defaults are the product's; CPU-friendly enough for CI (see each field)."""

    size: int = IMAGE_SIZE
    """Image side in pixels (the product uses 256; tests may use less). Intrinsics scale with it (focal 280 @ 256)."""
    polar: PolarSpec = field(default_factory=PolarSpec)
    """Polar angle of the view ring (see :class:`PolarSpec`)."""
    extent: float = 0.8
    """Largest side of the object's bounding box after normalisation (centred at the origin). 0.8 rather than
    Zero123's 1.0: Zero123 pairs extent 1 with cameras at 1.5–2.2, while One-2-3-45's cameras sit at 1.2; at 1.2
    (FOV 49.13°, 1.10 units visible at the origin) extent 0.8 fills ~75 % of the frame — the fill ratio the inference
    pre-processing gives the input image (spec §1.2) — and is the extent of the reference's evaluation renders (§6)."""
    samples: int = 32
    """Cycles samples per pixel (with denoising). Zero123 used 128 and the evaluation script 32; 32 keeps CPU
    rendering affordable."""
    denoise: bool = True
    """Run Intel Open Image Denoise on the colour (not on alpha or depth)."""
    ambient: float = 0.6
    """Strength of the uniform white world light: fills shadows so no side of the object is black."""
    light_energy: float = 600.0
    """Watts of the key area light, placed 3 units from the origin at a direction drawn per object (upper hemisphere,
    polar 0–60°); Zero123 used one randomly placed area light too."""
    view_transform: str = "Filmic"
    """Colour management of the PNGs. Filmic is BlenderProc's default and the Blender 3.x default under which
    Zero123's training renders — hence the look of its outputs at inference — were made."""
    exr_depth: bool = False
    """Also write float32 EXR depth (metres) next to the millimetre PNGs."""
    export_mesh: bool = True
    """Write ``mesh.ply``, the normalised object in the pose.json frame."""
    threads: int = 0
    """Cycles CPU threads; 0 = all cores (a Slurm task or Ray actor should pass what it reserved)."""
    views: str = "all"
    """Which cameras to render, one of :data:`VIEW_SETS`: ``all`` (8 targets + 32 nearby views, the training layout)
    or ``elevation`` (stage-1 view 0 and its 4 nearby views only — what the elevation estimator reads — 8× fewer
    images; such objects are refused as training data)."""
    surface: str = "mixed"
    """How procedural objects are painted, one of :data:`~training.render.procedural.SURFACES` (see
    :attr:`training.render.procedural.ProceduralConfig.surface`); mesh files keep their own materials."""

    def __post_init__(self) -> None:
        if not 16 <= self.size <= 2048:
            raise BadInputError(f"--size {self.size} is not usable: need 16..2048 pixels")
        if self.samples < 1:
            raise BadInputError(f"--samples {self.samples} is not usable: need at least 1")
        if not 0.05 <= self.extent <= 1.2:
            raise BadInputError(
                f"--extent {self.extent} is not usable: need 0.05..1.2 (cameras sit at {1.2}; 0.8 is the default)"
            )
        if self.ambient < 0 or self.light_energy < 0:
            raise BadInputError(f"--ambient {self.ambient} / --light-energy {self.light_energy} must be ≥ 0")
        if self.threads < 0:
            raise BadInputError(f"--threads {self.threads} is not usable: need ≥ 0 (0 = all cores)")
        if self.views not in VIEW_SETS:
            raise BadInputError(f"--views {self.views!r} is not usable: choose one of {', '.join(VIEW_SETS)}")
        if self.surface not in SURFACES:
            raise BadInputError(f"--surface {self.surface!r} is not usable: choose one of {', '.join(SURFACES)}")

    def to_argv(self) -> list[str]:
        """Command-line arguments of :func:`add_settings_arguments` that reproduce these settings."""
        argv = ["--size", str(self.size), "--polar", str(self.polar), "--extent", repr(self.extent)]
        argv += ["--samples", str(self.samples), "--ambient", repr(self.ambient)]
        argv += ["--light-energy", repr(self.light_energy), "--view-transform", self.view_transform]
        argv += ["--threads", str(self.threads), "--views", self.views, "--surface", self.surface]
        argv += [] if self.denoise else ["--no-denoise"]
        argv += ["--exr-depth"] if self.exr_depth else []
        argv += [] if self.export_mesh else ["--no-mesh"]
        return argv

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (polar as its text form)."""
        data = asdict(self)
        data["polar"] = str(self.polar)
        return data


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the :class:`RenderSettings` options (shared by the script and ``one2345-train render``)."""
    d = RenderSettings()
    group = parser.add_argument_group("rendering")
    group.add_argument("--size", type=int, default=d.size, help=f"image side in pixels (default {d.size})")
    group.add_argument("--polar", default=str(d.polar), help=f"ring polar: N or LOW:HIGH per object ({d.polar})")
    group.add_argument("--extent", type=float, default=d.extent, help=f"normalised max extent ({d.extent})")
    group.add_argument("--samples", type=int, default=d.samples, help=f"Cycles samples per pixel ({d.samples})")
    group.add_argument("--no-denoise", dest="denoise", action="store_false", help="disable the denoiser")
    group.add_argument("--ambient", type=float, default=d.ambient, help=f"world light strength ({d.ambient})")
    group.add_argument("--light-energy", type=float, default=d.light_energy, help=f"key light W ({d.light_energy})")
    group.add_argument("--view-transform", default=d.view_transform, help=f"colour transform ({d.view_transform})")
    group.add_argument("--exr-depth", action="store_true", help="also write float32 EXR depth in metres")
    group.add_argument("--no-mesh", dest="export_mesh", action="store_false", help="do not write mesh.ply")
    group.add_argument("--threads", type=int, default=d.threads, help="Cycles CPU threads, 0 = all cores")
    group.add_argument(
        "--views",
        default=d.views,
        choices=VIEW_SETS,
        help="cameras per object: all 40, or elevation: view 0 and its 4 nearby views (default all)",
    )
    group.add_argument(
        "--surface",
        default=d.surface,
        choices=SURFACES,
        help="procedural parts: mixed (each textured with p=0.5), textured, or flat colours (default mixed)",
    )


def settings_from_args(args: argparse.Namespace) -> RenderSettings:
    """RenderSettings from the options of :func:`add_settings_arguments` (raises BadInputError on bad values)."""
    return RenderSettings(
        size=args.size,
        polar=PolarSpec.parse(args.polar),
        extent=args.extent,
        samples=args.samples,
        denoise=args.denoise,
        ambient=args.ambient,
        light_energy=args.light_energy,
        view_transform=args.view_transform,
        exr_depth=args.exr_depth,
        export_mesh=args.export_mesh,
        threads=args.threads,
        views=args.views,
        surface=args.surface,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Objects, folders, shards
# ---------------------------------------------------------------------------------------------------------------------


def stable_hash(text: str) -> int:
    """A 64-bit hash of ``text`` that is the same on every machine and Python run (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def folder_id_for_index(index: int) -> str:
    """Bucket ``"AAA-BBB"`` for the index-th object of a source without buckets: 1000 objects per folder, named like
    Objaverse's ``000-000 … 000-159``."""
    bucket = int(index) // OBJECTS_PER_FOLDER
    return f"{bucket // 1000:03d}-{bucket % 1000:03d}"


def check_uid(uid: str) -> str:
    """Return ``uid`` if it is a safe folder name (letters, digits, ``_.-``; ≤ 128 chars), else raise BadInputError."""
    if not isinstance(uid, str) or not _UID_PATTERN.match(uid) or uid in (".", ".."):
        raise BadInputError(f"object uid {uid!r} is not usable as a folder name: use letters, digits, '_', '.', '-'")
    return uid


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` → (i, N) with 0 ≤ i < N; raises BadInputError."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise BadInputError(f"--shard {text!r} is not usable: give i/N with 0 <= i < N, e.g. 0/1 or 3/100")
    return int(match.group(1)), int(match.group(2))


def shard_of(uid: str, num_shards: int) -> int:
    """Shard that renders ``uid``: a hash of the uid modulo N, so the assignment does not depend on which other
    objects are selected (changing ``--count`` or the category list never moves an object to another shard)."""
    return stable_hash(f"shard:{uid}") % int(num_shards)


@dataclass(frozen=True)
class ObjectJob:
    """One object to render: where it comes from and where it goes."""

    uid: str
    """Folder name of the object (Objaverse uid, file stem, or ``proc-<seed>``)."""
    folder_id: str
    """Bucket folder (``000-000`` …)."""
    path: str | None = None
    """Mesh file (GLB/GLTF/OBJ/PLY/FBX) to import; None for procedural objects."""
    seed: int | None = None
    """Seed of :func:`training.render.procedural.make_object`; None for files."""

    def __post_init__(self) -> None:
        check_uid(self.uid)
        check_uid(self.folder_id)
        if (self.path is None) == (self.seed is None):
            raise BadInputError(f"object {self.uid!r} needs exactly one of a file path or a procedural seed")

    @property
    def source(self) -> str:
        """``"procedural"`` or ``"file"``."""
        return "procedural" if self.seed is not None else "file"

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (one line of a jobs file)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ObjectJob:
        """Inverse of :meth:`to_json`."""
        return cls(data["uid"], data["folder_id"], data.get("path"), data.get("seed"))


def object_dir(out: str | os.PathLike[str], job: ObjectJob) -> Path:
    """Final folder ``<out>/<folder_id>/<uid>``."""
    return Path(out) / job.folder_id / job.uid


def is_done(out: str | os.PathLike[str], job: ObjectJob, views: str = "all") -> bool:
    """Whether the object's final folder holds its ``meta.json`` (written last, then the folder renamed into place)
    and the cameras ``views`` asks for: a full object serves ``elevation`` too, an elevation-only one is not done for
    ``all`` (rendering it replaces the folder)."""
    folder = object_dir(out, job)
    if not (folder / META_NAME).is_file():
        return False
    return views == "elevation" or rendered_views(folder) == "all"


def rendered_views(folder: str | os.PathLike[str]) -> str:
    """The ``--views`` an object folder was rendered with, from its ``meta.json``: ``"all"`` when the file or the key
    is missing or unreadable (renders from before the option, the official layout, synthetic objects)."""
    try:
        meta = json.loads((Path(folder) / META_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "all"
    views = meta.get("views", "all") if isinstance(meta, dict) else "all"
    return views if isinstance(views, str) else "all"


def require_full_views(folder: str | os.PathLike[str]) -> None:
    """Raise BadInputError if the object folder was rendered with ``--views elevation`` (it lacks 35 of the 40
    views), so that training and evaluation refuse it instead of failing on a missing file."""
    views = rendered_views(folder)
    if views != "all":
        raise BadInputError(
            f"{folder} holds only the {views} views (rendered with --views {views}: view 0 and its 4 nearby views), "
            "not the 40 views of a training object",
            fix="use it for the elevation evaluation only, or render it in full: one2345-train render with the "
            "same --out and without --views elevation re-renders such objects",
        )


def write_jobs(path: str | os.PathLike[str], jobs: Iterable[ObjectJob]) -> Path:
    """Write a jobs file: one JSON object per line."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(json.dumps(job.to_json()) + "\n" for job in jobs), encoding="utf-8")
    return target


def read_jobs(path: str | os.PathLike[str]) -> list[ObjectJob]:
    """Read a jobs file written by :func:`write_jobs`."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [ObjectJob.from_json(json.loads(line)) for line in lines if line.strip()]


# ---------------------------------------------------------------------------------------------------------------------
# Manifest and progress events
# ---------------------------------------------------------------------------------------------------------------------


def manifest_path(out: str | os.PathLike[str], shard: tuple[int, int]) -> Path:
    """``<out>/manifest-<i>-of-<N>.jsonl``: one file per shard, so shards never append to the same file."""
    index, count = shard
    return Path(out) / f"manifest-{index:05d}-of-{count:05d}.jsonl"


def append_record(path: str | os.PathLike[str], record: Mapping[str, Any]) -> None:
    """Append one JSON line and flush it to disk (a kill loses at most the line being written)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(dict(record), sort_keys=True) + "\n")
        file.flush()
        os.fsync(file.fileno())


def read_manifests(out: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """uid → its latest manifest record, over every shard's manifest (a torn last line from a kill is ignored)."""
    records: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(out).glob(MANIFEST_GLOB)):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "uid" in record:
                records[str(record["uid"])] = record
    return records


def format_event(event: Mapping[str, Any]) -> str:
    """One progress line for the driver: :data:`EVENT_PREFIX` + JSON."""
    return EVENT_PREFIX + json.dumps(dict(event), sort_keys=True)


def parse_event(line: str) -> dict[str, Any] | None:
    """The event of a progress line, or None for any other output line."""
    start = line.find(EVENT_PREFIX)
    if start < 0:
        return None
    try:
        event = json.loads(line[start + len(EVENT_PREFIX) :])
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None


# ---------------------------------------------------------------------------------------------------------------------
# Cameras and file names
# ---------------------------------------------------------------------------------------------------------------------


def intrinsics_for_size(size: int) -> np.ndarray:
    """[3, 3] pose.json intrinsics for ``size``² images: focal 280·size/256, principal point (size/2, size/2).

    At 256 this is exactly :func:`server.common.cameras.default_intrinsics`. The principal point follows the reference's
    convention that pixel (row i, column j) covers [j, j+1] × [i, i+1], so its centre is (j + 0.5, i + 0.5).
    """
    scale = size / IMAGE_SIZE
    half = size / 2
    return np.array([[FOCAL * scale, 0.0, half], [0.0, FOCAL * scale, half], [0.0, 0.0, 1.0]])


def pose_file_for(polar: float, size: int, views: str = "all") -> PoseFile:
    """pose.json contents for an object rendered at ``polar`` with ``size``² images (spec §3.3); with ``views`` =
    ``"elevation"`` only the cameras of :func:`view_file_names` for it, each exactly as in the full file."""
    angles = view_angles(polar)
    poses = calc_pose(np.array([a[0] for a in angles.values()]), np.array([a[1] for a in angles.values()]))
    c2ws = dict(zip(angles, poses, strict=True))
    if views != "all":
        c2ws = {view_id: c2ws[view_id] for view_id in view_file_names(polar, views)}
    return PoseFile(intrinsics_for_size(size), NEAR_FAR, c2ws)


def view_file_names(polar: float, views: str = "all") -> dict[str, str]:
    """pose.json id → file name, in pose.json order (see the module docstring).

    Args:
        polar: polar angle of the object's ring.
        views: one of :data:`VIEW_SETS`.

    Returns:
        ``all``: 40 entries, ``"0.png" → "view_0.png"`` …, then ``"<i>_<j>.png" → "view_<k>_<j>_10.png"``;
        ``elevation``: the first stage-1 id and its 4 nearby ids (``0.png``, ``0_0.png`` … ``0_3.png``).
    """
    if views not in VIEW_SETS:
        raise BadInputError(f"views {views!r} is not usable: choose one of {', '.join(VIEW_SETS)}")
    indices = stage1_indices(polar)
    names = {f"{i}.png": f"view_{k}.png" for k, i in enumerate(indices)}
    for k, i in enumerate(indices):
        for j in range(4):
            names[f"{i}_{j}.png"] = f"view_{k}_{j}_10.png"
    if views == "elevation":
        first = indices[0]
        names = {view_id: names[view_id] for view_id in [f"{first}.png"] + [f"{first}_{j}.png" for j in range(4)]}
    return names


def depth_file_name(k: int, exr: bool = False) -> str:
    """``view_{k}_depth_mm.png`` (uint16 millimetres) or ``view_{k}_depth.exr`` (float32 metres)."""
    return f"view_{k}_depth.exr" if exr else f"view_{k}_depth_mm.png"


# ---------------------------------------------------------------------------------------------------------------------
# Depth and mask
# ---------------------------------------------------------------------------------------------------------------------

BACKGROUND_DEPTH = 1e6
"""Depths at or beyond this (metres) are background: Blender reports empty pixels as ~1e10."""


def _neighbour_min(depth: np.ndarray) -> np.ndarray:
    """[H, W] minimum of the valid (> 0) depths in each pixel's 3×3 neighbourhood, 0 where none is valid."""
    padded = np.pad(np.where(depth > 0, depth, np.inf), 1, constant_values=np.inf)
    height, width = depth.shape
    stack = [padded[dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)]
    result = np.min(stack, axis=0)
    return np.where(np.isfinite(result), result, 0.0)


def reconcile_alpha_depth(alpha: np.ndarray, depth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Make mask and depth agree exactly: alpha > 0 ⇔ depth > 0.

    Cycles antialiases alpha (fractional coverage over all samples, spread by the 1.5-pixel pixel filter) but writes
    depth from one sample per pixel, so silhouette pixels can have alpha > 0 and no depth. Such pixels take the
    nearest surface among their 3×3 neighbours (two passes: the filter reaches 1.5 px); pixels still without depth
    after that only hold a faint filter tail and become transparent. Pixels with depth but alpha 0 (coverage below
    half a quantisation step) lose their depth.

    Args:
        alpha: [H, W] uint8 alpha.
        depth: [H, W] float z-depth in metres; background is ≤ 0, non-finite, or ≥ :data:`BACKGROUND_DEPTH`.

    Returns:
        alpha: [H, W] uint8; depth: [H, W] float64 metres, 0 exactly where alpha is 0.
    """
    depth = np.asarray(depth, dtype=np.float64)
    depth = np.where(np.isfinite(depth) & (depth > 0) & (depth < BACKGROUND_DEPTH), depth, 0.0)
    alpha = np.asarray(alpha, dtype=np.uint8).copy()
    covered = alpha > 0
    for _ in range(2):
        missing = covered & (depth <= 0)
        if not missing.any():
            break
        depth = np.where(missing, _neighbour_min(depth), depth)
    alpha[covered & (depth <= 0)] = 0
    depth[alpha == 0] = 0.0
    return alpha, depth


def depth_to_mm(depth: np.ndarray) -> np.ndarray:
    """[H, W] metres (0 = background) → uint16 millimetres, rounded; raises BadInputError beyond 65.535 m."""
    millimetres = np.rint(np.asarray(depth, dtype=np.float64) * 1000.0)
    if millimetres.max(initial=0) > np.iinfo(np.uint16).max:
        raise BadInputError(f"depth {millimetres.max() / 1000:.3f} m does not fit a uint16 millimetre PNG (65.535 m)")
    return millimetres.astype(np.uint16)


# ---------------------------------------------------------------------------------------------------------------------
# Meshes
# ---------------------------------------------------------------------------------------------------------------------


def write_ply(path: str | os.PathLike[str], vertices: np.ndarray, faces: np.ndarray) -> Path:
    """Binary little-endian PLY of a triangle mesh.

    Args:
        vertices: [V, 3] float positions (written as float32).
        faces: [F, 3] integer vertex indices (written as int32).
    """
    vertices = np.ascontiguousarray(vertices, dtype="<f4").reshape(-1, 3)
    faces = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"element vertex {len(vertices)}\nproperty float x\nproperty float y\nproperty float z\n"
        f"element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n"
    )
    records = np.zeros(len(faces), dtype=[("n", "u1"), ("v", "<i4", (3,))])
    records["n"] = 3
    records["v"] = faces
    target = Path(path)
    with open(target, "wb") as file:
        file.write(header.encode("ascii"))
        file.write(vertices.tobytes())
        file.write(records.tobytes())
    return target


def read_ply(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read a PLY written by :func:`write_ply` → (vertices [V, 3] float32, faces [F, 3] int64)."""
    data = Path(path).read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    counts = {line.split()[1]: int(line.split()[2]) for line in header if line.startswith("element")}
    vertex_bytes = counts["vertex"] * 12
    vertices = np.frombuffer(data[end : end + vertex_bytes], dtype="<f4").reshape(-1, 3)
    records = np.frombuffer(data[end + vertex_bytes :], dtype=[("n", "u1"), ("v", "<i4", (3,))], count=counts["face"])
    return vertices.copy(), records["v"].astype(np.int64)
