"""``one2345-train evaluate``: how good a reconstruction checkpoint is, and how good the elevation estimate is.

Mesh metrics (spec §8, footnote of Table 1): both meshes are sampled uniformly by area (seeded), the prediction is
aligned to the ground truth — up axis known (z), so a linear search over uniform scale and rotation about z, then
point-to-point ICP — and then

* **Chamfer distance** = ½(mean_p min_g ‖p − g‖ + mean_g min_p ‖g − p‖), in the pose.json world's units;
* **F-score** (%) at threshold τ = ``threshold`` × the ground truth's extent (largest bounding-box side; 0.05 by
  default, so τ = 0.04 for the renderer's extent-0.8 objects): harmonic mean of precision (share of predicted points
  within τ of the GT) and recall (share of GT points within τ of the prediction).

Elevation: :class:`server.stages.elevation.ElevationEstimator` on the four GT nearby views of view 0 at the object's
known
polar angle, as rendered and (``--degrade``) degraded like Zero123 output; the report gives median, 90th percentile
and maximum absolute error and the share off by more than 10°, split by the estimator's flag
(:mod:`training.elevation_eval`).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.spatial import cKDTree

from server.common.errors import BadInputError, EmptySurfaceError
from training.elevation_eval import Trial, markdown_table, run_trials, summarise, trials_from_renders

# ---------------------------------------------------------------------------------------------------------------------
# Point sampling and metrics
# ---------------------------------------------------------------------------------------------------------------------


def sample_surface(vertices: np.ndarray, faces: np.ndarray, count: int, seed: int = 0,
                   return_faces: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Points uniformly distributed by area on a triangle mesh.

    Args:
        vertices: [V, 3]; faces: [F, 3] int.
        count: number of points.
        seed: the same mesh and seed give the same points.
        return_faces: also return the [count] index of each point's face.

    Returns:
        [count, 3] float64 (and the face indices).
    """
    tri = np.asarray(vertices, dtype=np.float64)[np.asarray(faces)]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=-1)
    if len(tri) == 0 or area.sum() <= 0:
        raise EmptySurfaceError("the mesh has no surface area to sample (no faces, or all degenerate)")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(tri), size=count, p=area / area.sum())
    r1, r2 = rng.random((2, count))
    flip = r1 + r2 > 1  # reflect into the triangle: uniform barycentrics
    r1, r2 = np.where(flip, 1 - r1, r1), np.where(flip, 1 - r2, r2)
    t = tri[chosen]
    points = t[:, 0] + r1[:, None] * (t[:, 1] - t[:, 0]) + r2[:, None] * (t[:, 2] - t[:, 0])
    return (points, chosen) if return_faces else points


@dataclass(frozen=True)
class Metrics:
    chamfer: float
    """½(mean pred→GT + mean GT→pred) nearest-neighbour distance, world units."""
    fscore: float
    """F-score in % at ``tau``."""
    precision: float
    """% of predicted points within tau of the GT."""
    recall: float
    """% of GT points within tau of the prediction."""
    tau: float
    """Distance threshold used, world units."""


def point_metrics(pred: np.ndarray, gt: np.ndarray, tau: float) -> Metrics:
    """Chamfer distance and F-score between point sets [N, 3] and [M, 3] at threshold ``tau``."""
    d_pred = cKDTree(gt).query(pred)[0]
    d_gt = cKDTree(pred).query(gt)[0]
    precision = 100.0 * float((d_pred < tau).mean())
    recall = 100.0 * float((d_gt < tau).mean())
    fscore = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return Metrics(0.5 * float(d_pred.mean() + d_gt.mean()), fscore, precision, recall, tau)


def extent(points: np.ndarray) -> float:
    """Largest side of the axis-aligned bounding box."""
    return float((points.max(axis=0) - points.min(axis=0)).max())


# ---------------------------------------------------------------------------------------------------------------------
# Alignment
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlignConfig:
    """The paper's alignment: grid search over scale and z-rotation, then ICP."""

    scales: tuple[float, ...] = tuple(np.round(np.linspace(0.8, 1.2, 9), 3))
    """Uniform scales tried about the centroid."""
    angles: int = 36
    """Rotations about z tried, evenly spaced over 360° (10° steps)."""
    icp_iterations: int = 30
    """Point-to-point ICP iterations (rigid, after the search)."""
    search_points: int = 2000
    """Points per cloud used in the grid search."""


def rotation_z(degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    return np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])


