"""Issue #26, asset stage: baking onto a mesh's own UVs, filling unseen texels on the surface (never across a crease
through UV space), vertex colours of any mesh from the views, view selection, and the one pixel convention.

Every expected value is independent of the code under test: the views are rendered by the exact ray casters below
(a box and a sphere, colours analytic functions of the surface point), and the meshes and their UVs are built here.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from server.common.cameras import PoseFile
from server.common.errors import BadInputError
from server.common.mesh_io import Mesh
from server.stages.asset import (
    BakeViews,
    bake_texture,
    check_uvs,
    load_bake_views,
    render_depth,
    vertex_colors_from_views,
)
from server.stages.asset.raster import triangle_pixels

SIZE = 96
"""View side in pixels."""


def look_at(eye: np.ndarray) -> np.ndarray:
    """[4, 4] OpenCV w2c (x right, y down, +z forward) of a camera at ``eye`` looking at the origin, z-up world."""
    forward = -eye / np.linalg.norm(eye)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    w2c = np.eye(4)
    w2c[:3, :3] = np.stack([right, down, forward])
    w2c[:3, 3] = -w2c[:3, :3] @ eye
    return w2c


def ring_cameras(count: int, elevation_deg: float, radius: float = 1.6) -> np.ndarray:
    e = math.radians(elevation_deg)
    return np.stack([look_at(radius * np.array([math.cos(a) * math.cos(e), math.sin(a) * math.cos(e), math.sin(e)]))
                     for a in np.linspace(0, 2 * math.pi, count, endpoint=False) + 0.3])


INTRINSICS = np.array([[110.0, 0.0, SIZE / 2], [0.0, 110.0, SIZE / 2], [0.0, 0.0, 1.0]])


def rays(w2c: np.ndarray, k: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Origin [3] and unit directions [size², 3] through the pixel centres (j + 0.5, i + 0.5), row-major."""
    col, row = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5)
    camera = np.stack([(col - k[0, 2]) / k[0, 0], (row - k[1, 2]) / k[1, 1], np.ones_like(col)], axis=-1)
    d = camera.reshape(-1, 3) @ w2c[:3, :3]
    return -w2c[:3, :3].T @ w2c[:3, 3], d / np.linalg.norm(d, axis=1, keepdims=True)


# ----------------------------------------------------------------------------------------------------------------------
# A box: top red, sides blue, bottom never seen (all cameras above it)
# ----------------------------------------------------------------------------------------------------------------------

HALF = 0.25
RED, BLUE, GREEN = np.array([220.0, 40.0, 40.0]), np.array([40.0, 40.0, 220.0]), np.array([40.0, 200.0, 40.0])


def render_box(w2c: np.ndarray) -> np.ndarray:
    """Exact ray casting of the axis-aligned box [−HALF, HALF]³ (slab method); top red, sides blue, bottom green,
    white background. [SIZE, SIZE, 3] uint8."""
    origin, d = rays(w2c, INTRINSICS, SIZE)
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (-HALF - origin) / d, (HALF - origin) / d
    near, far = np.minimum(t1, t2), np.maximum(t1, t2).min(axis=1)
    t_near, axis = near.max(axis=1), near.argmax(axis=1)
    hit = (t_near <= far) & (far > 0)
    image = np.full((d.shape[0], 3), 255.0)
    point = origin + t_near[:, None] * d
    top = hit & (axis == 2) & (point[:, 2] > 0)
    bottom = hit & (axis == 2) & (point[:, 2] < 0)
    image[hit] = BLUE
    image[top], image[bottom] = RED, GREEN
    return image.reshape(SIZE, SIZE, 3).astype(np.uint8)


