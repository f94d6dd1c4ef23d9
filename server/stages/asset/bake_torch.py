"""The texture bake's heavy steps in torch, on any device (issue #28): the same method as the numpy path of
:mod:`server.stages.asset.bake` and :mod:`server.stages.asset.raster`, step for step, so a bake on the GPU gives the
CPU's texture.

What runs here: texel centres → surface points (barycentric rasterisation of the UV triangles), the views' z-buffers
(every view in one rasterisation, nearest depth per pixel by ``scatter_reduce`` amin), their silhouette/occlusion edge
distances, projection, visibility, weights and bilinear sampling of every view, the weighted sums per texel, and the
splat and interpolation of the surface fill. What stays on the CPU: the xatlas unwrap (before), the Dijkstra of the
fill over the mesh's vertices (a few thousand, on scipy), and the gutter dilation (one exact distance transform of
the chart mask on scipy; both are milliseconds to a tenth of a second at 1024²).

Exactness. Everything is float64, as in the numpy path, and each formula is written in the same order, so the two
paths differ only by the round-off of reductions (a 3-term matmul, CUDA's atomic sums): a texel's colour moves by at
most one sRGB level where its exact value sits on a rounding boundary, and a surface point whose depth sits exactly
on the visibility threshold may flip (tests/server/test_bake_torch.py states and checks the tolerance). float64 costs
little here: the work is gathers and elementwise arithmetic over ~10⁶ points, bound by memory traffic, not by the
GPU's float64 rate. Depths are rounded through float32 as :func:`~server.stages.asset.raster.render_depth` returns
them, and the edge distance is the exact Euclidean distance (capped where the weight no longer depends on it), so the
visibility test and the weights see the same numbers as on the CPU.

Pixel convention (the asset stage's one): pixel (i, j) is centred at (j + 0.5, i + 0.5); a view is sampled by an
explicit bilinear gather at (u − 0.5, v − 0.5) in index space, clamped at the border (what ``grid_sample`` with
``align_corners=False`` and ``padding_mode="border"`` would compute, without its float32 grid).

A stage module: imports :mod:`server.common` and its own stage only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

from server.common.errors import BadInputError
from server.common.mesh_io import Mesh
from server.stages.asset.unwrap import UvLayout


# What this module reads of bake.py's BakeViews and BakeConfig (bake imports this module, so not the reverse).
class BakeViews(Protocol):
    """:class:`server.stages.asset.views.BakeViews`: V posed sRGB images in the pixel convention of the module."""

    @property
    def ids(self) -> tuple[str, ...]: ...
    @property
    def images(self) -> tuple[np.ndarray, ...]: ...
    @property
    def intrinsics(self) -> np.ndarray: ...
    @property
    def w2c(self) -> np.ndarray: ...


class BakeConfig(Protocol):
    """:class:`server.stages.asset.bake.BakeConfig`: visibility and weighting settings."""

    @property
    def depth_tolerance(self) -> float: ...
    @property
    def min_cosine(self) -> float: ...
    @property
    def cosine_power(self) -> float: ...
    @property
    def edge_margin(self) -> float: ...
    @property
    def edge_ramp(self) -> float: ...
    @property
    def edge_depth_jump(self) -> float: ...

_CHUNK = 1 << 22
"""Candidate pixels evaluated at once by :func:`triangle_pixels` (~350 MB of float64/int64 temporaries at most)."""

_INSIDE_EPS = 1e-7
"""Barycentric slack, the numpy rasteriser's (:mod:`server.stages.asset.raster`)."""