def icp(source: np.ndarray, target: np.ndarray, iterations: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Rigid point-to-point ICP (nearest neighbours, then the Kabsch/Umeyama solve without scale).

    Args:
        source: [N, 3] moved points; target: [M, 3].

    Returns:
        (R [3, 3], t [3]) such that source @ R.T + t ≈ target.
    """
    tree = cKDTree(target)
    rotation, translation = np.eye(3), np.zeros(3)
    for _ in range(iterations):
        moved = source @ rotation.T + translation
        matched = target[tree.query(moved)[1]]
        mu_s, mu_t = moved.mean(axis=0), matched.mean(axis=0)
        u, _, vt = np.linalg.svd((matched - mu_t).T @ (moved - mu_s))
        d = np.sign(np.linalg.det(u @ vt))
        step = u @ np.diag([1.0, 1.0, d]) @ vt
        rotation, translation = step @ rotation, step @ (translation - mu_s) + mu_t
    return rotation, translation


def align(pred: np.ndarray, gt: np.ndarray, config: AlignConfig = AlignConfig(), seed: int = 0) -> np.ndarray:
    """Align predicted points to GT points: centroids, best (scale, z-rotation) by Chamfer, then ICP.

    Args:
        pred: [N, 3]; gt: [M, 3] (z up in both).

    Returns:
        [N, 3] the aligned predicted points.
    """
    rng = np.random.default_rng(seed)
    sub_p = pred[rng.choice(len(pred), min(len(pred), config.search_points), replace=False)]
    sub_g = gt[rng.choice(len(gt), min(len(gt), config.search_points), replace=False)]
    c_p, c_g = pred.mean(axis=0), gt.mean(axis=0)
    tree_g = cKDTree(sub_g)
    best = (math.inf, 1.0, 0.0)
    for scale in config.scales:
        for angle in np.arange(config.angles) * 360.0 / config.angles:
            moved = scale * (sub_p - c_p) @ rotation_z(angle).T + c_g
            score = tree_g.query(moved)[0].mean() + cKDTree(moved).query(sub_g)[0].mean()
            if score < best[0]:
                best = (score, scale, angle)
    _, scale, angle = best
    start = scale * (pred - c_p) @ rotation_z(angle).T + c_g
    rotation, translation = icp(start[rng.choice(len(start), min(len(start), 5000), replace=False)], gt,
                                config.icp_iterations)
    return start @ rotation.T + translation


def mesh_metrics(pred_vertices: np.ndarray, pred_faces: np.ndarray, gt_vertices: np.ndarray, gt_faces: np.ndarray,
                 threshold: float = 0.05, points: int = 20_000, aligned: bool = True, seed: int = 0,
                 align_config: AlignConfig = AlignConfig()) -> Metrics:
    """Metrics between two meshes (module docstring); τ = threshold × GT extent."""
    gt = sample_surface(gt_vertices, gt_faces, points, seed)
    pred = sample_surface(pred_vertices, pred_faces, points, seed)
    if aligned:
        pred = align(pred, gt, align_config, seed)
    return point_metrics(pred, gt, threshold * extent(gt))


# ---------------------------------------------------------------------------------------------------------------------
# Side-by-side renders (point splats, no GL)
# ---------------------------------------------------------------------------------------------------------------------


def splat(vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray | None, size: int = 256, polar: float = 60.0,
          azimuth: float = 30.0, points: int = 60_000) -> np.ndarray:
    """A shaded point-splat render of a mesh (z-up world) from a camera on the radius-1.2 sphere.

    Returns:
        [size, size, 3] uint8 on white.
    """
    from server.common.cameras import FOCAL, IMAGE_SIZE, calc_pose

    xyz, chosen = sample_surface(vertices, faces, points, 0, return_faces=True)
    tri = np.asarray(vertices, dtype=np.float64)[faces[chosen]]
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    n /= np.maximum(np.linalg.norm(n, axis=-1), 1e-12)[:, None]
    base = colors[faces[chosen]].mean(axis=1) / 255.0 if colors is not None else np.full((points, 3), 0.75)
    c2w = calc_pose(polar, azimuth)
    cam = (xyz - c2w[:3, 3]) @ c2w[:3, :3]  # OpenGL camera: looks along −z
    depth = -cam[:, 2]
    focal = FOCAL * size / IMAGE_SIZE
    u = np.round(focal * cam[:, 0] / depth + size / 2).astype(int)
    v = np.round(-focal * cam[:, 1] / depth + size / 2).astype(int)
    light = c2w[:3, 2]  # headlight
    shade = 0.35 + 0.65 * np.abs(n @ light)
    rgb = np.clip(base * shade[:, None], 0, 1)
    image = np.ones((size, size, 3))
    zbuf = np.full((size, size), np.inf)
    ok = (depth > 0) & (u >= 0) & (u < size - 1) & (v >= 0) & (v < size - 1)
    order = np.argsort(-depth[ok])  # far first, so nearer splats overwrite
    for du in (0, 1):
        for dv in (0, 1):
            uu, vv = u[ok][order] + du, v[ok][order] + dv
            image[vv, uu] = rgb[ok][order]
            zbuf[vv, uu] = np.minimum(zbuf[vv, uu], depth[ok][order])
    return (image * 255).round().astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------------
# Reconstruction evaluation over a dataset
# ---------------------------------------------------------------------------------------------------------------------


def reconstruct_object(model, folder: Path, predicted: bool, resolution: int, device: str = "cpu"):
    """Run the server's reconstruction on one object's 32 source views → server Mesh in the pose.json world."""
    import torch

    from server.common.cameras import normalise_cameras
    from server.common.views import ViewSet
    from server.pipeline.reconstruct import reconstruct_mesh
    from server.stages.meshing import MeshingConfig
    from training.data import read_object, read_rgb_on_white

    obj = read_object(folder)
    images = np.stack([read_rgb_on_white(p) for p in obj.nearby_files(predicted)])
    cams = normalise_cameras(obj.poses, obj.nearby_ids, obj.reference_id, images.shape[1:3])
    views = ViewSet(list(obj.nearby_ids), torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), cams)
    return reconstruct_mesh(model, views, MeshingConfig(resolution=resolution), device=device).mesh


def load_gt_mesh(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    import trimesh

    path = folder / "mesh.ply"
    if not path.is_file():
        raise BadInputError(f"{folder} has no mesh.ply (render without --no-mesh to evaluate geometry)")
    mesh = trimesh.load(path, force="mesh", process=False)
    return np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces, dtype=np.int64)


def evaluate_checkpoint(checkpoint: Path, objects: Sequence[Path], out: Path, predicted: bool = False,
                        resolution: int = 128, threshold: float = 0.05, points: int = 20_000, aligned: bool = True,
                        device: str = "cpu") -> dict:
    """Metrics of one checkpoint on ``objects``; writes side-by-side renders under ``out/renders/<ckpt>/``.

    Returns:
        {"checkpoint", "step", "objects": [{uid, chamfer, fscore, …}], "mean": {chamfer, fscore, …}}.
    """
    from server.stages.reconstruction.checkpoint import load_reconstruction_model, read_config

    model = load_reconstruction_model(checkpoint)
    step = read_config(checkpoint)[1].get("step") if checkpoint.is_dir() else None
    renders = out / "renders" / checkpoint.name
    renders.mkdir(parents=True, exist_ok=True)
    rows = []
    for folder in objects:
        gt_v, gt_f = load_gt_mesh(folder)
        try:
            mesh = reconstruct_object(model, folder, predicted, resolution, device)
            m = mesh_metrics(mesh.vertices, mesh.faces, gt_v, gt_f, threshold, points, aligned)
            side = np.concatenate([splat(mesh.vertices, mesh.faces, mesh.colors), splat(gt_v, gt_f, None)], axis=1)
            Image.fromarray(side).save(renders / f"{folder.name}.png")
            row = {"uid": folder.name, **asdict(m)}
        except EmptySurfaceError:
            # No surface is a real outcome of a bad network: F-score 0, Chamfer undefined.
            row = {"uid": folder.name, "chamfer": math.nan, "fscore": 0.0, "precision": 0.0, "recall": 0.0,
                   "tau": threshold * extent(gt_v)}
        rows.append(row)
    mean = {k: float(np.nanmean([r[k] for r in rows])) for k in ("chamfer", "fscore", "precision", "recall")}
    return {"checkpoint": str(checkpoint), "step": step, "objects": rows, "mean": mean}


def markdown_report(results: Sequence[dict], threshold: float, elevation: dict | None = None) -> str:
    """The Markdown tables: per checkpoint the mean, then per object, then the elevation errors."""
    lines = ["# Evaluation"]
    if results:
        lines += ["", f"F-score at τ = {threshold} × GT extent (largest bounding-box side); Chamfer = ½(pred→GT + "
                  "GT→pred) mean nearest distance, world units; after alignment (scale × z-rotation search, then ICP) "
                  "unless stated.", "", "| checkpoint | step | objects | F-score % | Chamfer |",
                  "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {Path(r['checkpoint']).name} | {r['step']} | {len(r['objects'])} | "
                     f"{r['mean']['fscore']:.1f} | {r['mean']['chamfer']:.4f} |")
    for r in results:
        lines += ["", f"## {Path(r['checkpoint']).name}", "", "| object | F-score % | Chamfer | render |",
                  "|---|---|---|---|"]
        for o in r["objects"]:
            lines.append(f"| {o['uid']} | {o['fscore']:.1f} | {o['chamfer']:.4f} | "
                         f"![](renders/{Path(r['checkpoint']).name}/{o['uid']}.png) |")
    if elevation:
        lines += ["", "## Elevation estimate", "", f"Matchers {elevation['matcher']}; absolute polar error in degrees; "
                  "flagged = the estimator said uncertain (the artist is asked to set the elevation).", "",
                  markdown_table(elevation["settings"])]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# Elevation
# ---------------------------------------------------------------------------------------------------------------------


def textured_render(c2w: np.ndarray, size: int = 256, shape: str = "toy", seed: int = 0) -> np.ndarray:
    """The analytic object of :mod:`server.common.synthetic` with a solid (3D) noise texture, so feature matchers find
    correspondences; same cameras and background as ``render_view``. Returns [size, size, 3] uint8."""
    from scipy.ndimage import map_coordinates

    from server.common.cameras import default_intrinsics
    from server.common.synthetic import camera_rays, cast_rays

    k = default_intrinsics()
    k[:2] *= size / 256
    origins, directions = camera_rays(c2w, k, size)
    directions = directions / np.linalg.norm(directions, axis=-1, keepdims=True)
    hits = cast_rays(origins, directions, shape)
    points = origins[hits.hit] + hits.t[hits.hit, None] * directions[hits.hit]
    rng = np.random.default_rng(seed)
    lum = np.zeros(len(points))
    for weight, n in ((0.3, 8), (0.35, 24), (0.35, 48)):
        grid = rng.random((n, n, n))
        lum += weight * map_coordinates(grid, ((points + 0.6) / 1.2 * (n - 1)).T, order=3, mode="nearest")
    lum = np.clip((lum - 0.5) * 2.0 + 0.5, 0, 1)
    image = np.full((size * size, 3), 255.0)
    image[hits.hit] = 20 + 200 * lum[:, None] * np.array([1.0, 0.85, 0.7])
    return image.reshape(size, size, 3).round().astype(np.uint8)


def elevation_trials_synthetic(count: int, seed: int = 0, polar_range: tuple[int, int] = (45, 105),
                               size: int = 256) -> list[Trial]:
    """``count`` trials at random polar angles: the 4 GT nearby views of view 0 of the textured synthetic object."""
    from training.synthetic import nearby_poses

    rng = np.random.default_rng(seed)
    trials = []
    for n in range(count):
        polar = float(rng.integers(polar_range[0], polar_range[1] + 1))
        azimuth = float(rng.uniform(0, 360))  # the object's orientation relative to the input view
        trials.append(Trial(f"synthetic-{n}", polar,
                            [textured_render(c2w, size) for c2w in nearby_poses(polar, 30.0 + azimuth)]))
    return trials


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def evaluate_elevation(args: argparse.Namespace, objects: Sequence[Path]) -> dict:
    """The elevation report of :mod:`training.elevation_eval`: per setting (and degraded, with --degrade) the error
    statistics, all and split by the estimator's flag; the rows of every trial."""
    from server.stages.elevation import ElevationEstimator, available_matchers

    estimator = ElevationEstimator(available_matchers(args.weights_dir, prefer=args.matcher))
    if args.elevation == "synthetic":
        sets = {"synthetic textured 256²": elevation_trials_synthetic(args.elevation_trials, args.seed)}
    else:
        roots = args.elevation_data or ([args.data] if args.data else [])
        if not roots:
            raise BadInputError("--elevation data needs --elevation-data DIR (or --data) with rendered objects")
        sets = {Path(root).name: trials_from_renders(root) for root in roots}
    settings, rows = {}, {}
    for name, trials in sets.items():
        for degraded in (False, True) if args.degrade else (False,):
            label = f"{name}, degraded" if degraded else name
            rows[label] = run_trials(trials, estimator, degraded=degraded, seed=args.seed)
            settings[label] = summarise(rows[label])
            a, u = settings[label]["all"], settings[label]["unflagged"]
            print(f"elevation, {label}: median {a['median']}°, p90 {a['p90']}°, max {a['max']}°, > 10°: "
                  f"{a['over_10']} of {a['count']} ({u['over_10']} unflagged)")
    return {"matcher": estimator.name, "settings": settings, "trials": rows}


def run_evaluate(args: argparse.Namespace) -> int:
    from training.data import find_objects, split_objects

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, elevation = [], None
    objects: list[Path] = []
    if args.data:
        everything = find_objects(args.data)
        objects = everything if args.split == "all" else split_objects(everything, args.val_fraction)[
            0 if args.split == "train" else 1]
        objects = objects[: args.limit] if args.limit else objects
    if args.checkpoint:
        if not objects:
            raise BadInputError("--checkpoint needs --data with at least one object of the chosen --split")
        for checkpoint in args.checkpoint:
            results.append(evaluate_checkpoint(Path(checkpoint), objects, out, predicted=args.predicted_sources,
                                               resolution=args.resolution, threshold=args.threshold,
                                               points=args.points, aligned=not args.no_align, device=args.device))
            mean = results[-1]["mean"]
            print(f"{checkpoint}: F-score {mean['fscore']:.1f} %  Chamfer {mean['chamfer']:.4f}")
    if args.elevation:
        elevation = evaluate_elevation(args, objects)
    if not results and elevation is None:
        raise BadInputError("nothing to evaluate: give --checkpoint (with --data) and/or --elevation")
    report = {"threshold": args.threshold, "aligned": not args.no_align, "results": results, "elevation": elevation}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown_report(results, args.threshold, elevation))
    print(f"report: {out / 'report.md'}")
    return 0


