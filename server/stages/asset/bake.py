"""Texture bake and vertex colours from posed views (sRGB bytes, visibility by depth), onto any mesh in the views'
frame: a fresh xatlas unwrap, or the mesh's own UVs.

Pixel convention (one for the whole asset stage, :mod:`server.stages.asset.raster`): pixel (row i, column j) of a
view covers [j, j + 1] × [i, i + 1] in pixel units and is centred at (j + 0.5, i + 0.5); intrinsics map a camera
point to those units (principal point (W/2, H/2) for a centred camera, as in pose.json and Blender's renders). A
surface point that projects to (j + 0.5, i + 0.5) reads exactly pixel (i, j). The reconstruction's colour blending
(:mod:`server.stages.reconstruction.rendering_network`) keeps the reference code's convention instead (pixel centres
at integers, ``grid_sample`` with ``align_corners=True``), so it samples the same views half a pixel up and left of
where the bake does; the reconstruction stays faithful to the weights it was trained with, the bake to the geometry.

Sampling. For every texel covered by a UV triangle, its surface point p and normal n come from barycentric
interpolation over that triangle. For every view, the mesh is z-buffered at the view's resolution
(:func:`render_depth`), and the view contributes the bilinear sample of its image at p's projection when

* p is visible: its camera depth matches the z-buffer at its pixel within ``depth_tolerance`` × the mesh's bounding
  diagonal plus the depth change the surface slope allows within that pixel;
* the view sees the surface at least as frontally as ``min_cosine``;

with weight cos(n, direction to the camera)^``cosine_power`` × w_edge, where w_edge rises from 0 to 1 with the
distance of the pixel from the nearest silhouette or occlusion edge of the z-buffer (``edge_margin``,
``edge_ramp``): samples near an edge bleed background or the occluder into the texel, and the camera is least sure
there. The texel's colour is the weighted mean (over every surface point the texel stands for, when UV triangles
overlap). :func:`vertex_colors_from_views` applies the same sampler to the vertices of any mesh.

Fill on the surface, not in the texture: texels no view sees take their colour from the nearest seen surface across
the mesh, and gutters copy their own chart's border (:mod:`server.stages.asset.fill`).

Colours stay in sRGB bytes throughout (the views are sRGB PNGs, and the texture is stored as one), so a surface that
every view shows in the same colour gets exactly that colour.

Where it runs. ``device=None`` (the default) runs the numpy path here; a torch device (``"cuda"``, ``"cpu"``) runs the
same method in torch on it (:mod:`server.stages.asset.bake_torch`, issue #28): rasterisation, z-buffers, sampling,
weighting and the fill's splat on the device; the unwrap, the fill's Dijkstra and the gutter dilation stay on the
CPU. Both paths compute in float64 in the same order of operations and give the same texture up to round-off (at
most one sRGB level on a seen texel; tests/server/test_bake_torch.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from server.common.errors import BadInputError
from server.common.mesh_io import Mesh
from server.stages.asset.fill import dilate_charts, fill_over_surface, surface_colours
from server.stages.asset.fill import fill_unseen as fill_unseen  # importable from here, as before the split (#27)
from server.stages.asset.geometry import checked_mesh, face_areas, vertex_normals
from server.stages.asset.raster import render_depth, triangle_pixels
from server.stages.asset.reports import CleanupReport, DecimateReport
from server.stages.asset.unwrap import UnwrapConfig, UvLayout, unwrap
from server.stages.asset.views import BakeViews

if TYPE_CHECKING:
    import torch

    from server.common.views import ViewSet

# ----------------------------------------------------------------------------------------------------------------------
# Settings and results
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BakeConfig:
    """Settings of :func:`bake_texture` and :func:`vertex_colors_from_views` (module docstring for the method)."""

    depth_tolerance: float = 0.003
    """Visibility slack, as a fraction of the mesh's bounding-box diagonal, on top of the slope term. Only
    rasterisation error needs covering (the z-buffer is of the same mesh), so it can be tight: parts thicker than
    this occlude properly."""

    min_cosine: float = 0.1
    """Views that see the surface more obliquely than arccos(0.1) ≈ 84° are not used."""

    cosine_power: float = 2.0
    """Weight exponent of the view cosine: 2 favours the most frontal views more than plain cosine weighting does,
    which keeps the texture sharper when the generated views disagree slightly."""

    edge_margin: float = 1.0
    """Pixels at most this far (in pixels) from a silhouette or occlusion edge get zero weight: their bilinear
    footprint can reach the background or the occluder."""

    edge_ramp: float = 4.0
    """Pixels over which the edge weight then rises linearly to 1."""

    edge_depth_jump: float = 0.02
    """A neighbouring pixel whose depth differs by more than this fraction of the depth marks an occlusion edge."""

    min_uv_area_fraction: float = 0.95
    """A mesh's own UVs are used when the faces with a proper UV triangle (area > 0, inside [0, 1]²) hold at least
    this share of the surface area (:func:`check_uvs`); otherwise the mesh is unwrapped afresh."""

    unwrap: UnwrapConfig = field(default_factory=UnwrapConfig)
    """How the mesh is unwrapped when it has no usable UVs."""

    def __post_init__(self) -> None:
        checks = {
            "depth_tolerance": (self.depth_tolerance, self.depth_tolerance >= 0, "a number ≥ 0 (e.g. 0.003)"),
            "min_cosine": (self.min_cosine, 0 <= self.min_cosine < 1, "a number in [0, 1) (e.g. 0.1)"),
            "cosine_power": (self.cosine_power, self.cosine_power >= 0, "a number ≥ 0 (e.g. 2)"),
            "edge_margin": (self.edge_margin, self.edge_margin >= 0, "a number of pixels ≥ 0 (e.g. 1)"),
            "edge_ramp": (self.edge_ramp, self.edge_ramp > 0, "a number of pixels > 0 (e.g. 4)"),
            "edge_depth_jump": (self.edge_depth_jump, self.edge_depth_jump > 0, "a number > 0 (e.g. 0.02)"),
            "min_uv_area_fraction": (self.min_uv_area_fraction, 0 <= self.min_uv_area_fraction <= 1,
                                     "a number in [0, 1] (e.g. 0.95)"),
        }
        for name, (value, ok, allowed) in checks.items():
            if not (ok and math.isfinite(value)):
                raise BadInputError(f"{name} {value} is invalid; allowed: {allowed}")


@dataclass(frozen=True)
class UvCheck:
    """Whether a mesh's own UVs can carry a bake (:func:`check_uvs`)."""

    faces: int
    """Faces checked."""
    degenerate_faces: int
    """Faces whose UV triangle has (numerically) zero area: no texel can hold their colour."""
    outside_faces: int
    """Faces with a UV corner outside [0, 1]² (tiled or UDIM layouts): one texture cannot hold them."""
    usable_area_fraction: float
    """Share of the surface area on faces with a proper UV triangle."""
    overlap_texels: int
    """Texels inside two or more UV triangles (mirrored or stacked islands): they get the mean colour of all the
    surface points they stand for. Reported, never fatal."""
    overlap_fraction: float
    """overlap_texels / texels inside some UV triangle."""
    usable: bool
    """usable_area_fraction ≥ the bake's ``min_uv_area_fraction``."""

    @property
    def reason(self) -> str:
        """One line for logs and reports."""
        verdict = "usable" if self.usable else "not usable"
        return (f"UVs {verdict}: {self.usable_area_fraction:.1%} of the area on proper UV triangles "
                f"({self.degenerate_faces} of {self.faces} faces degenerate, {self.outside_faces} outside [0, 1]²), "
                f"{self.overlap_texels} overlapping texels ({self.overlap_fraction:.1%})")

    def as_dict(self) -> dict[str, object]:
        return {"faces": self.faces, "degenerate_faces": self.degenerate_faces, "outside_faces": self.outside_faces,
                "usable_area_fraction": round(self.usable_area_fraction, 4), "overlap_texels": self.overlap_texels,
                "overlap_fraction": round(self.overlap_fraction, 4), "usable": self.usable}


