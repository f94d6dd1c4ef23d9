"""Tests for server/asset: clean-up, decimation, UV unwrap, texture bake, textured export.

Every expected value is computed independently of the code under test: meshes are marching-cubes surfaces of
analytic SDFs (spheres), the views are rendered by the exact ray caster below (not by server.stages.asset.raster), and
the
true colour of a surface point is an analytic function of its sphere normal, so each baked texel can be checked.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from server.common.cameras import PoseFile
from server.common.errors import BadInputError
from server.common.mesh_io import Mesh, load_mesh
from server.common.views import load_views, read_rgb
from server.stages.asset import (
    AssetConfig,
    BakeConfig,
    BakeViews,
    CleanupConfig,
    DecimateConfig,
    TexturedMesh,
    UnwrapConfig,
    bake_texture,
    build_asset,
    clean_mesh,
    decimate,
    export_textured_mesh,
    load_bake_views,
    rasterize_uv,
    render_depth,
    unwrap,
)
from server.stages.meshing import extract_surface

TEXTURE = 256

# ----------------------------------------------------------------------------------------------------------------------
# Analytic scene: a large sphere and a small one in front of it (seen from the input azimuth), each with a smooth
# colour that is a function of its own normal, so the small one occludes a known patch of the large one.
# ----------------------------------------------------------------------------------------------------------------------

SPHERES = (((0.0, 0.0, 0.0), 0.30), ((0.12, -0.40, 0.08), 0.09))


def true_colour(points: np.ndarray, sphere: np.ndarray) -> np.ndarray:
    """[N, 3] float sRGB 0–255 of surface points [N, 3] on sphere index [N]; values span 38..217."""
    out = np.empty((points.shape[0], 3))
    for k, (centre, _) in enumerate(SPHERES):
        mask = sphere == k
        n = points[mask] - centre
        n /= np.linalg.norm(n, axis=1, keepdims=True)
        out[mask] = 255 * (0.5 + 0.35 * n) if k == 0 else 255 * (0.5 - 0.35 * n[:, [1, 2, 0]])
    return out


def nearest_sphere(points: np.ndarray) -> np.ndarray:
    return np.argmin([np.abs(np.linalg.norm(points - c, axis=1) - r) for c, r in SPHERES], axis=0)


def render(c2w: np.ndarray, k: np.ndarray, size: int = 256) -> np.ndarray:
    """Exact ray casting through pixel centres with an OpenGL c2w (x right, y up, looking along −z); white
    background, no anti-aliasing. Returns [size, size, 3] uint8."""
    col, row = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5)
    camera = np.stack([(col - k[0, 2]) / k[0, 0], -(row - k[1, 2]) / k[1, 1], -np.ones_like(col)], axis=-1)
    d = camera.reshape(-1, 3) @ c2w[:3, :3].T
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    origin = c2w[:3, 3]
    best, which = np.full(d.shape[0], np.inf), np.full(d.shape[0], -1)
    for i, (centre, radius) in enumerate(SPHERES):
        oc = origin - np.asarray(centre)
        b = d @ oc
        disc = b * b - (oc @ oc - radius**2)
        t = np.where(disc >= 0, -b - np.sqrt(np.maximum(disc, 0)), np.inf)
        closer = t < best
        best, which = np.where(closer, t, best), np.where(closer, i, which)
    image = np.full((d.shape[0], 3), 255.0)
    hit = which >= 0
    image[hit] = true_colour(origin + best[hit, None] * d[hit], which[hit])
    return np.round(image).astype(np.uint8).reshape(size, size, 3)


def marching_cubes(spheres, resolution: int, half: float = 0.5) -> Mesh:
    """Marching-cubes surface of a union of spheres, grid linspace(−half, half, R)³ (outward, as PyMCubes gives)."""
    axis = np.linspace(-half, half, resolution)
    points = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1)
    sdf = np.min([np.linalg.norm(points - np.asarray(c), axis=-1) - r for c, r in spheres], axis=0)
    vertices, faces = extract_surface(sdf.astype(np.float32))
    return Mesh((vertices * half).astype(np.float32), faces)


def position_colours(vertices: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(vertices * 200 + 128), 0, 255).astype(np.uint8)


def signed_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    tri = vertices[faces].astype(np.float64)
    return float(np.einsum("fi,fi->", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])) / 6)


def is_closed(faces: np.ndarray) -> bool:
    edges = np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    return bool((np.unique(edges, axis=0, return_counts=True)[1] == 2).all())


def texel_points(mesh: TexturedMesh, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of covered texels and their surface points [T, 3]."""
    face_index, bary = rasterize_uv(mesh.uvs, mesh.faces, size)
    texels = np.flatnonzero(face_index.reshape(-1) >= 0)
    corners = mesh.vertices[mesh.faces[face_index.reshape(-1)[texels]]].astype(np.float64)
    return texels, np.einsum("tk,tkc->tc", bary.reshape(-1, 3)[texels], corners)


