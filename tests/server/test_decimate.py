"""Issue #26: ``decimate`` reaches its budget within 1 % on closed manifolds, planar patches and slivers included, or
says in its report how many faces it reached and why."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import trimesh

from server.common.mesh_io import Mesh
from server.stages.asset import DecimateConfig, decimate, decimate_with_report


def as_mesh(tm: trimesh.Trimesh) -> Mesh:
    return Mesh(np.asarray(tm.vertices, dtype=np.float32), np.asarray(tm.faces, dtype=np.int64))


def subdivided_cube() -> trimesh.Trimesh:
    box = trimesh.creation.box(extents=(0.6, 0.6, 0.6))
    for _ in range(5):
        box = box.subdivide()
    box.merge_vertices()  # subdivide leaves the new edge midpoints split between neighbouring faces
    assert box.is_watertight
    return box  # 12 288 faces on six planar patches


def capped_cylinder() -> trimesh.Trimesh:
    # Caps are fans of 2 000 slivers (planar patches), the side 4 000 long thin triangles: quadric collapse refuses
    # every collapse here (each would leave a near-degenerate triangle) and used to return all 8 000 faces.
    return trimesh.creation.cylinder(radius=0.3, height=0.8, sections=2000)


@pytest.mark.parametrize(
    ("name", "make", "target"),
    [
        ("subdivided cube", subdivided_cube, 5_000),
        ("subdivided icosphere", lambda: trimesh.creation.icosphere(subdivisions=6, radius=0.4), 20_000),
        ("capped cylinder", capped_cylinder, 1_000),
    ],
)
def test_decimate_reaches_the_budget_on_closed_meshes(name: str, make, target: int) -> None:
    source = make()
    mesh, report = decimate_with_report(as_mesh(source), target)
    out = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    assert abs(len(mesh.faces) - target) <= 0.01 * target, (name, report)
    assert report.reached and report.reason is None and report.faces == len(mesh.faces)
    assert report.input_faces == len(source.faces) and report.target_faces == target
    # Still closed: no edge with a single face. (fast-simplification may leave a rare edge shared by four faces on
    # planar patches — one of 7 500 on the cube — so manifoldness is not asserted.)
    edges = np.sort(mesh.faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    assert (np.unique(edges, axis=0, return_counts=True)[1] % 2 == 0).all()
    assert out.volume == pytest.approx(source.volume, rel=0.03)  # the shape is kept, not just the count
    if name == "capped cylinder":
        assert report.method == "quadric+shortest-edge" and report.quadric_faces > 2 * target


def test_decimate_reports_a_missed_budget_and_why(caplog: pytest.LogCaptureFixture) -> None:
    # A strip of triangles: every vertex is on the open border, which may not move, so nothing can be collapsed.
    x = np.arange(51, dtype=np.float32)
    vertices = np.concatenate([np.stack([x, np.zeros_like(x), np.zeros_like(x)], 1),
                               np.stack([x, np.ones_like(x), np.zeros_like(x)], 1)])
    faces = np.array([[i, i + 1, 52 + i] for i in range(50)] + [[i, 52 + i, 51 + i] for i in range(50)])
    mesh, report = decimate_with_report(Mesh(vertices, faces), 20)
    assert not report.reached and report.faces == len(mesh.faces) == 100
    assert report.reason is not None and "border" in report.reason
    with caplog.at_level(logging.WARNING, logger="server.stages.asset"):
        decimate(Mesh(vertices, faces), 20)
    assert "100 faces for a target of 20" in caplog.text
    # With the fallback off, a stalled quadric collapse says so as well.
    _, report = decimate_with_report(as_mesh(capped_cylinder()), 1_000, DecimateConfig(fallback=False))
    assert not report.reached and report.faces > 1_010 and "fallback is off" in (report.reason or "")


def test_decimate_carries_colours_and_reports_an_untouched_mesh() -> None:
    source = as_mesh(trimesh.creation.icosphere(subdivisions=3, radius=0.4))
    colours = np.clip(np.rint(source.vertices * 300 + 128), 0, 255).astype(np.uint8)
    mesh, report = decimate_with_report(Mesh(source.vertices, source.faces, colours), 5_000)
    assert report.method == "none" and report.reached and np.array_equal(mesh.colors, colours)
    cylinder = as_mesh(capped_cylinder())
    colours = np.clip(np.rint(cylinder.vertices * 300 + 128), 0, 255).astype(np.uint8)
    mesh, _ = decimate_with_report(Mesh(cylinder.vertices, cylinder.faces, colours), 1_000)
    expected = np.clip(np.rint(mesh.vertices * 300 + 128), 0, 255)
    assert mesh.colors is not None and np.abs(mesh.colors - expected).max() <= 40  # nearest original vertex