@dataclass
class BakeReport:
    """What the bake (and, from :func:`server.stages.asset.build_asset`, the asset stage) did, for logs and tests."""

    seen: np.ndarray
    """[S, S] bool: texels coloured from at least one view."""
    charted: np.ndarray
    """[S, S] bool: texels whose centre lies in a UV triangle."""
    view_ids: tuple[str, ...]
    """The views used, in the order of ``samples_per_view``."""
    samples_per_view: np.ndarray
    """[V] int64: texels each view contributed to."""
    timings: dict[str, float]
    """Seconds per step: unwrap, rasterize, views (z-buffers and sampling), fill, total."""
    uv_source: str = "unwrap"
    """``"mesh"``: the mesh's own UVs were baked onto; ``"unwrap"``: a fresh xatlas unwrap."""
    uv_check: UvCheck | None = None
    """The check of the mesh's own UVs, when it had some."""
    cleanup: CleanupReport | None = None
    """Set by :func:`server.stages.asset.build_asset`: the components kept and dropped."""
    decimation: DecimateReport | None = None
    """Set by :func:`server.stages.asset.build_asset`: the face count reached and how."""
    device: str = "numpy"
    """Where the sampling ran: ``"numpy"`` (the CPU path) or the torch device (``"cuda:0"``, ``"cpu"``)."""

    @property
    def coverage(self) -> float:
        """Share of charted texels seen by some view."""
        return float(self.seen[self.charted].mean()) if self.charted.any() else 0.0


