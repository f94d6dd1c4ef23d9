"""Texture bake: the posed views projected onto an unwrapped mesh (sRGB bytes, visibility by depth).

For every texel covered by a UV triangle, its surface point p and normal n come from barycentric interpolation over
that triangle. For every view, the mesh is z-buffered at the view's resolution (:func:`render_depth`), and the view
contributes the bilinear sample of its image at p's projection when

* p is visible: its camera depth matches the z-buffer at its pixel within ``depth_tolerance`` × the mesh's bounding
  diagonal plus the depth change the surface slope allows within that pixel;
* the view sees the surface at least as frontally as ``min_cosine``;

with weight cos(n, direction to the camera)^``cosine_power`` × w_edge, where w_edge rises from 0 to 1 with the
distance of the pixel from the nearest silhouette or occlusion edge of the z-buffer (``edge_margin``,
``edge_ramp``): samples near an edge bleed background or the occluder into the texel, and the camera is least sure
there. The texel's colour is the weighted mean. Texels no view sees, the gutters between charts and texels at chart
borders are filled by iterative dilation of the seen colours, then any rest with the mean seen colour.

Colours stay in sRGB bytes throughout (the views are sRGB PNGs, and the texture is stored as one), so a surface that
every view shows in the same colour gets exactly that colour.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from server.common.cameras import PoseFile, opengl_to_opencv
from server.common.errors import BadInputError
from server.common.mesh_io import Mesh
from server.stages.asset.geometry import checked_mesh, vertex_normals
from server.stages.asset.raster import rasterize_uv, render_depth
from server.stages.asset.unwrap import UnwrapConfig, unwrap

if TYPE_CHECKING:
    from server.common.views import ViewSet

_VIEW_FILE = re.compile(r"^\d+(_\d+)?\.png$")
"""Image ids the pipeline writes beside pose.json: stage-1 ``<i>.png`` and nearby ``<i>_<j>.png``."""


# ----------------------------------------------------------------------------------------------------------------------
# Views
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class BakeViews:
    """Posed sRGB images in the mesh's frame (the pose.json world), the bake's input."""

    ids: tuple[str, ...]
    """The V image ids."""
    images: tuple[np.ndarray, ...]
    """V arrays [H_v, W_v, 3] uint8 sRGB; pixel (i, j) is centred at (j + 0.5, i + 0.5) in pixel units."""
    intrinsics: np.ndarray
    """[V, 3, 3] pixel intrinsics, each for its own image's size."""
    w2c: np.ndarray
    """[V, 4, 4] OpenCV world-to-camera (x right, y down, looking along +z) in the pose.json world."""

    def __post_init__(self) -> None:
        count = len(self.ids)
        if count == 0:
            raise BadInputError("no views to bake from; allowed: at least one posed image")
        if len(self.images) != count or np.shape(self.intrinsics) != (count, 3, 3) or \
                np.shape(self.w2c) != (count, 4, 4):
            raise BadInputError(f"{count} view ids but {len(self.images)} images, intrinsics of shape "
                                f"{np.shape(self.intrinsics)} and w2c of shape {np.shape(self.w2c)}; allowed: V "
                                "images, [V, 3, 3] and [V, 4, 4]")
        for view_id, image in zip(self.ids, self.images, strict=True):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 2:
                raise BadInputError(f"view {view_id!r} has shape {image.shape} and dtype {image.dtype}; allowed: "
                                    "[H, W, 3] uint8 sRGB with H, W ≥ 2")

    @classmethod
    def from_pose_file(cls, poses: PoseFile, images: Mapping[str, np.ndarray]) -> BakeViews:
        """Views from pose.json cameras and images keyed by id (in pose.json order).

        pose.json's intrinsics describe images whose principal point is at their centre (256×256 for the pipeline);
        an image of another size gets them scaled by its width / (2·cx) and height / (2·cy), keeping the field of
        view (as :func:`server.common.synthetic.render_views` does).

        Raises:
            BadInputError: an image id without a pose.
        """
        poses.require(images)
        ids = tuple(i for i in poses.c2ws if i in images)
        k = poses.intrinsics
        intrinsics = []
        for view_id in ids:
            height, width = images[view_id].shape[:2]
            intrinsics.append(np.diag([width / (2 * k[0, 2]), height / (2 * k[1, 2]), 1.0]) @ k)
        w2c = np.linalg.inv(opengl_to_opencv(np.stack([poses.c2ws[i] for i in ids])))
        return cls(ids, tuple(np.asarray(images[i]) for i in ids), np.stack(intrinsics), w2c)

    @classmethod
    def from_view_set(cls, views: ViewSet) -> BakeViews:
        """The reconstruction's input (32 nearby views, normalised-frame cameras) as bake views in pose.json world.

        The normalised camera c2w (R, C) becomes (R_ref·R, to_world(C)); the intrinsics are unchanged because the
        normalisation only scales and moves the scene. Images go back to the bytes they were read from (x·255 is
        exact for x = byte/255).
        """
        cams = views.cameras
        images = (views.images.permute(0, 2, 3, 1).double() * 255.0).round().clamp(0, 255).byte().numpy()
        rotation = cams.ref_c2w[:3, :3] @ cams.c2w[:, :3, :3]
        centres = cams.to_world(cams.centres)
        w2c = np.zeros((len(views.ids), 4, 4))
        w2c[:, :3, :3] = np.swapaxes(rotation, 1, 2)
        w2c[:, :3, 3] = -np.einsum("vji,vj->vi", rotation, centres)
        w2c[:, 3, 3] = 1.0
        return cls(tuple(views.ids), tuple(images), np.asarray(cams.intrinsics, dtype=np.float64), w2c)


def load_bake_views(views_dir: str | os.PathLike[str], arrays: dict[str, np.ndarray] | None = None) -> BakeViews:
    """Every posed view of a run's ``views/`` folder: the 32 nearby views and the stage-1 views that are present.

    Reads ``pose.json`` and each image id it lists that names a file of the pipeline's layout (``<i>.png``,
    ``<i>_<j>.png``) present in the folder; other ids are ignored (never a path outside the folder). ``arrays``
    holds views already in memory by file name (the pipeline's, while their PNGs are still being written): they
    count as present and are not read.

    Raises:
        BadInputError: no folder, no or a broken pose.json, no posed image present, or an unreadable image.
    """
    from server.common.views import read_rgb  # torch-free import path for callers that only bake

    folder = Path(views_dir)
    if not folder.is_dir():
        raise BadInputError(f"views folder {folder} does not exist or is not a folder")
    poses = PoseFile.read(folder / "pose.json")
    arrays = arrays or {}
    ids = [i for i in poses.c2ws if _VIEW_FILE.match(i) and (i in arrays or (folder / i).is_file())]
    if not ids:
        raise BadInputError(f"{folder} holds none of the {len(poses.c2ws)} images pose.json lists "
                            f"({', '.join(list(poses.c2ws)[:4])}…); allowed: a views folder of `one2345 generate`")
    return BakeViews.from_pose_file(poses, {i: arrays[i] if i in arrays else read_rgb(folder / i) for i in ids})


# ----------------------------------------------------------------------------------------------------------------------
# Bake
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BakeConfig:
    """Settings of :func:`bake_texture` (module docstring for the method)."""

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

    dilation_iterations: int = 64
    """Rounds of one-texel dilation that fill unseen texels and gutters from seen neighbours before the mean fill."""

    unwrap: UnwrapConfig = field(default_factory=UnwrapConfig)
    """How the mesh is unwrapped."""

    def __post_init__(self) -> None:
        checks = {
            "depth_tolerance": (self.depth_tolerance, self.depth_tolerance >= 0, "a number ≥ 0 (e.g. 0.003)"),
            "min_cosine": (self.min_cosine, 0 <= self.min_cosine < 1, "a number in [0, 1) (e.g. 0.1)"),
            "cosine_power": (self.cosine_power, self.cosine_power >= 0, "a number ≥ 0 (e.g. 2)"),
            "edge_margin": (self.edge_margin, self.edge_margin >= 0, "a number of pixels ≥ 0 (e.g. 1)"),
            "edge_ramp": (self.edge_ramp, self.edge_ramp > 0, "a number of pixels > 0 (e.g. 4)"),
            "edge_depth_jump": (self.edge_depth_jump, self.edge_depth_jump > 0, "a number > 0 (e.g. 0.02)"),
            "dilation_iterations": (self.dilation_iterations, self.dilation_iterations >= 0, "an integer ≥ 0"),
        }
        for name, (value, ok, allowed) in checks.items():
            if not (ok and math.isfinite(value)):
                raise BadInputError(f"{name} {value} is invalid; allowed: {allowed}")


@dataclass
class BakeReport:
    """What the bake did, for logs and tests."""

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


def bake_texture(
    mesh: Mesh,
    views: BakeViews | ViewSet,
    size: int = 1024,
    config: BakeConfig = BakeConfig(),  # frozen, so a shared default is safe
) -> TexturedMesh:
    """Unwrap a mesh and bake its base-colour texture from posed views (module docstring).

    Args:
        mesh: vertices [V, 3] in the views' world frame (pose.json world), faces [F, 3], colours [V, 3] uint8 or None.
        views: :class:`BakeViews` (e.g. :func:`load_bake_views` of a run's views folder) or the reconstruction's
            :class:`~server.pipeline.reconstruct.ViewSet`.
        size: texture side in texels.
        config: see :class:`BakeConfig`.

    Returns:
        The textured mesh with its :class:`BakeReport` (coverage, timings).

    Raises:
        BadInputError: a malformed mesh or views, or a size below 8.
    """
    start = time.perf_counter()
    mesh = checked_mesh(mesh)
    if not isinstance(views, BakeViews):
        views = BakeViews.from_view_set(views)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 8:
        raise BadInputError(f"texture size {size!r} is invalid; allowed: an integer ≥ 8 (e.g. 1024)")
    timings: dict[str, float] = {}
    clock = start

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[step] = now - clock
        clock = now

    # 1. UV layout; positions, normals and colours follow the vertex copies.
    layout = unwrap(mesh.vertices, mesh.faces, int(size), config.unwrap)
    normals = vertex_normals(mesh.vertices, mesh.faces)[layout.vertex_map]
    vertices = mesh.vertices[layout.vertex_map]
    lap("unwrap")

    # 2. Texel centres → surface points and normals.
    face_index, bary = rasterize_uv(layout.uvs, layout.faces, int(size))
    texels = np.flatnonzero(face_index.reshape(-1) >= 0)
    corners = layout.faces[face_index.reshape(-1)[texels]]
    weights = bary.reshape(-1, 3)[texels].astype(np.float64)
    points = np.einsum("tk,tkc->tc", weights, vertices[corners].astype(np.float64))
    texel_normals = np.einsum("tk,tkc->tc", weights, normals[corners].astype(np.float64))
    texel_normals /= np.maximum(np.linalg.norm(texel_normals, axis=1, keepdims=True), 1e-12)
    lap("rasterize")

    # 3. Weighted mean over the views that see each texel.
    diagonal = float(np.linalg.norm(mesh.vertices.max(axis=0) - mesh.vertices.min(axis=0)))
    colour_sum = np.zeros((texels.shape[0], 3))
    weight_sum = np.zeros(texels.shape[0])
    samples = np.zeros(len(views.ids), dtype=np.int64)
    for v in range(len(views.ids)):
        index, colour, weight = view_samples(mesh, points, texel_normals, views.images[v], views.intrinsics[v],
                                              views.w2c[v], config, config.depth_tolerance * diagonal)
        colour_sum[index] += weight[:, None] * colour
        weight_sum[index] += weight
        samples[v] = index.shape[0]
    lap("views")

    # 4. Fill the texels no view sees, the chart borders and the gutters.
    seen_texels = weight_sum > 0
    texture = np.zeros((int(size) * int(size), 3), dtype=np.float32)
    texture[texels[seen_texels]] = colour_sum[seen_texels] / weight_sum[seen_texels, None]
    seen = np.zeros(int(size) * int(size), dtype=bool)
    seen[texels[seen_texels]] = True
    seen = seen.reshape(int(size), int(size))
    fallback = None if mesh.colors is None else mesh.colors.mean(axis=0)
    filled = fill_unseen(texture.reshape(int(size), int(size), 3), seen, config.dilation_iterations, fallback)
    lap("fill")
    timings["total"] = time.perf_counter() - start

    report = BakeReport(seen=seen, charted=face_index >= 0, view_ids=views.ids, samples_per_view=samples,
                        timings=timings)
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
        points, normals: [T, 3] texel surface points and unit normals.
        image: [H, W, 3] uint8; intrinsics: [3, 3]; w2c: [4, 4] OpenCV.
        config: bake settings; tolerance: absolute depth slack in world units.

    Returns:
        index: [N] texels the view contributes to; colour: [N, 3] float64 bilinear sRGB samples (0–255);
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
    # The pixel centre may lie up to √2/2 px from the texel's projection; on a surface tilted by θ the depth changes
    # by (z/f)·tan θ per pixel there.
    tangent = np.sqrt(np.maximum(1.0 - cosine**2, 0.0)) / cosine
    slack = tolerance + 0.75 * z / intrinsics[0, 0] * tangent
    edge_weight = np.clip((_edge_distance(depth, config.edge_depth_jump)[row, column] - config.edge_margin)
                          / config.edge_ramp, 0.0, 1.0)
    weight = cosine**config.cosine_power * edge_weight
    keep = (np.abs(z - depth[row, column]) <= slack) & (weight > 0)
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


def fill_unseen(
    texture: np.ndarray, known: np.ndarray, iterations: int, fallback: np.ndarray | None = None
) -> np.ndarray:
    """Fill unknown texels: iterative one-texel dilation (each round, an unknown texel with known 8-neighbours takes
    their mean), then the mean known colour for whatever is left (``fallback``, else mid grey, if nothing is known).

    Dilation carries chart colours across their borders into the gutters, so bilinear filtering and mip-mapping at a
    seam read the chart's own colour rather than black.

    Args:
        texture: [S, S, 3] float colours (values at unknown texels are ignored).
        known: [S, S] bool.
        iterations: dilation rounds (each grows the known region by one texel).
        fallback: [3] colour used when no texel is known.

    Returns:
        [S, S, 3] uint8 sRGB.
    """
    import cv2  # OpenCV's box filter is ~10× faster than the numpy shifts at 1024²

    colour = np.where(known[..., None], texture, 0.0).astype(np.float32)
    mask = known.astype(np.float32)
    for _ in range(iterations):
        if mask.all():
            break
        total = cv2.boxFilter(colour, -1, (3, 3), normalize=False, borderType=cv2.BORDER_CONSTANT)
        count = cv2.boxFilter(mask, -1, (3, 3), normalize=False, borderType=cv2.BORDER_CONSTANT)
        grow = (mask == 0) & (count > 0)
        if not grow.any():
            break
        colour[grow] = total[grow] / count[grow, None]
        mask[grow] = 1.0
    if not mask.all():
        if mask.any():
            rest = colour[mask > 0].mean(axis=0)
        else:
            rest = np.full(3, 128.0) if fallback is None else np.asarray(fallback, dtype=np.float32)
        colour[mask == 0] = rest
    return np.clip(np.rint(colour), 0, 255).astype(np.uint8)
