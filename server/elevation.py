"""Elevation (polar angle) estimation by feature matching (spec §4).

Zero123 renders four views close to the input view: (polar −10°), (polar +10°), (azimuth −10°), (azimuth +10°). The
camera poses of these views are known up to the input's polar angle, so the polar angle is found by search: for every
candidate angle the four cameras are placed, the matches of one image pair are triangulated, the 3D points are
reprojected into the two other views, and the candidate whose reprojection error is smallest wins.

Layout: a matcher contract (:class:`Matcher`, :class:`Matches`) with a weight-free OpenCV SIFT matcher and the
reference's LoFTR; a pure, image-free search (:func:`estimate_polar_from_matches`); and the image-level entry point
(:func:`estimate_elevation`) that builds the six pairs and the foreground filter. The core needs only numpy and
OpenCV; torch and kornia are imported by :class:`LoFTRMatcher` alone.

Pixel frame: every keypoint in this module is (x, y) in the *continuous* frame in which the image spans [0, W]×[0, H]
and the centre of pixel (row i, column j) is (j + 0.5, i + 0.5). It is the frame of the intrinsics (principal point
(128, 128) for a 256² image, i.e. the image centre), of kornia's LoFTR keypoints (see ``kornia.feature.LoFTR``) and of
a resize, which is a pure scaling in it. OpenCV's SIFT keypoints put pixel centres on integers and are shifted by +0.5.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import cv2
import numpy as np
from scipy.spatial import cKDTree

from server.cameras import calc_pose
from server.errors import BadInputError, CheckpointError, MissingWeightsError
from server.weights import resolve

if TYPE_CHECKING:
    import torch

LOFTR_WEIGHTS_FILENAME = "indoor_ds_new.ckpt"
"""File name of the reference's LoFTR weights (indoor, "ds_new"), looked up in the weights directory."""

LOFTR_FETCH_COMMAND = "one2345 weights download --only loftr"
"""The command that fetches the LoFTR weights."""

NUM_VIEWS = 4
"""The four nearby views of stage-2 view 0, in the order (polar −10), (polar +10), (azimuth −10), (azimuth +10)."""

PAIRS: tuple[tuple[int, int], ...] = tuple((i, j) for i in range(NUM_VIEWS) for j in range(i + 1, NUM_VIEWS))
"""The six unordered image pairs (i < j), in the reference's order."""


# ---------------------------------------------------------------------------------------------------------------------
# Matcher contract


@dataclass
class Matches:
    """Point correspondences between two images, in the continuous pixel frame of the module docstring.

    Attributes:
        kpts0: [M, 2] float64, (x, y) in image 0.
        kpts1: [M, 2] float64, (x, y) in image 1; row m matches row m of ``kpts0``.
        confidence: [M] float64 in (0, 1], higher is more reliable.
    """

    kpts0: np.ndarray
    kpts1: np.ndarray
    confidence: np.ndarray

    def __post_init__(self) -> None:
        self.kpts0 = np.asarray(self.kpts0, dtype=np.float64).reshape(-1, 2)
        self.kpts1 = np.asarray(self.kpts1, dtype=np.float64).reshape(-1, 2)
        self.confidence = np.asarray(self.confidence, dtype=np.float64).reshape(-1)
        if not len(self.kpts0) == len(self.kpts1) == len(self.confidence):
            raise BadInputError(
                f"Matches need as many rows in kpts0, kpts1 and confidence; got {len(self.kpts0)}, "
                f"{len(self.kpts1)} and {len(self.confidence)}."
            )

    def __len__(self) -> int:
        return len(self.confidence)

    @classmethod
    def empty(cls) -> Matches:
        """No correspondences."""
        return cls(np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0))


@runtime_checkable
class Matcher(Protocol):
    """Finds correspondences between two grayscale images (one contract for all matchers, as in kornia.feature)."""

    name: str
    """Short identifier reported with the result ("sift", "loftr")."""

    def __call__(self, image0: np.ndarray, image1: np.ndarray) -> Matches:
        """Match two images.

        Args:
            image0: [H0, W0] uint8 grayscale.
            image1: [H1, W1] uint8 grayscale.

        Returns:
            The correspondences, keypoints in each image's own pixel frame.
        """
        ...