def box_with_charts(n: int = 6) -> tuple[Mesh, np.ndarray, dict[str, tuple[int, int]]]:
    """A closed box, each side an n×n grid of its own vertices (split at the creases, as a file's per-face normals
    leave it) and its own UV island in a 4×4 grid of cells. Top at cell (0, 0), bottom right beside it at (1, 0) —
    two texels apart at 96² — and the four sides far away in the bottom row.

    Returns:
        mesh, per-vertex uvs [V, 2] (glTF convention), cell (column, row) per side.
    """
    cells = {"top": (0, 0), "bottom": (1, 0), "+x": (0, 3), "-x": (1, 3), "+y": (2, 3), "-y": (3, 3)}
    sides = {"top": (2, 1), "bottom": (2, -1), "+x": (0, 1), "-x": (0, -1), "+y": (1, 1), "-y": (1, -1)}
    vertices, faces, uvs = [], [], []
    for name, (axis, sign) in sides.items():
        u_axis, v_axis = [a for a in range(3) if a != axis]
        grid = np.linspace(-HALF, HALF, n + 1)
        a, b = np.meshgrid(grid, grid, indexing="ij")
        p = np.zeros((n + 1, n + 1, 3))
        p[..., axis], p[..., u_axis], p[..., v_axis] = sign * HALF, a, b
        base = sum(len(x) for x in vertices)
        vertices.append(p.reshape(-1, 3))
        column, row = cells[name]
        margin = 1.0 / 96  # one texel of the 96² texture inside each 24-texel cell
        uv = np.stack([(column + margin * 4 + (a + HALF) / (2 * HALF) * (1 - 8 * margin)) / 4,
                       (row + margin * 4 + (b + HALF) / (2 * HALF) * (1 - 8 * margin)) / 4], axis=-1)
        uvs.append(uv.reshape(-1, 2))
        idx = base + np.arange((n + 1) ** 2).reshape(n + 1, n + 1)
        quads = np.stack([idx[:-1, :-1], idx[1:, :-1], idx[1:, 1:], idx[:-1, 1:]], axis=-1).reshape(-1, 4)
        tris = np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]])
        # Wind counter-clockwise seen from outside.
        v = np.concatenate(vertices)
        normal = np.cross(v[tris[:, 1]] - v[tris[:, 0]], v[tris[:, 2]] - v[tris[:, 0]])
        flip = normal[:, axis] * sign < 0
        tris[flip] = tris[flip][:, ::-1]
        faces.append(tris)
    return (Mesh(np.concatenate(vertices).astype(np.float32), np.concatenate(faces).astype(np.int64)),
            np.concatenate(uvs).astype(np.float32), cells)


def cell_texels(cell: tuple[int, int], size: int, inset: int) -> tuple[slice, slice]:
    """(rows, columns) of a UV cell's island in a size² texture, ``inset`` texels inside its edge."""
    column, row = cell
    step = size // 4
    lo, hi = step * 0 + 2 + inset, step - 2 - inset
    return slice(row * step + lo, row * step + hi), slice(column * step + lo, column * step + hi)


@pytest.fixture(scope="module")
def box_views() -> BakeViews:
    w2c = np.concatenate([ring_cameras(8, 35.0), ring_cameras(4, 70.0)])
    return BakeViews(tuple(f"v{i}" for i in range(len(w2c))), tuple(render_box(m) for m in w2c),
                     np.repeat(INTRINSICS[None], len(w2c), axis=0), w2c)