@dataclass
class TexturedMesh:
    """A mesh with UVs, a base-colour texture and (optionally) vertex colours, in the pose.json world (z-up)."""

    vertices: np.ndarray
    """[V, 3] float32 positions (vertices are split along UV seams)."""
    faces: np.ndarray
    """[F, 3] int64, counter-clockwise seen from outside."""
    uvs: np.ndarray
    """[V, 2] float32 in [0, 1], origin at the texture's top-left corner, v downwards (glTF convention)."""
    texture: np.ndarray
    """[S, S, 3] uint8 sRGB base colour."""
    colors: np.ndarray | None = None
    """[V, 3] uint8 sRGB vertex colours carried over from the input mesh, or None."""
    report: BakeReport | None = None
    """How the texture was baked, when it was."""


# ----------------------------------------------------------------------------------------------------------------------
# The mesh's own UVs
# ----------------------------------------------------------------------------------------------------------------------


def _uv_arrays(mesh: Mesh, uvs: np.ndarray, uv_faces: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    uvs = np.asarray(uvs, dtype=np.float64)
    uv_faces = mesh.faces if uv_faces is None else np.asarray(uv_faces)
    if uvs.ndim != 2 or uvs.shape[1] != 2 or uvs.shape[0] == 0 or not np.all(np.isfinite(uvs)):
        raise BadInputError(f"uvs have shape {uvs.shape}; allowed: [T, 2] finite numbers")
    if uv_faces.shape != mesh.faces.shape or not np.issubdtype(uv_faces.dtype, np.integer) or \
            uv_faces.min() < 0 or uv_faces.max() >= uvs.shape[0]:
        raise BadInputError(f"uv faces have shape {uv_faces.shape} and index {int(uv_faces.min())}.."
                            f"{int(uv_faces.max())}; allowed: one UV triangle per face, [{mesh.faces.shape[0]}, 3] "
                            f"indices in 0..{uvs.shape[0] - 1}")
    return uvs, uv_faces.astype(np.int64)


def check_uvs(
    mesh: Mesh, uvs: np.ndarray, uv_faces: np.ndarray | None = None, size: int = 1024,
    min_area_fraction: float = BakeConfig.min_uv_area_fraction,
) -> UvCheck:
    """Can a mesh's own UVs carry a size×size bake?

    Args:
        mesh: vertices [V, 3], faces [F, 3].
        uvs: [T, 2] in the glTF convention of :class:`TexturedMesh` (origin top-left, v downwards).
        uv_faces: [F, 3] indices into ``uvs``, one UV triangle per face (an OBJ's ``vt`` indices); None: ``uvs`` is
            per vertex (T = V) and the faces index both.
        size: texture side, for the overlap count.
        min_area_fraction: see :attr:`BakeConfig.min_uv_area_fraction`.

    Returns:
        The :class:`UvCheck`.

    Raises:
        BadInputError: malformed mesh or UV arrays.
    """
    mesh = checked_mesh(mesh)
    uvs, uv_faces = _uv_arrays(mesh, uvs, uv_faces)
    tri = uvs[uv_faces]
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    uv_area = 0.5 * np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0])
    # Zero in texel units: below a millionth of a texel a triangle holds no texel centre a bake could fill.
    degenerate = uv_area * size * size < 1e-6
    outside = ((tri < -1e-6) | (tri > 1 + 1e-6)).any(axis=(1, 2))
    area = face_areas(mesh.vertices, mesh.faces)
    proper = ~degenerate & ~outside
    fraction = float(area[proper].sum() / max(area.sum(), 1e-300))
    _, pixel, bary = triangle_pixels(tri[proper] * size, size, size)
    # Interior coverage only: centres on a shared edge count for both neighbours and are no overlap.
    interior = bary.min(axis=1) > 1e-6
    counts = np.bincount(pixel[interior], minlength=size * size)
    covered = np.unique(pixel).shape[0]
    overlap = int((counts > 1).sum())
    return UvCheck(faces=int(mesh.faces.shape[0]), degenerate_faces=int(degenerate.sum()),
                   outside_faces=int(outside.sum()), usable_area_fraction=fraction, overlap_texels=overlap,
                   overlap_fraction=overlap / max(covered, 1), usable=fraction >= min_area_fraction)