def _describe(value: object) -> str:
    """'uint8 array of shape (H, W)' for arrays, else the type name (for error messages)."""
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    return type(value).__name__


def _check_gray(image: np.ndarray, which: str) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 2:
        raise BadInputError(f"{which} must be a [H, W] uint8 grayscale array; got {_describe(image)}.")


class SiftMatcher:
    """Weight-free matcher: OpenCV SIFT, Lowe's ratio test and a mutual nearest-neighbour check.

    The confidence of a match is 1 − d₁/d₂ (d₁, d₂: descriptor distances to the nearest and second-nearest candidate),
    so it lies in (1 − ratio, 1]: the more distinctive the match, the higher.

    Args:
        ratio: Lowe's ratio threshold; a match is kept when d₁ < ratio·d₂.
    """

    name = "sift"

    def __init__(self, ratio: float = 0.75) -> None:
        if not 0.0 < ratio <= 1.0:
            raise BadInputError(f"SIFT ratio must be in (0, 1]; got {ratio}.")
        self.ratio = ratio

    def __call__(self, image0: np.ndarray, image1: np.ndarray) -> Matches:
        _check_gray(image0, "image0")
        _check_gray(image1, "image1")
        sift = cv2.SIFT_create()  # per call: OpenCV detectors are not safe to share across threads
        kp0, desc0 = sift.detectAndCompute(image0, None)
        kp1, desc1 = sift.detectAndCompute(image1, None)
        # The ratio test needs a second-nearest candidate.
        if desc0 is None or desc1 is None or len(kp0) < 1 or len(kp1) < 2:
            return Matches.empty()
        bf = cv2.BFMatcher(cv2.NORM_L2)
        forward = bf.knnMatch(desc0, desc1, k=2)
        backward = bf.knnMatch(desc1, desc0, k=1)
        best_back = np.array([m[0].trainIdx if m else -1 for m in backward])
        rows = []
        for pair in forward:
            if len(pair) < 2:
                continue
            best, second = pair
            mutual = best_back[best.trainIdx] == best.queryIdx
            if mutual and best.distance < self.ratio * second.distance:
                rows.append((best.queryIdx, best.trainIdx, 1.0 - best.distance / max(second.distance, 1e-12)))
        if not rows:
            return Matches.empty()
        idx0, idx1, conf = (np.array(c) for c in zip(*rows, strict=True))
        pts0 = np.array([kp0[i].pt for i in idx0.astype(int)]) + 0.5  # OpenCV: pixel centres on integers
        pts1 = np.array([kp1[i].pt for i in idx1.astype(int)]) + 0.5
        return Matches(pts0, pts1, conf)


class LoFTRMatcher:
    """The reference's matcher: LoFTR with the indoor "ds_new" weights, run at 480×480 (spec §4).

    The network is kornia's ``LoFTR`` built without downloading anything: its default config with the change that
    kornia's ``pretrained='indoor_new'`` makes (``coarse.temp_bug_fix = True``, the positional encoding that checkpoint
    was trained with), which is the config the reference builds by hand. Both images are resized to 480×480 (OpenCV
    bilinear, as the reference) and the keypoints are scaled back to each input's size.

    Args:
        weights_path: the ``indoor_ds_new.ckpt`` file: a torch checkpoint with the model under ``state_dict``, keys
            prefixed ``matcher.`` (the prefix is optional).
        device: where to run; CUDA when available by default.
        input_size: side of the square both images are resized to before matching (480 in the reference).

    Raises:
        MissingWeightsError: the file does not exist.
        CheckpointError: the file cannot be read or does not hold exactly LoFTR's parameters.
    """

    name = "loftr"

    def __init__(
        self, weights_path: str | Path, device: str | torch.device | None = None, input_size: int = 480
    ) -> None:
        import torch

        self.weights_path = Path(weights_path)
        self.input_size = int(input_size)
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = build_loftr(self.weights_path).to(self.device)

    def __call__(self, image0: np.ndarray, image1: np.ndarray) -> Matches:
        import torch

        _check_gray(image0, "image0")
        _check_gray(image1, "image1")
        size = self.input_size

        def to_tensor(image: np.ndarray) -> torch.Tensor:
            resized = cv2.resize(image, (size, size))
            return torch.from_numpy(resized).to(self.device, torch.float32)[None, None] / 255.0

        with torch.inference_mode():
            out = self.model({"image0": to_tensor(image0), "image1": to_tensor(image1)})
        kpts0 = out["keypoints0"].double().cpu().numpy()
        kpts1 = out["keypoints1"].double().cpu().numpy()
        conf = out["confidence"].double().cpu().numpy()
        # A resize is a pure scaling in the continuous pixel frame LoFTR's keypoints live in.
        kpts0 = kpts0 * np.array([image0.shape[1], image0.shape[0]]) / size
        kpts1 = kpts1 * np.array([image1.shape[1], image1.shape[0]]) / size
        return Matches(kpts0, kpts1, conf)