def test_unseen_face_is_filled_from_its_surface_neighbours_not_across_the_uv_gap(box_views: BakeViews) -> None:
    """The bottom is seen by no view. Its island sits two texels from the red top's island in UV space, but on the
    surface it borders only the blue sides (across a sharp crease): it must come out blue. A texture-space fill
    (the old bake: dilation from the nearest seen texels) paints it red from the top's island next to it."""
    mesh, uvs, cells = box_with_charts()
    out = bake_texture(mesh, box_views, 96, uvs=uvs)
    assert out.report is not None and out.report.uv_source == "mesh"
    texture = out.texture.astype(np.float64)
    top = texture[cell_texels(cells["top"], 96, 2)].reshape(-1, 3)
    bottom = texture[cell_texels(cells["bottom"], 96, 0)].reshape(-1, 3)
    side = texture[cell_texels(cells["+x"], 96, 2)].reshape(-1, 3)
    assert np.abs(top - RED).max() <= 6 and np.abs(side - BLUE).max() <= 6  # seen faces: their own colour
    assert not out.report.seen[cell_texels(cells["bottom"], 96, 0)].any()  # the bottom is truly unseen
    assert np.abs(bottom - BLUE).max() <= 6, "the unseen bottom took colour from across the UV gap"
    # Gutters copy their own chart's border, never a mix of two: the top's island covers texel columns 1..22, the
    # bottom's 25..46; gutter column 23 is nearer the top, 24 the bottom.
    rows = cell_texels(cells["top"], 96, 2)[0]
    assert np.array_equal(texture[rows, 23], texture[rows, 22])
    assert np.array_equal(texture[rows, 24], texture[rows, 25])
    assert np.abs(texture[rows, 24] - BLUE).max() <= 6


def test_vertex_colours_of_any_mesh_fill_unseen_vertices_along_the_surface(box_views: BakeViews) -> None:
    mesh, _, _ = box_with_charts()
    colours = vertex_colors_from_views(mesh, box_views).astype(np.float64)
    z = mesh.vertices[:, 2]
    inner_top = (np.abs(z - HALF) < 1e-6) & (np.abs(mesh.vertices[:, :2]).max(axis=1) < HALF - 0.05)
    bottom = np.abs(z + HALF) < 1e-6
    assert np.abs(colours[inner_top] - RED).max() <= 6
    # The bottom's vertices are unseen: nearest seen surface is a blue side (never the red top, never green).
    assert np.abs(colours[bottom] - BLUE).max() <= 6


# ----------------------------------------------------------------------------------------------------------------------
# A UV sphere with its own lat-long UVs and a known colour field
# ----------------------------------------------------------------------------------------------------------------------

RADIUS = 0.3


def field(points: np.ndarray) -> np.ndarray:
    """[N, 3] sRGB 0–255 of sphere points: a smooth function of the normal (values 45..210)."""
    n = points / np.linalg.norm(points, axis=1, keepdims=True)
    return 255.0 * (0.5 + 0.32 * n[:, [2, 0, 1]])


def render_sphere(w2c: np.ndarray) -> np.ndarray:
    origin, d = rays(w2c, INTRINSICS, SIZE)
    b = d @ origin
    disc = b * b - (origin @ origin - RADIUS**2)
    hit = disc >= 0
    image = np.full((d.shape[0], 3), 255.0)
    image[hit] = field(origin + (-b[hit] - np.sqrt(disc[hit]))[:, None] * d[hit])
    return np.rint(image).reshape(SIZE, SIZE, 3).astype(np.uint8)


def uv_sphere(rings: int = 24, segments: int = 48) -> tuple[Mesh, np.ndarray, np.ndarray]:
    """Lat-long sphere: welded positions (one vertex per point, poles included), UVs indexed separately (an OBJ's
    ``vt``), with a seam at longitude 0 and one pole UV per segment.

    Returns:
        mesh, uvs [T, 2], uv_faces [F, 3].
    """
    theta = np.linspace(0, np.pi, rings + 1)[1:-1]
    phi = np.linspace(0, 2 * np.pi, segments, endpoint=False)
    t, p = np.meshgrid(theta, phi, indexing="ij")
    body = np.stack([np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), np.cos(t)], axis=-1).reshape(-1, 3)
    vertices = np.concatenate([[[0, 0, 1]], body, [[0, 0, -1]]]) * RADIUS
    north, south = 0, vertices.shape[0] - 1

    def vid(ring: int, seg: int) -> int:  # ring 0..rings (0 and rings are the poles)
        if ring == 0:
            return north
        if ring == rings:
            return south
        return 1 + (ring - 1) * segments + seg % segments

    def tid(ring: int, seg: int) -> int:  # UV grid (rings + 1) × (segments + 1)
        return ring * (segments + 1) + seg

    u, v = np.meshgrid(np.arange(segments + 1) / segments, np.arange(rings + 1) / rings)
    uvs = np.stack([0.02 + 0.96 * u, 0.02 + 0.96 * v], axis=-1).reshape(-1, 2)
    faces, uv_faces = [], []
    for ring in range(rings):
        for seg in range(segments):
            a, b, c, d = (ring, seg), (ring + 1, seg), (ring + 1, seg + 1), (ring, seg + 1)
            for tri in ((a, b, c), (a, c, d)):
                corners = [vid(*x) for x in tri]
                if len(set(corners)) == 3:
                    faces.append(corners)
                    uv_faces.append([tid(*x) for x in tri])
    faces, uv_faces = np.asarray(faces), np.asarray(uv_faces)
    # Outward winding.
    tri = vertices[faces]
    outward = np.einsum("fi,fi->f", np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), tri.mean(axis=1)) > 0
    faces[~outward], uv_faces[~outward] = faces[~outward][:, ::-1], uv_faces[~outward][:, ::-1]
    return Mesh(vertices.astype(np.float32), faces), uvs.astype(np.float32), uv_faces


