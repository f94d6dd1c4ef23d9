"""Feature matchers for the elevation estimate: the contract (:class:`Matcher`, :class:`Matches`), OpenCV SIFT, dense
DIS optical flow with a forward–backward check and a per-match covariance (:class:`FlowMatcher`), and the reference's
LoFTR (torch and kornia are imported by :class:`LoFTRMatcher` alone).

Keypoints are (x, y) in the continuous pixel frame described in :mod:`server.stages.elevation`.
"""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import cv2
import numpy as np

from server.common.errors import BadInputError, CheckpointError, MissingWeightsError, describe_value
from server.common.weights import resolve

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


def positive_definite(covariance: np.ndarray) -> np.ndarray:
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
        if not (np.isfinite(self.covariance).all() and positive_definite(self.covariance).all()):
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



def _check_gray(image: np.ndarray, which: str) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 2:
        raise BadInputError(f"{which} must be a [H, W] uint8 grayscale array; got {describe_value(image)}.")


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
        weights_dir: the weights folder of :mod:`server.common.weights` (LoFTR's file sits at its registry path there);
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
