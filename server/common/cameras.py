"""Camera conventions of One-2-3-45: the one module that owns them (spec §3, §5.1, §5.4).

Three frames appear in the pipeline:

* **pose.json world** — z-up, object at the origin, cameras on a sphere of radius :data:`RADIUS`, the input image at
  azimuth :data:`INPUT_AZIMUTH`. ``pose.json`` stores OpenGL-style camera-to-world matrices (x right, y up, looking
  along −z), built by :func:`calc_pose`.
* **reference frame** — the OpenCV camera frame of stage-1 view ``0.png`` (x right, y down, looking along +z).
* **normalised frame** — the reference frame shifted and scaled so that the union of the source-view frustums fits in
  [−1, 1]³; the reconstruction network's volume and marching cubes live here (:func:`normalise_cameras`).

Everything here is numpy float64; the network code does its own torch math on the arrays this module produces.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from server.common.errors import BadInputError
from server.common.fsutil import write_text_atomic

RADIUS: float = 1.2
"""Distance of every camera from the object origin in the pose.json world (spec §3.2)."""

FOCAL: float = 280.0
"""Focal length in pixels for an :data:`IMAGE_SIZE` image (560/2: FOV 49.13°, the FOV of Zero123's renders)."""

IMAGE_SIZE: int = 256
"""Side in pixels of every generated view and of the images the intrinsics describe."""

NEAR_FAR: tuple[float, float] = (0.5, 1.8)
"""Depth range written to pose.json (1.2 − 0.7, 1.2 + 0.6); it bounds the frustums of the scene normalisation."""

INPUT_AZIMUTH: float = 30.0
"""Azimuth in degrees at which the input image is assumed to have been taken (spec §3.1)."""

POLAR_BRANCH_THRESHOLD: float = 75
"""Polar angle (degrees) up to which stage 1b renders views 4–7 (30° lower); above it, views 8–11 (30° higher)."""

STAGE1_DELTAS: tuple[tuple[float, float], ...] = (
    (0.0, 0.0),
    (0.0, 90.0),
    (0.0, 180.0),
    (0.0, 270.0),
    (30.0, 30.0),
    (30.0, 120.0),
    (30.0, 210.0),
    (30.0, 300.0),
    (-30.0, 30.0),
    (-30.0, 120.0),
    (-30.0, 210.0),
    (-30.0, 300.0),
)
"""(Δpolar, Δazimuth) in degrees of stage-1 view ``i`` relative to the input image, for i = 0..11 (spec §2.5)."""

NEARBY_DELTAS: tuple[tuple[float, float], ...] = ((-10.0, 0.0), (10.0, 0.0), (0.0, -10.0), (0.0, 10.0))
"""(Δpolar, Δazimuth) in degrees of nearby view ``i_j`` relative to stage-1 view ``i``, for j = 0..3 (spec §2.5)."""

OPENGL_TO_OPENCV: np.ndarray = np.diag([1.0, -1.0, -1.0, 1.0])
"""Right-multiplying an OpenGL c2w by this flips the camera's y and z axes, giving the OpenCV c2w."""

_RIGID_TOLERANCE = 1e-4
"""How far RᵀR may be from I in a pose file: float32 round-trips (the reference writes float32 values) stay ~1e-7."""


# ---------------------------------------------------------------------------------------------------------------------
# Poses and view ids
# ---------------------------------------------------------------------------------------------------------------------


def calc_pose(polar_deg: float | np.ndarray, azimuth_deg: float | np.ndarray, radius: float = RADIUS) -> np.ndarray:
    """OpenGL-style camera-to-world matrix looking at the origin (spec §3.2).

    Camera centre c = r·(sin a·sin φ, −cos a·sin φ, cos φ); columns are x = normalise(ẑ × f), y = normalise(f × x),
    z = f = c/|c| (pointing from the object to the camera), then c.

    At an exact pole (ẑ × f = 0) the x axis falls back to (0, 1, 0) like the reference's ``calc_pose``. The reference
    tests the *sum* over its whole batch against 0.01, so in practice the fallback only fires for exact poles; here it
    is applied per pose and only when the cross product is numerically zero.

    Args:
        polar_deg: polar angle(s) in degrees from +z (0 = top view, 90 = horizon); any shape, broadcast with azimuth.
        azimuth_deg: azimuth(s) in degrees, counter-clockwise about +z seen from above; 0 puts the camera on −y.
        radius: distance of the camera centre from the origin.

    Returns:
        [..., 4, 4] float64 c2w (a single pose gives [4, 4]).
    """
    polar = np.radians(np.asarray(polar_deg, dtype=np.float64))
    azimuth = np.radians(np.asarray(azimuth_deg, dtype=np.float64))
    polar, azimuth = np.broadcast_arrays(polar, azimuth)
    centre = radius * np.stack(
        [np.sin(azimuth) * np.sin(polar), -np.cos(azimuth) * np.sin(polar), np.cos(polar)], axis=-1
    )
    forward = centre / np.linalg.norm(centre, axis=-1, keepdims=True)
    right = np.cross(np.array([0.0, 0.0, 1.0]), forward)
    right_norm = np.linalg.norm(right, axis=-1, keepdims=True)
    degenerate = right_norm < 1e-12
    right = np.where(degenerate, np.array([0.0, 1.0, 0.0]), right / np.where(degenerate, 1.0, right_norm))
    up = np.cross(forward, right)
    up = up / np.linalg.norm(up, axis=-1, keepdims=True)
    c2w = np.zeros((*centre.shape[:-1], 4, 4))
    c2w[..., :3, 0] = right
    c2w[..., :3, 1] = up
    c2w[..., :3, 2] = forward
    c2w[..., :3, 3] = centre
    c2w[..., 3, 3] = 1.0
    return c2w


def opengl_to_opencv(c2w: np.ndarray) -> np.ndarray:
    """OpenGL c2w (y up, looking along −z) → OpenCV c2w (y down, looking along +z).

    Args:
        c2w: [..., 4, 4] OpenGL camera-to-world.

    Returns:
        [..., 4, 4] ``c2w @ diag(1, −1, −1, 1)``.
    """
    return np.asarray(c2w, dtype=np.float64) @ OPENGL_TO_OPENCV


def _check_polar(polar: float) -> float:
    value = float(polar)
    if not math.isfinite(value) or not 0.0 <= value <= 180.0:
        raise BadInputError(f"polar angle {polar!r} is not usable: it must be a finite number of degrees in [0, 180]")
    return value


def stage1_indices(polar: float) -> list[int]:
    """Indices of the 8 stage-1 views generated for an input at this polar angle (spec §1.3 step 6).

    Args:
        polar: estimated polar angle of the input view in degrees.

    Returns:
        [0..7] when polar ≤ :data:`POLAR_BRANCH_THRESHOLD`, else [0, 1, 2, 3, 8, 9, 10, 11].
    """
    if _check_polar(polar) <= POLAR_BRANCH_THRESHOLD:
        return list(range(8))
    return [0, 1, 2, 3, 8, 9, 10, 11]


def stage1_view_ids(polar: float) -> list[str]:
    """Image ids of the 8 stage-1 views (``"0.png"`` …) in pose.json order."""
    return [f"{i}.png" for i in stage1_indices(polar)]


def nearby_view_ids(polar: float) -> list[str]:
    """Image ids ``"<i>_<j>.png"`` of the 32 nearby (stage-2) views, i-major then j-minor: reconstruction sources."""
    return [f"{i}_{j}.png" for i in stage1_indices(polar) for j in range(len(NEARBY_DELTAS))]


def view_angles(polar: float) -> dict[str, tuple[float, float]]:
    """Absolute (polar, azimuth) in degrees of every view id in pose.json order (spec §3.1).

    Azimuths are not wrapped to [0, 360) (e.g. ``"7_3.png"`` has 340), exactly as the reference computes them.

    Args:
        polar: estimated polar angle of the input view in degrees.

    Returns:
        Ordered dict: the 8 stage-1 ids, then the 32 nearby ids → (polar, azimuth).
    """
    indices = stage1_indices(polar)
    base = {i: (polar + STAGE1_DELTAS[i][0], INPUT_AZIMUTH + STAGE1_DELTAS[i][1]) for i in indices}
    angles: dict[str, tuple[float, float]] = {f"{i}.png": base[i] for i in indices}
    for i in indices:
        for j, (d_polar, d_azimuth) in enumerate(NEARBY_DELTAS):
            angles[f"{i}_{j}.png"] = (base[i][0] + d_polar, base[i][1] + d_azimuth)
    return angles


def default_intrinsics() -> np.ndarray:
    """[3, 3] pinhole intrinsics of pose.json: focal :data:`FOCAL`, principal point at the image centre (128, 128)."""
    half = IMAGE_SIZE / 2
    return np.array([[FOCAL, 0.0, half], [0.0, FOCAL, half], [0.0, 0.0, 1.0]])


# ---------------------------------------------------------------------------------------------------------------------
# pose.json
# ---------------------------------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _as_matrix(value: Any, shape: tuple[int, int], name: str) -> np.ndarray:
    """A nested list / array as a finite float64 matrix of exactly ``shape``, else BadInputError naming ``name``."""
    expected = "×".join(map(str, shape))
    if isinstance(value, np.ndarray):
        if not (np.issubdtype(value.dtype, np.integer) or np.issubdtype(value.dtype, np.floating)):
            raise BadInputError(f"{name} must be a {expected} matrix of numbers, got an array of dtype {value.dtype}")
        matrix = value.astype(np.float64)
    else:
        rows_ok = isinstance(value, (list, tuple)) and all(
            isinstance(row, (list, tuple)) and all(_is_number(x) for x in row) for row in value
        )
        if not rows_ok:
            raise BadInputError(f"{name} must be a {expected} matrix (a list of rows of numbers), got {value!r:.80}")
        if len({len(row) for row in value}) > 1:
            raise BadInputError(f"{name} must be a {expected} matrix, got rows of lengths {[len(r) for r in value]}")
        matrix = np.array(value, dtype=np.float64)
    if matrix.shape != shape:
        raise BadInputError(f"{name} must be a {expected} matrix, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise BadInputError(f"{name} contains non-finite values (NaN or infinity): {matrix.tolist()}")
    return matrix


def _check_intrinsics(value: Any) -> np.ndarray:
    k = _as_matrix(value, (3, 3), "intrinsics")
    if not (k[0, 0] > 0 and k[1, 1] > 0) or not np.allclose(k[2], [0.0, 0.0, 1.0]) or k[1, 0] != 0:
        raise BadInputError(
            f"intrinsics {k.tolist()} is not a pinhole camera matrix: it must have positive focal lengths at [0][0] "
            "and [1][1], a zero at [1][0] and a last row [0, 0, 1]"
        )
    return k


def _check_near_far(value: Any) -> tuple[float, float]:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(x) for x in value)):
        raise BadInputError(f"near_far must be a list of two numbers [near, far], got {value!r:.80}")
    near, far = float(value[0]), float(value[1])
    if not (math.isfinite(near) and math.isfinite(far) and 0.0 < near < far):
        raise BadInputError(f"near_far {[near, far]} is not usable: it must satisfy 0 < near < far (finite)")
    return near, far


