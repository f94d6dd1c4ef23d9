"""Cameras of the four nearby views and the reference's polar search (spec §4), kept for parity: pure numpy + OpenCV."""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy.spatial import cKDTree

from server.common.cameras import calc_pose
from server.common.errors import BadInputError
from server.stages.elevation.matchers import NUM_VIEWS, PAIRS


@dataclass(frozen=True)
class PolarSearchConfig:
    """The grid search over the input's polar angle (spec §4), with the reference's values."""

    coarse_start: int = 30
    """First polar angle of the coarse grid, degrees."""
    coarse_stop: int = 150
    """End (exclusive) of the coarse grid, degrees: arange(30, 150, 10) = 30 … 140."""
    coarse_step: int = 10
    """Coarse grid step, degrees."""
    fine_half_width: int = 10
    """The fine grid is e* − 10 … e* + 9 in 1° steps around the coarse optimum e*."""
    view_offset: float = 10.0
    """Polar/azimuth offset of the nearby views: (e−10, az), (e+10, az), (e, az−10), (e, az+10)."""
    azimuth: float = 30.0
    """Azimuth of the input view by convention (spec §3.1)."""
    radius: float = 1.2
    """Camera distance to the origin."""
    link_px: float = 1.0
    """Two matches sharing an image are linked when their keypoints there are closer than this, pixels."""


def pose_hypotheses(polar: float, config: PolarSearchConfig) -> np.ndarray:
    """OpenCV c2w of the four nearby views for a candidate polar angle.

    Returns:
        [4, 4, 4] float64, views in the order (polar −d), (polar +d), (azimuth −d), (azimuth +d).
    """
    d, az = config.view_offset, config.azimuth
    angles = [(polar - d, az), (polar + d, az), (polar, az - d), (polar, az + d)]
    poses = np.stack([calc_pose(p, a, config.radius) for p, a in angles])
    poses[:, :, 1:3] *= -1.0  # OpenGL → OpenCV: negate the camera y and z axes (the columns, not the centre)
    return poses


def _both_directions(matches: dict[tuple[int, int], np.ndarray]) -> dict[tuple[int, int], np.ndarray]:
    """Validate the six pairs and add the reverse direction of each: (j, i) = [x1, y1, x0, y0, conf]."""
    out: dict[tuple[int, int], np.ndarray] = {}
    for i, j in PAIRS:
        if (i, j) in matches:
            forward = np.asarray(matches[(i, j)], dtype=np.float64)
        elif (j, i) in matches:
            forward = np.asarray(matches[(j, i)], dtype=np.float64)[:, [2, 3, 0, 1, 4]]
        else:
            raise BadInputError(f"No matches given for image pair ({i}, {j}); all six pairs of images 0–3 are needed.")
        if forward.ndim != 2 or forward.shape[1] != 5:
            raise BadInputError(
                f"Matches of pair ({i}, {j}) must be an [M, 5] array (x0, y0, x1, y1, conf); got shape {forward.shape}."
            )
        if len(forward) == 0:
            raise BadInputError(f"Image pair ({i}, {j}) has no matches; the polar angle cannot be estimated.")
        if not np.isfinite(forward).all() or (forward[:, 4] <= 0).any():
            raise BadInputError(f"Matches of pair ({i}, {j}) must be finite with confidence > 0.")
        out[(i, j)] = forward
        out[(j, i)] = forward[:, [2, 3, 0, 1, 4]]
    return out


