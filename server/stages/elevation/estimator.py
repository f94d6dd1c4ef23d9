"""Images → polar angle: each matcher once over the views (:func:`match_views`), fits of those matches
(:func:`fit_views`, :func:`estimate_elevation`) and :class:`ElevationEstimator`, the documented rule for low
confidence."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from server.common.errors import BadInputError, MissingWeightsError, describe_value
from server.common.weights import resolve
from server.stages.elevation.fit import (
    RobustFitConfig,
    fit_polar,
    foreground_mask,
    half_level_mask,
    silhouette_outline,
)
from server.stages.elevation.matchers import (
    MATCH_COLUMNS,
    NUM_VIEWS,
    PAIRS,
    FlowMatcher,
    LoFTRMatcher,
    Matcher,
    SiftMatcher,
)

if TYPE_CHECKING:
    pass


@dataclass(frozen=True)
class ElevationResult:
    """Outcome of :func:`fit_views`, :func:`estimate_elevation` and :class:`ElevationEstimator`."""

    polar: int
    """Polar angle of the input view, integer degrees (0 = top view, 90 = horizon)."""
    matcher: str
    """The matcher(s) whose matches were fitted, joined by "+" ("loftr+flow+sift", "flow"); "none" for the
    fallback."""
    num_matches: dict[tuple[int, int], int]
    """Matches kept per image pair (i, j), i < j: both ends on the object, away from its edge."""
    confidence: float = 1.0
    """0–1, see :func:`fit_polar`."""
    uncertain: bool = False
    """True when the estimate should not be trusted; the UI then asks for the elevation by hand."""
    inliers: int = 0
    """Matches consistent with the estimate (informative pairs)."""
    fitted: int = 0
    """Matches that took part in the fit (informative pairs with enough of them); 0: the silhouettes alone."""
    source: str = "estimated"
    """"estimated", or "fallback": every fit was uncertain, so the reference's polar 90 is used."""
    note: str = ""
    """What was tried, in words (for meta.json and logs)."""

    @property
    def elevation(self) -> int:
        """Elevation above the horizon, degrees (the UI's label): 90 − polar."""
        return 90 - self.polar

    def to_json(self) -> dict[str, Any]:
        """The fields ``one2345 elevation`` prints and meta.json records."""
        return {"polar": self.polar, "elevation": self.elevation, "matcher": self.matcher,
                "confidence": self.confidence, "uncertain": self.uncertain, "inliers": self.inliers,
                "source": self.source, "note": self.note}


def _keep_foreground(mask: np.ndarray, kpts: np.ndarray) -> np.ndarray:
    """[M] bool: the keypoint [M, 2] lies in a true pixel of ``mask`` [H, W] (outside the image counts as false)."""
    h, w = mask.shape
    col = np.floor(kpts[:, 0]).astype(np.int64)  # continuous frame: pixel j spans [j, j + 1)
    row = np.floor(kpts[:, 1]).astype(np.int64)
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    keep = np.zeros(len(kpts), dtype=bool)
    keep[inside] = mask[row[inside], col[inside]]
    return keep


def _check_images(images: Sequence[np.ndarray]) -> None:
    if len(images) != NUM_VIEWS:
        raise BadInputError(f"Elevation estimation needs exactly {NUM_VIEWS} images; got {len(images)}.")
    for n, image in enumerate(images):
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise BadInputError(f"Image {n} must be an [H, W, 3] uint8 RGB array; got {describe_value(image)}.")
    shapes = {image.shape for image in images}
    if len(shapes) != 1:
        raise BadInputError(f"The {NUM_VIEWS} images must have the same size; got {[im.shape for im in images]}.")
    h, w, _ = images[0].shape
    if h != w:
        raise BadInputError(f"The images must be square (Zero123 outputs); got {w}×{h}.")


MATCH_SIZE = 256
"""Smaller views are upsampled (bicubic) to this side before matching. The matchers' windows and the fit's pixel
tolerances are those of Zero123's 256² output; on 100 rendered 64² objects each, matching at 256 brought the median
error from 5–6° to 2° and the confident misses over 10° from 6 (flat colours) and 3 (textured) to none."""


@dataclass(frozen=True)
class ViewMatches:
    """What :func:`match_views` found in the four views: each matcher's matches and the silhouettes. Fitting any
    subset of the matchers (:func:`fit_views`) needs no new matching."""

    size: int
    """Side of the images the matches are in (the views, upsampled to :data:`MATCH_SIZE` when smaller), pixels."""
    names: list[str]
    """The matchers' names, in the order given."""
    matches: list[dict[tuple[int, int], np.ndarray]]
    """Per matcher, {(i, j): [M, 8] (:data:`MATCH_COLUMNS`)} for the pairs it was given: both ends on the object and
    more than ``contour_px`` inside it."""
    outlines: list[np.ndarray]
    """The four views' silhouette outlines (:func:`silhouette_outline` of :func:`half_level_mask`)."""

    def pooled(self, which: Sequence[int]) -> dict[tuple[int, int], np.ndarray]:
        """{(i, j): [M, 8]} for all six pairs: the matches of matchers ``which``, concatenated in that order."""
        return {p: np.concatenate([np.zeros((0, len(MATCH_COLUMNS)))]
                                  + [self.matches[k][p] for k in which if p in self.matches[k]])
                for p in PAIRS}


