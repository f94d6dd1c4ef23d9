"""Texture-bake quality on ground truth (#13): a baked texture against vertex colours at the same face count.

Texture quality does not depend on the reconstruction's weights, so it is measured on ground truth: objects rendered
by the #6 renderer's pieces (:mod:`training.render.texture_views`: the 40-view layout plus held-out cameras, a
1-pixel box filter) are coloured in two ways from their 40 views and rendered at the held-out cameras, and each render
is compared with the ground-truth render there. Every object is rendered, and scored, in two shadings (see Shading).

Per object, numbered as :func:`evaluate_object` runs:

1. The GT surface is ``mesh_dense.ply``: the outer surface of the object's parts, voxel-remeshed at ~1 pixel by the
   render script — the kind of surface the pipeline decimates (marching cubes of an SDF, nothing inside the object).
   (``mesh.ply``, the parts as modelled, has a few hundred long slivers per part, on which quadric decimation stalls
   far above 20 k faces.) Its vertex colours are sampled from the 40 views with the bake's own per-view sampler
   (visibility by depth, cosine and edge weights — :func:`server.stages.asset.vertex_colors_from_views`): the best
   per-vertex colour the views give, standing in for the reconstruction's blended vertex colours.
2. For each face count, :func:`server.stages.asset.decimate` brings the dense surface to the budget and carries the
   colours to the new vertices exactly as the pipeline does for a vertex-coloured result with ``target_faces`` (nearest
   original vertex), and :func:`server.stages.asset.bake_texture` bakes a texture onto the same decimated mesh.
3. Both are rendered at the held-out cameras by a supersampled z-buffer rasteriser (:func:`render_mesh`, built on
   :func:`server.stages.asset.raster.triangle_pixels`, with the bake's pixel convention) and compared with the GT
   renders:
   PSNR over the object's foreground (:func:`psnr`), all held-out views pooled. LPIPS is left out: no maintained
   LPIPS package is installed in the project's environment.

Shading. ``--shading both`` (the default) renders and scores every object twice, and the report sets the two side by
side (lit first):

* ``unlit``: each material's base colour through an emission shader (Standard view transform), so a pixel is the sRGB
  base colour averaged over the pixel — the colour-transfer ceiling, with nothing view-dependent.
* ``lit``: shaded as Zero123's training views are — Cycles with a sun (soft shadows, a per-object direction from the
  upper hemisphere), the renderer's soft white environment, Filmic, and glossy parts (about half the parts get a
  low-roughness, higher-specular Principled BSDF); both the 40 views the bake reads and the held-out views are
  rendered in that scene (:mod:`training.render.texture_views` has the exact scheme).

The scoring is the same for both: the decimated mesh's texture or vertex colours are rendered *unlit* by
:mod:`training.mesh_render` and compared with the GT render at each held-out camera. For lit views that is the honest
test of what the artist gets: the bake can only store the views' shading in the colours (shadows, shading and
whatever highlights the blend keeps), the same at every camera, while the GT's highlights move with the camera — an
error floor no colour map can remove, which the lit rows include and the unlit rows leave out.

Colours are interpolated in linear light in both rasterisers, as Cycles and glTF viewers do (vertex colours are
linear COLOR_0 in the pipeline's GLB; an sRGB texture is decoded before filtering).

The command that renders the objects and writes the report is :mod:`training.texture_command`:

    one2345-train evaluate-texture --out report/texture --count 4
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from server.common.cameras import PoseFile, opengl_to_opencv
from server.common.errors import BadInputError
from server.common.mesh_io import Mesh
from server.stages.asset import (
    BakeConfig,
    BakeViews,
    DecimateConfig,
    TexturedMesh,
    bake_texture,
    decimate,
    vertex_colors_from_views,
)
from training.mesh_render import composite_on_white, render_mesh

logger = logging.getLogger("training.texture_eval")

HELDOUT_DIR = "heldout"
"""Sub-folder of a rendered object with the held-out views and their pose.json
(:mod:`training.render.texture_views`)."""

DENSE_MESH = "mesh_dense.ply"
"""The GT outer surface, voxel-remeshed (:func:`training.render.texture_views.dense_surface`)."""

TEXTURE = "texture"
VERTEX = "vertex colours"

SHADINGS = ("lit", "unlit")
"""The render shadings of :mod:`training.render.texture_views`, in report order."""


@dataclass(frozen=True)
class TextureEvalConfig:
    """Settings of :func:`evaluate_object`."""

    face_counts: tuple[int, ...] = (5_000, 20_000, 100_000)
    """Polygon budgets the GT mesh is decimated to (the issue's 5 k, 20 k and 100 k)."""
    texture_size: int = 1024
    """Side of the baked texture (the asset stage's default)."""
    jitter: float = 1e-5
    """Standard deviation of a seeded Gaussian displacement of the dense surface's vertices (pose.json units; 1e-5 is
    1/400 pixel). The remeshed GT has large exactly planar patches (the parts' facets), on which the simplifier's
    quadrics are singular: it then stalls near 20 k faces whatever the budget and cuts corners off the silhouette.
    The pipeline's marching-cubes surfaces of a learnt SDF are never exactly planar; the jitter makes these behave
    like them."""
    bake_repeats: int = 1
    """Times each bake runs; its timings are those of the fastest run (on a shared machine the others' load only
    ever adds time, so the minimum is the estimate of the bake's own cost)."""
    supersample: int = 4
    """Evaluation renders use supersample² samples per pixel (box filter, as the GT renders)."""
    bake: BakeConfig = field(default_factory=BakeConfig)
    """How the texture is baked (and how vertex colours are sampled)."""
    decimate: DecimateConfig = field(default_factory=DecimateConfig)
    """How the budgets are reached."""

    def __post_init__(self) -> None:
        if not self.face_counts or any(isinstance(n, bool) or int(n) < 4 for n in self.face_counts):
            raise BadInputError(f"face counts {self.face_counts!r} are invalid; allowed: one or more integers ≥ 4 "
                                "(e.g. 5000, 20000, 100000)")
        if self.texture_size < 8:
            raise BadInputError(f"texture size {self.texture_size} is invalid; allowed: an integer ≥ 8 (e.g. 1024)")
        if not (math.isfinite(self.jitter) and self.jitter >= 0):
            raise BadInputError(f"jitter {self.jitter} is invalid; allowed: a length ≥ 0 (e.g. 1e-5)")
        if self.bake_repeats < 1:
            raise BadInputError(f"bake_repeats {self.bake_repeats} is invalid; allowed: an integer ≥ 1")
        if self.supersample < 1:
            raise BadInputError(f"supersample {self.supersample} is invalid; allowed: an integer ≥ 1 (e.g. 4)")


# ----------------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class HeldOutViews:
    """Ground-truth renders at cameras the bake does not see."""

    ids: tuple[str, ...]
    rgba: tuple[np.ndarray, ...]
    """V arrays [H, W, 4] uint8: sRGB colour with straight alpha (0 = background)."""
    intrinsics: np.ndarray
    """[V, 3, 3] pixel intrinsics (pixel (i, j) centred at (j + 0.5, i + 0.5))."""
    w2c: np.ndarray
    """[V, 4, 4] OpenCV world-to-camera in the mesh's frame."""

    @classmethod
    def from_pose_file(cls, poses: PoseFile, rgba: dict[str, np.ndarray]) -> HeldOutViews:
        """Held-out views from pose.json cameras and RGBA images keyed by id (intrinsics scaled to each image)."""
        poses.require(rgba)
        ids = tuple(i for i in poses.c2ws if i in rgba)
        k = poses.intrinsics
        intrinsics = [np.diag([rgba[i].shape[1] / (2 * k[0, 2]), rgba[i].shape[0] / (2 * k[1, 2]), 1.0]) @ k
                      for i in ids]
        w2c = np.linalg.inv(opengl_to_opencv(np.stack([poses.c2ws[i] for i in ids])))
        return cls(ids, tuple(rgba[i] for i in ids), np.stack(intrinsics), w2c)


@dataclass(frozen=True, eq=False)
class EvalObject:
    """One ground-truth object: its mesh, the 40 views the bake reads and the held-out views it is judged on."""

    name: str
    surface: Mesh
    """The GT object's outer surface, densely and evenly meshed (~1 px edges: ``mesh_dense.ply``), pose.json frame."""
    views: BakeViews
    """The 40 views the bake and the vertex colours read."""
    heldout: HeldOutViews
    """The views both are judged on."""
    shading: str = "unlit"
    """How the GT was rendered (one of :data:`SHADINGS`); both kinds of view share it."""


def _read_rgba(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGBA"))


def load_rendered_object(folder: str | os.PathLike[str]) -> EvalObject:
    """An object folder of :mod:`training.render.texture_views`: mesh.ply, the 40 views (composited on white, as
    the pipeline reads its views) with pose.json, and ``heldout/``.

    Raises:
        BadInputError: a missing file, a folder without held-out views, or lit views of the scene before #26 (an
            area light, no glossy parts: render them again).
    """
    from server.common.views import read_rgb
    from training.render import layout

    folder = Path(folder)
    heldout_dir = folder / HELDOUT_DIR
    if not (heldout_dir / "pose.json").is_file() or not (folder / DENSE_MESH).is_file():
        raise BadInputError(f"{folder} is not an object of the texture evaluation ({DENSE_MESH}, heldout/); "
                            "render one with one2345-train evaluate-texture (or training/render/texture_views.py)")
    layout.require_full_views(folder)
    meta = json.loads((folder / layout.META_NAME).read_text(encoding="utf-8"))
    record = meta.get("texture_eval") or {}
    shading = record.get("shading", "unlit")
    if shading not in SHADINGS or (shading == "lit" and "lit" not in record):
        raise BadInputError(f"{folder} was rendered with shading {shading!r} of an older texture evaluation (allowed: "
                            "unlit, or lit with the sun and glossy parts); render it again with "
                            "one2345-train evaluate-texture")
    poses = PoseFile.read(folder / "pose.json")
    images = {view_id: read_rgb(folder / name) for view_id, name in meta["files"].items()}
    held = PoseFile.read(heldout_dir / "pose.json")
    rgba = {view_id: _read_rgba(heldout_dir / view_id) for view_id in held.c2ws}
    vertices, faces = layout.read_ply(folder / DENSE_MESH)
    return EvalObject(folder.name, Mesh(vertices, faces), BakeViews.from_pose_file(poses, images),
                      HeldOutViews.from_pose_file(held, rgba), shading)


def find_rendered_objects(root: str | os.PathLike[str]) -> list[Path]:
    """Object folders under a render root (``<folder_id>/<uid>/``) that hold held-out views, sorted."""
    return sorted(p.parent.parent for p in Path(root).glob(f"*/*/{HELDOUT_DIR}/pose.json")
                  if (p.parent.parent / "meta.json").is_file())


def rendered_shading(folder: str | os.PathLike[str]) -> str | None:
    """The shading an object folder was rendered with (meta.json's texture_eval record; None if it has none)."""
    try:
        meta = json.loads((Path(folder) / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    record = meta.get("texture_eval") if isinstance(meta, dict) else None
    return record.get("shading") if isinstance(record, dict) else None


def find_objects_by_shading(data: str | os.PathLike[str], shadings: Sequence[str]) -> dict[str, list[Path]]:
    """Rendered objects per shading under ``data``: those of ``data/<shading>/`` (where the command renders them),
    and those rendered directly under ``data`` (before #26 the command rendered one shading there), by the shading
    their meta.json records. Shadings with no object are left out."""
    found: dict[str, list[Path]] = {}
    flat = find_rendered_objects(data)
    for shading in shadings:
        folders = find_rendered_objects(Path(data) / shading)
        folders += [f for f in flat if rendered_shading(f) == shading]
        if folders:
            found[shading] = folders
    return found


# ----------------------------------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ViewScore:
    """Squared error of one method over the held-out views (pooled) and the silhouette agreement."""

    squared_error: float = 0.0
    values: int = 0
    intersection: float = 0.0
    union: float = 0.0

    def add(self, render: np.ndarray, coverage: np.ndarray, gt: np.ndarray, gt_alpha: np.ndarray) -> None:
        """One view: render and GT [H, W, 3] on white, coverage and GT alpha [H, W] in [0, 1]. The foreground is
        every pixel either covers; the IoU is the soft one (Σ min / Σ max of the coverages), which a silhouette
        pixel covered by a sliver does not swing."""
        mask = (gt_alpha > 0) | (coverage > 0)
        self.squared_error += float(((render[mask] - gt[mask]) ** 2).sum())
        self.values += int(mask.sum()) * 3
        self.intersection += float(np.minimum(gt_alpha, coverage).sum())
        self.union += float(np.maximum(gt_alpha, coverage).sum())

    @property
    def psnr(self) -> float:
        mse = self.squared_error / max(self.values, 1)
        return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)

    @property
    def iou(self) -> float:
        return self.intersection / max(self.union, 1e-12)


def score_heldout(mesh: Mesh | TexturedMesh, heldout: HeldOutViews, supersample: int) -> ViewScore:
    """Render ``mesh`` at every held-out camera and pool its error against the GT renders over their foreground
    (GT alpha > 0 or covered by the render)."""
    score = ViewScore()
    for rgba, k, w2c in zip(heldout.rgba, heldout.intrinsics, heldout.w2c, strict=True):
        gt, gt_alpha = composite_on_white(rgba)
        render, coverage = render_mesh(mesh, k, w2c, rgba.shape[0], rgba.shape[1], supersample)
        score.add(render, coverage, gt, gt_alpha)
    return score


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class EvalRow:
    """One method on one object at one face budget."""

    object: str
    budget: int | None
    """The requested face count; None for the dense reference row."""
    faces: int
    """Faces of the mesh rendered (the budget, or the dense surface's count when it has fewer)."""
    method: str
    """:data:`TEXTURE`, :data:`VERTEX`, or :data:`DENSE` (vertex colours on the undecimated dense surface: what the
    views allow a per-vertex colour at ~1-pixel spacing, the ceiling of the vertex-colour rows)."""
    psnr: float
    """dB over the held-out views' foreground, all views pooled."""
    iou: float
    """Soft silhouette IoU of the render with the GT (a check of cameras and geometry: ~1 for every row)."""
    seconds: float
    """Colouring time: bake_texture (unwrap, rasterize, views, fill) for the texture; sampling the dense surface's
    vertices from the 40 views for the vertex colours (once per object, shared by every budget; decimation carries
    the colours)."""
    cpu_seconds: float = 0.0
    """The same work's CPU time (this process, all threads): on a shared machine the wall time depends on the load,
    this much less."""
    coverage: float | None = None
    """Texture only: share of charted texels some view saw."""
    timings: dict[str, float] | None = None
    """Texture only: the bake's wall seconds per step."""
    shading: str = "unlit"
    """How the GT views (the bake's and the held-out ones) were rendered: one of :data:`SHADINGS`."""


DENSE = "vertex colours, dense"


def evaluate_object(obj: EvalObject, config: TextureEvalConfig = TextureEvalConfig(),
                    export_dir: Path | None = None, export_faces: Sequence[int] = ()) -> list[EvalRow]:
    """The measurement of the module docstring on one object.

    Args:
        obj: GT surface, bake views and held-out views.
        config: see :class:`TextureEvalConfig`.
        export_dir, export_faces: for these budgets, write ``<name>-<budget>-texture.glb`` (no COLOR_0, as the
            pipeline writes a textured GLB) and ``<name>-<budget>-vertex-colours.glb`` into ``export_dir``.

    Returns:
        The dense reference row, then per budget (in config order) a :data:`TEXTURE` and a :data:`VERTEX` row.
    """
    from server.common.mesh_io import export_mesh
    from server.stages.asset import export_textured_mesh

    # 1. Vertex colours of the (jittered) dense GT surface from the 40 views.
    rng = np.random.default_rng(0)
    surface = Mesh((obj.surface.vertices + rng.normal(0.0, config.jitter, obj.surface.vertices.shape))
                   .astype(np.float32), obj.surface.faces)
    start, cpu = time.perf_counter(), time.process_time()
    dense = Mesh(surface.vertices, surface.faces, vertex_colors_from_views(surface, obj.views, config.bake))
    vertex_seconds, vertex_cpu = time.perf_counter() - start, time.process_time() - cpu
    score = score_heldout(dense, obj.heldout, config.supersample)
    rows = [EvalRow(obj.name, None, len(dense.faces), DENSE, score.psnr, score.iou, vertex_seconds, vertex_cpu,
                    shading=obj.shading)]
    for target in config.face_counts:
        # 2. The budget (colours follow the decimation, as in the pipeline), then the bake onto the same mesh.
        mesh = decimate(dense, int(target), config.decimate)
        best = None
        for _ in range(config.bake_repeats):
            start, cpu = time.perf_counter(), time.process_time()
            textured = bake_texture(mesh, obj.views, config.texture_size, config.bake)
            run = (time.perf_counter() - start, time.process_time() - cpu, textured)
            best = run if best is None or run[0] < best[0] else best
        bake_seconds, bake_cpu, textured = best
        # 3. Both rendered at the held-out cameras against the GT.
        score = score_heldout(textured, obj.heldout, config.supersample)
        report = textured.report
        rows.append(EvalRow(obj.name, int(target), len(mesh.faces), TEXTURE, score.psnr, score.iou, bake_seconds,
                            bake_cpu, None if report is None else report.coverage,
                            None if report is None else dict(report.timings), obj.shading))
        score = score_heldout(mesh, obj.heldout, config.supersample)
        rows.append(EvalRow(obj.name, int(target), len(mesh.faces), VERTEX, score.psnr, score.iou, vertex_seconds,
                            vertex_cpu, shading=obj.shading))
        logger.info("%s (%s) @ %d faces: texture %.2f dB, vertex colours %.2f dB (bake %.1f s)", obj.name,
                    obj.shading, len(mesh.faces), rows[-2].psnr, rows[-1].psnr, bake_seconds)
        if export_dir is not None and int(target) in {int(n) for n in export_faces}:
            # Unlit keeps the names of the single-shading command; lit GLBs carry the shading in their name.
            stem = f"{obj.name}-{int(target)}" + ("" if obj.shading == "unlit" else f"-{obj.shading}")
            export_textured_mesh(textured, Path(export_dir) / f"{stem}-texture.glb", vertex_colors=False)
            export_mesh(mesh, Path(export_dir) / f"{stem}-vertex-colours.glb")
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------

GOAL_DB = {20_000: 3.0, 100_000: 0.0}
"""#13's goals on the unlit views: texture − vertex colours PSNR ≥ 3 dB at 20 k faces and ≥ 0 dB at 100 k (mean)."""
LIT_GOAL_DB = {20_000: (4.0, 1.0), 100_000: (0.0, None)}
"""#26's goal on the lit views, (mean, smallest) gain: ≥ 4 dB on average and ≥ 1 dB on every object at 20 k faces;
#13's ≥ 0 dB at 100 k."""


def goal_for(shading: str, budget: int) -> tuple[float | None, float | None]:
    """(mean, smallest) gain asked for at this budget in this shading; None where no goal is set."""
    if shading == "lit":
        return LIT_GOAL_DB.get(budget, (None, None))
    return GOAL_DB.get(budget), None


def summarise(rows: Sequence[EvalRow]) -> list[dict]:
    """Per budget (ascending) and shading (lit first): objects, mean PSNR of each method, the texture's mean and
    smallest gain over vertex colours, the goal for the budget (``goal``: mean, ``goal_min``: smallest gain; None if
    none is set) and whether the gains meet it, and the bake seconds (mean, max) with the mean seconds of each step.

    Raises:
        BadInputError: a budget with a texture row but no vertex-colour row for the same object, or the reverse.
    """
    pairs: dict[tuple[int, str], dict[str, dict[str, EvalRow]]] = {}
    for row in rows:
        if row.method in (TEXTURE, VERTEX):
            key = (int(row.budget), row.shading)
            pairs.setdefault(key, {}).setdefault(row.object, {})[row.method] = row
    order = {shading: n for n, shading in enumerate(SHADINGS)}
    summary = []
    for budget, shading in sorted(pairs, key=lambda key: (key[0], order.get(key[1], len(order)), key[1])):
        items = list(pairs[budget, shading].items())
        if any(set(methods) != {TEXTURE, VERTEX} for _, methods in items):
            raise BadInputError(f"budget {budget} ({shading}): every object needs a texture and a vertex-colour row")
        texture = [methods[TEXTURE] for _, methods in items]
        vertex = [methods[VERTEX] for _, methods in items]
        gains = [t.psnr - v.psnr for t, v in zip(texture, vertex, strict=True)]
        goal, goal_min = goal_for(shading, budget)
        met = None
        if goal is not None:
            met = bool(np.mean(gains) >= goal and (goal_min is None or np.min(gains) >= goal_min))
        steps = [t.timings or {} for t in texture]
        summary.append({
            "budget": budget,
            "shading": shading,
            "objects": len(items),
            "texture_psnr": float(np.mean([t.psnr for t in texture])),
            "vertex_psnr": float(np.mean([v.psnr for v in vertex])),
            "gain_mean": float(np.mean(gains)),
            "gain_min": float(np.min(gains)),
            "goal": goal,
            "goal_min": goal_min,
            "met": met,
            "bake_mean_s": float(np.mean([t.seconds for t in texture])),
            "bake_max_s": float(np.max([t.seconds for t in texture])),
            "bake_cpu_mean_s": float(np.mean([t.cpu_seconds for t in texture])),
            "bake_steps_s": {k: float(np.mean([t.get(k, 0.0) for t in steps]))
                             for k in ("unwrap", "rasterize", "views", "fill")},
        })
    return summary


def host_description() -> str:
    """CPU model and core count of this machine (for the timing lines)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def markdown_report(rows: Sequence[EvalRow], config: TextureEvalConfig, host: str) -> str:
    """Per-object table, the summary per budget with the shadings side by side (lit first) against the goals, and the
    bake timings."""
    label = {TEXTURE: f"texture {config.texture_size}²", VERTEX: VERTEX, DENSE: DENSE}
    order = {shading: n for n, shading in enumerate(SHADINGS)}
    rows = sorted(rows, key=lambda r: order.get(r.shading, len(order)))  # stable: each shading keeps its order
    lines = ["| object | faces | method | shading | PSNR (dB) | silhouette IoU | colouring s |",
             "|---|---:|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.object} | {r.faces} | {label[r.method]} | {r.shading} | {r.psnr:.2f} | {r.iou:.4f} | "
                     f"{r.seconds:.1f} |")
    summary = summarise(rows)
    lines += ["", "| faces | objects | shading | texture PSNR | vertex-colour PSNR | gain (mean) | gain (min) | goal "
                  "| met |",
              "|---:|---:|---|---:|---:|---:|---:|---|---|"]
    for s in summary:
        goal = "—" if s["goal"] is None else f"≥ {s['goal']:g} dB"
        if s["goal_min"] is not None:
            goal += f", min ≥ {s['goal_min']:g} dB"
        met = "—" if s["met"] is None else ("yes" if s["met"] else "**no**")
        lines.append(f"| {s['budget']} | {s['objects']} | {s['shading']} | {s['texture_psnr']:.2f} | "
                     f"{s['vertex_psnr']:.2f} | {s['gain_mean']:+.2f} | {s['gain_min']:+.2f} | {goal} | {met} |")
    shadings = sorted({r.shading for r in rows}, key=lambda sh: order.get(sh, len(order)))
    for shading in shadings:
        dense = [r for r in rows if r.method == DENSE and r.shading == shading]
        if dense:
            lines += ["", f"Vertex colours on the undecimated dense surfaces, {shading} "
                          f"({np.mean([r.faces for r in dense]):.0f} faces on average): "
                          f"{np.mean([r.psnr for r in dense]):.2f} dB."]
    fastest = f", the fastest of {config.bake_repeats} runs" if config.bake_repeats > 1 else ""
    lines += ["", f"Bake time per object, bake_texture at {config.texture_size}² on the CPU ({host}{fastest}): wall "
                  "seconds (mean, max, mean per step) and CPU seconds of the process (mean):", "",
              "| faces | shading | wall s | max wall s | CPU s | unwrap | rasterize | views | fill |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        steps = s["bake_steps_s"]
        lines.append(f"| {s['budget']} | {s['shading']} | {s['bake_mean_s']:.1f} | {s['bake_max_s']:.1f} | "
                     f"{s['bake_cpu_mean_s']:.1f} | {steps['unwrap']:.1f} | {steps['rasterize']:.1f} | "
                     f"{steps['views']:.1f} | {steps['fill']:.1f} |")
    dense = [r for r in rows if r.method == DENSE]
    if dense:
        wall, cpu = np.mean([r.seconds for r in dense]), np.mean([r.cpu_seconds for r in dense])
        lines += ["", f"Vertex colours of a dense surface from the 40 views: {wall:.1f} s wall, {cpu:.1f} s CPU per "
                      "object (mean)."]
    return "\n".join(lines) + "\n"
