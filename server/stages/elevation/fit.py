"""The robust polar fit the product uses: every candidate polar scored by the Sampson distance of every match (and the
silhouettes' epipolar tangencies) under a truncated loss; see :mod:`server.stages.elevation` for why."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from server.common.errors import BadInputError
from server.stages.elevation.matchers import ISOTROPIC, MATCH_COLUMNS, NUM_VIEWS, PAIRS, positive_definite
from server.stages.elevation.search import PolarSearchConfig, pose_hypotheses

if TYPE_CHECKING:
    pass


@dataclass(frozen=True)
class RobustFitConfig:
    """:func:`fit_polar`'s search, loss and confidence rule, and which matches and outlines :func:`match_views`
    gives it.
    Pixel values are at 256² and scale with the image."""

    polar_min: int = 20
    """Smallest candidate polar, degrees (elevation 70, the largest a user may give)."""
    polar_max: int = 150
    """Largest candidate polar, degrees (elevation −60)."""
    truncation_px: float = 2.0
    """Residual at which the loss stops growing (MSAC): a match further off its epipolar line is an outlier, and
    costs the same under every candidate."""
    basin_deg: float = 10.0
    """Candidates within this of the minimum belong to its basin; the best candidate outside it is the runner-up."""
    agreement_deg: float = 5.0
    """A pair agrees when its own minimum lies within this of the joint one."""
    distinct_full: float = 0.4
    """Relative depth of the minimum below the runner-up ((runner-up − min) / runner-up) that counts as fully
    distinct; shallower minima lower the confidence in proportion."""
    min_inliers: int = 24
    """Fewer inlier matches (informative pairs, at the minimum) than this is never trusted; twice as many count as
    full support."""
    confident: float = 0.5
    """Confidence below which the estimate is flagged ``uncertain``."""
    stable_deg: float = 3.0
    """Leaving out any one pair may move the minimum this far at full confidence; twice as far gives none."""
    min_pair_matches: int = 8
    """A pair with fewer matches takes no part in the fit."""
    max_pair_matches: int = 1000
    """A pair with more matches is subsampled to this many (seeded, so the fit is deterministic): dense flow gives
    thousands, and beyond a few hundred they only cost time."""
    object_radius: float = 1.0
    """World radius around the origin that holds the object (the cameras sit at 1.2): a match that triangulates
    behind a camera or outside this under a candidate is an outlier for that candidate."""
    static_px: float = 0.5
    """Displacement below which a match has not moved."""
    static_share: float = 0.5
    """A pair whose matches mostly have not moved shows the same image twice (a symmetric or textureless object):
    it is left out of the fit, since identical views fit some polar angles' epipolar geometry by accident."""
    shift_px: float = 0.0
    """Prior scale of an unknown 2D shift of each view (generated views are not centred to the pixel): under each
    candidate the four shifts are fitted to its inliers (ridge-regularised least squares, so a shift of this size
    costs as much as one inlier at the truncation), and the cost is taken after them. 0 fits no shifts."""
    shift_rounds: int = 2
    """Refits of the shifts, each on the inliers under the previous ones."""
    retry_shift_px: float = 1.0
    """When the fit is uncertain, fit again on the same matches with this ``shift_px``, and use that fit if it is
    confident. Clean renders need no shifts (fitting them always costs them a little accuracy), but a generated view
    off by a pixel or so makes the plain fit doubt; 0 disables the retry."""
    contour_px: float = 4.0
    """Matches closer than this to the silhouette's edge (in either view) are dropped: there the matchers see the
    occluding contour, which slides over the surface as the view turns, not a point fixed on it. On a flat-coloured
    object dense flow finds only such matches (all within 3.6 px of the edge), each a little wrong."""
    outline_window_px: float = 4.0
    """The silhouette's edge is where a pixel is half as dark as the darkest pixel within this distance
    (:func:`half_level_mask`): the mid-level of a blurred edge, which blur does not move."""
    silhouette_weight: float = 20.0
    """Weight of each of a pair's two epipolar tangencies of the silhouettes (:func:`frontier_points`), in matches.
    They make the fit work on objects without texture; 0 fits matches alone."""