def match_views(images: Sequence[np.ndarray], matchers: Sequence[Matcher],
                config: RobustFitConfig | None = None) -> ViewMatches:
    """Run each matcher once on the pairs it takes of the four nearby views, and outline the silhouettes.

    Args:
        images: 4 × [S, S, 3] uint8 RGB on a white background, in the order (polar −10), (polar +10),
            (azimuth −10), (azimuth +10) — the stage-2 images ``0_0 … 0_3`` of view 0.
        matchers: the matchers to run.
        config: gives ``contour_px``, the margin inside the silhouette a match needs.

    Raises:
        BadInputError: not exactly four RGB uint8 images of one square size.
    """
    _check_images(images)
    config = config or RobustFitConfig()
    if images[0].shape[0] < MATCH_SIZE:
        images = [cv2.resize(image, (MATCH_SIZE, MATCH_SIZE), interpolation=cv2.INTER_CUBIC) for image in images]
    size = images[0].shape[0]
    grays = [cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) for image in images]
    masks = [foreground_mask(image) for image in images]
    # Matches are kept where both ends lie inside their object by more than contour_px (the distance transform
    # counts the pixel next to the background as 1).
    inner = [cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5) > config.contour_px * size / 256.0
             for mask in masks]
    found_by = []
    for m in matchers:
        found_by.append({})
        for i, j in getattr(m, "pairs", PAIRS):
            found = m(grays[i], grays[j])
            # Both ends are tested at their own coordinates. The reference indexes image i's mask with image j's x
            # coordinate (mask0[y0, x1]); that bug is deliberately not reproduced.
            keep = _keep_foreground(inner[i], found.kpts0) & _keep_foreground(inner[j], found.kpts1)
            found_by[-1][(i, j)] = np.concatenate([found.kpts0[keep], found.kpts1[keep], found.confidence[keep, None],
                                                   found.covariance[keep]], axis=1)
    window = config.outline_window_px * size / 256.0
    outlines = [silhouette_outline(half_level_mask(image, window)) for image in images]
    return ViewMatches(size, [m.name for m in matchers], found_by, outlines)


def fit_views(views: ViewMatches, which: Sequence[int] | None = None,
              config: RobustFitConfig | None = None) -> ElevationResult:
    """One robust fit of the pooled matches of matchers ``which`` (default: all) with the silhouettes, and when it is
    uncertain one retry that fits each view's small shift too (``retry_shift_px``); no fallback.

    Raises:
        BadInputError: too few matches and outlines for a fit (see :func:`fit_polar`).
    """
    which = range(len(views.names)) if which is None else which
    config = config or RobustFitConfig()
    name = "+".join(views.names[k] for k in which)
    matches = views.pooled(which)
    size, focal = views.size, 280.0 * views.size / 256.0
    try:
        fit = fit_polar(matches, image_size=size, focal=focal, config=config, outlines=views.outlines)
    except BadInputError as e:
        raise BadInputError(f"matcher {name!r}: {e.message}") from None
    note = f"{name}: polar {fit.polar}, confidence {fit.confidence:.2f}"
    if fit.uncertain and config.retry_shift_px > 0 and config.shift_px == 0:
        shifted = fit_polar(matches, image_size=size, focal=focal,
                            config=replace(config, shift_px=config.retry_shift_px), outlines=views.outlines)
        note += f"; with view shifts: polar {shifted.polar}, confidence {shifted.confidence:.2f}"
        if not shifted.uncertain:
            fit = shifted
    counts = {pair: len(m) for pair, m in matches.items()}
    return ElevationResult(fit.polar, name, counts, confidence=fit.confidence, uncertain=fit.uncertain,
                           inliers=fit.inliers, fitted=fit.matches, note=note)


def estimate_elevation(
    images: Sequence[np.ndarray],
    matcher: Matcher | Sequence[Matcher],
    config: RobustFitConfig | None = None,
) -> ElevationResult:
    """Polar angle of the input view from its four nearby Zero123 views, with a confidence (one fit, no fallback).

    Args:
        images: 4 × [S, S, 3] uint8 RGB on a white background, in the order (polar −10), (polar +10),
            (azimuth −10), (azimuth +10) — the stage-2 images ``0_0 … 0_3`` of view 0.
        matcher: one :class:`Matcher`, or several whose matches are pooled into one fit.
        config: the robust fit's settings.

    Returns:
        The polar angle, the matchers' names, the matches kept per pair and the fit's confidence. The intrinsics
        are the reference's focal 280 px at 256², scaled with the image size.

    Raises:
        BadInputError: not exactly four RGB uint8 images of one square size, or too few foreground matches for a fit.
    """
    matchers = [matcher] if isinstance(matcher, Matcher) else list(matcher)
    if not matchers:
        raise BadInputError("estimate_elevation needs at least one matcher.")
    return fit_views(match_views(images, matchers, config), config=config)


