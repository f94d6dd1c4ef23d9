"""Synthetic objects in the training layout: analytic shapes of :mod:`server.common.synthetic` with exact depth, for
tests and a Blender-free dataset."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from server.common.cameras import NEARBY_DELTAS, PoseFile, calc_pose
from training.data import META_NAME, NUM_NEARBY, STAGE1_ID, depth_name, nearby_name, target_name


def write_synthetic_object(folder: str | os.PathLike[str], polar: float = 75.0, shape: str = "toy", size: int = 256,
                           rotation_deg: float = 0.0, scale: float = 1.0, mesh_resolution: int = 64) -> Path:
    """Render an analytic object of :mod:`server.common.synthetic` in the training layout, with exact depth and a GT
    mesh.

    The object is rotated by ``rotation_deg`` about z and scaled by ``scale`` (by moving the cameras instead:
    a camera at c/scale with the same orientation sees the scaled object as the camera at c sees the original), which
    gives varied objects from the two analytic shapes.

    Writes ``view_{k}.png`` (RGBA), ``view_{k}_depth_mm.png``, ``view_{k}_{j}_10.png``, ``pose.json``, ``mesh.ply``
    (marching cubes of the exact SDF) and ``meta.json``.

    Returns:
        The folder.
    """
    from server.common.mesh_io import Mesh, export_mesh
    from server.common.synthetic import render_view, shape_sdf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    poses = PoseFile.for_polar(polar)
    poses.intrinsics[:2] *= size / 256
    poses = PoseFile(poses.intrinsics, poses.near_far, poses.c2ws)
    theta = math.radians(rotation_deg)
    rot = np.eye(4)
    rot[:2, :2] = [[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]]
    targets = [i for i in poses.c2ws if STAGE1_ID.match(i)]
    files = {}
    for k, target in enumerate(targets):
        files[target] = target_name(k)
        for j in range(NUM_NEARBY):
            files[f"{target[:-4]}_{j}.png"] = nearby_name(k, j)
    for view_id, name in files.items():
        # Camera seen from the object's frame: undo the object's rotation, divide the position by its scale.
        c2w = np.linalg.inv(rot) @ poses.c2ws[view_id]
        c2w[:3, 3] /= scale
        rgb, depth = render_view(c2w, poses.intrinsics, size, shape)
        depth = depth * scale
        alpha = np.isfinite(depth)
        Image.fromarray(np.dstack([rgb, alpha.astype(np.uint8) * 255])).save(folder / name)
        if name.count("_") == 1:
            mm = np.where(alpha, np.rint(np.where(alpha, depth, 0) * 1000), 0).astype(np.uint16)
            Image.fromarray(mm).save(folder / depth_name(int(name[5:-4])))
    poses.write(folder / "pose.json")

    from server.stages.marching import marching_cubes

    axis = np.linspace(-0.6, 0.6, mesh_resolution)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    sdf = shape_sdf(grid / scale, shape).reshape((mesh_resolution,) * 3) * scale
    vertices, faces = (t.numpy() for t in marching_cubes(torch.from_numpy(-sdf), 0.0))
    vertices = vertices * (axis[1] - axis[0]) + axis[0]
    vertices = vertices @ rot[:3, :3].T
    export_mesh(Mesh(vertices.astype(np.float32), faces.astype(np.int64)), folder / "mesh.ply")
    meta = {"uid": folder.name, "source": "synthetic", "shape": shape, "polar": polar, "rotation_deg": rotation_deg,
            "scale": scale, "files": files}
    (folder / META_NAME).write_text(json.dumps(meta, indent=2))
    return folder


def write_synthetic_dataset(root: str | os.PathLike[str], count: int, size: int = 256, seed: int = 0,
                            polar: tuple[int, int] = (45, 105), workers: int = 1) -> list[Path]:
    """``count`` synthetic objects under ``<root>/000-000/syn-<n>/`` with random shape, polar, z-rotation and scale.

    ``workers`` > 1 renders that many objects at once in separate processes (same objects: the draws come first).
    """
    rng = np.random.default_rng(seed)
    jobs = []
    for n in range(count):
        shape = ("toy", "sphere")[int(rng.integers(0, 4) == 0)]  # mostly the asymmetric toy
        jobs.append({"folder": Path(root) / "000-000" / f"syn-{n:04d}",
                     "polar": float(rng.integers(polar[0], polar[1] + 1)), "shape": shape, "size": size,
                     "rotation_deg": float(rng.uniform(0, 360)), "scale": float(rng.uniform(0.8, 1.15))})
    if workers <= 1 or count <= 1:
        return [write_synthetic_object(**job) for job in jobs]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(min(workers, count)) as pool:
        return list(pool.map(_write_synthetic_job, jobs))


def _write_synthetic_job(job: dict) -> Path:
    return write_synthetic_object(**job)


def nearby_poses(polar: float, azimuth: float = 30.0) -> list[np.ndarray]:
    """OpenGL c2ws of the 4 nearby views of a view at (polar, azimuth), in the order j = 0..3 (spec §3.1)."""
    return [calc_pose(polar + dp, azimuth + da) for dp, da in NEARBY_DELTAS]
