"""Elevation (polar angle) estimation by feature matching (spec §4).

Zero123 renders four views close to the input view: (polar −10°), (polar +10°), (azimuth −10°), (azimuth +10°). The
camera poses of these views are known up to the input's polar angle, so the polar angle is found by search: for every
candidate angle the four cameras are placed, the matches of one image pair are triangulated, the 3D points are
reprojected into the two other views, and the candidate whose reprojection error is smallest wins.

Layout: a matcher contract (:class:`Matcher`, :class:`Matches`) with two weight-free matchers — OpenCV SIFT and
dense DIS optical flow with a forward–backward check (:class:`FlowMatcher`; the views are only 10° apart, which is
what flow is good at) — and the reference's LoFTR; two pure, image-free searches: the reference's
(:func:`estimate_polar_from_matches`, kept for parity) and the robust fit the product uses (:func:`fit_polar`); and
the image-level entry points: :func:`match_views` (each matcher once over the views, and the silhouettes),
:func:`fit_views` (one fit of some of those matches), :func:`estimate_elevation` (both, for one set of matchers) and
:class:`ElevationEstimator` (the documented rule for low confidence). The core needs only numpy and OpenCV; torch
and kornia are imported by :class:`LoFTRMatcher` alone.

Why a second search. The reference scores each candidate polar by triangulating one pair, linking its matches to
other pairs' within 1 px and averaging the reprojection errors: a mean, so a handful of wrong matches moves the
minimum, and one descent on a coarse grid, so a spurious basin wins. Probed on renders of thin, repetitive objects it
was off by 55–78° with no sign of doubt. :func:`fit_polar` instead scores every candidate on a 1° grid with the
Sampson (first-order geometric) distance of every match to its epipolar line under that candidate's known relative
pose, under a truncated quadratic loss (MSAC): a wrong match costs at most the truncation, whatever the candidate, so
it cannot pull the minimum. All pairs but (0, 1) constrain the polar angle (the two polar-offset views differ by a
rotation that is the same for every polar); each also gives its own minimum, and the whole curve is kept, so the
confidence can say how distinct the minimum is, how many matches support it and how many pairs agree.

Silhouettes. Texture-poor objects give few matches, so each pair's two epipolar tangencies of the silhouettes
(:func:`frontier_points`) join the fit as two heavily weighted matches per candidate. On 30 clean 256² renders they
alone gave a median error of 0.5° (max 5°); pooled with the matches they let a flat-shaded object be estimated
instead of falling back to polar 90. The outline is taken at the half-way level of the object's edge
(:func:`half_level_mask`), where blur leaves it, not at a near-white threshold, which a blurred view moves outwards.

Pixel frame: every keypoint in this module is (x, y) in the *continuous* frame in which the image spans [0, W]×[0, H]
and the centre of pixel (row i, column j) is (j + 0.5, i + 0.5). It is the frame of the intrinsics (principal point
(128, 128) for a 256² image, i.e. the image centre), of kornia's LoFTR keypoints (see ``kornia.feature.LoFTR``) and of
a resize, which is a pure scaling in it. OpenCV's SIFT keypoints put pixel centres on integers and are shifted by +0.5.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
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

ISOTROPIC = (1.0, 0.0, 1.0)
"""(σxx, σxy, σyy) of a match as sure of its position in every direction (SIFT, LoFTR, silhouette tangencies)."""

MATCH_COLUMNS = ("x0", "y0", "x1", "y1", "conf", "sxx", "sxy", "syy")
"""Columns of the match arrays :func:`match_views` gives and :func:`fit_polar` takes: the two points, the confidence
and the covariance (:attr:`Matches.covariance`). :func:`fit_polar` also takes the first five alone (isotropic)."""


def _positive_definite(covariance: np.ndarray) -> np.ndarray:
    """[...] bool: the rows (σxx, σxy, σyy) of covariance [..., 3] are positive definite (NaN is not)."""
    sxx, sxy, syy = np.moveaxis(covariance, -1, 0)
    return (sxx > 0) & (sxx * syy > sxy**2)


# ---------------------------------------------------------------------------------------------------------------------
# Matcher contract


@dataclass
class Matches:
    """Point correspondences between two images, in the continuous pixel frame of the module docstring.

    Attributes:
        kpts0: [M, 2] float64, (x, y) in image 0.
        kpts1: [M, 2] float64, (x, y) in image 1; row m matches row m of ``kpts0``.
        confidence: [M] float64 in (0, 1], higher is more reliable.
        covariance: [M, 3] float64 (σxx, σxy, σyy), the shape of each match's position error: 1 along its
            best-determined direction, more along a direction the matcher could not pin down (flow along a stripe).
            None (the default) means isotropic, (1, 0, 1).
    """

    kpts0: np.ndarray
    kpts1: np.ndarray
    confidence: np.ndarray
    covariance: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.kpts0 = np.asarray(self.kpts0, dtype=np.float64).reshape(-1, 2)
        self.kpts1 = np.asarray(self.kpts1, dtype=np.float64).reshape(-1, 2)
        self.confidence = np.asarray(self.confidence, dtype=np.float64).reshape(-1)
        if self.covariance is None:
            self.covariance = np.tile(ISOTROPIC, (len(self.confidence), 1))
        self.covariance = np.asarray(self.covariance, dtype=np.float64)
        if not len(self.kpts0) == len(self.kpts1) == len(self.confidence):
            raise BadInputError(
                f"Matches need as many rows in kpts0, kpts1 and confidence; got {len(self.kpts0)}, "
                f"{len(self.kpts1)} and {len(self.confidence)}."
            )
        if self.covariance.shape != (len(self.confidence), 3):
            raise BadInputError(f"Matches covariance must be [M, 3] (σxx, σxy, σyy) with M = {len(self.confidence)}; "
                                f"got shape {self.covariance.shape}.")
        if not (np.isfinite(self.covariance).all() and _positive_definite(self.covariance).all()):
            raise BadInputError("Matches covariance must be finite and positive definite (σxx > 0, "
                                "σxx·σyy − σxy² > 0) in every row.")

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
    """Short identifier reported with the result ("sift", "loftr", "flow"). A matcher may also have ``pairs``, the
    image pairs it should be given (default: all six, :data:`PAIRS`)."""

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


class FlowMatcher:
    """Weight-free dense matcher: OpenCV's DIS optical flow both ways, kept where the two agree.

    Points on a regular grid of image 0 are moved by the forward flow; a match is kept when the backward flow brings
    it back within ``max_fb_px`` (scaled with the image, at 256 px) and the point sits on texture (the smaller
    eigenvalue of the local structure tensor above ``min_texture``: on a flat patch flow is a guess). Its confidence
    falls with the forward–backward error: exp(−(e / max_fb_px)²).

    Each match also says in which direction it is unsure (its ``covariance``, used by :func:`sampson_distances`):

    - Along an edge or a stripe the image does not change, so the flow there is DIS's smoothing guess (the aperture
      problem). With λ₁ ≥ λ₂ the structure tensor's eigenvalues and v₁, v₂ their directions, the shape is
      v₁v₁ᵀ + min(λ₁/λ₂, ``max_spread``)·v₂v₂ᵀ.
    - Where the flow itself is irregular (its largest range, max − min of either component, over
      ``range_window_px``) it is less sure in every direction: (range / ``range_px``)² is added to both variances.
      Near an occluding edge inside the object, where one surface slides over another, the range is large.

    Args:
        step: grid spacing in pixels at 256² (scaled with the image size, at least 1).
        max_fb_px: largest forward–backward error kept, pixels at 256².
        min_texture: smallest structure-tensor eigenvalue (cv2.cornerMinEigenVal on [0, 1] grey, 5×5) kept.
        max_spread: largest ratio of the variances along and across an edge; 1 makes every match isotropic.
        range_px: flow range (pixels at 256²) that adds one unit of variance; 0 adds none.
        range_window_px: side of the window the flow's range is taken over, pixels at 256².
    """

    name = "flow"
    pairs: tuple[tuple[int, int], ...] = ((0, 2), (0, 3), (1, 2), (1, 3))
    """The pairs it is given: neighbours about 14° apart. Pairs (0, 1) and (2, 3) are 20° apart, where DIS's
    displacements run out of range and consistently wrong flow passes the forward–backward check (median 2–3 px off
    the epipolar line on the test renders, against 0.05 px for these four)."""

    def __init__(self, step: float = 3.0, max_fb_px: float = 0.5, min_texture: float = 1e-4,
                 max_spread: float = 16.0, range_px: float = 3.0, range_window_px: float = 7.0) -> None:
        if step <= 0 or max_fb_px <= 0 or min_texture < 0:
            raise BadInputError(f"FlowMatcher needs step > 0, max_fb_px > 0 and min_texture ≥ 0; got {step}, "
                                f"{max_fb_px}, {min_texture}.")
        if max_spread < 1 or range_px < 0 or range_window_px <= 0:
            raise BadInputError(f"FlowMatcher needs max_spread ≥ 1, range_px ≥ 0 and range_window_px > 0; got "
                                f"{max_spread}, {range_px}, {range_window_px}.")
        self.step, self.max_fb_px, self.min_texture = step, max_fb_px, min_texture
        self.max_spread, self.range_px, self.range_window_px = max_spread, range_px, range_window_px

    def __call__(self, image0: np.ndarray, image1: np.ndarray) -> Matches:
        _check_gray(image0, "image0")
        _check_gray(image1, "image1")
        if image0.shape != image1.shape:
            raise BadInputError(f"FlowMatcher needs images of one size; got {image0.shape} and {image1.shape}.")
        h, w = image0.shape
        scale = w / 256.0
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)  # per call: not thread-safe to share
        forward = dis.calc(image0, image1, None)
        backward = dis.calc(image1, image0, None)
        step = max(1.0, self.step * scale)
        ys, xs = np.mgrid[step / 2: h: step, step / 2: w: step]
        pts0 = np.stack([xs.ravel(), ys.ravel()], axis=1)  # continuous frame: pixel centres at +0.5
        rows, cols = np.floor(pts0[:, 1]).astype(int), np.floor(pts0[:, 0]).astype(int)
        # [N, 6] (λ₁, λ₂, v₁, v₂) of the 5×5 structure tensor; min(λ₁, λ₂) is cv2.cornerMinEigenVal.
        tensor = cv2.cornerEigenValsAndVecs(image0.astype(np.float32) / 255.0, 5, 3)[rows, cols].astype(np.float64)
        textured = tensor[:, :2].min(axis=1) > self.min_texture
        pts1 = pts0 + _sample(forward, pts0)
        back = pts1 + _sample(backward, pts1)
        error = np.linalg.norm(back - pts0, axis=1)
        limit = self.max_fb_px * scale
        inside = (pts1[:, 0] >= 0) & (pts1[:, 0] < w) & (pts1[:, 1] >= 0) & (pts1[:, 1] < h)
        keep = textured & inside & (error < limit)
        covariance = _edge_covariance(tensor[keep], self.max_spread)
        if self.range_px > 0:
            window = np.ones((max(1, round(self.range_window_px * scale)),) * 2, np.uint8)
            spread = np.max([cv2.dilate(forward[..., c], window) - cv2.erode(forward[..., c], window)
                             for c in range(2)], axis=0)[rows[keep], cols[keep]]
            extra = (spread / (self.range_px * scale)) ** 2
            covariance[:, 0] += extra
            covariance[:, 2] += extra
        return Matches(pts0[keep], pts1[keep], np.exp(-((error[keep] / limit) ** 2)), covariance)


def _edge_covariance(tensor: np.ndarray, max_spread: float) -> np.ndarray:
    """[M, 3] (σxx, σxy, σyy) = u uᵀ + min(λmax/λmin, max_spread)·e eᵀ of structure tensors [M, 6] (λ₁, λ₂, v₁, v₂ as
    cv2.cornerEigenValsAndVecs gives them), u across the local edge (the larger eigenvalue's direction), e along it."""
    first = tensor[:, 0] >= tensor[:, 1]
    lam_max = np.where(first, tensor[:, 0], tensor[:, 1])
    lam_min = np.maximum(np.where(first, tensor[:, 1], tensor[:, 0]), 1e-12)
    across = np.where(first[:, None], tensor[:, 2:4], tensor[:, 4:6])
    length = np.linalg.norm(across, axis=1, keepdims=True)
    across = np.where(length > 1e-12, across / np.maximum(length, 1e-12), [1.0, 0.0])
    along = np.stack([-across[:, 1], across[:, 0]], axis=1)
    ratio = np.clip(lam_max / lam_min, 1.0, max_spread)[:, None, None]
    sigma = across[:, :, None] * across[:, None, :] + ratio * along[:, :, None] * along[:, None, :]
    return np.stack([sigma[:, 0, 0], sigma[:, 0, 1], sigma[:, 1, 1]], axis=1)


def _sample(field_: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Bilinear samples [N, 2] of an [H, W, 2] flow field at continuous-frame points [N, 2] (clamped to the image)."""
    h, w = field_.shape[:2]
    x = np.clip(pts[:, 0] - 0.5, 0, w - 1)
    y = np.clip(pts[:, 1] - 0.5, 0, h - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    top = field_[y0, x0] * (1 - fx) + field_[y0, x1] * fx
    bottom = field_[y1, x0] * (1 - fx) + field_[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


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
# The robust fit (what the product uses)


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
    """[E, 4, 4, 4] OpenCV c2w of the four nearby views under each candidate polar (see :func:`_pose_hypotheses`)."""
    config = config or PolarSearchConfig()
    return np.stack([_pose_hypotheses(float(e), config) for e in polars])


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
        if not _positive_definite(found[:, 5:]).all():
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


# ---------------------------------------------------------------------------------------------------------------------
# Images → polar angle


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


def foreground_mask(image: np.ndarray, threshold: int = 245) -> np.ndarray:
    """[H, W] bool: True unless all three channels of the [H, W, 3] uint8 image exceed ``threshold`` (white)."""
    return ~(image > threshold).all(axis=-1)


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
            raise BadInputError(f"Image {n} must be an [H, W, 3] uint8 RGB array; got {_describe(image)}.")
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