Tensor = torch.Tensor


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device` that exists here.

    Raises:
        BadInputError: an unknown device string, or CUDA asked for where it is not available.
    """
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise BadInputError(f"bake device {device!r} is not a device; allowed: None (numpy on the CPU), 'cpu', "
                            "'cuda' or 'cuda:N'") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError(f"bake device {device!r} asked for, but CUDA is not available here; allowed: None "
                            "(numpy on the CPU) or 'cpu'")
    if resolved.type not in ("cpu", "cuda"):
        raise BadInputError(f"bake device {device!r} is not supported; allowed: None, 'cpu', 'cuda' or 'cuda:N'")
    return resolved


def _tensor(array: np.ndarray, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A copy of a numpy array on ``device`` (a copy: the caller's arrays may be read-only, and stay untouched)."""
    return torch.tensor(np.asarray(array), device=device).to(dtype)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that step timings measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------------------------
# Rasterisation
# ----------------------------------------------------------------------------------------------------------------------


def triangle_pixels(
    xy: Tensor, height: int | Tensor, width: int | Tensor, chunk: int = _CHUNK
) -> tuple[Tensor, Tensor, Tensor]:
    """All (triangle, pixel) pairs whose pixel centre lies in the triangle (:func:`server.stages.asset.raster.
    triangle_pixels` in torch, the same pairs in the same order).

    Args:
        xy: [F, 3, 2] float64 corner positions in pixel units (x along the width, y along the height).
        height, width: the image size, or [F] int64 per triangle (triangles of several images at once).
        chunk: candidate pixels evaluated at once.

    Returns:
        face: [N] int64; pixel: [N] int64 row·width + column (the triangle's width); bary: [N, 3] float64.
    """
    device = xy.device
    xy = xy.to(torch.float64)
    empty = (torch.zeros(0, dtype=torch.int64, device=device), torch.zeros(0, dtype=torch.int64, device=device),
             torch.zeros((0, 3), dtype=torch.float64, device=device))
    if xy.shape[0] == 0:
        return empty
    height = torch.as_tensor(height, dtype=torch.int64, device=device).expand(xy.shape[0])
    width = torch.as_tensor(width, dtype=torch.int64, device=device).expand(xy.shape[0])
    lo, hi = xy.amin(dim=1), xy.amax(dim=1)
    x0 = torch.clamp(torch.ceil(lo[:, 0] - 0.5).long(), torch.zeros_like(width), width)
    x1 = torch.clamp(torch.floor(hi[:, 0] - 0.5).long(), torch.full_like(width, -1), width - 1)
    y0 = torch.clamp(torch.ceil(lo[:, 1] - 0.5).long(), torch.zeros_like(height), height)
    y1 = torch.clamp(torch.floor(hi[:, 1] - 0.5).long(), torch.full_like(height, -1), height - 1)
    box_w, box_h = (x1 - x0 + 1).clamp(min=0), (y1 - y0 + 1).clamp(min=0)
    e1, e2 = xy[:, 1] - xy[:, 0], xy[:, 2] - xy[:, 0]
    det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    count = torch.where(det != 0, box_w * box_h, 0)
    # Per-triangle values gathered once per candidate into contiguous rows (index_select along the last axis: several
    # times faster than advanced indexing on the CPU, and every later elementwise op reads contiguous memory).
    long_rows = torch.stack([x0, y0, box_w, width])
    real_rows = torch.stack([xy[:, 0, 0], xy[:, 0, 1], e1[:, 0], e1[:, 1], e2[:, 0], e2[:, 1], det])
    ends = torch.cumsum(count, 0).cpu().numpy()
    faces_out, pixels_out, bary_out = [], [], []
    start_face = 0
    while start_face < xy.shape[0]:
        base = int(ends[start_face - 1]) if start_face else 0
        stop_face = max(int(np.searchsorted(ends, base + chunk, side="right")), start_face + 1)
        total = int(ends[stop_face - 1]) - base
        idx = torch.arange(start_face, stop_face, device=device)
        start_face = stop_face
        if total == 0:
            continue
        counts = count[idx]
        face = torch.repeat_interleave(idx, counts, output_size=total)
        first = torch.cumsum(counts, 0) - counts
        local = torch.arange(total, device=device) - torch.repeat_interleave(first, counts, output_size=total)
        fx0, fy0, fbw, fwidth = long_rows.index_select(1, face)
        cx, cy, e1x, e1y, e2x, e2y, fdet = real_rows.index_select(1, face)
        px = fx0 + local % fbw
        py = fy0 + local // fbw
        dx, dy = px + 0.5 - cx, py + 0.5 - cy
        b1 = (dx * e2y - dy * e2x) / fdet
        b2 = (dy * e1x - dx * e1y) / fdet
        b0 = 1.0 - b1 - b2
        keep = torch.nonzero((b0 >= -_INSIDE_EPS) & (b1 >= -_INSIDE_EPS) & (b2 >= -_INSIDE_EPS)).squeeze(1)
        faces_out.append(face.index_select(0, keep))
        pixels_out.append((py * fwidth + px).index_select(0, keep))
        bary_out.append(torch.stack([b0, b1, b2], dim=1).index_select(0, keep))
    if not faces_out:
        return empty
    return torch.cat(faces_out), torch.cat(pixels_out), torch.cat(bary_out)


def _project(points: Tensor, intrinsics: Tensor, w2c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Camera z and pixel position (u, v) of points [..., N, 3] for cameras [..., 3, 3] / [..., 4, 4], in the numpy
    path's order of operations; z is replaced by 1 where ≤ 1e-6 for the division (callers mask those)."""
    camera = points @ w2c[..., :3, :3].transpose(-1, -2) + w2c[..., None, :3, 3]
    z = camera[..., 2]
    z_safe = torch.where(z > 1e-6, z, 1.0)
    k = intrinsics[..., None, :, :]
    u = (k[..., 0, 0] * camera[..., 0] + k[..., 0, 1] * camera[..., 1]) / z_safe + k[..., 0, 2]
    v = k[..., 1, 1] * camera[..., 1] / z_safe + k[..., 1, 2]
    return z, u, v


def render_depths(vertices: Tensor, faces: Tensor, intrinsics: Tensor, w2c: Tensor, height: int, width: int) -> Tensor:
    """Z-buffers of one mesh from C cameras of one image size (:func:`server.stages.asset.raster.render_depth` for
    each, rasterised together).

    Args:
        vertices: [V, 3] float64; faces: [F, 3] int64.
        intrinsics: [C, 3, 3]; w2c: [C, 4, 4] OpenCV; float64.
        height, width: image size in pixels.

    Returns:
        [C, height, width] float64 holding float32-rounded depths (+inf where uncovered), as the numpy z-buffer.
    """
    cameras = intrinsics.shape[0]
    camera = vertices @ w2c[:, :3, :3].transpose(1, 2) + w2c[:, None, :3, 3]  # [C, V, 3]
    z = camera[..., 2]
    safe_z = torch.where(z > 1e-6, z, 1.0)
    k = intrinsics[:, None]
    pixels = torch.stack([k[..., 0, 0] * camera[..., 0] / safe_z + k[..., 0, 1] * camera[..., 1] / safe_z
                          + k[..., 0, 2], k[..., 1, 1] * camera[..., 1] / safe_z + k[..., 1, 2]], dim=-1)
    valid = (z[:, faces] > 1e-6).all(dim=-1)  # [C, F]
    view, face_id = torch.nonzero(valid, as_tuple=True)
    corners = faces[face_id]  # [M, 3]
    xy = pixels[view[:, None], corners]  # [M, 3, 2]
    tri, pixel, bary = triangle_pixels(xy, height, width)
    inverse_z = 1.0 / z[view[tri, None], corners[tri]]
    depth_n = 1.0 / torch.clamp((bary * inverse_z).sum(dim=1), min=1e-12)
    depth = torch.full((cameras * height * width,), math.inf, dtype=torch.float64, device=vertices.device)
    depth.scatter_reduce_(0, view[tri] * (height * width) + pixel, depth_n, "amin")
    return depth.to(torch.float32).to(torch.float64).reshape(cameras, height, width)


def edge_distances(depth: Tensor, jump: float, cap: float) -> Tensor:
    """Distance in pixels from each pixel to the nearest edge pixel of z-buffers [C, H, W] (uncovered pixels, covered
    pixels next to an uncovered one or across a depth jump > ``jump``·z, and the image border), as
    :func:`server.stages.asset.bake._edge_distance`'s exact Euclidean transform wherever it is ≤ ``cap``; larger
    distances come back as some value > ``cap`` (callers only use min(distance, cap)).

    Exact by the separable form d² = min over Δy of (Δy² + g(y + Δy)²), g the distance along the row, both searched
    within ±⌈cap⌉ (an edge pixel within ``cap`` lies in that window).
    """
    covered = torch.isfinite(depth)
    z = torch.where(covered, depth, 0.0)
    edge = ~covered
    padded_z = torch.nn.functional.pad(z, (1, 1, 1, 1))
    padded_covered = torch.nn.functional.pad(covered, (1, 1, 1, 1))
    height, width = depth.shape[1:]
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        nz = padded_z[:, 1 + dy:1 + dy + height, 1 + dx:1 + dx + width]
        nc = padded_covered[:, 1 + dy:1 + dy + height, 1 + dx:1 + dx + width]
        edge |= (~nc | ((nz - z).abs() > jump * z)) & covered
    reach = math.ceil(cap)
    # The image border is an edge ring at distance 1; everything beyond it is dominated by the ring, so padding the
    # mask with edges is exact.
    edge = torch.nn.functional.pad(edge, (reach + 1,) * 4, value=True)
    far = float((reach + 1) ** 2)
    rows = torch.full(edge.shape, far, dtype=torch.float64, device=depth.device)
    full_w = edge.shape[2]
    for dx in range(-reach, reach + 1):
        lo, hi = max(0, -dx), full_w - max(0, dx)
        hit = edge[:, :, lo + dx:hi + dx]
        window = rows[:, :, lo:hi]
        rows[:, :, lo:hi] = torch.where(hit, window.clamp(max=float(dx * dx)), window)
    cols = slice(reach + 1, reach + 1 + width)
    squared = torch.full((depth.shape[0], height, width), far, dtype=torch.float64, device=depth.device)
    for dy in range(-reach, reach + 1):
        shifted = rows[:, reach + 1 + dy:reach + 1 + dy + height, cols]
        squared = torch.minimum(squared, shifted + float(dy * dy))
    return torch.sqrt(squared)


# ----------------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------------


class DeviceViews:
    """The bake views on a device: z-buffers and edge distances of the mesh, images and cameras, all float64."""

    def __init__(self, mesh: Mesh, views: BakeViews, config: BakeConfig, device: torch.device) -> None:
        self.count = len(views.ids)
        self.intrinsics = _tensor(views.intrinsics, torch.float64, device)
        self.w2c = _tensor(views.w2c, torch.float64, device)
        self.sizes = [tuple(image.shape[:2]) for image in views.images]
        # uint8 to the device (an eighth of the bytes), float64 there; a copy, as the views' arrays may be read-only.
        self.images = [torch.from_numpy(np.array(image)).to(device).to(torch.float64) for image in views.images]
        vertices = _tensor(mesh.vertices, torch.float64, device)
        faces = _tensor(mesh.faces, torch.int64, device)
        self.depth: list[Tensor] = [None] * self.count  # type: ignore[list-item]
        self.edge: list[Tensor] = [None] * self.count  # type: ignore[list-item]
        cap = config.edge_margin + config.edge_ramp
        for size in dict.fromkeys(self.sizes):  # views of one size are rasterised together
            group = [i for i in range(self.count) if self.sizes[i] == size]
            index = torch.tensor(group, device=device)
            depth = render_depths(vertices, faces, self.intrinsics[index], self.w2c[index], *size)
            edge = edge_distances(depth, config.edge_depth_jump, cap)
            for j, i in enumerate(group):
                self.depth[i], self.edge[i] = depth[j], edge[j]


def _bilinear(image: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """:func:`server.stages.asset.bake._bilinear` in torch: samples [N, 3] float64 of an [H, W, 3] float64 image at
    index-space positions (pixel (i, j) at (j, i)), clamped at the borders."""
    height, width = image.shape[:2]
    x = x.clamp(0.0, width - 1.0)
    y = y.clamp(0.0, height - 1.0)
    x0 = torch.clamp(torch.floor(x).long(), max=width - 2)
    y0 = torch.clamp(torch.floor(y).long(), max=height - 2)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    flat = image.reshape(-1, 3)
    top_left = y0 * width + x0

    def pixel(offset: int) -> Tensor:
        return flat.index_select(0, top_left + offset)

    top = pixel(0) * (1 - fx) + pixel(1) * fx
    bottom = pixel(width) * (1 - fx) + pixel(width + 1) * fx
    return top * (1 - fy) + bottom * fy


def view_weights(
    device_views: DeviceViews, v: int, points: Tensor, normals: Tensor, config: BakeConfig, tolerance: float
) -> tuple[Tensor, Tensor]:
    """One view's weight [N] (0 where it does not contribute) and bilinear colour [N, 3] for every point:
    :func:`server.stages.asset.bake.view_samples` without compaction (a zero weight adds nothing)."""
    intrinsics, w2c = device_views.intrinsics[v], device_views.w2c[v]
    height, width = device_views.sizes[v]
    rotation, translation = w2c[:3, :3], w2c[:3, 3]
    centre = -rotation.T @ translation
    to_camera = centre - points
    cosine = (normals * to_camera).sum(dim=1) / torch.linalg.vector_norm(to_camera, dim=1)
    z, u, v_pix = _project(points, intrinsics, w2c)
    column, row = torch.floor(u).long(), torch.floor(v_pix).long()
    inside = (cosine > config.min_cosine) & (z > 1e-6) & (column >= 0) & (column < width) & (row >= 0) & \
        (row < height)
    flat = row.clamp(0, height - 1) * width + column.clamp(0, width - 1)
    safe_cosine = torch.where(inside, cosine, 1.0)
    tangent = torch.sqrt(torch.clamp(1.0 - safe_cosine**2, min=0.0)) / safe_cosine
    slack = tolerance + 0.75 * z / intrinsics[0, 0] * tangent
    edge_weight = torch.clamp((device_views.edge[v].reshape(-1).index_select(0, flat) - config.edge_margin)
                              / config.edge_ramp, 0.0, 1.0)
    weight = safe_cosine**config.cosine_power * edge_weight
    keep = inside & ((z - device_views.depth[v].reshape(-1).index_select(0, flat)).abs() <= slack) & (weight > 0)
    colour = _bilinear(device_views.images[v], u - 0.5, v_pix - 0.5)
    return torch.where(keep, weight, 0.0), colour


def accumulate(
    device_views: DeviceViews, points: Tensor, normals: Tensor, config: BakeConfig, diagonal: float
) -> tuple[Tensor, Tensor, np.ndarray]:
    """Σ weight·colour [N, 3], Σ weight [N] (float64, on the points' device) and samples per view [V] (numpy int64)
    of N surface points over every view, in view order (as :func:`server.stages.asset.bake._accumulate`)."""
    tolerance = config.depth_tolerance * diagonal
    colour_sum = torch.zeros((points.shape[0], 3), dtype=torch.float64, device=points.device)
    weight_sum = torch.zeros(points.shape[0], dtype=torch.float64, device=points.device)
    samples = []
    for v in range(device_views.count):
        weight, colour = view_weights(device_views, v, points, normals, config, tolerance)
        colour_sum += weight[:, None] * colour
        weight_sum += weight
        samples.append((weight > 0).sum())
    counts = torch.stack(samples).cpu().numpy().astype(np.int64) if samples else np.zeros(0, np.int64)
    return colour_sum, weight_sum, counts


def mesh_diagonal(vertices: np.ndarray) -> float:
    """The bounding-box diagonal, as the numpy path computes it (on the float32 vertices)."""
    return float(np.linalg.norm(vertices.max(axis=0) - vertices.min(axis=0)))


# ----------------------------------------------------------------------------------------------------------------------
# Bake
# ----------------------------------------------------------------------------------------------------------------------


def bake_layout(
    mesh: Mesh,
    layout: UvLayout,
    normals: np.ndarray,
    views: BakeViews,
    size: int,
    config: BakeConfig,
    device: torch.device,
    lap: Callable[[str], None],
    fill_vertices: Callable[[np.ndarray, np.ndarray], np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Steps 2–4 of :func:`server.stages.asset.bake.bake_texture` (rasterise, views, surface fill) on ``device``; the
    gutter dilation is left to the caller.

    Args:
        mesh: the checked input mesh; layout: its UV layout; normals: [V', 3] vertex normals of the layout's copies.
        views: the :class:`~server.stages.asset.views.BakeViews`; size: texture side; config: the BakeConfig.
        device: where to run; lap: ``lap(step)`` records a step's time (called after a device synchronisation).
        fill_vertices: ``fill_vertices(colours [V, 3], known [V])`` → [V, 3] float64 colours of the input mesh's
            vertices, the unknown ones filled over the surface (:func:`server.stages.asset.fill.fill_over_surface`).

    Returns:
        texture: [S·S, 3] float64 (zeros outside the charts); seen, charted: [S·S] bool; samples: [V] int64.
    """
    vertices = _tensor(mesh.vertices[layout.vertex_map], torch.float64, device)
    vertex_normals = _tensor(normals, torch.float64, device)
    faces = _tensor(layout.faces, torch.int64, device)
    uvs = _tensor(layout.uvs, torch.float64, device)

    # 2. Texel centres → surface points and normals.
    face, pixel, bary = triangle_pixels(uvs[faces] * size, size, size)
    corners = faces[face]
    points = torch.einsum("tk,tkc->tc", bary, vertices[corners])
    pair_normals = torch.einsum("tk,tkc->tc", bary, vertex_normals[corners])
    pair_normals /= torch.clamp(torch.linalg.vector_norm(pair_normals, dim=1, keepdim=True), min=1e-12)
    synchronize(device)
    lap("rasterize")

    # 3. Weighted mean over the views, then over the points of each texel.
    device_views = DeviceViews(mesh, views, config, device)
    colour_sum, weight_sum, samples = accumulate(device_views, points, pair_normals, config,
                                                 mesh_diagonal(mesh.vertices))
    texels = size * size
    texel_weight = torch.zeros(texels, dtype=torch.float64, device=device).index_add_(0, pixel, weight_sum)
    texel_colour = torch.zeros((texels, 3), dtype=torch.float64, device=device).index_add_(0, pixel, colour_sum)
    seen = texel_weight > 0
    texture = torch.where(seen[:, None], texel_colour / torch.where(seen, texel_weight, 1.0)[:, None], 0.0)
    synchronize(device)
    lap("views")

    # 4. Unseen texels from the surface: splat the seen points onto their corners here, Dijkstra on the CPU.
    pair_seen = weight_sum > 0
    unseen_pairs = ~seen[pixel]
    if bool(unseen_pairs.any()):
        seen_index = torch.nonzero(pair_seen).squeeze(1)
        point_colour = colour_sum[seen_index] / weight_sum[seen_index, None]
        vertex_map = _tensor(layout.vertex_map, torch.int64, device)
        owner = vertex_map[corners[seen_index]].reshape(-1)
        weight = bary[seen_index]
        count = mesh.vertices.shape[0]
        splat_weight = torch.zeros(count, dtype=torch.float64, device=device).index_add_(0, owner, weight.reshape(-1))
        splat = torch.zeros((count, 3), dtype=torch.float64, device=device).index_add_(
            0, owner, (weight[..., None] * point_colour[:, None, :]).reshape(-1, 3))
        known = splat_weight > 0
        colour = torch.where(known[:, None], splat / torch.where(known, splat_weight, 1.0)[:, None], 0.0)
        filled = fill_vertices(colour.cpu().numpy(), known.cpu().numpy())
        vertex_colour = _tensor(filled, torch.float64, device)[vertex_map]
        pick = torch.nonzero(unseen_pairs).squeeze(1)
        interpolated = torch.einsum("tk,tkc->tc", bary[pick], vertex_colour[corners[pick]])
        fill_count = torch.zeros(texels, dtype=torch.float64, device=device).index_add_(
            0, pixel[pick], torch.ones(pick.shape[0], dtype=torch.float64, device=device))
        total = torch.zeros((texels, 3), dtype=torch.float64, device=device).index_add_(0, pixel[pick], interpolated)
        fill = fill_count > 0
        texture = torch.where(fill[:, None], total / torch.where(fill, fill_count, 1.0)[:, None], texture)
    charted = torch.zeros(texels, dtype=torch.bool, device=device)
    charted[pixel] = True
    return texture.cpu().numpy(), seen.cpu().numpy(), charted.cpu().numpy(), samples


def vertex_sums(
    mesh: Mesh, normals: np.ndarray, views: BakeViews, config: BakeConfig, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Σ weight·colour [V, 3] and Σ weight [V] (numpy float64) of the mesh's vertices over every view, for
    :func:`server.stages.asset.bake.vertex_colors_from_views`."""
    points = _tensor(mesh.vertices, torch.float64, device)
    point_normals = _tensor(normals, torch.float64, device)
    device_views = DeviceViews(mesh, views, config, device)
    colour_sum, weight_sum, _ = accumulate(device_views, points, point_normals, config, mesh_diagonal(mesh.vertices))
    return colour_sum.cpu().numpy(), weight_sum.cpu().numpy()