def layout_from_uvs(faces: np.ndarray, uvs: np.ndarray, uv_faces: np.ndarray) -> UvLayout:
    """A :class:`~server.stages.asset.unwrap.UvLayout` of given UVs: one output vertex per distinct (vertex, UV) corner
    pair, so a vertex is split exactly where the UVs have a seam. UVs are clipped into [0, 1]."""
    pairs = np.stack([np.asarray(faces, np.int64).reshape(-1), np.asarray(uv_faces, np.int64).reshape(-1)], axis=1)
    unique, inverse = np.unique(pairs, axis=0, return_inverse=True)
    uv = np.clip(np.asarray(uvs, dtype=np.float64)[unique[:, 1]], 0.0, 1.0)
    return UvLayout(unique[:, 0], inverse.reshape(-1, 3).astype(np.int64), uv.astype(np.float32))


# ----------------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------------


def _accumulate(
    mesh: Mesh, points: np.ndarray, normals: np.ndarray, views: BakeViews, config: BakeConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Σ weight·colour [N, 3], Σ weight [N] and samples per view [V] of N surface points over every view."""
    diagonal = float(np.linalg.norm(mesh.vertices.max(axis=0) - mesh.vertices.min(axis=0)))
    colour_sum = np.zeros((points.shape[0], 3))
    weight_sum = np.zeros(points.shape[0])
    samples = np.zeros(len(views.ids), dtype=np.int64)
    for v in range(len(views.ids)):
        index, colour, weight = view_samples(mesh, points, normals, views.images[v], views.intrinsics[v],
                                              views.w2c[v], config, config.depth_tolerance * diagonal)
        # index is unique within a view, so fancy-index addition is exact.
        colour_sum[index] += weight[:, None] * colour
        weight_sum[index] += weight
        samples[v] = index.shape[0]
    return colour_sum, weight_sum, samples


def vertex_colors_from_views(
    mesh: Mesh, views: BakeViews | ViewSet, config: BakeConfig | None = None, device: str | torch.device | None = None
) -> np.ndarray:
    """Colour every vertex of any mesh in the views' frame with the bake's sampler: the weighted mean of the bilinear
    samples of the views that see it (depth visibility, cosine^p and silhouette-edge weights, as for a texel; the
    pixel convention of the module docstring). Vertices no view sees take the colour of the nearest seen vertex along
    the mesh's surface (:func:`fill_over_surface`), never across a gap; a part no view sees at all gets the mean seen
    colour (mid grey when nothing is seen).

    Args:
        mesh: vertices [V, 3], faces [F, 3] in the views' frame (pose.json world).
        views: the posed sRGB views (:func:`load_bake_views`, optionally a subset) or the reconstruction's ViewSet.
        config: the bake's settings (visibility slack, weights); default :class:`BakeConfig`.
        device: None samples with numpy; a torch device (``"cuda"``, ``"cpu"``) samples there (module docstring).

    Returns:
        [V, 3] uint8 sRGB.

    Raises:
        BadInputError: a malformed mesh or views, or a device that is not one or not available.
    """
    config = config or BakeConfig()
    mesh = checked_mesh(mesh)
    if not isinstance(views, BakeViews):
        views = BakeViews.from_view_set(views)
    points = mesh.vertices.astype(np.float64)
    normals = vertex_normals(mesh.vertices, mesh.faces).astype(np.float64)
    if device is None:
        colour_sum, weight_sum, _ = _accumulate(mesh, points, normals, views, config)
    else:
        from server.stages.asset import bake_torch

        colour_sum, weight_sum = bake_torch.vertex_sums(mesh, normals, views, config,
                                                        bake_torch.resolve_device(device))
    seen = weight_sum > 0
    colours = np.zeros((points.shape[0], 3))
    colours[seen] = colour_sum[seen] / weight_sum[seen, None]
    colours = fill_over_surface(colours, seen, mesh.vertices, mesh.faces)
    return np.clip(np.rint(colours), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------------
# Bake
# ----------------------------------------------------------------------------------------------------------------------


def bake_texture(
    mesh: Mesh,
    views: BakeViews | ViewSet,
    size: int = 1024,
    config: BakeConfig = BakeConfig(),  # frozen, so a shared default is safe
    uvs: np.ndarray | None = None,
    uv_faces: np.ndarray | None = None,
    device: str | torch.device | None = None,
) -> TexturedMesh:
    """Bake a base-colour texture from posed views onto a mesh: onto its own UVs when given and usable, else onto a
    fresh xatlas unwrap (module docstring for the method; the report's ``uv_source`` and ``uv_check`` say which).

    Args:
        mesh: vertices [V, 3] in the views' world frame (pose.json world), faces [F, 3], colours [V, 3] uint8 or None.
        views: :class:`BakeViews` (e.g. :func:`load_bake_views` of a run's views folder) or the reconstruction's
            :class:`~server.common.views.ViewSet`; intrinsics in the pixel convention of the module docstring.
        size: texture side in texels.
        config: see :class:`BakeConfig`.
        uvs: the mesh's own UVs, [T, 2] in the glTF convention (origin at the texture's top-left corner, v
            downwards; an OBJ's ``vt`` (u, v) is (u, 1 − v) here); None unwraps.
        uv_faces: [F, 3] indices into ``uvs`` (an OBJ's ``vt`` indices); None: ``uvs`` is per vertex.
        device: None bakes with numpy on the CPU; a torch device (``"cuda"``, ``"cuda:1"``, ``"cpu"``) runs the
            rasterisation, sampling and fill there (module docstring), with the same texture up to round-off.

    Returns:
        The textured mesh with its :class:`BakeReport` (coverage, UV source, timings, device). Faces keep their order
        and winding; vertices are split where the UVs have seams.

    Raises:
        BadInputError: a malformed mesh, views or UVs, a size below 8, or a device that is not one or not available.
    """
    start = time.perf_counter()
    mesh = checked_mesh(mesh)
    if not isinstance(views, BakeViews):
        views = BakeViews.from_view_set(views)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 8:
        raise BadInputError(f"texture size {size!r} is invalid; allowed: an integer ≥ 8 (e.g. 1024)")
    size = int(size)
    torch_device = None
    if device is not None:
        from server.stages.asset import bake_torch

        torch_device = bake_torch.resolve_device(device)
    timings: dict[str, float] = {}
    clock = start

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[step] = now - clock
        clock = now

    # 1. UV layout; positions, normals and colours follow the vertex copies.
    uv_check = None
    if uvs is not None:
        uvs, uv_faces = _uv_arrays(mesh, uvs, uv_faces)
        uv_check = check_uvs(mesh, uvs, uv_faces, size, config.min_uv_area_fraction)
    if uv_check is not None and uv_check.usable:
        layout, uv_source = layout_from_uvs(mesh.faces, uvs, uv_faces), "mesh"
    else:
        layout, uv_source = unwrap(mesh.vertices, mesh.faces, size, config.unwrap), "unwrap"
    normals = vertex_normals(mesh.vertices, mesh.faces)[layout.vertex_map]
    vertices = mesh.vertices[layout.vertex_map]
    lap("unwrap")
    fallback = None if mesh.colors is None else mesh.colors.mean(axis=0)
    if torch_device is not None:
        def fill_vertices(colour: np.ndarray, known: np.ndarray) -> np.ndarray:
            return fill_over_surface(colour, known, mesh.vertices, mesh.faces, fallback)

        texture, seen, charted, samples = bake_torch.bake_layout(mesh, layout, normals, views, size, config,
                                                                 torch_device, lap, fill_vertices)
        filled = dilate_charts(texture.reshape(size, size, 3), charted.reshape(size, size), fallback)
        lap("fill")
        timings["total"] = time.perf_counter() - start
        report = BakeReport(seen=seen.reshape(size, size), charted=charted.reshape(size, size), view_ids=views.ids,
                            samples_per_view=samples, timings=timings, uv_source=uv_source, uv_check=uv_check,
                            device=str(torch_device))
        colors = None if mesh.colors is None else mesh.colors[layout.vertex_map]
        return TexturedMesh(vertices=vertices, faces=layout.faces, uvs=layout.uvs, texture=filled, colors=colors,
                            report=report)

    # 2. Texel centres → surface points and normals: every (triangle, texel) pair, so overlapping UV triangles all
    # contribute to the texels they share.
    face, pixel, bary = triangle_pixels(layout.uvs.astype(np.float64)[layout.faces] * size, size, size)
    corners = layout.faces[face]
    points = np.einsum("tk,tkc->tc", bary, vertices[corners].astype(np.float64))
    pair_normals = np.einsum("tk,tkc->tc", bary, normals[corners].astype(np.float64))
    pair_normals /= np.maximum(np.linalg.norm(pair_normals, axis=1, keepdims=True), 1e-12)
    lap("rasterize")

    # 3. Weighted mean over the views that see each surface point, then over the points of each texel.
    colour_sum, weight_sum, samples = _accumulate(mesh, points, pair_normals, views, config)
    texel_weight = np.bincount(pixel, weight_sum, size * size)
    texel_colour = np.stack([np.bincount(pixel, colour_sum[:, c], size * size) for c in range(3)], axis=1)
    seen = texel_weight > 0
    texture = np.zeros((size * size, 3))
    texture[seen] = texel_colour[seen] / texel_weight[seen, None]
    lap("views")

    # 4. Unseen texels from the surface, then gutters from their own chart.
    pair_seen = weight_sum > 0
    unseen_pairs = ~seen[pixel]
    if unseen_pairs.any():
        vertex_colour = surface_colours(mesh, layout, corners, bary, colour_sum, weight_sum, pair_seen, fallback)
        interpolated = np.einsum("tk,tkc->tc", bary[unseen_pairs], vertex_colour[corners[unseen_pairs]])
        count = np.bincount(pixel[unseen_pairs], minlength=size * size).astype(np.float64)
        total = np.stack([np.bincount(pixel[unseen_pairs], interpolated[:, c], size * size) for c in range(3)], 1)
        fill = count > 0
        texture[fill] = total[fill] / count[fill, None]
    charted = np.zeros(size * size, dtype=bool)
    charted[pixel] = True
    filled = dilate_charts(texture.reshape(size, size, 3), charted.reshape(size, size), fallback)
    lap("fill")
    timings["total"] = time.perf_counter() - start

    report = BakeReport(seen=seen.reshape(size, size), charted=charted.reshape(size, size), view_ids=views.ids,
                        samples_per_view=samples, timings=timings, uv_source=uv_source, uv_check=uv_check)
    colors = None if mesh.colors is None else mesh.colors[layout.vertex_map]
    return TexturedMesh(vertices=vertices, faces=layout.faces, uvs=layout.uvs, texture=filled, colors=colors,
                        report=report)


def view_samples(
    mesh: Mesh,
    points: np.ndarray,
    normals: np.ndarray,
    image: np.ndarray,
    intrinsics: np.ndarray,
    w2c: np.ndarray,
    config: BakeConfig,
    tolerance: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One view's contribution.

    Args:
        mesh: the (un-split) mesh, for the z-buffer.
        points, normals: [T, 3] surface points and unit normals.
        image: [H, W, 3] uint8; intrinsics: [3, 3] in the pixel convention of the module docstring (a point that
            projects to (j + 0.5, i + 0.5) reads pixel (i, j) exactly); w2c: [4, 4] OpenCV.
        config: bake settings; tolerance: absolute depth slack in world units.

    Returns:
        index: [N] points the view contributes to (unique); colour: [N, 3] float64 bilinear sRGB samples (0–255);
        weight: [N] float64 > 0.
    """
    height, width = image.shape[:2]
    centre = -w2c[:3, :3].T @ w2c[:3, 3]
    to_camera = centre - points
    cosine = np.einsum("tc,tc->t", normals, to_camera) / np.linalg.norm(to_camera, axis=1)
    index = np.flatnonzero(cosine > config.min_cosine)
    cosine = cosine[index]
    camera = points[index] @ w2c[:3, :3].T + w2c[:3, 3]
    z = camera[:, 2]
    z_safe = np.where(z > 1e-6, z, 1.0)
    u = (intrinsics[0, 0] * camera[:, 0] + intrinsics[0, 1] * camera[:, 1]) / z_safe + intrinsics[0, 2]
    v = intrinsics[1, 1] * camera[:, 1] / z_safe + intrinsics[1, 2]
    column, row = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    inside = (z > 1e-6) & (column >= 0) & (column < width) & (row >= 0) & (row < height)
    index, cosine, z, u, v = index[inside], cosine[inside], z[inside], u[inside], v[inside]
    column, row = column[inside], row[inside]

    depth = render_depth(mesh.vertices, mesh.faces, intrinsics, w2c, height, width)
    # The pixel centre may lie up to √2/2 px from the point's projection; on a surface tilted by θ the depth changes
    # by (z/f)·tan θ per pixel there.
    tangent = np.sqrt(np.maximum(1.0 - cosine**2, 0.0)) / cosine
    slack = tolerance + 0.75 * z / intrinsics[0, 0] * tangent
    edge_weight = np.clip((_edge_distance(depth, config.edge_depth_jump)[row, column] - config.edge_margin)
                          / config.edge_ramp, 0.0, 1.0)
    weight = cosine**config.cosine_power * edge_weight
    keep = (np.abs(z - depth[row, column]) <= slack) & (weight > 0)
    # Pixel centres at +0.5: the index-space position of (u, v) is (u − 0.5, v − 0.5).
    colour = _bilinear(image, u[keep] - 0.5, v[keep] - 0.5)
    return index[keep], colour, weight[keep]


def _edge_distance(depth: np.ndarray, jump: float) -> np.ndarray:
    """[H, W] distance in pixels from each pixel to the nearest edge pixel of a z-buffer: uncovered pixels, covered
    pixels next to an uncovered one or across a depth jump > ``jump``·z, and (as a margin) the image border."""
    covered = np.isfinite(depth)
    z = np.where(covered, depth, 0.0)
    edge = np.pad(~covered, 1, constant_values=True)
    padded_z = np.pad(z, 1)
    core = (slice(1, -1), slice(1, -1))
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        neighbour = (slice(1 + dy, padded_z.shape[0] - 1 + dy), slice(1 + dx, padded_z.shape[1] - 1 + dx))
        far = ~np.pad(covered, 1)[neighbour] | (np.abs(padded_z[neighbour] - z) > jump * z)
        edge[core] |= far & covered
    return ndimage.distance_transform_edt(~edge)[core]


def _bilinear(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear samples of an [H, W, 3] image at index-space positions (pixel (i, j) at (j, i)), clamped at the
    borders. Returns [N, 3] float64."""
    height, width = image.shape[:2]
    x = np.clip(x, 0.0, width - 1.0)
    y = np.clip(y, 0.0, height - 1.0)
    x0 = np.minimum(np.floor(x).astype(np.int64), width - 2)
    y0 = np.minimum(np.floor(y).astype(np.int64), height - 2)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    img = image.astype(np.float64)
    top = img[y0, x0] * (1 - fx) + img[y0, x0 + 1] * fx
    bottom = img[y0 + 1, x0] * (1 - fx) + img[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy
