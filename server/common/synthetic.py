"""Deterministic synthetic views of an analytic object, for tests and demos that must run without model weights.

The object lives in the pose.json world frame (z-up, origin at the object, see :mod:`server.common.cameras`) and is
rendered
by exact numpy ray casting with the cameras of a :class:`~server.common.cameras.PoseFile`: OpenGL c2w, pixel
intrinsics, rays
through pixel centres (pixel (row i, column j) is the ray through u = j + 0.5, v = i + 0.5, the convention of Blender
renders with the principal point at the image centre). Colours are flat per region (each box face and each octant of
the sphere its own colour) with Lambert shading from a light fixed in the world, so a surface point has the same
colour in every view, like an ideal multi-view generator; the background is white as the reference composites on white.

:func:`write_views_dir` writes the input layout of ``one2345 reconstruct``: the 8 stage-1 images, the 32 nearby images
and pose.json in one folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from server.common.cameras import IMAGE_SIZE, PoseFile, opengl_to_opencv
from server.common.errors import BadInputError


@dataclass(frozen=True)
class _Sphere:
    centre: tuple[float, float, float]
    radius: float


@dataclass(frozen=True)
class _Box:
    centre: tuple[float, float, float]
    half_extents: tuple[float, float, float]


_SHAPES: dict[str, tuple[_Sphere | None, _Box | None]] = {
    # Asymmetric on purpose so a mirrored or rotated reconstruction does not match; fits in a ball of radius 0.45,
    # roughly what Zero123's 75 % object framing gives at camera distance 1.2.
    "toy": (_Sphere((0.08, -0.04, 0.10), 0.30), _Box((-0.06, 0.05, -0.12), (0.26, 0.16, 0.12))),
    "sphere": (_Sphere((0.0, 0.0, 0.0), 0.35), None),
}
"""Analytic objects by name: a sphere, a box, or both (union)."""

SHAPE_NAMES: tuple[str, ...] = tuple(_SHAPES)
"""The names :func:`render_views`, :func:`shape_sdf` and :func:`write_views_dir` accept."""

PALETTE: np.ndarray = np.array(
    [
        # Box faces +x, −x, +y, −y, +z, −z.
        (220, 50, 47),
        (38, 139, 210),
        (133, 153, 0),
        (211, 54, 130),
        (181, 137, 0),
        (42, 161, 152),
        # Sphere octants, index 4·[n_x > 0] + 2·[n_y > 0] + [n_z > 0].
        (240, 140, 40),
        (110, 70, 180),
        (60, 180, 75),
        (230, 190, 40),
        (0, 130, 200),
        (200, 30, 90),
        (120, 200, 220),
        (150, 90, 50),
    ],
    dtype=np.float64,
)
"""[14, 3] albedo (0–255) per region: 0–5 box faces, 6–13 sphere octants. No channel near white, so a
"all channels > 245" foreground test (spec §4) separates object from background."""

SPHERE_REGION_OFFSET = 6
"""Region id of the first sphere octant in :data:`PALETTE`."""

LIGHT_DIRECTION: np.ndarray = np.array([0.4, -0.6, 0.7]) / np.linalg.norm([0.4, -0.6, 0.7])
"""Unit direction towards the directional light, in the pose.json world (fixed, so shading is view-independent)."""

AMBIENT = 0.5
"""Shading = AMBIENT + (1 − AMBIENT)·max(n·l, 0): dark sides stay recognisably coloured."""


def _shape(shape: str) -> tuple[_Sphere | None, _Box | None]:
    if shape not in _SHAPES:
        raise BadInputError(f"unknown synthetic shape {shape!r}; allowed: {', '.join(SHAPE_NAMES)}")
    return _SHAPES[shape]


def shape_sdf(points: np.ndarray, shape: str = "toy") -> np.ndarray:
    """Signed distance to a synthetic object (positive outside), in the pose.json world frame.

    Exact for the sphere and the box; their union (min) is exact outside and a lower bound of the distance inside.

    Args:
        points: [N, 3] points in the pose.json world.
        shape: one of :data:`SHAPE_NAMES`.

    Returns:
        [N] float64 signed distances.
    """
    sphere, box = _shape(shape)
    points = np.asarray(points, dtype=np.float64)
    distance = np.full(len(points), np.inf)
    if sphere is not None:
        distance = np.minimum(distance, np.linalg.norm(points - sphere.centre, axis=-1) - sphere.radius)
    if box is not None:
        q = np.abs(points - box.centre) - box.half_extents
        box_distance = np.linalg.norm(np.maximum(q, 0.0), axis=-1) + np.minimum(q.max(axis=-1), 0.0)
        distance = np.minimum(distance, box_distance)
    return distance


def toy_sdf(points: np.ndarray) -> np.ndarray:
    """Signed distance to the ``"toy"`` object (sphere ∪ box), positive outside.

    Args:
        points: [N, 3] points in the pose.json world.

    Returns:
        [N] float64 signed distances.
    """
    return shape_sdf(points, "toy")


@dataclass(frozen=True)
class RayHits:
    """First intersections of rays with a synthetic object."""

    t: np.ndarray
    """[N] distance along the (unit) ray to the first hit; inf where the ray misses."""
    normal: np.ndarray
    """[N, 3] unit outward surface normal at the hit (zeros where the ray misses)."""
    region: np.ndarray
    """[N] int region id indexing :data:`PALETTE`; −1 where the ray misses."""

    @property
    def hit(self) -> np.ndarray:
        """[N] bool, True where the ray hits the object."""
        return self.region >= 0


def _intersect_sphere(origins: np.ndarray, directions: np.ndarray, sphere: _Sphere) -> tuple[np.ndarray, np.ndarray]:
    offset = origins - sphere.centre
    b = np.einsum("ni,ni->n", offset, directions)
    c = np.einsum("ni,ni->n", offset, offset) - sphere.radius**2
    discriminant = b * b - c
    root = np.sqrt(np.maximum(discriminant, 0.0))
    t = -b - root
    # Origins inside the sphere would need the far root; cameras are always outside, so those rays count as misses.
    t = np.where((discriminant >= 0) & (t > 0), t, np.inf)
    normal = (origins + np.where(np.isfinite(t), t, 0.0)[:, None] * directions - sphere.centre) / sphere.radius
    return t, normal


def _intersect_box(origins: np.ndarray, directions: np.ndarray, box: _Box) -> tuple[np.ndarray, np.ndarray]:
    low = np.asarray(box.centre) - box.half_extents
    high = np.asarray(box.centre) + box.half_extents
    with np.errstate(divide="ignore", invalid="ignore"):
        t_low = (low - origins) / directions
        t_high = (high - origins) / directions
    t_enter_axes = np.minimum(t_low, t_high)
    t_exit = np.maximum(t_low, t_high).min(axis=-1)
    axis = t_enter_axes.argmax(axis=-1)
    t_enter = np.take_along_axis(t_enter_axes, axis[:, None], axis=-1)[:, 0]
    t = np.where((t_enter <= t_exit) & (t_enter > 0), t_enter, np.inf)
    normal = np.zeros_like(origins)
    rows = np.arange(len(origins))
    normal[rows, axis] = -np.sign(directions[rows, axis])
    return t, normal


def _bounding_ball(sphere: _Sphere | None, box: _Box | None) -> _Sphere:
    """A ball about the origin that contains every primitive (for culling rays that cannot hit)."""
    radius = 0.0
    if sphere is not None:
        radius = max(radius, float(np.linalg.norm(sphere.centre)) + sphere.radius)
    if box is not None:
        radius = max(radius, float(np.linalg.norm(np.abs(box.centre) + np.asarray(box.half_extents))))
    return _Sphere((0.0, 0.0, 0.0), radius * 1.001)


def cast_rays(origins: np.ndarray, directions: np.ndarray, shape: str = "toy") -> RayHits:
    """Intersect rays with a synthetic object (analytic sphere and slab tests; origins must lie outside it).

    Args:
        origins: [N, 3] ray origins in the pose.json world.
        directions: [N, 3] unit ray directions.
        shape: one of :data:`SHAPE_NAMES`.

    Returns:
        The first hit of every ray.
    """
    sphere, box = _shape(shape)
    origins = np.asarray(origins, dtype=np.float64)
    directions = np.asarray(directions, dtype=np.float64)
    count = len(origins)
    t_all = np.full(count, np.inf)
    normal_all = np.zeros((count, 3))
    region_all = np.full(count, -1, dtype=np.int64)
    # Most pixels are background: intersect only the rays that reach the object's bounding ball.
    ball = _bounding_ball(sphere, box)
    reaches_ball = np.isfinite(_intersect_sphere(origins, directions, ball)[0])
    candidates = np.flatnonzero(reaches_ball | (np.linalg.norm(origins, axis=-1) < ball.radius))
    origins, directions = origins[candidates], directions[candidates]
    t = np.full(len(candidates), np.inf)
    normal = np.zeros((len(candidates), 3))
    region = np.full(len(candidates), -1, dtype=np.int64)
    if box is not None:
        t_box, n_box = _intersect_box(origins, directions, box)
        closer = t_box < t
        t = np.where(closer, t_box, t)
        normal[closer] = n_box[closer]
        axis = np.argmax(np.abs(n_box), axis=-1)
        region = np.where(closer, 2 * axis + (n_box[np.arange(len(candidates)), axis] < 0), region)
    if sphere is not None:
        t_sphere, n_sphere = _intersect_sphere(origins, directions, sphere)
        closer = t_sphere < t
        t = np.where(closer, t_sphere, t)
        normal[closer] = n_sphere[closer]
        octant = 4 * (n_sphere[:, 0] > 0) + 2 * (n_sphere[:, 1] > 0) + (n_sphere[:, 2] > 0)
        region = np.where(closer, SPHERE_REGION_OFFSET + octant, region)
    t_all[candidates], normal_all[candidates], region_all[candidates] = t, normal, region
    return RayHits(t=t_all, normal=normal_all, region=region_all)


def shade(hits: RayHits) -> np.ndarray:
    """Colour of every ray: region albedo with world-fixed Lambert shading, white where the ray misses.

    Args:
        hits: result of :func:`cast_rays` for N rays.

    Returns:
        [N, 3] float64 colours in [0, 255].
    """
    lambert = np.clip(hits.normal @ LIGHT_DIRECTION, 0.0, 1.0)
    shading = AMBIENT + (1.0 - AMBIENT) * lambert
    colour = PALETTE[np.maximum(hits.region, 0)] * shading[:, None]
    return np.where(hits.hit[:, None], colour, 255.0)


def camera_rays(c2w: np.ndarray, intrinsics: np.ndarray, size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """World-space rays through the pixel centres of one camera.

    Args:
        c2w: [4, 4] OpenGL camera-to-world (as in pose.json).
        intrinsics: [3, 3] pixel intrinsics for a ``size``×``size`` image.
        size: image side in pixels.

    Returns:
        origins: [size·size, 3] (all the camera centre); directions: [size·size, 3] unscaled, with camera-space
        z component 1 (so ``t`` along them is the z-depth), row-major over (row, column).
    """
    c2w_cv = opengl_to_opencv(c2w)
    rows, columns = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
    camera = np.stack(
        [
            (columns.ravel() - intrinsics[0, 2]) / intrinsics[0, 0],
            (rows.ravel() - intrinsics[1, 2]) / intrinsics[1, 1],
            np.ones(size * size),
        ],
        axis=-1,
    )
    directions = camera @ c2w_cv[:3, :3].T
    origins = np.broadcast_to(c2w_cv[:3, 3], directions.shape)
    return origins, directions


def render_view(
    c2w: np.ndarray, intrinsics: np.ndarray, size: int = IMAGE_SIZE, shape: str = "toy"
) -> tuple[np.ndarray, np.ndarray]:
    """Render one view of a synthetic object.

    Args:
        c2w: [4, 4] OpenGL camera-to-world in the pose.json world.
        intrinsics: [3, 3] pixel intrinsics for a ``size``×``size`` image.
        size: image side in pixels.
        shape: one of :data:`SHAPE_NAMES`.

    Returns:
        rgb: [size, size, 3] uint8 (white background); depth: [size, size] float64 z-depth along the camera's optical
        axis, inf on the background.
    """
    origins, directions = camera_rays(c2w, intrinsics, size)
    scale = np.linalg.norm(directions, axis=-1)
    hits = cast_rays(origins, directions / scale[:, None], shape)
    rgb = np.round(shade(hits)).astype(np.uint8).reshape(size, size, 3)
    depth = (hits.t / scale).reshape(size, size)
    return rgb, depth


def render_views(
    pose_file: PoseFile, ids: Iterable[str], shape: str = "toy", size: int = IMAGE_SIZE
) -> dict[str, np.ndarray]:
    """Render the synthetic object from the cameras of a pose file.

    The pose file's intrinsics describe :data:`IMAGE_SIZE` images; for another ``size`` they are scaled by
    size / IMAGE_SIZE so the field of view stays the same.

    Args:
        pose_file: cameras (OpenGL c2w in the pose.json world) and intrinsics.
        ids: image ids to render; each must be in the pose file.
        shape: one of :data:`SHAPE_NAMES`.
        size: image side in pixels.

    Returns:
        Image id → [size, size, 3] uint8 RGB, in the order of ``ids``.
    """
    ids = list(ids)
    _shape(shape)
    if int(size) != size or size < 2:
        raise BadInputError(f"image size {size!r} is not usable: it must be an integer ≥ 2")
    pose_file.require(ids)
    intrinsics = pose_file.intrinsics.copy()
    intrinsics[:2] *= size / IMAGE_SIZE
    return {view_id: render_view(pose_file.c2ws[view_id], intrinsics, int(size), shape)[0] for view_id in ids}


def write_views_dir(out_dir: str | os.PathLike[str], polar: float = 75, shape: str = "toy") -> Path:
    """Write a complete reconstruction input folder rendered from the synthetic object.

    Contents: ``0.png`` … (the 8 stage-1 ids), the 32 nearby ``<i>_<j>.png`` and ``pose.json``
    (:meth:`PoseFile.for_polar`), all 256×256 RGB.

    Args:
        out_dir: folder to create or fill.
        polar: polar angle in degrees of the (virtual) input view.
        shape: one of :data:`SHAPE_NAMES`.

    Returns:
        The folder.
    """
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    pose_file = PoseFile.for_polar(polar)
    for view_id, rgb in render_views(pose_file, pose_file.view_ids, shape).items():
        Image.fromarray(rgb).save(folder / view_id)
    pose_file.write(folder / "pose.json")
    return folder