def loftr_config() -> dict[str, Any]:
    """kornia's LoFTR default config with the indoor "ds_new" change (``coarse.temp_bug_fix = True``)."""
    from kornia.feature.loftr.loftr import default_cfg

    config = copy.deepcopy(default_cfg)
    config["coarse"]["temp_bug_fix"] = True
    return config


def build_loftr(weights_path: str | Path) -> torch.nn.Module:
    """Build LoFTR (:func:`loftr_config`) and load a local checkpoint strictly; returned in eval mode on the CPU.

    Args:
        weights_path: torch checkpoint holding ``{"state_dict": {...}}``; a leading ``matcher.`` on the keys is
            stripped (the reference's Lightning module wraps the network as ``matcher``).

    Raises:
        MissingWeightsError: the file does not exist.
        CheckpointError: the file is unreadable, has no ``state_dict``, or its keys/shapes do not match LoFTR's.
    """
    import torch
    from kornia.feature import LoFTR

    path = Path(weights_path)
    if not path.is_file():
        raise MissingWeightsError(f"LoFTR weights not found: {path}", fix=LOFTR_FETCH_COMMAND)
    try:
        # weights_only: the published checkpoint is tensors in plain containers; nothing in it needs to run code.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:  # damaged, truncated or unsafe file
        raise CheckpointError(
            f"Cannot read LoFTR weights {path}: {error}", fix=f"delete the file and run `{LOFTR_FETCH_COMMAND}`"
        ) from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(
            f"LoFTR weights {path} have no 'state_dict' entry; expected the indoor_ds_new.ckpt checkpoint.",
            fix=f"delete the file and run `{LOFTR_FETCH_COMMAND}`",
        )
    state_dict = {k.removeprefix("matcher."): v for k, v in checkpoint["state_dict"].items()}
    model = LoFTR(pretrained=None, config=loftr_config())
    try:
        # nn.Module's loader, strict: kornia's override only renames the same prefix.
        torch.nn.Module.load_state_dict(model, state_dict, strict=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"LoFTR weights {path} do not fit the indoor LoFTR network: {error}",
            fix=f"delete the file and run `{LOFTR_FETCH_COMMAND}`",
        ) from error
    return model.eval()


def available_matcher(weights_dir: Path | str | None, prefer: str = "loftr") -> Matcher:
    """The best matcher that can run here: LoFTR when preferred and its weights are on disk, else SIFT.

    Args:
        weights_dir: the weights folder of :mod:`server.weights` (LoFTR's file sits at its registry path there);
            None means the default folder.
        prefer: "loftr" (use LoFTR if possible) or "sift" (always SIFT).
    """
    if prefer not in ("loftr", "sift"):
        raise BadInputError(f"Unknown matcher {prefer!r}; allowed: 'loftr', 'sift'.")
    if prefer == "loftr":
        try:
            return LoFTRMatcher(resolve("loftr", weights_dir))
        except MissingWeightsError:
            pass  # the weight-free matcher is the documented fallback
    return SiftMatcher()


# ---------------------------------------------------------------------------------------------------------------------
# Cameras and the polar search (pure numpy + OpenCV)


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