INFORMATIVE_PAIRS: tuple[tuple[int, int], ...] = tuple(p for p in PAIRS if p != (0, 1))
"""Pairs whose relative pose depends on the polar angle. Views 0 and 1 (polar ∓ 10 at one azimuth) differ by the same
20° rotation about a horizontal axis whatever the polar, so their matches say nothing about it."""


@dataclass(frozen=True)
class PolarFit:
    """Outcome of :func:`fit_polar`."""

    polar: int
    """The candidate of least total robust cost, integer degrees."""
    confidence: float
    """0–1: distinct minimum × enough inliers × pairs agreeing (see :func:`fit_polar`)."""
    uncertain: bool
    """True when the estimate should not be trusted (confidence below the threshold, or too few inliers)."""
    inliers: int
    """Matches of the informative pairs within the truncation of their epipolar line at ``polar``."""
    matches: int
    """Matches of the informative pairs that took part."""
    pair_minima: dict[tuple[int, int], int]
    """Each informative pair's own best polar."""
    curve: np.ndarray = field(repr=False)
    """[K, 2] (candidate polar, normalised cost in [0, 1]) over the whole search range."""


def _as_match_array(found: object, pair: tuple[int, int]) -> np.ndarray:
    """[M, 8] float64 (:data:`MATCH_COLUMNS`) of one pair's matches given as [M, 8] or [M, 5] (made isotropic)."""
    found = np.asarray(found, dtype=np.float64)
    if found.size == 0:
        return np.zeros((0, len(MATCH_COLUMNS)))
    if found.ndim != 2 or found.shape[1] not in (5, len(MATCH_COLUMNS)):
        raise BadInputError(f"Matches of pair {pair} must be an [M, 8] array {MATCH_COLUMNS} or [M, 5] (the first "
                            f"five); got shape {found.shape}.")
    if found.shape[1] == 5:
        found = np.concatenate([found, np.tile(ISOTROPIC, (len(found), 1))], axis=1)
    return found


def _skew(t: np.ndarray) -> np.ndarray:
    return np.array([[0.0, -t[2], t[1]], [t[2], 0.0, -t[0]], [-t[1], t[0], 0.0]])


def candidate_poses(polars: np.ndarray, config: PolarSearchConfig | None = None) -> np.ndarray:
    """[E, 4, 4, 4] OpenCV c2w of the four nearby views under each candidate polar (see :func:`pose_hypotheses`)."""
    config = config or PolarSearchConfig()
    return np.stack([pose_hypotheses(float(e), config) for e in polars])


def fundamental_matrices(poses: np.ndarray, pair: tuple[int, int], K: np.ndarray) -> np.ndarray:
    """[E, 3, 3] fundamental matrices of image pair (i, j) under each candidate's poses [E, 4, 4, 4]:
    x_jᵀ F x_i = 0."""
    i, j = pair
    K_inv = np.linalg.inv(K)
    relative = np.linalg.inv(poses[:, j]) @ poses[:, i]  # camera i → camera j
    return np.stack([K_inv.T @ _skew(r[:3, 3]) @ r[:3, :3] @ K_inv for r in relative])