class ElevationEstimator:
    """The elevation estimate the pipeline uses, with the documented rule for low confidence:

    Each matcher runs once per pair (:func:`match_views`); every step below fits some of those matches.

    1. All matchers' matches pooled into one robust fit (:func:`fit_views`); if it is uncertain, the same
       matches are fitted again with a 2D shift per view (``retry_shift_px``). Confident → done.
    2. Otherwise each matcher alone, in the given order; the first confident fit is used. A matcher with fewer
       matches of its own than ``min_inliers`` is skipped when the pooled fit had matches: its fit would rest on
       the silhouettes (each tangency weighs ``silhouette_weight`` matches), which on generated views can be
       confidently wrong, and it would overrule the matches that doubt it (SIFT with 9 matches on a flat object:
       confidence 0.81, 11° off). A matcher whose fit lies more than ``agreement_deg`` from the pooled fit's is
       skipped too: alone it may only settle where all the evidence points, not overrule the rest of it (SIFT's
       43 matches on a degraded textured object said 111, flow's 1223 and the pooled fit 101–103, the truth 100).
    3. Otherwise the most confident of those fits, flagged ``uncertain``: it is still the best guess there is (on
       degraded renders most flagged fits are within a few degrees), and the UI asks for the elevation by hand.
    4. No fit at all (no matches: a textureless or symmetric object): the reference's fallback, polar 90
       (elevation 0), flagged, with ``source`` "fallback".

    Args:
        matchers: the matchers to use, best first (:func:`available_matchers`).
        config: the robust fit's settings.
    """

    def __init__(self, matchers: Sequence[Matcher], config: RobustFitConfig | None = None) -> None:
        if not matchers:
            raise BadInputError("ElevationEstimator needs at least one matcher.")
        self.matchers = list(matchers)
        self.config = config or RobustFitConfig()

    @property
    def name(self) -> str:
        return "+".join(m.name for m in self.matchers)

    def __call__(self, images: Sequence[np.ndarray]) -> ElevationResult:
        return self.fit(match_views(images, self.matchers, self.config))

    def fit(self, views: ViewMatches) -> ElevationResult:
        """Steps 1–4 on views already matched by this estimator's matchers (:func:`match_views`)."""
        if views.names != [m.name for m in self.matchers]:
            raise BadInputError(f"these views were matched by {views.names}, not by this estimator's matchers "
                                f"{[m.name for m in self.matchers]}")
        count = len(self.matchers)
        attempts = [list(range(count))] + ([[k] for k in range(count)] if count > 1 else [])
        tried, best, pooled = [], None, None
        for n, which in enumerate(attempts):
            try:
                result = fit_views(views, which, self.config)
            except BadInputError as e:
                tried.append(e.message)
                continue
            if n == 0:
                pooled = result
            elif pooled is not None and pooled.fitted > 0 and result.fitted < self.config.min_inliers:
                tried.append(f"{result.matcher}: too few matches of its own ({result.fitted} < "
                             f"{self.config.min_inliers}; a fit resting on the silhouettes is not used over the "
                             f"pooled matches)")
                continue
            elif pooled is not None and abs(result.polar - pooled.polar) > self.config.agreement_deg:
                tried.append(f"{result.matcher}: polar {result.polar} is more than {self.config.agreement_deg:g}° "
                             f"from the pooled fit's {pooled.polar} (one matcher does not overrule the rest)")
                continue
            tried.append(result.note)
            if not result.uncertain:
                return replace(result, note="; ".join(tried))
            if best is None or result.confidence > best.confidence:
                best = result
        if best is not None:
            return replace(best, note="; ".join(tried) + f"; every fit was uncertain: the most confident "
                                                        f"({best.matcher}, {best.confidence:.2f}) is used")
        return ElevationResult(FALLBACK_POLAR, "none", {}, confidence=0.0, uncertain=True, source="fallback",
                               note="; ".join(tried) + f"; no fit was possible, so polar {FALLBACK_POLAR} is used")


FALLBACK_POLAR = 90
"""The reference's polar angle when estimation fails (run.py), used when no fit is confident."""


def available_matchers(weights_dir: Path | str | None = None, prefer: str = "auto") -> list[Matcher]:
    """The matchers that can run here, best first.

    Args:
        weights_dir: the weights folder (LoFTR's file at its registry path); None means the default folder.
        prefer: "auto" (LoFTR when its weights are on disk, then flow, then SIFT), or one of "loftr", "flow",
            "sift" for that matcher alone ("loftr" raises MissingWeightsError without its weights).
    """
    if prefer not in ("auto", "loftr", "flow", "sift"):
        raise BadInputError(f"Unknown matcher {prefer!r}; allowed: 'auto', 'loftr', 'flow', 'sift'.")
    if prefer == "flow":
        return [FlowMatcher()]
    if prefer == "sift":
        return [SiftMatcher()]
    if prefer == "loftr":
        return [LoFTRMatcher(resolve("loftr", weights_dir))]
    try:
        found: list[Matcher] = [LoFTRMatcher(resolve("loftr", weights_dir))]
    except MissingWeightsError:
        found = []  # the weight-free matchers are the documented fallback
    return [*found, FlowMatcher(), SiftMatcher()]