@pytest.fixture(scope="module")
def sphere_views() -> BakeViews:
    w2c = np.concatenate([ring_cameras(8, 20.0), ring_cameras(6, -40.0), ring_cameras(3, 75.0), ring_cameras(3, -75.0)])
    return BakeViews(tuple(f"s{i}" for i in range(len(w2c))), tuple(render_sphere(m) for m in w2c),
                     np.repeat(INTRINSICS[None], len(w2c), axis=0), w2c)


def test_bake_onto_the_mesh_own_uvs_reproduces_a_known_colour_field(sphere_views: BakeViews) -> None:
    mesh, uvs, uv_faces = uv_sphere()
    size = 128
    out = bake_texture(mesh, sphere_views, size, uvs=uvs, uv_faces=uv_faces)
    report = out.report
    assert report is not None and report.uv_source == "mesh"
    assert report.uv_check is not None and report.uv_check.usable and report.uv_check.overlap_texels == 0
    # The artist's UVs come back unchanged, corner by corner, faces in their order.
    assert np.array_equal(out.faces.shape, mesh.faces.shape)
    assert np.allclose(out.uvs[out.faces], uvs[uv_faces], atol=1e-6)
    assert np.allclose(out.vertices[out.faces], mesh.vertices[mesh.faces])
    # Every texel inside a UV triangle holds the field at its surface point (on the polygon, pushed to the sphere).
    face, pixel, bary = triangle_pixels(uvs.astype(np.float64)[uv_faces] * size, size, size)
    points = np.einsum("nk,nkc->nc", bary, mesh.vertices[mesh.faces[face]].astype(np.float64))
    error = np.abs(out.texture.reshape(-1, 3)[pixel].astype(np.float64) - field(points)).max(axis=1)
    seen = report.seen.reshape(-1)[pixel]
    assert seen.mean() > 0.95
    # ≤ 0.5 quantisation + bilinear interpolation over a view pixel + the polygon-to-sphere offset (≤ 2.5 mm).
    assert np.percentile(error[seen], 99) <= 6.0 and np.median(error[seen]) <= 2.0