def _check_c2w(value: Any, view_id: str) -> np.ndarray:
    name = f"c2ws[{view_id!r}]"
    c2w = _as_matrix(value, (4, 4), name)
    rotation = c2w[:3, :3]
    orthonormal_error = float(np.abs(rotation.T @ rotation - np.eye(3)).max())
    if (
        not np.allclose(c2w[3], [0.0, 0.0, 0.0, 1.0], atol=_RIGID_TOLERANCE)
        or orthonormal_error > _RIGID_TOLERANCE
        or np.linalg.det(rotation) < 0
    ):
        raise BadInputError(
            f"{name} is not a rigid transform (rotation + translation): its 3×3 block must be a rotation "
            f"(RᵀR = I within {_RIGID_TOLERANCE}, got max error {orthonormal_error:.2g}; det +1, got "
            f"{np.linalg.det(rotation):.4g}) and its last row [0, 0, 0, 1] (got {c2w[3].tolist()})"
        )
    return c2w


@dataclass
class PoseFile:
    """The contents of ``pose.json``: shared intrinsics, shared depth range and one OpenGL c2w per image id.

    Construction validates and converts every field (float64 arrays), raising :class:`BadInputError` on bad values.
    """

    intrinsics: np.ndarray
    """[3, 3] pinhole intrinsics in pixels for :data:`IMAGE_SIZE` images, shared by all views."""
    near_far: tuple[float, float]
    """(near, far) depth range in pose.json world units, shared by all views."""
    c2ws: dict[str, np.ndarray] = field(default_factory=dict)
    """Image id (``"0.png"``, ``"0_0.png"`` …) → [4, 4] OpenGL camera-to-world, in file order."""

    def __post_init__(self) -> None:
        self.intrinsics = _check_intrinsics(self.intrinsics)
        self.near_far = _check_near_far(self.near_far)
        if not isinstance(self.c2ws, Mapping) or not self.c2ws:
            raise BadInputError(f"c2ws must be a non-empty mapping of image id → 4×4 matrix, got {self.c2ws!r:.80}")
        for view_id in self.c2ws:
            if not isinstance(view_id, str) or not view_id:
                raise BadInputError(f"c2ws keys must be non-empty image ids such as '0_0.png', got {view_id!r}")
        self.c2ws = {view_id: _check_c2w(value, view_id) for view_id, value in self.c2ws.items()}

    @classmethod
    def for_polar(cls, polar: float) -> PoseFile:
        """The poses the reference's ``gen_poses`` writes for an input at this polar angle (spec §3.3).

        Args:
            polar: estimated polar angle of the input view in degrees, in [0, 180].

        Returns:
            PoseFile with the default intrinsics, :data:`NEAR_FAR`, and c2ws for the 8 stage-1 ids then the 32 nearby
            ids (i-major, j-minor).
        """
        angles = view_angles(polar)
        poses = calc_pose(np.array([a[0] for a in angles.values()]), np.array([a[1] for a in angles.values()]))
        return cls(default_intrinsics(), NEAR_FAR, dict(zip(angles, poses, strict=True)))

    @property
    def view_ids(self) -> list[str]:
        """Image ids in file order."""
        return list(self.c2ws)

    def require(self, ids: Iterable[str]) -> PoseFile:
        """Check that every id in ``ids`` has a pose; returns ``self`` so calls chain.

        Raises:
            BadInputError: naming the missing ids.
        """
        missing = [view_id for view_id in ids if view_id not in self.c2ws]
        if missing:
            raise BadInputError(
                f"pose data has no camera for {len(missing)} required image id(s): {', '.join(missing)} "
                f"(it has {len(self.c2ws)}: {', '.join(list(self.c2ws)[:8])}{' …' if len(self.c2ws) > 8 else ''})"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict in the reference's layout: ``intrinsics``, ``near_far``, ``c2ws`` (nested lists)."""
        return {
            "intrinsics": self.intrinsics.tolist(),
            "near_far": [float(self.near_far[0]), float(self.near_far[1])],
            "c2ws": {view_id: c2w.tolist() for view_id, c2w in self.c2ws.items()},
        }

    @classmethod
    def from_dict(cls, data: Any) -> PoseFile:
        """Build from a parsed pose.json object, validating keys and values (raises :class:`BadInputError`)."""
        if not isinstance(data, dict):
            raise BadInputError(
                f"pose data must be a JSON object with keys intrinsics, near_far, c2ws; got {data!r:.60}"
            )
        missing = [key for key in ("intrinsics", "near_far", "c2ws") if key not in data]
        if missing:
            raise BadInputError(
                f"pose data lacks the key(s) {', '.join(missing)}; required: intrinsics, near_far, c2ws "
                f"(found: {', '.join(map(str, data)) or 'none'})"
            )
        if not isinstance(data["c2ws"], dict):
            raise BadInputError(f"c2ws must be a JSON object mapping image id → 4×4 matrix, got {data['c2ws']!r:.80}")
        return cls(data["intrinsics"], data["near_far"], data["c2ws"])

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write pose.json atomically (temporary file in the same folder, then ``os.replace``).

        The layout is the reference's: ``json.dump(..., indent=4)`` of intrinsics, near_far, c2ws in that order.

        Returns:
            The path written.
        """
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        return write_text_atomic(target, json.dumps(self.to_dict(), indent=4))  # mode 0666 less the umask

    @classmethod
    def read(cls, path: str | os.PathLike[str], require: Iterable[str] | None = None) -> PoseFile:
        """Read and validate a pose.json file.

        Args:
            path: the file.
            require: image ids that must have a pose (see :meth:`require`).

        Raises:
            BadInputError: the file is missing or not JSON, a key is missing, a matrix has the wrong shape or
                non-finite values, a c2w is not rigid, or a required id is absent; the message names the file.
        """
        source = Path(path)
        try:
            text = source.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise BadInputError(f"pose file {source} does not exist") from None
        except (OSError, UnicodeDecodeError) as err:
            raise BadInputError(f"pose file {source} cannot be read as UTF-8 text: {err}") from None
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as err:  # JSONDecodeError, a 4300+ digit integer, absurd nesting
            why = str(err)[:200] or "nested too deeply"
            raise BadInputError(f"pose file {source} is not JSON: {why}") from None
        try:
            pose_file = cls.from_dict(data)
            if require is not None:
                pose_file.require(require)
        except BadInputError as err:
            raise BadInputError(f"pose file {source}: {err.message}", fix=err.fix) from None
        return pose_file


# ---------------------------------------------------------------------------------------------------------------------
# Reconstruction frames
# ---------------------------------------------------------------------------------------------------------------------


def _pad4(k: np.ndarray) -> np.ndarray:
    """[..., 3, 3] intrinsics → [..., 4, 4] with a 1 at [3, 3]."""
    out = np.zeros((*k.shape[:-2], 4, 4))
    out[..., :3, :3] = k
    out[..., 3, 3] = 1.0
    return out


def _frustum_corners(
    k: np.ndarray, c2w: np.ndarray, near: float, far: float, image_size: tuple[int, int]
) -> np.ndarray:
    """[8, 3] image corners (0,0), (W,0), (0,H), (W,H) back-projected to z-depths near and far, in c2w's world."""
    height, width = image_size
    u = np.array([0.0, width, 0.0, width] * 2)
    v = np.array([0.0, 0.0, height, height] * 2)
    z = np.array([near] * 4 + [far] * 4)
    camera = np.stack([(u - k[0, 2]) * z / k[0, 0], (v - k[1, 2]) * z / k[1, 1], z], axis=-1)
    return camera @ c2w[:3, :3].T + c2w[:3, 3]


def _w2c_from(rotation_c2w: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """[..., 4, 4] world-to-camera from [..., 3, 3] camera-to-world rotations and [..., 3] camera centres."""
    w2c = np.zeros((*centre.shape[:-1], 4, 4))
    rotation = np.swapaxes(rotation_c2w, -1, -2)
    w2c[..., :3, :3] = rotation
    w2c[..., :3, 3] = -np.einsum("...ij,...j->...i", rotation, centre)
    w2c[..., 3, 3] = 1.0
    return w2c


@dataclass(frozen=True, eq=False)
class ReconstructionCameras:
    """Source cameras in the normalised frame of the reconstruction network, and the maps back to pose.json world.

    Frames: pose.json world --(inverse of ``ref_c2w``)--> reference frame --(minus centre, divided by s)--> normalised.
    All matrices are OpenCV-style (x right, y down, looking along +z).
    """

    view_ids: tuple[str, ...]
    """The V source image ids, in the order of the arrays below."""
    ref_c2w: np.ndarray
    """[4, 4] OpenCV c2w of the reference view: maps reference-frame points to pose.json world."""
    scale_mat: np.ndarray
    """[4, 4] [[s, 0, 0, cx], [0, s, 0, cy], [0, 0, s, cz], [0, 0, 0, 1]]: normalised → reference frame."""
    intrinsics: np.ndarray
    """[V, 3, 3] pixel intrinsics (unchanged by the normalisation)."""
    w2c: np.ndarray
    """[V, 4, 4] normalised world-to-camera."""
    c2w: np.ndarray
    """[V, 4, 4] normalised camera-to-world."""
    proj: np.ndarray
    """[V, 4, 4] K·w2c (K padded to 4×4): normalised point → (u·z, v·z, z, 1) in pixels, z in normalised units."""
    centres: np.ndarray
    """[V, 3] camera centres in the normalised frame."""
    near_far: np.ndarray
    """[V, 2] per-view [0.95·(d − 1), 1.05·(d + 1)], d = normalised camera distance. Reproduced as the reference
    computes it: with d < 1 (typical: 0.85–0.95) near is negative, so a renderer must clamp it; mesh export ignores
    it."""
    image_size: tuple[int, int]
    """(height, width) in pixels of the images the intrinsics describe."""

    @property
    def scale(self) -> float:
        """s: half the side of the normalised cube in reference-frame units."""
        return float(self.scale_mat[0, 0])

    @property
    def centre(self) -> np.ndarray:
        """[3] centre of the frustum bounding box in the reference frame (maps to the normalised origin)."""
        return self.scale_mat[:3, 3].copy()

    def to_world(self, points: np.ndarray) -> np.ndarray:
        """Normalised frame → pose.json world (spec §3.5: v ← s·v + centre, then ref_c2w).

        Args:
            points: [N, 3] in the normalised frame.

        Returns:
            [N, 3] float64 in the pose.json world frame.
        """
        reference = np.asarray(points, dtype=np.float64) * self.scale + self.scale_mat[:3, 3]
        return reference @ self.ref_c2w[:3, :3].T + self.ref_c2w[:3, 3]

    def to_normalised(self, points: np.ndarray) -> np.ndarray:
        """Pose.json world → normalised frame (inverse of :meth:`to_world`).

        Args:
            points: [N, 3] in the pose.json world frame.

        Returns:
            [N, 3] float64 in the normalised frame.
        """
        reference = (np.asarray(points, dtype=np.float64) - self.ref_c2w[:3, 3]) @ self.ref_c2w[:3, :3]
        return (reference - self.scale_mat[:3, 3]) / self.scale

    def normalised_w2c(self, c2w_opengl: np.ndarray) -> np.ndarray:
        """Normalised OpenCV world-to-camera of any pose.json camera (e.g. a query view that is not a source).

        Args:
            c2w_opengl: [..., 4, 4] OpenGL c2w in the pose.json world (as stored in pose.json).

        Returns:
            [..., 4, 4] normalised w2c: same rotation as in the reference frame, centre (C − centre)/s.
        """
        c2w_ref_frame = np.linalg.inv(self.ref_c2w) @ opengl_to_opencv(c2w_opengl)
        centres = (c2w_ref_frame[..., :3, 3] - self.scale_mat[:3, 3]) / self.scale
        return _w2c_from(c2w_ref_frame[..., :3, :3], centres)


def normalise_cameras(
    pose_file: PoseFile,
    source_ids: Sequence[str],
    ref_id: str = "0.png",
    image_size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE),
) -> ReconstructionCameras:
    """Express the source cameras in the reconstruction's normalised frame (spec §3.4).

    1. c2w_cv = c2w_gl · diag(1, −1, −1, 1); every w2c becomes w2c_i · c2w_ref (reference camera = identity).
    2. Frustum union of the reference and all source cameras: image corners (0,0), (W,0), (0,H), (W,H) back-projected
       to **z-depths** (not ray lengths) near and far → axis-aligned bbox; centre = bbox centre,
       s = 1.1 × half the largest side. Near is the file's; far is always 1.8 because the reference dataset overrides
       ``near_far[1] = 1.8`` after reading pose.json.
    3. Normalised cameras = decomposition of K·w2c·S: same rotations, camera centre (C − centre)/s, same K.

    The z-depth reading reproduces the reference's numbers (s = 1.4205, 1.3413, 1.3943, 1.3413, 1.4205 at polar 60, 75,
    90, 105, 120 with the 32 nearby ids; centre (0, 0.0016, 1.2513) at polar 75); ray-length depth would give
    s ≈ 1.03–1.12. Including the reference camera or not does not change the bbox for these layouts (its frustum lies
    inside the union of its four nearby views'), but it is included as in the reference.

    The intrinsics are used unchanged: ``image_size`` must be the size of the images they describe (256×256 for
    pose.json), as in the reference, which fixes ``img_wh = (256, 256)``.

    Args:
        pose_file: poses in the pose.json world.
        source_ids: the V source image ids (normally :func:`nearby_view_ids`).
        ref_id: the id whose camera defines the reference frame.
        image_size: (height, width) of the images.

    Returns:
        ReconstructionCameras for the source ids, in the given order.
    """
    source_ids = list(source_ids)
    if not source_ids:
        raise BadInputError("normalise_cameras needs at least one source image id, got none")
    height, width = (int(image_size[0]), int(image_size[1]))
    if height <= 0 or width <= 0:
        raise BadInputError(f"image_size {tuple(image_size)} is not usable: height and width must be positive")
    pose_file.require([ref_id, *source_ids])
    near, far = pose_file.near_far[0], NEAR_FAR[1]
    k = pose_file.intrinsics

    ref_c2w = opengl_to_opencv(pose_file.c2ws[ref_id])
    ref_w2c = np.linalg.inv(ref_c2w)
    # Cameras in the reference frame (OpenCV c2w): ref_w2c · c2w_i.
    frame_c2ws = ref_w2c @ opengl_to_opencv(np.stack([pose_file.c2ws[i] for i in source_ids]))
    frustum_cameras = [np.eye(4), *frame_c2ws]
    corners = np.concatenate([_frustum_corners(k, c2w, near, far, (height, width)) for c2w in frustum_cameras])
    low, high = corners.min(axis=0), corners.max(axis=0)
    centre = (low + high) / 2
    scale = 1.1 * float((high - low).max()) / 2
    scale_mat = np.diag([scale, scale, scale, 1.0])
    scale_mat[:3, 3] = centre

    centres = (frame_c2ws[:, :3, 3] - centre) / scale
    w2c = _w2c_from(frame_c2ws[:, :3, :3], centres)
    c2w = np.linalg.inv(w2c)
    intrinsics = np.repeat(k[None], len(source_ids), axis=0)
    distance = np.linalg.norm(centres, axis=-1)
    near_far = np.stack([0.95 * (distance - 1.0), 1.05 * (distance + 1.0)], axis=-1)
    return ReconstructionCameras(
        view_ids=tuple(source_ids),
        ref_c2w=ref_c2w,
        scale_mat=scale_mat,
        intrinsics=intrinsics,
        w2c=w2c,
        c2w=c2w,
        proj=_pad4(intrinsics) @ w2c,
        centres=centres,
        near_far=near_far,
        image_size=(height, width),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Projection
# ---------------------------------------------------------------------------------------------------------------------


def project(proj: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project points with K·w2c matrices as the cost volume does (spec §5.4 step 2).

    u = x/z, v = y/z with the divisor clamped to ≥ 1e-6 when z ≥ 0 (points behind the camera keep their negative z,
    so callers must test ``z > 0``).

    Args:
        proj: [V, 4, 4] (or [4, 4]) projection matrices, pixel units.
        points: [N, 3] points in the frame the matrices expect.

    Returns:
        uv: [V, N, 2] pixel coordinates ([N, 2] for a single matrix); z: [V, N] depths ([N]).
    """
    matrices = np.asarray(proj, dtype=np.float64)
    single = matrices.ndim == 2
    if single:
        matrices = matrices[None]
    points = np.asarray(points, dtype=np.float64)
    homogeneous = np.concatenate([points, np.ones((len(points), 1))], axis=-1)
    projected = np.einsum("vij,nj->vni", matrices[:, :3, :], homogeneous)
    z = projected[..., 2]
    divisor = np.where(z >= 0, np.maximum(z, 1e-6), z)
    uv = projected[..., :2] / divisor[..., None]
    return (uv[0], z[0]) if single else (uv, z)


def pixel_to_grid(uv: np.ndarray, size: int | tuple[int, int] = IMAGE_SIZE) -> np.ndarray:
    """Pixel coordinates → ``grid_sample`` coordinates with align_corners=True: 2u/(W − 1) − 1, 2v/(H − 1) − 1.

    This is the reference's convention (spec §5.4): it treats pixel index j as sitting at u = j, whereas the
    intrinsics (principal point W/2) put pixel j's centre at u = j + 0.5 — a half-pixel shift kept for fidelity.

    Args:
        uv: [..., 2] pixel coordinates (u along the width, v along the height).
        size: image side, or (height, width).

    Returns:
        [..., 2] coordinates in [−1, 1] for points inside the image.
    """
    height, width = (size, size) if isinstance(size, int) else size
    uv = np.asarray(uv, dtype=np.float64)
    return np.stack([2.0 * uv[..., 0] / (width - 1) - 1.0, 2.0 * uv[..., 1] / (height - 1) - 1.0], axis=-1)