def _pose_hypotheses(polar: float, config: PolarSearchConfig) -> np.ndarray:
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
        errors = np.array([_hypothesis_error(_pose_hypotheses(e, config), both, links, K) for e in candidates])
        # Deviation from the reference only when it would fail: a non-finite error (points at infinity) never wins,
        # where torch.argmin would pick the NaN.
        errors = np.where(np.isfinite(errors), errors, np.inf)
        return int(candidates[int(np.argmin(errors))])

    coarse = best(np.arange(config.coarse_start, config.coarse_stop, config.coarse_step))
    return best(np.arange(coarse - config.fine_half_width, coarse + config.fine_half_width, 1))


# ---------------------------------------------------------------------------------------------------------------------
# Images → polar angle


@dataclass(frozen=True)
class ElevationResult:
    """Outcome of :func:`estimate_elevation`."""

    polar: int
    """Polar angle of the input view, integer degrees (0 = top view, 90 = horizon)."""
    matcher: str
    """Name of the matcher used ("loftr", "sift")."""
    num_matches: dict[tuple[int, int], int]
    """Foreground matches kept per image pair (i, j), i < j."""

    @property
    def elevation(self) -> int:
        """Elevation above the horizon, degrees (the UI's label): 90 − polar."""
        return 90 - self.polar


def foreground_mask(image: np.ndarray, threshold: int = 245) -> np.ndarray:
    """[H, W] bool: True unless all three channels of the [H, W, 3] uint8 image exceed ``threshold`` (white)."""
    return ~(image > threshold).all(axis=-1)


def _keep_foreground(mask: np.ndarray, kpts: np.ndarray) -> np.ndarray:
    """[M] bool: the keypoint [M, 2] lies in a foreground pixel (outside the image counts as background)."""
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
            raise BadInputError(f"Image {n} must be an [H, W, 3] uint8 RGB array; got {_describe(image)}.")
    shapes = {image.shape for image in images}
    if len(shapes) != 1:
        raise BadInputError(f"The {NUM_VIEWS} images must have the same size; got {[im.shape for im in images]}.")
    h, w, _ = images[0].shape
    if h != w:
        raise BadInputError(f"The images must be square (Zero123 outputs); got {w}×{h}.")


def estimate_elevation(
    images: Sequence[np.ndarray], matcher: Matcher, config: PolarSearchConfig | None = None
) -> ElevationResult:
    """Polar angle of the input view from its four nearby Zero123 views (spec §4).

    Args:
        images: 4 × [S, S, 3] uint8 RGB on a white background, in the order (polar −10), (polar +10),
            (azimuth −10), (azimuth +10) — the stage-2 images ``0_0 … 0_3`` of view 0.
        matcher: any :class:`Matcher`; the reference uses LoFTR (:class:`LoFTRMatcher`).
        config: the polar search; the reference's by default.

    Returns:
        The polar angle, the matcher's name and the number of foreground matches per pair. The intrinsics are the
        reference's focal 280 px at 256², scaled with the image size.

    Raises:
        BadInputError: not exactly four RGB uint8 images of one square size, or a pair without foreground matches
            (the reference returns None there and its caller uses polar 90; that choice is the caller's).
    """
    _check_images(images)
    size = images[0].shape[0]
    grays = [cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) for image in images]
    masks = [foreground_mask(image) for image in images]
    matches: dict[tuple[int, int], np.ndarray] = {}
    for i, j in PAIRS:
        found = matcher(grays[i], grays[j])
        # Both ends are tested at their own coordinates. The reference indexes image i's mask with image j's x
        # coordinate (mask0[y0, x1]); that bug is deliberately not reproduced.
        keep = _keep_foreground(masks[i], found.kpts0) & _keep_foreground(masks[j], found.kpts1)
        matches[(i, j)] = np.concatenate([found.kpts0[keep], found.kpts1[keep], found.confidence[keep, None]], axis=1)
        if not keep.any():
            raise BadInputError(
                f"Image pair ({i}, {j}) has no foreground matches ({len(found)} before the foreground filter, "
                f"matcher {matcher.name!r}); the polar angle cannot be estimated."
            )
    polar = estimate_polar_from_matches(matches, image_size=size, focal=280.0 * size / 256.0, config=config)
    return ElevationResult(polar, matcher.name, {pair: len(m) for pair, m in matches.items()})