def _camera_rays(poses: np.ndarray, K: np.ndarray, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centres [E, 3] and unit ray directions [E, M, 3] (world) of pixels [M, 2] of one view, poses [E, 4, 4]."""
    rays = np.concatenate([pixels, np.ones((len(pixels), 1))], axis=1) @ np.linalg.inv(K).T
    directions = np.einsum("eab,mb->ema", poses[:, :3, :3], rays)
    return poses[:, :3, 3], directions / np.linalg.norm(directions, axis=-1, keepdims=True)


def plausible_depths(poses: np.ndarray, pair: tuple[int, int], K: np.ndarray, matches: np.ndarray,
                     radius: float) -> np.ndarray:
    """[E, M] bool: the match triangulates (midpoint of the two rays) in front of both cameras and within ``radius``
    of the origin, under each candidate's poses [E, 4, 4, 4]."""
    ci, di = _camera_rays(poses[:, pair[0]], K, matches[:, 0:2])
    cj, dj = _camera_rays(poses[:, pair[1]], K, matches[:, 2:4])
    w = (ci - cj)[:, None, :]
    b = np.einsum("ema,ema->em", di, dj)
    d = np.einsum("ema,ema->em", di, w)
    e = np.einsum("ema,ema->em", dj, w)
    denominator = np.maximum(1.0 - b**2, 1e-12)  # parallel rays: the point is at infinity, never plausible
    s = (b * e - d) / denominator
    t = (e - b * d) / denominator
    point = 0.5 * (ci[:, None, :] + s[..., None] * di + cj[:, None, :] + t[..., None] * dj)
    return (s > 0) & (t > 0) & (np.linalg.norm(point, axis=-1) < radius) & (1.0 - b**2 > 1e-12)


def _epipolar_terms(F: np.ndarray, matches: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Algebraic errors x1ᵀ F x0 [E, M], the Sampson normaliser [E, M], F x0 and Fᵀ x1 [E, M, 3] of matches
    [M, ≥4] (the same under every geometry) or [E, M, ≥4] (one set per geometry) under F [E, 3, 3]. With 8 columns,
    columns 5–7 are each match's covariance (σxx, σxy, σyy), taken for both of its points."""
    m = np.broadcast_to(matches, (len(F), *matches.shape)) if matches.ndim == 2 else matches
    ones = np.ones((*m.shape[:-1], 1))
    x0 = np.concatenate([m[..., 0:2], ones], axis=-1)
    x1 = np.concatenate([m[..., 2:4], ones], axis=-1)
    Fx0 = np.einsum("eab,emb->ema", F, x0)
    Ftx1 = np.einsum("eba,emb->ema", F, x1)
    sxx, sxy, syy = (m[..., k] for k in (5, 6, 7)) if m.shape[-1] >= 8 else ISOTROPIC
    # The algebraic error's variance: its gradient in each point, (F x0)₁₂ and (Fᵀ x1)₁₂, through Σ.
    variance = sum(sxx * g[..., 0] ** 2 + 2 * sxy * g[..., 0] * g[..., 1] + syy * g[..., 1] ** 2 for g in (Fx0, Ftx1))
    return (x1 * Fx0).sum(axis=-1), np.sqrt(np.maximum(variance, 1e-300)), Fx0, Ftx1


def sampson_distances(F: np.ndarray, matches: np.ndarray) -> np.ndarray:
    """[E, M] first-order geometric distances (pixels) of M matches (x0, y0, x1, y1, …) — [M, ≥4], or [E, M, ≥4]
    with one set per geometry — to E epipolar geometries F [E, 3, 3].

    Matches of 8 columns (:data:`MATCH_COLUMNS`) carry their covariance: the distance is then measured in units of
    each match's spread across its epipolar line (a match unsure along the line's normal counts for less; with
    :data:`ISOTROPIC` it is the plain Sampson distance)."""
    algebraic, norm, _, _ = _epipolar_terms(F, matches)
    return np.abs(algebraic) / norm


# Silhouettes. Where an epipolar line touches one view's silhouette, the corresponding line touches the other's: both
# graze the object at the same surface point (a frontier point). The two outermost epipolar lines of each view are
# therefore a correspondence that needs no texture at all (epipolar tangency; Wong & Cipolla, "Structure and motion
# from silhouettes", 2001), and the fit scores them as two extra matches per pair under every candidate.


def foreground_mask(image: np.ndarray, threshold: int = 245) -> np.ndarray:
    """[H, W] bool: True unless all three channels of the [H, W, 3] uint8 image exceed ``threshold`` (white)."""
    return ~(image > threshold).all(axis=-1)


def half_level_mask(image: np.ndarray, window_px: float = 4.0) -> np.ndarray:
    """[H, W] bool: the object of an [H, W, 3] uint8 view on white, up to the mid-level of its edge.

    A blurred edge spreads the object into the background. :func:`foreground_mask`'s near-white threshold then lies
    about 1.4 σ of the blur outside the true edge (a mid-grey object), which for the degraded 64² views upsampled to
    256² is 2–7 px and different in every view. Here a foreground pixel also has to be at least half as dark
    (255 − its darkest channel) as the darkest pixel within ``window_px`` (a square window): the edge's half-way
    level, where a symmetric blur leaves it. A small window keeps a light part of the object beside a dark one.
    """
    darkness = 255.0 - image.min(axis=-1).astype(np.float32)
    side = 2 * max(1, round(window_px)) + 1
    local = cv2.dilate(darkness, np.ones((side, side), np.uint8))
    return foreground_mask(image) & (darkness > 0.5 * local)


def silhouette_outline(mask: np.ndarray, min_share: float = 0.02) -> np.ndarray:
    """Outline of the object in a foreground mask, as the fit's silhouette evidence.

    Args:
        mask: [H, W] bool foreground.
        min_share: pieces smaller than this share of the largest piece's area are specks, not the object.

    Returns:
        [N, 2] float64 boundary pixel centres (continuous frame), or [0, 2] when the mask is empty or touches the
        image border (a silhouette cut off by the frame has tangents that are not the object's).
    """
    if not mask.any() or mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any():
        return np.zeros((0, 2))
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    areas = np.array([cv2.contourArea(c) for c in contours])
    kept = [c[:, 0, :] for c, area in zip(contours, areas, strict=True) if area >= min_share * areas.max()]
    return np.concatenate(kept).astype(np.float64) + 0.5


def epipoles(poses: np.ndarray, pair: tuple[int, int], K: np.ndarray) -> np.ndarray:
    """[E, 2] pixel position in image i of camera j's centre, (i, j) = pair, under each candidate's poses
    [E, 4, 4, 4]. The nearby cameras are 10–20° apart around the object, so it lies far outside the image but at a
    finite distance."""
    i, j = pair
    w2c = np.linalg.inv(poses[:, i])
    centre = np.einsum("eab,eb->ea", w2c[:, :3, :3], poses[:, j, :3, 3]) + w2c[:, :3, 3]
    pix = centre @ K.T
    return pix[:, :2] / pix[:, 2:3]


def _tangent_points(outline: np.ndarray, epipole: np.ndarray) -> np.ndarray:
    """[E, 2, 2] the outline points [N, 2] on the two lines through each epipole [E, 2] that bound the outline."""
    rays = outline[None] - epipole[:, None]
    centre = rays.mean(axis=1)
    centre /= np.linalg.norm(centre, axis=-1, keepdims=True)
    angle = np.arctan2(centre[:, None, 0] * rays[..., 1] - centre[:, None, 1] * rays[..., 0],
                       (centre[:, None] * rays).sum(axis=-1))
    return np.stack([outline[angle.argmin(axis=1)], outline[angle.argmax(axis=1)]], axis=1)


def frontier_points(poses: np.ndarray, pair: tuple[int, int], K: np.ndarray, outline_i: np.ndarray,
                    outline_j: np.ndarray) -> np.ndarray:
    """The two epipolar tangencies of image pair (i, j) as matches, under each candidate's poses [E, 4, 4, 4].

    Returns:
        [E, 2, 5] (x_i, y_i, x_j, y_j, 1): the outline point of image i on each outermost epipolar line through its
        epipole, with the outline point of image j on the corresponding outermost line. Their Sampson distance is
        zero when the candidate's epipolar geometry is the true one.
    """
    F = fundamental_matrices(poses, pair, K)
    in_i = _tangent_points(outline_i, epipoles(poses, pair, K))
    in_j = _tangent_points(outline_j, epipoles(poses, pair[::-1], K))
    # Which of image j's two tangents corresponds to image i's first: the one nearer its epipolar line.
    line = np.einsum("eab,eb->ea", F, np.concatenate([in_i[:, 0], np.ones((len(F), 1))], axis=1))
    near = [np.abs((line[:, :2] * in_j[:, k]).sum(axis=1) + line[:, 2]) for k in range(2)]
    in_j = np.where((near[1] < near[0])[:, None, None], in_j[:, ::-1], in_j)
    return np.concatenate([in_i, in_j, np.ones((len(F), 2, 1))], axis=-1)


def _after_view_shifts(terms: dict[Any, tuple[tuple[int, int], np.ndarray, np.ndarray]], poses: np.ndarray,
                       K: np.ndarray, tau: float, prior_px: float, rounds: int) -> dict[Any, np.ndarray]:
    """Sampson residuals [E, M] per term after fitting one 2D shift per view under each candidate.

    Args:
        terms: {key: (pair, matches [M, 5 or 8] or [E, M, 5], residuals [E, M])}; a match with an infinite residual
            (implausible under that candidate) stays an outlier.

    Linearised: shifting view i by s_i and view j by s_j changes the algebraic error x_jᵀ F x_i by
    (Fᵀ x_j)₁₂·s_i + (F x_i)₁₂·s_j, so each residual is affine in the eight shift coordinates. Per candidate the
    shifts minimise Σ_inliers w·r² / τ² + |s|² / prior² (w the match's weight, its inliers: |r| < τ under the
    previous shifts), a few times.
    """
    E = len(poses)
    parts = {}
    for key, ((i, j), m, residuals) in terms.items():
        algebraic, norm, Fx0, Ftx1 = _epipolar_terms(fundamental_matrices(poses, (i, j), K), m)
        J = np.zeros((*algebraic.shape, 8))
        J[..., 2 * i:2 * i + 2] = Ftx1[..., :2] / norm[..., None]
        J[..., 2 * j:2 * j + 2] = Fx0[..., :2] / norm[..., None]
        weight = np.broadcast_to(m[..., 4], algebraic.shape)
        parts[key] = (np.where(np.isfinite(residuals), algebraic / norm, np.inf), J, weight)
    shifts = np.zeros((E, 8))
    for _ in range(rounds):
        A = np.broadcast_to(np.eye(8) * (tau / prior_px) ** 2, (E, 8, 8)).copy()
        b = np.zeros((E, 8))
        for r0, J, w in parts.values():
            r = r0 + np.einsum("emk,ek->em", J, shifts)
            inlier = (np.abs(r) < tau) * w  # inf residuals are never inliers
            r0_in = np.where(inlier > 0, r0, 0.0)
            A += np.einsum("em,emk,eml->ekl", inlier, J, J)
            b -= np.einsum("em,emk,em->ek", inlier, J, r0_in)
        shifts = np.linalg.solve(A, b[..., None])[..., 0]
    return {key: np.abs(r0 + np.einsum("emk,ek->em", J, shifts)) for key, (r0, J, _) in parts.items()}


def fit_polar(
    matches: dict[tuple[int, int], np.ndarray],
    image_size: int = 256,
    focal: float = 280.0,
    config: RobustFitConfig | None = None,
    outlines: Sequence[np.ndarray] | None = None,
) -> PolarFit:
    """The polar angle that best explains the matches, robustly, with a confidence.

    For every candidate polar e on a 1° grid the four nearby cameras are placed as in the reference's search, and
    each match m of pair p gets its Sampson distance r to the epipolar line under that pair's relative pose (in units
    of the match's own spread across the line, :func:`sampson_distances`). The pair's cost is the confidence-weighted
    mean of min(r, τ)² / τ² (τ the truncation), the candidate's cost the match-count-weighted mean over the
    informative pairs, in [0, 1]. The minimum of the whole curve wins.
    With ``outlines``, each pair's two silhouette tangencies count as two more matches of weight
    ``silhouette_weight`` (their points depend on the candidate, see :func:`frontier_points`).

    Confidence = distinct × support × agreement × stability:

    - ``distinct``: the depth of the minimum below the best candidate outside its basin, relative to that runner-up,
      over ``distinct_full`` (capped at 1); a flat curve or two basins of similar depth give little.
    - ``support``: the inlier count over twice ``min_inliers`` (capped).
    - ``agreement``: the match-weighted share of informative pairs whose own minimum lies within ``agreement_deg``;
      halved, and the fit flagged, when a cue (the matches, or the silhouettes) objects: its own minimum lies
      outside ``agreement_deg`` and the joint answer costs it over ``distinct_full / 2`` more, relatively.
    - ``stability``: falls as leaving out one pair moves the minimum by more than ``stable_deg``.

    Args:
        matches: {(i, j): [M, 8] (:data:`MATCH_COLUMNS`) or [M, 5] (x0, y0, x1, y1, conf; isotropic)} for any of
            the six pairs (either direction); pairs with fewer than ``min_pair_matches`` matches are left out.
        image_size: side of the square images, pixels.
        focal: focal length in pixels.
        config: search, loss and confidence settings.
        outlines: optional, the four views' silhouette outlines [N, 2] (:func:`silhouette_outline`); an empty one
            leaves that view's pairs to their matches.

    Raises:
        BadInputError: fewer than two informative pairs have enough matches or outlines (nothing constrains the
            polar angle).
    """
    config = config or RobustFitConfig()
    scale = image_size / 256.0
    tau = config.truncation_px * scale
    c = image_size / 2.0
    K = np.array([[focal, 0.0, c], [0.0, focal, c], [0.0, 0.0, 1.0]])
    polars = np.arange(config.polar_min, config.polar_max + 1, dtype=np.float64)
    pairs: dict[tuple[int, int], np.ndarray] = {}
    static = []
    for i, j in INFORMATIVE_PAIRS:
        found = matches.get((i, j))
        if found is None and (j, i) in matches:
            found = _as_match_array(matches[(j, i)], (j, i))[:, [2, 3, 0, 1, 4, 5, 6, 7]]
        if found is None:
            continue
        found = _as_match_array(found, (i, j))
        found = found[np.isfinite(found).all(axis=1) & (found[:, 4] > 0)]
        if not positive_definite(found[:, 5:]).all():
            raise BadInputError(f"Matches of pair {(i, j)}: the covariance (columns 5–7, σxx σxy σyy) must be positive "
                                f"definite in every row (σxx > 0, σxx·σyy > σxy²).")
        if len(found) < config.min_pair_matches:
            continue
        if len(found) > config.max_pair_matches:
            found = found[np.random.default_rng(i * 4 + j).choice(len(found), config.max_pair_matches,
                                                                  replace=False)]
        moved = np.linalg.norm(found[:, 2:4] - found[:, 0:2], axis=1) >= config.static_px * scale
        if moved.mean() < 1.0 - config.static_share:
            static.append((i, j))
            continue
        pairs[(i, j)] = found
    outlined = []
    if outlines is not None and config.silhouette_weight > 0:
        if len(outlines) != NUM_VIEWS:
            raise BadInputError(f"outlines must hold one [N, 2] outline per view ({NUM_VIEWS}); got {len(outlines)}.")
        outlined = [p for p in INFORMATIVE_PAIRS if p not in static and all(len(outlines[k]) for k in p)]
    if len(set(pairs) | set(outlined)) < 2:
        counts = {p: len(np.asarray(matches.get(p, ()))) for p in INFORMATIVE_PAIRS}
        why = f"; the views of {static} look the same (a symmetric or textureless object)" if static else ""
        raise BadInputError(f"too few matches to estimate the polar angle: at least two of the pairs "
                            f"{list(INFORMATIVE_PAIRS)} need {config.min_pair_matches} matches each (or both "
                            f"views' silhouettes inside the frame); got {counts}{why}")

    poses = candidate_poses(polars)
    F = {p: fundamental_matrices(poses, p, K) for p in set(pairs) | set(outlined)}
    # Every term is (pair, points [M, 8] or [E, M, 5] with their weights in column 4, residuals [E, M]). A pair's
    # matches weigh 1 each on average (their confidences, normalised), its two frontier points silhouette_weight.
    terms: dict[tuple[str, tuple[int, int]], tuple[tuple[int, int], np.ndarray, np.ndarray]] = {}
    for p, m in pairs.items():
        m = np.concatenate([m[:, :4], m[:, 4:5] / m[:, 4].mean(), m[:, 5:]], axis=1)
        r = sampson_distances(F[p], m)
        # A match that would have to lie behind a camera or far outside the object is wrong for that candidate.
        terms[("matches", p)] = (p, m, np.where(plausible_depths(poses, p, K, m, config.object_radius), r, np.inf))
    for p in outlined:
        f = frontier_points(poses, p, K, outlines[p[0]], outlines[p[1]])
        f[..., 4] = config.silhouette_weight
        terms[("outline", p)] = (p, f, sampson_distances(F[p], f))
    if config.shift_px > 0:
        residuals = _after_view_shifts(terms, poses, K, tau, config.shift_px * scale, config.shift_rounds)
    else:
        residuals = {key: r for key, (_, _, r) in terms.items()}
    used = sorted({p for _, p in terms})
    weights = {k: np.broadcast_to(m[..., 4], residuals[k].shape) for k, (_, m, _) in terms.items()}
    sizes = {p: sum(float(weights[k][0].sum()) for k in terms if k[1] == p) for p in used}
    # Each term's truncated, weighted cost per candidate [E]; a pair's and a cue's costs are sums of these.
    term_cost = {k: (np.minimum(residuals[k], tau) ** 2 / tau**2 * weights[k]).sum(axis=1) for k in terms}
    pair_cost = {p: sum(term_cost[k] for k in terms if k[1] == p) / sizes[p] for p in used}
    total = sum(sizes.values())
    cost = sum(pair_cost[p] * sizes[p] for p in used) / total
    best = int(np.argmin(cost))
    polar = int(polars[best])

    outside = np.abs(polars - polar) > config.basin_deg
    runner_up = float(cost[outside].min()) if outside.any() else float(cost[best])
    distinct = min(1.0, max(0.0, (runner_up - float(cost[best])) / max(runner_up, 1e-12)) / config.distinct_full)
    inliers = int(sum((residuals[("matches", p)][best] < tau).sum() for p in pairs))
    frontier_inliers = int(sum((residuals[("outline", p)][best] < tau).sum() for p in outlined))
    support = min(1.0, (inliers + frontier_inliers * config.silhouette_weight) / (2.0 * config.min_inliers))
    # Leave each pair out in turn: an answer that moves when one pair goes is held up by that pair alone.
    shifts = [abs(int(polars[int(np.argmin((cost * total - pair_cost[p] * sizes[p]) / (total - sizes[p])))]) - polar)
              for p in used] if len(used) > 1 else [0]
    stability = min(1.0, max(0.0, (config.stable_deg * 2 - max(shifts)) / config.stable_deg))
    minima = {p: int(polars[int(np.argmin(pair_cost[p]))]) for p in used}
    # A pair left out as static counts as disagreeing: its views carry no evidence for this answer.
    agreement = sum(sizes[p] for p in used if abs(minima[p] - polar) <= config.agreement_deg) / total
    agreement *= len(used) / (len(used) + len(static))
    # Matches and silhouettes are biased differently by a shifted or blurred view: when one objects, the joint minimum
    # is a compromise between two cues that each rule the other's answer out.
    objecting = []
    for kind in sorted({k for k, _ in terms}):
        cue = sum(term_cost[k] for k in terms if k[0] == kind)
        own = int(np.argmin(cue))
        rise = (cue[best] - cue[own]) / max(float(cue[best]), 1e-12)
        if abs(int(polars[own]) - polar) > config.agreement_deg and rise > config.distinct_full / 2:
            objecting.append(kind)
    cues = 0.5 if objecting else 1.0
    confidence = round(distinct * support * agreement * cues * stability, 3)
    uncertain = confidence < config.confident or support < 0.5 or bool(objecting)
    return PolarFit(polar=polar, confidence=confidence, uncertain=uncertain, inliers=inliers,
                    matches=sum(len(m) for m in pairs.values()),
                    pair_minima=minima, curve=np.stack([polars, cost], axis=1))
