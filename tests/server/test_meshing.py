"""Tests for server/meshing.py: SDF sampling (dense and coarse-to-fine), marching cubes, mesh files.

The SDFs are analytic (sphere, box, unions, a thin plate), so every expected value is computed independently of the
code under test: true distances, true volumes, the dense grid, and bytes parsed by hand.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from server.common.errors import BadInputError, CancelledError, EmptySurfaceError
from server.common.mesh_io import Mesh, export_mesh, load_mesh
from server.stages.meshing import MeshingConfig, extract_surface, lattice_indices, refinement_strides, sample_sdf_grid

SdfFn = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------------------------------
# Analytic SDFs (positive outside, exactly 1-Lipschitz)
# ----------------------------------------------------------------------------------------------------------------------


def sphere_sdf(center: tuple[float, float, float], radius: float) -> SdfFn:
    """Signed distance to a sphere; points [N, 3] → [N]."""
    c = torch.tensor(center, dtype=torch.float32)
    return lambda p: (p - c).norm(dim=-1) - radius


def box_sdf(center: tuple[float, float, float], half_extents: tuple[float, float, float]) -> SdfFn:
    """Signed distance to an axis-aligned box; points [N, 3] → [N]."""
    c = torch.tensor(center, dtype=torch.float32)
    h = torch.tensor(half_extents, dtype=torch.float32)

    def sdf(p: torch.Tensor) -> torch.Tensor:
        q = (p - c).abs() - h
        return q.clamp(min=0).norm(dim=-1) + q.max(dim=-1).values.clamp(max=0)

    return sdf


def union_sdf(*fns: SdfFn) -> SdfFn:
    return lambda p: torch.stack([f(p) for f in fns]).min(dim=0).values


def cell(resolution: int) -> float:
    return 2.0 / (resolution - 1)


def thin_plate(resolution: int) -> SdfFn:
    """A plate 3 fine cells thick, centred between two coarse (stride-4) lattice planes: z index 30 ± 1.5."""
    h = cell(resolution)
    return box_sdf((0.0, 0.0, -1.0 + 30 * h), (0.6, 0.5, 1.5 * h))


class Counted:
    """Wraps an SDF and counts the points it is asked for."""

    def __init__(self, fn: SdfFn) -> None:
        self.fn = fn
        self.points = 0
        self.max_batch = 0

    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        assert p.dtype == torch.float32 and p.ndim == 2 and p.shape[1] == 3
        self.points += p.shape[0]
        self.max_batch = max(self.max_batch, p.shape[0])
        return self.fn(p)


def dense(fn: SdfFn, resolution: int) -> np.ndarray:
    """The dense grid computed independently: all points in one call. [R, R, R] float32."""
    x = torch.linspace(-1, 1, resolution)
    points = torch.stack(torch.meshgrid(x, x, x, indexing="ij"), dim=-1).reshape(-1, 3)
    return fn(points).reshape(resolution, resolution, resolution).numpy()


def signed_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    a, b, c = (vertices[faces[:, i]].astype(np.float64) for i in range(3))
    return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0)


# ----------------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------------


def test_dense_grid_indexing_and_blocks() -> None:
    # An asymmetric linear function catches axis permutations; R = 21 with 8³ blocks leaves partial blocks.
    fn = Counted(lambda p: p[:, 0] + 2 * p[:, 1] + 4 * p[:, 2] - 0.1)
    grid = sample_sdf_grid(fn, MeshingConfig(resolution=21, block_size=8, coarse_to_fine=False))
    x = np.linspace(-1, 1, 21)
    expected = x[:, None, None] + 2 * x[None, :, None] + 4 * x[None, None, :] - 0.1
    assert grid.shape == (21, 21, 21) and grid.dtype == np.float32
    np.testing.assert_allclose(grid, expected, atol=1e-5)
    assert fn.points == 21**3 and fn.max_batch <= 8**3


def test_lattices_and_strides() -> None:
    assert lattice_indices(10, 4).tolist() == [0, 4, 8, 9]
    assert lattice_indices(9, 4).tolist() == [0, 4, 8]
    assert refinement_strides(4) == [4, 2, 1]
    assert refinement_strides(8) == [8, 4, 2, 1]
    assert refinement_strides(6) == [6, 3, 1]
    assert refinement_strides(5) == [5, 1]


SHAPES = {
    "sphere": lambda r: sphere_sdf((0.1, -0.05, 0.02), 0.55),
    "box": lambda r: box_sdf((0.03, 0.0, -0.1), (0.5, 0.3, 0.6)),
    "two_spheres": lambda r: union_sdf(sphere_sdf((-0.4, 0.0, 0.0), 0.35), sphere_sdf((0.35, 0.1, 0.0), 0.3)),
    "thin_plate": thin_plate,
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize(("resolution", "stride"), [(64, 4), (61, 4), (73, 8), (70, 6)])
def test_coarse_to_fine_equals_dense(shape: str, resolution: int, stride: int) -> None:
    fn = Counted(SHAPES[shape](resolution))
    config = MeshingConfig(resolution=resolution, block_size=16, coarse_stride=stride)
    grid = sample_sdf_grid(fn, config)
    reference = dense(fn.fn, resolution)
    np.testing.assert_array_equal(grid > 0, reference > 0)
    assert fn.points < resolution**3 and fn.max_batch <= 16**3
    # Same sign pattern and the same values wherever a zero crossing is: the same mesh, vertex for vertex.
    v, f = extract_surface(grid)
    v_ref, f_ref = extract_surface(reference)
    np.testing.assert_array_equal(f, f_ref)
    np.testing.assert_allclose(v, v_ref, atol=1e-6)


def test_coarse_to_fine_evaluates_far_fewer_points() -> None:
    # R = 256 as in the reference: dense is 256³ = 16.8 M points.
    fn = Counted(sphere_sdf((0.0, 0.0, 0.0), 0.5))
    sample_sdf_grid(fn, MeshingConfig())
    assert 256**3 / fn.points > 15
    fn = Counted(box_sdf((0.0, 0.0, 0.0), (0.6, 0.4, 0.8)))  # surface area 8.3 vs the sphere's 3.1
    sample_sdf_grid(fn, MeshingConfig())
    assert 256**3 / fn.points > 8


def test_thin_plate_is_found_by_the_lipschitz_test_not_by_signs() -> None:
    # No coarse corner lies inside the plate, so flagging by sign changes alone loses it entirely: the Lipschitz
    # threshold is what keeps the grid exact (and this shows the equality test above can fail).
    resolution = 64
    fn = thin_plate(resolution)
    grid = sample_sdf_grid(fn, MeshingConfig(resolution=resolution, lipschitz=0.0))
    assert (grid > 0).all()
    assert (dense(fn, resolution) <= 0).sum() == 3 * 38 * 32  # z 29..31, |x| ≤ 0.6: 13..50, |y| ≤ 0.5: 16..47


def test_progress_reports_every_evaluated_point() -> None:
    fn = Counted(sphere_sdf((0.0, 0.0, 0.0), 0.5))
    calls: list[tuple[int, int]] = []
    sample_sdf_grid(fn, MeshingConfig(resolution=48, block_size=16), progress=lambda d, t: calls.append((d, t)))
    done = [d for d, _ in calls]
    assert done == sorted(done) and all(d <= t for d, t in calls)
    assert calls[-1] == (fn.points, fn.points)

    calls.clear()
    config = MeshingConfig(resolution=20, block_size=8, coarse_to_fine=False)
    sample_sdf_grid(fn, config, progress=lambda d, t: calls.append((d, t)))
    assert {t for _, t in calls} == {20**3} and calls[-1][0] == 20**3 and len(calls) == 27


def test_progress_can_cancel() -> None:
    def cancel(done: int, total: int) -> None:
        raise CancelledError("cancelled by the user")

    with pytest.raises(CancelledError):
        sample_sdf_grid(sphere_sdf((0.0, 0.0, 0.0), 0.5), MeshingConfig(resolution=32), progress=cancel)


@pytest.mark.parametrize("kwargs", [{"resolution": 1}, {"block_size": 0}, {"coarse_stride": 0}, {"lipschitz": -1.0}])
def test_bad_config(kwargs: dict) -> None:
    with pytest.raises(BadInputError, match=str(next(iter(kwargs.values())))):
        MeshingConfig(**kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Marching cubes
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn",
    [sphere_sdf((0.1, -0.2, 0.05), 0.6), box_sdf((0.05, -0.1, 0.0), (0.5, 0.3, 0.7))],
    ids=["sphere", "box"],
)
def test_vertices_lie_on_the_true_surface(fn: SdfFn) -> None:
    resolution = 64
    vertices, faces = extract_surface(sample_sdf_grid(fn, MeshingConfig(resolution=resolution)))
    assert vertices.dtype == np.float32 and faces.dtype == np.int64
    assert vertices.shape[1] == 3 and faces.shape[1] == 3 and faces.max() < len(vertices)
    distance = fn(torch.from_numpy(vertices)).abs().numpy()
    assert distance.max() <= cell(resolution) / 2


def test_normals_point_outward() -> None:
    center, radius = np.array([0.1, -0.05, 0.2]), 0.6
    vertices, faces = extract_surface(sample_sdf_grid(sphere_sdf(tuple(center), radius), MeshingConfig(resolution=64)))
    volume = signed_volume(vertices, faces)
    assert volume == pytest.approx(4 / 3 * math.pi * radius**3, rel=0.02)
    a, b, c = (vertices[faces[:, i]] for i in range(3))
    normals = np.cross(b - a, c - a)
    outward = np.einsum("ij,ij->i", normals, (a + b + c) / 3 - center)
    assert (outward > 0).all()


@pytest.mark.parametrize("offset", [0.1, -2.0], ids=["all_outside", "all_inside"])
def test_empty_surface_is_an_error(offset: float) -> None:
    grid = sample_sdf_grid(lambda p: p.norm(dim=-1) + offset, MeshingConfig(resolution=24))
    with pytest.raises(EmptySurfaceError) as info:
        extract_surface(grid)
    message = str(info.value)
    assert f"{grid.min():.4g}" in message and f"{grid.max():.4g}" in message
    assert "no zero crossing" in message


def test_bad_grid() -> None:
    with pytest.raises(BadInputError, match=r"\(4, 4, 5\)"):
        extract_surface(np.zeros((4, 4, 5), np.float32))
    grid = dense(sphere_sdf((0.0, 0.0, 0.0), 0.5), 8)
    grid[0, 0, 0] = np.nan
    with pytest.raises(BadInputError, match="1 NaN"):
        extract_surface(grid)


# ----------------------------------------------------------------------------------------------------------------------
# Mesh files
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    """A sphere off the origin (so no axis is symmetric) with random colours."""
    vertices, faces = extract_surface(dense(sphere_sdf((0.2, -0.3, 0.1), 0.5), 24))
    colors = np.random.default_rng(0).integers(0, 256, size=(len(vertices), 3), dtype=np.uint8)
    return Mesh(vertices, faces, colors)


@pytest.mark.parametrize("suffix", [".ply", ".glb", ".obj"])
def test_round_trip(mesh: Mesh, tmp_path: Path, suffix: str) -> None:
    path = export_mesh(mesh, tmp_path / f"mesh{suffix}")
    assert path == tmp_path / f"mesh{suffix}"
    back = load_mesh(path)
    assert back.vertices.dtype == np.float32 and back.faces.dtype == np.int64 and back.colors is not None
    np.testing.assert_allclose(back.vertices, mesh.vertices, atol=1e-6)
    np.testing.assert_array_equal(back.faces, mesh.faces)
    np.testing.assert_array_equal(back.colors, mesh.colors)


@pytest.mark.parametrize("suffix", [".ply", ".obj"])
def test_round_trip_without_colours(mesh: Mesh, tmp_path: Path, suffix: str) -> None:
    back = load_mesh(export_mesh(Mesh(mesh.vertices, mesh.faces), tmp_path / f"mesh{suffix}"))
    assert back.colors is None
    np.testing.assert_allclose(back.vertices, mesh.vertices, atol=1e-6)
    np.testing.assert_array_equal(back.faces, mesh.faces)


def test_ply_layout_is_what_blender_reads(mesh: Mesh, tmp_path: Path) -> None:
    raw = export_mesh(mesh, tmp_path / "mesh.ply").read_bytes()
    end = raw.index(b"end_header\n") + len(b"end_header\n")
    assert raw[:end].decode("ascii").split("\n")[:-1] == [
        "ply",
        "format binary_little_endian 1.0",
        f"element vertex {len(mesh.vertices)}",
        "property float x",
        "property float y",
        "property float z",
        "property uchar red",
        "property uchar green",
        "property uchar blue",
        f"element face {len(mesh.faces)}",
        "property list uchar int vertex_indices",
        "end_header",
    ]
    # Body parsed by hand: 15 bytes per vertex, then 13 bytes per face, nothing after.
    v, f = len(mesh.vertices), len(mesh.faces)
    assert len(raw) == end + 15 * v + 13 * f
    first = struct.unpack("<fffBBB", raw[end : end + 15])
    assert first[:3] == tuple(mesh.vertices[0].tolist()) and first[3:] == tuple(mesh.colors[0].tolist())
    faces = raw[end + 15 * v :]
    assert struct.unpack("<Biii", faces[:13]) == (3, *mesh.faces[0].tolist())
    assert struct.unpack("<Biii", faces[-13:]) == (3, *mesh.faces[-1].tolist())


def _glb_json(path: Path) -> dict:
    raw = path.read_bytes()
    magic, version, _ = struct.unpack("<4sII", raw[:12])
    length, kind = struct.unpack("<I4s", raw[12:20])
    assert magic == b"glTF" and version == 2 and kind == b"JSON"
    return json.loads(raw[20 : 20 + length])


def test_glb_is_y_up_and_not_mirrored(tmp_path: Path) -> None:
    # Tall along world z (the pose.json frame is z-up), and shifted towards world +y.
    vertices, faces = extract_surface(dense(box_sdf((0.0, 0.3, 0.0), (0.15, 0.1, 0.8)), 32))
    colors = np.full((len(vertices), 3), (200, 30, 10), np.uint8)
    path = export_mesh(Mesh(vertices, faces, colors), tmp_path / "tall.glb")
    scene = trimesh.load(path, file_type="glb", force="mesh", process=False)
    y_up = np.asarray(scene.vertices)
    extents = y_up.max(axis=0) - y_up.min(axis=0)
    assert extents[1] == pytest.approx(1.6, abs=0.1) and extents[1] > 4 * max(extents[0], extents[2])
    # A rotation (x, y, z) → (x, z, −y), not the reference's (x, z, y) mirror: world +y goes to glTF −z, the volume
    # keeps its sign (normals still outward), and the colours are per-vertex COLOR_0.
    np.testing.assert_allclose(y_up, np.stack([vertices[:, 0], vertices[:, 2], -vertices[:, 1]], axis=1), atol=1e-6)
    assert y_up[:, 2].mean() == pytest.approx(-0.3, abs=0.02)
    assert signed_volume(y_up, np.asarray(scene.faces)) > 0
    attributes = _glb_json(path)["meshes"][0]["primitives"][0]["attributes"]
    assert "COLOR_0" in attributes and "POSITION" in attributes


def test_obj_lines(tmp_path: Path) -> None:
    vertices = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], np.float32)
    faces = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]], np.int64)
    colors = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [51, 102, 153]], np.uint8)
    text = export_mesh(Mesh(vertices, faces, colors), tmp_path / "tet.obj").read_text()
    v_lines = [line.split()[1:] for line in text.splitlines() if line.startswith("v ")]
    f_lines = [line.split()[1:] for line in text.splitlines() if line.startswith("f ")]
    # y-up: (x, y, z) → (x, z, −y); colours as floats in 0..1; faces 1-based.
    assert [float(w) for w in v_lines[2]] == [0.0, 0.0, -1.0, 0.0, 0.0, 1.0]
    assert [float(w) for w in v_lines[3]] == pytest.approx([0.0, 1.0, 0.0, 0.2, 0.4, 0.6])
    assert [[int(w) for w in line] for line in f_lines] == (faces + 1).tolist()


def test_bad_suffix(mesh: Mesh, tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match=r"\.stl.*\.ply, \.glb, \.obj"):
        export_mesh(mesh, tmp_path / "mesh.stl")
    with pytest.raises(BadInputError, match=r"\.ply, \.glb, \.obj"):
        load_mesh(tmp_path / "mesh")
    assert list(tmp_path.iterdir()) == []


def test_bad_mesh(mesh: Mesh, tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match=r"0\.\.5"):
        export_mesh(Mesh(mesh.vertices[:6], mesh.faces), tmp_path / "mesh.ply")
    with pytest.raises(BadInputError, match="uint8"):
        export_mesh(Mesh(mesh.vertices, mesh.faces, mesh.colors.astype(np.float32)), tmp_path / "mesh.ply")


def test_atomic_write(mesh: Mesh, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out" / "mesh.ply"
    export_mesh(mesh, target)
    assert list(target.parent.iterdir()) == [target]
    before = target.read_bytes()

    def failing_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        export_mesh(Mesh(mesh.vertices, mesh.faces), target)
    assert list(target.parent.iterdir()) == [target]  # no temp file left behind
    assert target.read_bytes() == before  # the old file is untouched


def test_glb_vertex_colours_are_linear_as_gltf_defines_them(tmp_path):
    """glTF's COLOR_0 is linear: an sRGB byte c must be stored as ((c/255 + 0.055)/1.055)^2.4 (or c/255/12.92)."""
    import json as _json
    import struct as _struct

    vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    faces = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]], dtype=np.int64)
    colors = np.array([[0, 10, 128], [255, 200, 1], [30, 60, 90], [11, 12, 13]], dtype=np.uint8)
    path = export_mesh(Mesh(vertices, faces, colors), tmp_path / "c.glb")
    data = path.read_bytes()
    (json_length,) = _struct.unpack_from("<I", data, 12)
    gltf = _json.loads(data[20: 20 + json_length])
    accessor = gltf["accessors"][gltf["meshes"][0]["primitives"][0]["attributes"]["COLOR_0"]]
    view = gltf["bufferViews"][accessor["bufferView"]]
    blob = data[20 + json_length + 8:]
    stored = np.frombuffer(blob, "<f4", 12, view["byteOffset"]).reshape(4, 3)
    c = colors / 255.0
    expected = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    np.testing.assert_allclose(stored, expected, atol=1e-6)
    assert np.array_equal(load_mesh(path).colors, colors)  # every 8-bit sRGB value survives the round trip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_sampling_and_marching_cubes_on_cuda_give_the_cpu_mesh() -> None:
    from server.stages.meshing import sample_sdf_volume

    def sdf(p: torch.Tensor) -> torch.Tensor:  # on whichever device the points are
        return (p - torch.tensor([0.1, -0.05, 0.02], device=p.device)).norm(dim=-1) - 0.55

    on_gpu = sample_sdf_volume(sdf, MeshingConfig(), device="cuda")
    assert on_gpu.device.type == "cuda"
    v_gpu, f_gpu = extract_surface(on_gpu)
    v_cpu, f_cpu = extract_surface(sample_sdf_grid(sdf, MeshingConfig()))
    np.testing.assert_array_equal(f_gpu, f_cpu)
    np.testing.assert_allclose(v_gpu, v_cpu, atol=1e-5)