def test_unusable_or_overlapping_uvs_are_reported(sphere_views: BakeViews) -> None:
    mesh, uvs, uv_faces = uv_sphere(12, 24)
    # Collapsed UVs (every corner at one point): not usable, a fresh unwrap takes over and the report says so.
    out = bake_texture(mesh, sphere_views, 64, uvs=np.zeros_like(uvs), uv_faces=uv_faces)
    assert out.report is not None and out.report.uv_source == "unwrap"
    assert out.report.uv_check is not None and not out.report.uv_check.usable
    assert out.report.uv_check.degenerate_faces == mesh.faces.shape[0]
    assert "not usable" in out.report.uv_check.reason
    # Mirrored UVs (u folded onto itself: both hemispheres share texels) overlap: reported, still usable.
    folded = uvs.copy()
    folded[:, 0] = 0.02 + 0.96 * np.abs(2 * (uvs[:, 0] - 0.02) / 0.96 - 1)
    check = check_uvs(mesh, folded, uv_faces, 64)
    assert check.usable and check.overlap_texels > 100 and check.overlap_fraction > 0.5
    out = bake_texture(mesh, sphere_views, 64, uvs=folded, uv_faces=uv_faces)
    assert out.report is not None and out.report.uv_source == "mesh"
    with pytest.raises(BadInputError, match="uv faces"):
        bake_texture(mesh, sphere_views, 64, uvs=uvs, uv_faces=uv_faces[:-1])
    with pytest.raises(BadInputError, match="uvs have shape"):
        check_uvs(mesh, np.zeros((4, 3)), None)


# ----------------------------------------------------------------------------------------------------------------------
# Pixel convention
# ----------------------------------------------------------------------------------------------------------------------


def test_a_point_projecting_to_a_pixel_centre_reads_that_pixel() -> None:
    """Pixel (i, j) is centred at (j + 0.5, i + 0.5): a vertex projecting there takes exactly that pixel's colour
    (with centres at integers it would read a blend of four pixels)."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    i, j = 30, 21
    k = np.array([[20.0, 0.0, j + 0.5], [0.0, 20.0, i + 0.5], [0.0, 0.0, 1.0]])
    # A square facing the camera (at the origin, looking along +z) with a vertex on the optical axis.
    vertices = np.array([[0, 0, 2], [-1, -1, 2], [1, -1, 2], [1, 1, 2], [-1, 1, 2]], dtype=np.float32)
    faces = np.array([[0, 2, 1], [0, 3, 2], [0, 4, 3], [0, 1, 4]])  # facing −z, towards the camera
    views = BakeViews(("v",), (image,), k[None], np.eye(4)[None])
    colours = vertex_colors_from_views(Mesh(vertices, faces), views)
    assert tuple(colours[0]) == tuple(image[i, j])
    # The z-buffer uses the same centres: the square covers pixel centres within ±10 px of (j + 0.5, i + 0.5).
    depth = render_depth(vertices, faces, k, np.eye(4), 64, 64)
    assert np.isfinite(depth[i - 10 : i + 11, j - 10 : j + 11]).all()  # corners included: centres at +0.5
    assert np.isinf(depth[i - 11]).all() and np.isinf(depth[:, j + 11]).all()


# ----------------------------------------------------------------------------------------------------------------------
# Selecting views
# ----------------------------------------------------------------------------------------------------------------------


def test_load_bake_views_selects_a_subset_by_name(tmp_path: Path) -> None:
    poses = PoseFile.for_polar(75)
    poses.write(tmp_path / "pose.json")
    names = ["0.png", "1.png", "0_0.png", "2_3.png"]
    for n, name in enumerate(names):
        Image.fromarray(np.full((8, 8, 3), 10 * n, np.uint8)).save(tmp_path / name)
    every = load_bake_views(tmp_path)
    assert every.ids == ("0.png", "1.png", "0_0.png", "2_3.png")
    chosen = load_bake_views(tmp_path, ids=["2_3.png", "0.png"])
    assert chosen.ids == ("0.png", "2_3.png")  # pose.json's order
    assert int(chosen.images[1][0, 0, 0]) == 30
    assert np.allclose(chosen.w2c[1], every.w2c[3]) and np.allclose(chosen.intrinsics[1], every.intrinsics[3])
    with pytest.raises(BadInputError, match=r"5_1\.png"):
        load_bake_views(tmp_path, ids=["0.png", "5_1.png"])
    # The same on views in memory.
    picked = every.select(["1.png", "0.png"])
    assert picked.ids == ("1.png", "0.png") and np.allclose(picked.w2c[0], every.w2c[1])
    with pytest.raises(BadInputError, match="unknown ids"):
        every.select(["nope.png"])
