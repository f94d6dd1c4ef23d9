"""Issue #26: clean-up keeps a small part the views show and drops a floater they show as background."""

from __future__ import annotations

import numpy as np
import trimesh

from server.common.cameras import PoseFile
from server.common.mesh_io import Mesh
from server.stages.asset import AssetConfig, BakeViews, build_asset, clean_mesh, clean_mesh_with_report

BIG = ((0.0, 0.0, 0.0), 0.30)
PART = ((0.0, -0.38, 0.12), 0.05)  # area 2.8 % of the big sphere's: under the 5 % floater rule
FLOATER = ((0.0, 0.0, 0.46), 0.05)  # the same size, but the views show background there


def ray_cast(c2w: np.ndarray, k: np.ndarray, size: int = 128) -> np.ndarray:
    """Exact ray casting of BIG and PART (not FLOATER) through pixel centres, OpenGL c2w, white background; each
    sphere a flat colour."""
    col, row = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5)
    scale = size / (2 * k[0, 2])
    camera = np.stack([(col - k[0, 2] * scale) / (k[0, 0] * scale), -(row - k[1, 2] * scale) / (k[1, 1] * scale),
                       -np.ones_like(col)], axis=-1)
    d = camera.reshape(-1, 3) @ c2w[:3, :3].T
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    best, which = np.full(d.shape[0], np.inf), np.full(d.shape[0], -1)
    for i, (centre, radius) in enumerate((BIG, PART)):
        oc = c2w[:3, 3] - np.asarray(centre)
        b = d @ oc
        disc = b * b - (oc @ oc - radius**2)
        t = np.where(disc >= 0, -b - np.sqrt(np.maximum(disc, 0)), np.inf)
        best, which = np.where(t < best, t, best), np.where(t < best, i, which)
    image = np.full((d.shape[0], 3), 255, dtype=np.uint8)
    image[which == 0], image[which == 1] = (150, 120, 90), (30, 30, 30)
    return image.reshape(size, size, 3)


def sphere(centre, radius, subdivisions: int = 3) -> trimesh.Trimesh:
    return trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius).apply_translation(centre)


def scene() -> tuple[Mesh, BakeViews]:
    parts = trimesh.util.concatenate([sphere(*BIG, 4), sphere(*PART), sphere(*FLOATER)])
    poses = PoseFile.for_polar(75)
    images = {i: ray_cast(c2w, poses.intrinsics) for i, c2w in poses.c2ws.items()}
    return Mesh(np.asarray(parts.vertices, np.float32), np.asarray(parts.faces)), BakeViews.from_pose_file(poses,
                                                                                                            images)


def near(mesh: Mesh, centre) -> bool:
    return bool((np.linalg.norm(mesh.vertices - np.asarray(centre), axis=1) < 0.06).any())


def test_clean_up_keeps_a_small_part_the_views_show_and_drops_a_floater_they_do_not() -> None:
    mesh, views = scene()
    cleaned, report = clean_mesh_with_report(mesh, views=views)
    assert near(cleaned, PART[0]), "the small part every view shows was dropped"
    assert not near(cleaned, FLOATER[0]), "the floater the views show as background was kept"
    assert report.components == 3 and report.small == 2 and report.kept_by_views == 1 and report.dropped == 1
    low, high = sorted(report.supporting_views)  # the two have the same area: either order
    assert low == 0 and high >= 10
    # Without views, the area rule alone drops both (the behaviour before the views were consulted).
    alone = clean_mesh(mesh)
    assert not near(alone, PART[0]) and not near(alone, FLOATER[0])


def test_build_asset_consults_the_views_and_records_what_it_did() -> None:
    mesh, views = scene()
    out = build_asset(mesh, views, AssetConfig(target_faces=3000, texture_size=64))
    assert near(Mesh(out.vertices, out.faces), PART[0]) and not near(Mesh(out.vertices, out.faces), FLOATER[0])
    report = out.report
    assert report is not None and report.cleanup is not None and report.cleanup.kept_by_views == 1
    assert report.decimation is not None and report.decimation.reached
    assert abs(report.decimation.faces - 3000) <= 30 and report.decimation.as_dict()["target_faces"] == 3000