def add_evaluate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``evaluate``."""
    from training.data import DataConfig

    p = subparsers.add_parser(
        "evaluate", help="F-score / Chamfer of checkpoints on rendered objects, and the elevation error",
        description="Reconstruct held-out objects with each checkpoint, align to the GT mesh (scale × z-rotation "
                    "search, ICP) and report F-score and Chamfer per object and averaged (report.json, report.md, "
                    "renders/). --elevation adds the polar-angle error of the elevation estimator.")
    p.add_argument("--checkpoint", action="append",
                   help="checkpoint folder (ours) or official .pth; repeat for a curve over training steps")
    p.add_argument("--data", help="render root (<folder_id>/<uid>/ with mesh.ply)")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--split", choices=["val", "train", "all"], default="val",
                   help="objects to evaluate: the held-out split of `fit` (default), the training split, or all")
    p.add_argument("--val-fraction", type=float, default=DataConfig().val_fraction,
                   help=f"held-out share used by fit (default {DataConfig().val_fraction}; must match the run)")
    p.add_argument("--limit", type=int, default=0, help="evaluate at most this many objects (0 = all)")
    p.add_argument("--predicted-sources", action="store_true",
                   help="reconstruct from the cached Zero123 predictions instead of the GT nearby renders")
    p.add_argument("--resolution", type=int, default=128, help="marching-cubes grid per axis (default 128)")
    p.add_argument("--threshold", type=float, default=0.05,
                   help="F-score threshold as a fraction of the GT's largest bounding-box side (default 0.05)")
    p.add_argument("--points", type=int, default=20_000, help="surface samples per mesh (default 20000)")
    p.add_argument("--no-align", action="store_true", help="compare in the pose.json frame without alignment")
    p.add_argument("--elevation", choices=["synthetic", "data"],
                   help="also report the elevation error: on textured synthetic renders, or on rendered objects "
                        "(--elevation-data, else --data)")
    p.add_argument("--elevation-data", action="append",
                   help="render root of elevation trials (one2345-train render --views elevation …); repeat for "
                        "several settings, each reported on its own row")
    p.add_argument("--degrade", action="store_true",
                   help="also estimate every trial after Zero123-like degradation (blur, colour shift, jitter)")
    p.add_argument("--elevation-trials", type=int, default=20, help="random polar angles for --elevation synthetic")
    p.add_argument("--matcher", choices=["auto", "loftr", "flow", "sift"], default="auto",
                   help="elevation matchers: auto (LoFTR when its weights are present, flow, SIFT, with the "
                        "low-confidence rule), or one alone")
    p.add_argument("--weights-dir", type=Path, default=None, help="weights folder (LoFTR for --matcher auto/loftr)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic elevation trials")
    p.add_argument("--device", default="cpu", help="device of the reconstruction (cpu, cuda, cuda:N)")
    p.set_defaults(handler=run_evaluate, func=run_evaluate)
    return p