@pytest.fixture(scope="module")
def scene_mesh() -> Mesh:
    mesh = marching_cubes(SPHERES, 48)
    return Mesh(mesh.vertices, mesh.faces, position_colours(mesh.vertices))


@pytest.fixture(scope="module")
def views_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run's views folder: 8 stage-1 and 32 nearby views at the reference's cameras (polar 75), and pose.json."""
    folder = tmp_path_factory.mktemp("views")
    poses = PoseFile.for_polar(75)
    for view_id, c2w in poses.c2ws.items():
        Image.fromarray(render(c2w, poses.intrinsics)).save(folder / view_id)
    poses.write(folder / "pose.json")
    return folder


@pytest.fixture(scope="module")
def baked(scene_mesh: Mesh, views_dir: Path) -> TexturedMesh:
    return bake_texture(scene_mesh, load_bake_views(views_dir), TEXTURE)


# ----------------------------------------------------------------------------------------------------------------------
# Clean-up
# ----------------------------------------------------------------------------------------------------------------------


def test_clean_mesh_removes_small_floater_and_keeps_main_surface() -> None:
    mesh = marching_cubes([((0.0, 0.0, 0.0), 0.3), ((0.42, 0.0, 0.0), 0.04)], 48)
    mesh = Mesh(mesh.vertices, mesh.faces, position_colours(mesh.vertices))
    main = marching_cubes([((0.0, 0.0, 0.0), 0.3)], 48)
    cleaned = clean_mesh(mesh)
    radius = np.linalg.norm(cleaned.vertices, axis=1)
    assert cleaned.faces.shape == main.faces.shape  # the floater's area is ~2 % of the sphere's: below 5 %
    assert np.allclose(radius, 0.3, atol=0.01)
    assert np.array_equal(cleaned.colors, position_colours(cleaned.vertices))  # colours followed their vertices
    assert clean_mesh(mesh, CleanupConfig(min_component_fraction=0.0)).faces.shape == mesh.faces.shape


@pytest.mark.parametrize("flip", ["all", "random half", "one component"])
def test_clean_mesh_orients_faces_outward(flip: str) -> None:
    mesh = marching_cubes([((-0.2, 0.0, 0.0), 0.15), ((0.2, 0.0, 0.0), 0.12)], 40)
    faces = mesh.faces.copy()
    rng = np.random.default_rng(0)
    if flip == "all":
        mask = np.ones(faces.shape[0], dtype=bool)
    elif flip == "random half":
        mask = rng.random(faces.shape[0]) < 0.5
    else:
        mask = mesh.vertices[faces[:, 0], 0] > 0
    faces[mask] = faces[mask][:, ::-1]
    cleaned = clean_mesh(Mesh(mesh.vertices, faces))
    tri = cleaned.vertices[cleaned.faces].astype(np.float64)
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    centre = np.where(tri.mean(axis=1)[:, :1] < 0, -0.2, 0.2)
    outward = tri.mean(axis=1) - np.concatenate([centre, np.zeros((centre.shape[0], 2))], axis=1)
    assert (np.einsum("fi,fi->f", normal, outward) > 0).all()
    expected = 4 / 3 * np.pi * (0.15**3 + 0.12**3)
    assert signed_volume(cleaned.vertices, cleaned.faces) == pytest.approx(expected, rel=0.03)


def test_clean_mesh_drops_degenerate_duplicate_and_unreferenced() -> None:
    mesh = marching_cubes([((0.0, 0.0, 0.0), 0.3)], 24)
    v, f = mesh.vertices, mesh.faces
    copy_of_0 = v.shape[0]  # a second vertex at vertex 0's position: merged
    vertices = np.concatenate([v, v[:1], [[5.0, 5.0, 5.0]]]).astype(np.float32)  # + an unreferenced vertex
    extra = [f[0][::-1], f[1], [f[2, 0], f[2, 0], f[2, 1]], np.where(f[3] == 0, copy_of_0, f[3])]
    faces = np.concatenate([f, np.array(extra)])
    cleaned = clean_mesh(Mesh(vertices, faces, position_colours(vertices)), CleanupConfig(orient_outward=False))
    assert cleaned.faces.shape == f.shape
    assert cleaned.vertices.shape == v.shape
    assert is_closed(cleaned.faces)
    assert np.array_equal(cleaned.colors, position_colours(cleaned.vertices))


def test_taubin_smoothing_removes_noise_without_shrinking() -> None:
    mesh = marching_cubes([((0.0, 0.0, 0.0), 0.3)], 40)
    rng = np.random.default_rng(1)
    radius = np.linalg.norm(mesh.vertices, axis=1, keepdims=True)
    noisy = mesh.vertices * (1 + rng.uniform(-0.02, 0.02, radius.shape)).astype(np.float32)
    smoothed = clean_mesh(Mesh(noisy, mesh.faces), CleanupConfig(smooth_iterations=10))
    before = np.linalg.norm(noisy, axis=1).std()
    after = np.linalg.norm(smoothed.vertices, axis=1).std()
    assert after < before / 2
    volume = signed_volume(smoothed.vertices, smoothed.faces)
    assert volume == pytest.approx(signed_volume(noisy, mesh.faces), rel=0.01)


# ----------------------------------------------------------------------------------------------------------------------
# Decimation
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [2000, 500])
def test_decimate_hits_target_within_one_percent(scene_mesh: Mesh, target: int) -> None:
    mesh = clean_mesh(scene_mesh)
    out = decimate(mesh, target)
    assert abs(out.faces.shape[0] - target) <= 0.01 * target
    assert is_closed(out.faces)
    assert signed_volume(out.vertices, out.faces) == pytest.approx(
        signed_volume(mesh.vertices, mesh.faces), rel=0.03)
    # Nearest-original-vertex colours: within one original edge (≤ 0.03) of the colour function (slope 200/unit).
    error = np.abs(out.colors.astype(int) - position_colours(out.vertices).astype(int))
    assert error.max() <= 12


def test_decimate_preserves_open_border() -> None:
    sphere = marching_cubes([((0.0, 0.0, 0.0), 0.3)], 40)
    upper = sphere.faces[sphere.vertices[sphere.faces].mean(axis=1)[:, 2] > 0]
    used, local = np.unique(upper, return_inverse=True)
    half = Mesh(sphere.vertices[used], local.reshape(-1, 3))

    def border(mesh: Mesh) -> set[tuple[float, ...]]:
        edges = np.sort(mesh.faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
        unique, counts = np.unique(edges, axis=0, return_counts=True)
        return {tuple(p) for p in mesh.vertices[np.unique(unique[counts == 1])].round(6).tolist()}

    out = decimate(half, half.faces.shape[0] // 4)
    assert border(out) == border(half)
    assert border(decimate(half, half.faces.shape[0] // 4, DecimateConfig(preserve_border=False))) != border(half)


def test_decimate_keeps_a_mesh_within_budget_and_refuses_tiny_targets(scene_mesh: Mesh) -> None:
    out = decimate(scene_mesh, scene_mesh.faces.shape[0] + 10)
    assert np.array_equal(out.faces, scene_mesh.faces)
    for bad in (3, 0, -5, 2.5, True):
        with pytest.raises(BadInputError, match="target_faces"):
            decimate(scene_mesh, bad)


# ----------------------------------------------------------------------------------------------------------------------
# Unwrap and rasterisation
# ----------------------------------------------------------------------------------------------------------------------


def coverage_counts(uvs: np.ndarray, faces: np.ndarray, size: int, offset: float) -> np.ndarray:
    """How many UV triangles strictly contain each point of a size² sample grid (shifted by ``offset`` texels, so
    no sample sits on the texel lattice xatlas snaps to). Independent of server.stages.asset.raster: one triangle at a
    time
    over its bounding box."""
    counts = np.zeros((size, size), dtype=np.int32)
    tri = uvs[faces].astype(np.float64) * size - offset
    for a, b, c in tri:
        x0, x1 = max(int(np.floor(min(a[0], b[0], c[0]))), 0), min(int(np.ceil(max(a[0], b[0], c[0]))), size - 1)
        y0, y1 = max(int(np.floor(min(a[1], b[1], c[1]))), 0), min(int(np.ceil(max(a[1], b[1], c[1]))), size - 1)
        if x1 < x0 or y1 < y0:
            continue
        y, x = np.mgrid[y0 : y1 + 1, x0 : x1 + 1].astype(np.float64)
        area = (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])
        if area == 0:
            continue
        e0 = ((b[0] - x) * (c[1] - y) - (b[1] - y) * (c[0] - x)) / area
        e1 = ((c[0] - x) * (a[1] - y) - (c[1] - y) * (a[0] - x)) / area
        e2 = 1 - e0 - e1
        counts[y0 : y1 + 1, x0 : x1 + 1] += (e0 > 1e-9) & (e1 > 1e-9) & (e2 > 1e-9)
    return counts


@pytest.mark.parametrize("piece_faces", [0, 1500])
def test_unwrap_gives_non_overlapping_uvs_in_input_face_order(scene_mesh: Mesh, piece_faces: int) -> None:
    layout = unwrap(scene_mesh.vertices, scene_mesh.faces, TEXTURE, UnwrapConfig(piece_faces=piece_faces))
    assert np.array_equal(layout.vertex_map[layout.faces], scene_mesh.faces)
    assert layout.uvs.min() >= 0 and layout.uvs.max() <= 1
    counts = coverage_counts(layout.uvs, layout.faces, 2 * TEXTURE, offset=0.37)
    assert counts.max() == 1
    assert (counts > 0).mean() > 0.4  # the charts fill the atlas reasonably


def test_rasterize_uv_barycentrics_reproduce_texel_centres(scene_mesh: Mesh) -> None:
    layout = unwrap(scene_mesh.vertices, scene_mesh.faces, TEXTURE)
    face_index, bary = rasterize_uv(layout.uvs, layout.faces, TEXTURE)
    rows, cols = np.nonzero(face_index >= 0)
    uv = np.einsum("tk,tkc->tc", bary[rows, cols], layout.uvs[layout.faces[face_index[rows, cols]]])
    assert np.allclose(uv, np.stack([(cols + 0.5) / TEXTURE, (rows + 0.5) / TEXTURE], axis=1), atol=1e-5)
    assert (bary[rows, cols] >= -1e-6).all()


def test_render_depth_matches_ray_cast_sphere() -> None:
    mesh = marching_cubes([((0.0, 0.0, 0.0), 0.3)], 48)
    poses = PoseFile.for_polar(75)
    c2w = poses.c2ws["2_1.png"]
    w2c = np.linalg.inv(c2w @ np.diag([1.0, -1.0, -1.0, 1.0]))
    depth = render_depth(mesh.vertices, mesh.faces, poses.intrinsics, w2c, 256, 256)
    k = poses.intrinsics
    col, row = np.meshgrid(np.arange(256) + 0.5, np.arange(256) + 0.5)
    d = np.stack([(col - k[0, 2]) / k[0, 0], -(row - k[1, 2]) / k[1, 1], -np.ones_like(col)], -1) @ c2w[:3, :3].T
    o = c2w[:3, 3]
    a, b, c = (d * d).sum(-1), (d @ o), o @ o - 0.3**2
    disc = b * b - a * c
    z_true = np.where(disc >= 0, (-b - np.sqrt(np.maximum(disc, 0))) / a, np.inf)  # t along d = z-depth
    both = np.isfinite(depth) & np.isfinite(z_true)
    hit = o + np.where(both, z_true, 0)[..., None] * d
    cosine = -np.einsum("...c,...c->...", hit / 0.3, d) / np.linalg.norm(d, axis=-1)
    frontal = both & (cosine > 0.3)  # at grazing angles a 0.2 mm offset of the polygon becomes a large depth change
    assert np.abs(depth[frontal] - z_true[frontal]).max() < 0.002  # the polygon lies within ~0.4 mm of the sphere
    assert frontal.sum() > 0.9 * both.sum()
    assert (np.isfinite(depth) != np.isfinite(z_true)).sum() < 0.02 * both.sum()  # only silhouette pixels differ


# ----------------------------------------------------------------------------------------------------------------------
# Bake
# ----------------------------------------------------------------------------------------------------------------------


def test_load_bake_views_uses_every_posed_view_and_agrees_with_view_set(views_dir: Path) -> None:
    views = load_bake_views(views_dir)
    assert len(views.ids) == 40 and "0.png" in views.ids and "7_3.png" in views.ids
    from_set = BakeViews.from_view_set(load_views(views_dir))
    assert len(from_set.ids) == 32
    index = [views.ids.index(i) for i in from_set.ids]
    assert np.allclose(from_set.w2c, views.w2c[index], atol=1e-9)
    assert np.allclose(from_set.intrinsics, views.intrinsics[index])
    assert all(np.array_equal(a, views.images[i]) for a, i in zip(from_set.images, index, strict=True))


def test_views_in_memory_stand_for_files_not_written_yet(views_dir: Path, tmp_path: Path) -> None:
    # The pipeline bakes while stage 2b's PNGs are still being written: those views come from memory.
    partial = tmp_path / "views"
    shutil.copytree(views_dir, partial)
    arrays = {f"{i}_{j}.png": read_rgb(views_dir / f"{i}_{j}.png") for i in range(1, 8) for j in range(4)}
    for name in arrays:
        (partial / name).unlink()
    every = load_bake_views(views_dir)
    views = load_bake_views(partial, arrays)
    assert views.ids == every.ids and all(np.array_equal(a, b) for a, b in zip(views.images, every.images, strict=True))
    assert len(load_bake_views(partial).ids) == 40 - len(arrays)  # without them, only what is on disk
    loaded = load_views(partial, arrays)
    assert torch.equal(loaded.images, load_views(views_dir).images)


def test_bake_reproduces_true_colours(baked: TexturedMesh) -> None:
    """Tolerance 4 sRGB levels on every seen texel: ±0.5 from the views' quantisation, ≤ ~1.5 from bilinear
    interpolation of the colour across one view pixel (1.3 levels/pixel at most), and < 1 from the ~1 mm between the
    polygon and the sphere; measured max 2.7. Without the depth test (next test) errors reach ~120."""
    report = baked.report
    assert report is not None
    texels, points = texel_points(baked, TEXTURE)
    truth = true_colour(points, nearest_sphere(points))
    error = np.abs(baked.texture.reshape(-1, 3)[texels].astype(np.float64) - truth).max(axis=1)
    seen = report.seen.reshape(-1)[texels]
    assert report.coverage > 0.98
    assert error[seen].max() <= 4.0
    assert np.median(error[seen]) <= 1.0
    assert (nearest_sphere(points[seen]) == 1).sum() > 1000  # the small sphere is baked too
    # Unseen texels, chart borders and gutters are filled with scene colours (truth spans 38..217), never black.
    assert baked.texture.min() >= 30 and baked.texture.max() <= 225
    assert report.samples_per_view.min() > 0 and set(report.timings) >= {"unwrap", "views", "fill", "total"}


def test_bake_depth_test_rejects_occluded_views(scene_mesh: Mesh, views_dir: Path) -> None:
    loose = bake_texture(scene_mesh, load_bake_views(views_dir), TEXTURE, BakeConfig(depth_tolerance=10.0))
    texels, points = texel_points(loose, TEXTURE)
    error = np.abs(loose.texture.reshape(-1, 3)[texels] - true_colour(points, nearest_sphere(points))).max(axis=1)
    assert error.max() > 40  # the small sphere's colours land on the large sphere behind it


def test_fill_unseen_dilates_then_uses_the_mean() -> None:
    from server.stages.asset import fill_unseen

    texture = np.zeros((16, 16, 3), dtype=np.float32)
    known = np.zeros((16, 16), dtype=bool)
    texture[4, 4], known[4, 4] = (100, 50, 20), True
    texture[4, 6], known[4, 6] = (200, 150, 120), True
    out = fill_unseen(texture, known, iterations=1)
    assert tuple(out[4, 5]) == (150, 100, 70)  # the mean of its two known neighbours
    assert tuple(out[3, 3]) == (100, 50, 20)
    assert tuple(out[15, 15]) == (150, 100, 70)  # beyond the dilation: the mean of the known texels


# ----------------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------------


def corner_uvs(tm: trimesh.Trimesh) -> np.ndarray:
    return np.asarray(tm.visual.uv)[tm.faces]


def glb_json(path: Path) -> dict:
    data = path.read_bytes()
    (length,) = struct.unpack_from("<I", data, 12)
    return json.loads(data[20 : 20 + length])


def test_glb_round_trip_keeps_texture_uvs_and_vertex_colours(baked: TexturedMesh, tmp_path: Path) -> None:
    path = export_textured_mesh(baked, tmp_path / "asset.glb")[0]
    tm = trimesh.load(path, file_type="glb", force="mesh", process=False)
    assert tm.visual.kind == "texture"
    image = np.asarray(tm.visual.material.baseColorTexture.convert("RGB"))
    assert np.array_equal(image, baked.texture)
    # trimesh stores UVs with the origin at the bottom-left (OBJ style), so glTF's v comes back as 1 − v.
    expected = np.stack([baked.uvs[:, 0], 1 - baked.uvs[:, 1]], axis=1)[baked.faces]
    assert np.allclose(corner_uvs(tm), expected, atol=1e-6)
    y_up = np.stack([baked.vertices[:, 0], baked.vertices[:, 2], -baked.vertices[:, 1]], axis=1)
    assert np.allclose(np.asarray(tm.vertices)[tm.faces], y_up[baked.faces], atol=1e-6)
    gltf = glb_json(path)
    primitive = gltf["meshes"][0]["primitives"][0]
    assert set(primitive["attributes"]) == {"POSITION", "NORMAL", "TEXCOORD_0", "COLOR_0"}
    assert gltf["materials"][0]["pbrMetallicRoughness"]["metallicFactor"] == 0.0
    # The existing reader gets the z-up geometry and the exact sRGB vertex colours back.
    back = load_mesh(path)
    assert np.allclose(back.vertices, baked.vertices, atol=1e-6)
    assert np.array_equal(back.colors, baked.colors)

    plain = export_textured_mesh(baked, tmp_path / "plain.glb", vertex_colors=False)[0]
    assert "COLOR_0" not in glb_json(plain)["meshes"][0]["primitives"][0]["attributes"]


def test_obj_round_trip_keeps_texture_uvs_and_vertex_colours(baked: TexturedMesh, tmp_path: Path) -> None:
    paths = export_textured_mesh(baked, tmp_path / "asset.obj")
    assert [p.name for p in paths] == ["asset.obj", "asset.mtl", "asset_texture.png"]
    assert "map_Kd asset_texture.png" in paths[1].read_text()
    tm = trimesh.load(paths[0], force="mesh", process=False)
    assert tm.visual.kind == "texture"
    assert np.array_equal(np.asarray(tm.visual.material.image.convert("RGB")), baked.texture)
    expected = np.stack([baked.uvs[:, 0], 1 - baked.uvs[:, 1]], axis=1)[baked.faces]
    assert np.allclose(corner_uvs(tm), expected, atol=1e-6)
    back = load_mesh(paths[0])
    assert np.allclose(back.vertices, baked.vertices, atol=1e-6)
    assert np.array_equal(back.colors, baked.colors)


def test_export_refuses_unknown_suffix(baked: TexturedMesh, tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match=r"\.ply"):
        export_textured_mesh(baked, tmp_path / "asset.ply")
    with pytest.raises(BadInputError, match="uvs"):
        export_textured_mesh(replace(baked, uvs=baked.uvs[:-1]), tmp_path / "asset.glb")


# ----------------------------------------------------------------------------------------------------------------------
# Stage and errors
# ----------------------------------------------------------------------------------------------------------------------


def test_build_asset_chains_cleanup_budget_and_bake(views_dir: Path) -> None:
    mesh = marching_cubes([*SPHERES, ((0.0, 0.0, 0.45), 0.03)], 40)  # + a floater
    config = AssetConfig(target_faces=1500, texture_size=128)
    out = build_asset(Mesh(mesh.vertices, mesh.faces, position_colours(mesh.vertices)), load_bake_views(views_dir),
                      config)
    assert abs(out.faces.shape[0] - 1500) <= 15
    assert np.linalg.norm(out.vertices - [0.0, 0.0, 0.45], axis=1).min() > 0.05  # the floater is gone
    assert out.texture.shape == (128, 128, 3) and out.colors is not None
    assert out.report is not None and list(out.report.timings)[:2] == ["cleanup", "decimate"]


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: CleanupConfig(min_component_fraction=1.5), "min_component_fraction"),
        (lambda: CleanupConfig(smooth_iterations=-1), "smooth_iterations"),
        (lambda: CleanupConfig(smooth_mu=-0.4), "smooth_mu"),
        (lambda: BakeConfig(min_cosine=1.0), "min_cosine"),
        (lambda: BakeConfig(edge_ramp=0.0), "edge_ramp"),
        (lambda: UnwrapConfig(padding=-1), "padding"),
        (lambda: AssetConfig(target_faces=2), "target_faces"),
        (lambda: AssetConfig(texture_size=4), "texture_size"),
        (lambda: clean_mesh(Mesh(np.zeros((3, 3), np.float32), np.array([[0, 1, 2]]))), "no usable faces"),
        (lambda: clean_mesh(Mesh(np.zeros((3, 3), np.float32), np.array([[0, 1, 3]]))), "0..2"),
        (lambda: BakeViews(("a",), (np.zeros((4, 4), np.uint8),), np.eye(3)[None], np.eye(4)[None]), "'a'"),
        (lambda: BakeViews(("a", "b"), (np.zeros((4, 4, 3), np.uint8),), np.eye(3)[None], np.eye(4)[None]), "2 view"),
    ],
)
def test_bad_values_are_refused_with_what_is_allowed(factory, match: str) -> None:
    with pytest.raises(BadInputError, match=match):
        factory()


def test_bake_refuses_bad_size_and_missing_views(scene_mesh: Mesh, tmp_path: Path) -> None:
    views = BakeViews(("a",), (np.zeros((8, 8, 3), np.uint8),), np.eye(3)[None], np.eye(4)[None])
    with pytest.raises(BadInputError, match="texture size"):
        bake_texture(scene_mesh, views, 4)
    PoseFile.for_polar(75).write(tmp_path / "pose.json")
    with pytest.raises(BadInputError, match="holds none"):
        load_bake_views(tmp_path)