def _project(K: np.ndarray, c2w: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Pixel coordinates [N, 2] of world points [N, 3] in an OpenCV camera (no visibility test, as the reference)."""
    w2c = np.linalg.inv(c2w)
    cam = points @ w2c[:3, :3].T + w2c[:3, 3]
    pix = cam @ K.T
    return pix[:, :2] / pix[:, 2:3]


@dataclass(frozen=True)
class _Link:
    """Reference matches of pair (s, s+1) linked to matches of pair (s, k) through their image-s keypoints."""

    s: int
    k: int
    ref_rows: np.ndarray = field(repr=False)
    """[L] rows of the reference pair's matches that have a partner."""
    kpts_k: np.ndarray = field(repr=False)
    """[L, 2] the partner's keypoint in image k."""
    conf: np.ndarray = field(repr=False)
    """[L] the partner's confidence."""


def _links(matches: dict[tuple[int, int], np.ndarray], link_px: float) -> list[_Link]:
    """All links used by the error; they depend on keypoints only, so are computed once for every hypothesis."""
    links = []
    for s in range(NUM_VIEWS - 1):
        ref = matches[(s, (s + 1) % NUM_VIEWS)]
        for k in ((s + 2) % NUM_VIEWS, (s + 3) % NUM_VIEWS):
            other = matches[(s, k)]
            dist, nearest = cKDTree(other[:, :2]).query(ref[:, :2], k=1)
            keep = dist < link_px
            links.append(_Link(s, k, np.flatnonzero(keep), other[nearest[keep], 2:4], other[nearest[keep], 4]))
    return links


def _hypothesis_error(
    poses: np.ndarray, matches: dict[tuple[int, int], np.ndarray], links: list[_Link], K: np.ndarray
) -> float:
    """Summed confidence-weighted mean reprojection error (pixels) of one pose hypothesis (spec §4)."""
    total = 0.0
    triangulated: dict[int, np.ndarray] = {}
    for link in links:
        s = link.s
        if s not in triangulated:
            t = (s + 1) % NUM_VIEWS
            ref = matches[(s, t)]
            P0 = K @ np.linalg.inv(poses[s])[:3, :4]
            P1 = K @ np.linalg.inv(poses[t])[:3, :4]
            X = cv2.triangulatePoints(P0, P1, ref[:, 0:2].T.copy(), ref[:, 2:4].T.copy())
            triangulated[s] = (X[:3] / X[3:]).T
        if len(link.ref_rows) == 0:
            continue  # as the reference: a view with no linked match adds nothing
        reproj = _project(K, poses[link.k], triangulated[s][link.ref_rows])
        err = np.linalg.norm(link.kpts_k - reproj, axis=-1)
        total += float((err * link.conf).sum() / link.conf.sum())
    return total


def estimate_polar_from_matches(
    matches: dict[tuple[int, int], np.ndarray],
    image_size: int = 256,
    focal: float = 280.0,
    config: PolarSearchConfig | None = None,
) -> int:
    """Polar angle of the input view from the matches between its four nearby views (spec §4).

    For each candidate polar e the four views are placed at (e−10, 30), (e+10, 30), (e, 20), (e, 40); for s = 0, 1, 2
    pair (s, s+1 mod 4) is triangulated, each of its matches is linked to the match of pair (s, k), k the two other
    views, whose image-s keypoint is nearest (kept if closer than 1 px), and the 3D point is reprojected into k. The
    confidence-weighted mean pixel error per (s, k), summed, scores e. A coarse grid 30…140 (step 10) is refined on
    e* − 10 … e* + 9 (step 1).

    Args:
        matches: {(i, j): [M, 5] (x0, y0, x1, y1, conf)} for the six pairs of images 0–3; each pair in either
            direction (the other is derived by swapping the columns). Pixel frame of the module docstring.
        image_size: side of the square images, pixels (principal point at image_size / 2).
        focal: focal length in pixels (280 for 256² images: Zero123's 49.1° field of view).
        config: the search grid and camera layout; the reference's by default.

    Returns:
        The polar angle in integer degrees (90 − elevation).

    Raises:
        BadInputError: a pair is missing, empty, malformed, or has non-positive confidences.
    """
    config = config or PolarSearchConfig()
    both = _both_directions(matches)
    links = _links(both, config.link_px)
    c = image_size / 2.0
    K = np.array([[focal, 0.0, c], [0.0, focal, c], [0.0, 0.0, 1.0]])

    def best(candidates: np.ndarray) -> int:
        errors = np.array([_hypothesis_error(pose_hypotheses(e, config), both, links, K) for e in candidates])
        # Deviation from the reference only when it would fail: a non-finite error (points at infinity) never wins,
        # where torch.argmin would pick the NaN.
        errors = np.where(np.isfinite(errors), errors, np.inf)
        return int(candidates[int(np.argmin(errors))])

    coarse = best(np.arange(config.coarse_start, config.coarse_stop, config.coarse_step))
    return best(np.arange(coarse - config.fine_half_width, coarse + config.fine_half_width, 1))
