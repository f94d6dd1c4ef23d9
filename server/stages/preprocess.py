"""Pre-processing of the user's image into Zero123's input (spec §1.2).

Pipeline (:func:`preprocess`):

1. :func:`load_image` reads any image Pillow reads (PNG/JPEG/WebP/TIFF/…, 8/16-bit, float, grey, palette, CMYK, with
   or without alpha) into 8-bit RGB or RGBA, applying EXIF orientation, and rejects everything else with a
   :class:`~server.common.errors.BadInputError` that names the problem and what is allowed.
2. The image is thumbnailed to fit 512×512 (LANCZOS, aspect kept), as the reference does.
3. The object mask comes from, in this order: the image's own alpha channel when it is meaningful
   (:func:`has_meaningful_alpha`, method ``"alpha"``); the whole image when background removal is off (``"none"``);
   SAM ViT-H with a box prompt when its weights are available (:class:`SamSegmenter`, ``"sam"``); otherwise a
   weight-free estimate for plain backgrounds (:func:`estimate_foreground`, ``"foreground-estimate"``).
4. :func:`recentre` crops the object's tight box, pads it to a square in which the object's longer side fills 75 %,
   and resizes to 256×256; :func:`composite_on_white` flattens it onto white.

The reference derives SAM's box prompt from ``rembg`` (a second network, with its own weights); here the box comes
from :func:`estimate_foreground`, so SAM needs no other model. Every array in this module is ``uint8`` unless stated.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import cv2
import numpy as np
from PIL import Image, ImageOps
from scipy import ndimage

from server.common.errors import BadInputError, CheckpointError, MissingWeightsError, describe_value
from server.common.images import ACCEPTED, check_image_size, decoded, open_image
from server.stages.sam_compat import import_segment_anything, use_chunked_attention

if TYPE_CHECKING:
    import torch
    from segment_anything.modeling import Sam

THUMBNAIL_SIZE = 512
"""The reference thumbnails the input to fit 512×512 before segmentation (spec §1.2 step 1)."""
OUTPUT_SIZE = 256
"""Side of Zero123's input image (spec §1.2 step 4)."""
OBJECT_FILL = 0.75
"""Fraction of the output side taken by the object's longer side (spec §1.2 step 4)."""
SAM_FETCH_COMMAND = "one2345 weights download --only sam"
"""The command that fetches the SAM ViT-H weights."""

Method = Literal["alpha", "sam", "foreground-estimate", "none"]
ImageSource = str | Path | bytes | Image.Image | np.ndarray
"""What :func:`load_image` reads: a file path, the file's bytes, a PIL image or an array (see there)."""


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def load_image(source: ImageSource) -> Image.Image:
    """Read an image into 8-bit RGB or RGBA with EXIF orientation applied.

    Modes are converted by value, not clipped: 16-bit (``I;16*``, and ``I`` taken as 16-bit) is divided by 257,
    float (``F``) is taken as [0, 1] when its maximum is ≤ 1 and as [0, 255] otherwise; grey, palette (with its
    transparency), CMYK, premultiplied ``RGBa``/``La`` and the other Pillow modes go through Pillow's converters.

    Args:
        source: a file path, the file's bytes, a PIL image, or an array [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]
            of uint8, uint16 (scaled by 1/257), bool, or float in [0, 1].

    Returns:
        A loaded PIL image in mode ``RGB`` or ``RGBA`` (RGBA only when the source has an alpha channel or palette
        transparency), at least 16 px a side and at most 40 megapixels.

    Raises:
        BadInputError: missing/empty/truncated/non-image file, unsupported array, decompression bomb, or a size
            outside the allowed range.
    """
    if isinstance(source, np.ndarray):
        image = _from_array(source)
        _check_size(image.size, "array")
        return image
    if isinstance(source, Image.Image):
        image, name = source, "image"
        _check_size(image.size, name)
        image = _decode(lambda: _loaded(image), name)
    else:
        data, name = _read_bytes(source)
        image = _decode(lambda: _open_checked(data, name), name)
    image = _exif_transpose(image)
    _check_size(image.size, name)
    return _to_rgb_or_rgba(image, name)


def _read_bytes(source: str | Path | bytes) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), "uploaded image"
    elif isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        name = str(path)
        if not path.is_file():
            raise BadInputError(f"input image {name!r} does not exist or is not a file; expected {ACCEPTED}")
        data = path.read_bytes()
    else:
        raise BadInputError(
            f"input image of type {type(source).__name__} cannot be used; expected a path, bytes, a PIL image or a "
            "numpy array"
        )
    if not data:
        raise BadInputError(f"input image {name!r} is empty (0 bytes); expected {ACCEPTED}")
    return data, name


def _open_checked(data: bytes, name: str) -> Image.Image:
    return open_image(data, name)  # the size rule from the header, then every pixel (server.common.images)


def _loaded(image: Image.Image) -> Image.Image:
    image.load()
    return image


_decode = decoded  # Pillow's errors in our words; the size rule's own error passes through (issue #31, 11)


def _check_size(size: tuple[int, int], name: str) -> None:
    check_image_size(size, f"input image {name!r}")


def _exif_transpose(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError):
        # A malformed EXIF block is not worth rejecting the picture for; use the stored orientation.
        return image


def _to_rgb_or_rgba(image: Image.Image, name: str) -> Image.Image:
    mode = image.mode
    if mode in ("RGB", "RGBA"):
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_grey_to_uint8(np.asarray(image), mode)).convert("RGB")
    if mode in ("P", "PA"):
        transparent = mode == "PA" or "transparency" in image.info or image.palette.mode == "RGBA"
        return image.convert("RGBA" if transparent else "RGB")
    has_alpha = "A" in image.getbands() or "a" in image.getbands()
    try:
        # RGBa/La (premultiplied) → RGBA un-premultiplies; CMYK → RGB inverts Adobe JPEGs at decode time already.
        return image.convert("RGBA" if has_alpha else "RGB")
    except ValueError as error:
        raise BadInputError(
            f"input image {name!r} has pixel mode {mode!r}, which cannot be converted to RGB; expected {ACCEPTED}"
        ) from error


def _grey_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """[H, W] 16-bit, 32-bit int or float grey → [H, W] uint8, scaled (not clipped) to the full 8-bit range."""
    values = values.astype(np.float64)
    if mode == "F":
        # Float images are [0, 1] by convention; a float image with larger values is taken as 8-bit scaled.
        peak = 1.0 if np.nanmax(values, initial=0.0) <= 1.0 else 255.0
        scaled = values / peak * 255.0
    else:
        # "I;16*" is 16-bit by definition; "I" is what Pillow gave for 16-bit PNG/TIFF before "I;16" existed, so it
        # is taken as 16-bit too.
        scaled = values / 257.0
    return np.clip(np.nan_to_num(np.rint(scaled)), 0, 255).astype(np.uint8)


def _from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise BadInputError(f"input array has shape {array.shape}; expected [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]")
    if array.dtype == np.uint8:
        pixels = array
    elif array.dtype == np.uint16:
        pixels = np.rint(array / 257.0).astype(np.uint8)
    elif array.dtype == np.bool_:
        pixels = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        pixels = np.clip(np.rint(np.nan_to_num(array.astype(np.float64)) * 255.0), 0, 255).astype(np.uint8)
    else:
        raise BadInputError(f"input array has dtype {array.dtype}; expected uint8, uint16, bool or float in [0, 1]")
    if pixels.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(pixels)).convert("RGB")
    return Image.fromarray(np.ascontiguousarray(pixels), mode="RGBA" if pixels.shape[2] == 4 else "RGB")


# ---------------------------------------------------------------------------------------------------------------------
# Masks


def has_meaningful_alpha(
    rgba: Image.Image | np.ndarray, transparent_below: int = 16, min_fraction: float = 1e-3
) -> bool:
    """Whether an alpha channel separates an object from a transparent background.

    True when at least ``min_fraction`` of the pixels are clearly transparent (alpha < ``transparent_below``) and at
    least ``min_fraction`` are mostly opaque (alpha ≥ 128). A constant channel (all 255, or all 0) is not meaningful.

    Args:
        rgba: PIL image (any mode; no alpha band → False) or array [H, W, 4] uint8.
    """
    if isinstance(rgba, Image.Image):
        if "A" not in rgba.getbands():
            return False
        alpha = np.asarray(rgba.getchannel("A"))
    else:
        if rgba.ndim != 3 or rgba.shape[2] != 4:
            return False
        alpha = rgba[..., 3]
    count = alpha.size * min_fraction
    return bool(np.count_nonzero(alpha < transparent_below) >= count and np.count_nonzero(alpha >= 128) >= count)


class BackgroundNotPlainError(BadInputError):
    """The weight-free estimate refused the image: its border does not look like a plain background."""

    def __init__(self, message: str, *, noise: float, outliers: float, fix: str | None = None) -> None:
        super().__init__(message, fix=fix)
        self.noise = noise
        """Median colour deviation (ΔE) of the border from the fitted background."""
        self.outliers = outliers
        """Fraction of the border band that differs from the fitted background."""


@dataclass(frozen=True)
class ForegroundConfig:
    """Settings of :func:`estimate_foreground`. Colour distances are CIE76 ΔE in Lab (L in [0, 100])."""

    border_fraction: float = 0.02
    """Width of the border band that samples the background, as a fraction of the shorter side (at least 2 px)."""
    median_kernel: int = 3
    """Median pre-filter (odd, 1 = off): suppresses sensor/JPEG noise without moving edges, as a blur would."""
    noise_factor: float = 4.0
    """Threshold = max(``min_threshold``, ``noise_factor`` × median border residual): ~6σ for Gaussian noise."""
    min_threshold: float = 6.0
    """Smallest colour distance that counts as object (≈ a just clearly visible difference)."""
    max_noise: float = 8.0
    """Largest median border residual (ΔE) of a background still called plain."""
    max_border_outliers: float = 0.4
    """Largest fraction of the border band that may differ from the background model (object touching the edge)."""
    min_component_fraction: float = 0.01
    """Object components smaller than this fraction of the largest one are specks and dropped."""
    min_component_pixels: int = 16
    """Object components smaller than this many pixels are specks and dropped."""


def estimate_foreground(rgb: np.ndarray, config: ForegroundConfig | None = None) -> np.ndarray:
    """Weight-free object mask for an object on a plain (uniform, noisy or smoothly graded) background.

    The background is modelled from the image border as a quadratic colour field in Lab (a constant colour is the
    special case), fitted robustly (border pixels that differ from the fit, e.g. where the object touches the edge,
    are dropped and the fit repeated). Pixels within the noise threshold of the model that are connected (4-connected)
    to the image border are background; everything else is object, so background-coloured holes enclosed by the
    object are filled. Object components much smaller than the largest are removed as specks.

    Args:
        rgb: [H, W, 3] uint8.
        config: thresholds; the defaults suit photographs and renders on studio backgrounds.

    Returns:
        [H, W] bool, True on the object; all False when nothing differs from the background.

    Raises:
        BackgroundNotPlainError: (a BadInputError) the border is not plain: a high residual spread, or too much of it
            differs from the background model.
    """
    config = config or ForegroundConfig()
    _check_rgb(rgb, "rgb")
    height, width = rgb.shape[:2]
    smooth = cv2.medianBlur(rgb, config.median_kernel) if config.median_kernel > 1 else rgb
    lab = cv2.cvtColor(smooth.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab).reshape(-1, 3).astype(np.float64)

    band = max(2, round(config.border_fraction * min(height, width)))
    border = np.zeros((height, width), bool)
    border[:band], border[-band:], border[:, :band], border[:, -band:] = True, True, True, True
    design = _quadratic_design(height, width)  # [H·W, 6]
    border_idx = np.flatnonzero(border)
    border_lab, border_design = lab[border_idx], design[border_idx]

    # Robust fit: start from the median colour (insensitive to an object on < half of the border), then refit the
    # quadratic field on the inliers of the previous model.
    coeffs = np.zeros((design.shape[1], 3))
    coeffs[0] = np.median(border_lab, axis=0)
    for _ in range(4):
        residual = np.linalg.norm(border_lab - border_design @ coeffs, axis=1)
        noise = float(np.median(residual))
        threshold = max(config.min_threshold, config.noise_factor * noise)
        inliers = residual <= threshold
        if inliers.sum() < design.shape[1] * 4:
            break
        coeffs, *_ = np.linalg.lstsq(border_design[inliers], border_lab[inliers], rcond=None)
    residual = np.linalg.norm(border_lab - border_design @ coeffs, axis=1)
    noise = float(np.median(residual))
    threshold = max(config.min_threshold, config.noise_factor * noise)
    outliers = float(np.mean(residual > threshold))
    if noise > config.max_noise or outliers > config.max_border_outliers:
        raise BackgroundNotPlainError(
            f"the background is not plain enough to separate the object without a segmentation model (median "
            f"colour deviation along the border {noise:.1f} ΔE, allowed ≤ {config.max_noise}; {outliers:.0%} of the "
            f"border differs from the background, allowed ≤ {config.max_border_outliers:.0%}); supply an RGBA image "
            f"with the background removed, or install the SAM weights with `{SAM_FETCH_COMMAND}`",
            noise=noise,
            outliers=outliers,
            fix=f"use an RGBA image with a transparent background, or run `{SAM_FETCH_COMMAND}`",
        )

    distance = np.linalg.norm(lab - design @ coeffs, axis=1).reshape(height, width)
    background_like = distance <= threshold
    labels, _ = ndimage.label(background_like)  # 4-connected: the background cannot leak through diagonal gaps
    border_labels = np.unique(labels[border & background_like])
    background = np.isin(labels, border_labels[border_labels > 0])
    return _remove_specks(~background, config)


def _quadratic_design(height: int, width: int) -> np.ndarray:
    """[H·W, 6] float64: 1, x, y, x², xy, y² with x, y in [−1, 1] (row-major pixel order)."""
    y, x = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
    x, y = x.ravel(), y.ravel()
    return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=1)


def _remove_specks(mask: np.ndarray, config: ForegroundConfig) -> np.ndarray:
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if count == 0:
        return mask
    areas = np.bincount(labels.ravel())[1:]
    keep = areas >= max(config.min_component_pixels, config.min_component_fraction * areas.max())
    return np.concatenate([[False], keep])[labels]


def _check_rgb(rgb: np.ndarray, name: str) -> None:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise BadInputError(f"{name} must be a uint8 array [H, W, 3], got {describe_value(rgb)}")



def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight box (x_min, y_min, x_max, y_max), inclusive pixel indices, of the True pixels of [H, W]; None if none."""
    columns, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    if columns.size == 0:
        return None
    return int(columns[0]), int(rows[0]), int(columns[-1]), int(rows[-1])


# ---------------------------------------------------------------------------------------------------------------------
# SAM


def _import_segment_anything() -> tuple[type, dict]:
    sam = import_segment_anything()
    return sam.SamPredictor, sam.sam_model_registry


def load_sam_state_dict(model: torch.nn.Module, path: str | Path) -> None:
    """Load a SAM checkpoint (a plain state dict, as ``sam_vit_h_4b8939.pth``) into ``model`` strictly.

    Raises:
        MissingWeightsError: the file does not exist.
        CheckpointError: unreadable file, not a state dict, or keys/shapes that do not match ``model``.
    """
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingWeightsError(f"SAM ViT-H weights not found: {path}", fix=f"run `{SAM_FETCH_COMMAND}`")
    fix = f"delete {path} and run `{SAM_FETCH_COMMAND}`"
    try:
        # weights_only: the published file holds tensors only; nothing in it needs to run code. mmap (zip files,
        # i.e. every torch >= 1.6 save): the weights stay file-backed pages the kernel can drop and re-read, instead
        # of 2.4 GiB of heap for ViT-H.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"cannot read SAM weights {path}: {error}", fix=fix) from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"SAM weights {path} are not a state dict of tensors; expected sam_vit_h_4b8939.pth", fix=fix
        )
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        details = "; ".join(
            f"{label} ({len(keys)}): {', '.join(keys[:3])}{', …' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
            if keys
        )
        raise CheckpointError(f"SAM weights {path} do not fit the SAM network: {details}", fix=fix)
    # assign: the model takes the loaded (mapped) tensors themselves rather than copying them into its own storage,
    # so a model built on the meta device never allocates its weights at all.
    model.load_state_dict(state, strict=True, assign=True)
    unset = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
    if unset:
        raise CheckpointError(
            f"SAM network tensors that no checkpoint entry sets and that were built without values: "
            f"{', '.join(unset[:3])}{', …' if len(unset) > 3 else ''}; build the network on a real device"
        )


class SamSegmenter:
    """SAM with a box prompt, returning the reference's choice of mask: the **last** of the three (spec §1.2 step 3).

    The reference takes ``masks[-1]`` (its comment shows ``np.argmax(scores)`` was considered and dropped); with a
    box prompt the last multimask output is usually the largest, whole-object mask.
    """

    def __init__(self, model: Sam) -> None:
        """Wrap an already built SAM model (any size; the predictor resizes to ``model.image_encoder.img_size``)."""
        predictor_cls, _ = _import_segment_anything()
        self.model = model.eval()
        # ViT-H's global attention blocks would otherwise hold 3 GiB of scores at once on the CPU (issue #25).
        use_chunked_attention(self.model)
        self.predictor = predictor_cls(self.model)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path | None = None,
        device: str | torch.device = "cpu",
        *,
        build: Callable[[], Sam] | None = None,
    ) -> SamSegmenter:
        """Build SAM ViT-H (``sam_model_registry["vit_h"]``) and load ``path`` strictly.

        Args:
            path: the checkpoint; None looks up ``sam_vit_h_4b8939.pth`` in the weights folder.
            device: where the model runs.
            build: builds the (randomly initialised) network; defaults to ViT-H. Tests pass a tiny SAM.

        Raises:
            MissingWeightsError: the file is absent (the fix is ``one2345 weights download --only sam``).
            CheckpointError: the file is unreadable or is not SAM ViT-H.
        """
        if path is None:
            from server.common.weights import resolve

            path = resolve("sam")
        path = Path(path).expanduser()
        if not path.is_file():  # before building ViT-H: that takes seconds and 2.5 GB
            raise MissingWeightsError(f"SAM ViT-H weights not found: {path}", fix=f"run `{SAM_FETCH_COMMAND}`")
        if build is None:
            _, registry = _import_segment_anything()

            def build() -> Sam:
                return registry["vit_h"](checkpoint=None)

        import torch

        # On the meta device: no 2.4 GiB of random initial values that the checkpoint replaces anyway.
        with torch.device("meta"):
            model = build()
        load_sam_state_dict(model, path)
        return cls(model.to(device))

    def __call__(self, rgb: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        """Segment the object inside ``box``.

        Args:
            rgb: [H, W, 3] uint8.
            box: (x_min, y_min, x_max, y_max) in pixels of ``rgb``.

        Returns:
            [H, W] bool: the last of SAM's three masks.
        """
        import torch

        _check_rgb(rgb, "rgb")
        x0, y0, x1, y1 = (float(v) for v in box)
        height, width = rgb.shape[:2]
        if not (0 <= x0 <= x1 < width and 0 <= y0 <= y1 < height):
            raise BadInputError(f"box {tuple(box)} is not inside the {width}×{height} image as (x0, y0, x1, y1)")
        with torch.inference_mode():
            self.predictor.set_image(np.ascontiguousarray(rgb))
            masks, _scores, _logits = self.predictor.predict(box=np.array([x0, y0, x1, y1]), multimask_output=True)
        return np.asarray(masks[-1], dtype=bool)


# ---------------------------------------------------------------------------------------------------------------------
# Recentring and compositing


def recentre(rgba: np.ndarray, fill: float = OBJECT_FILL, size: int = OUTPUT_SIZE) -> np.ndarray:
    """Centre the object on a transparent square where its longer side is ``fill`` of the side, then resize.

    Exactly the reference's ``image_preprocess_nosave`` (spec §1.2 step 4): tight box (x, y, w, h) of alpha > 0;
    side = int(max(w, h) / fill); the crop is pasted with its top-left corner at (side//2 − w//2, side//2 − h//2);
    the square is resized to ``size``×``size`` with LANCZOS (Pillow resamples RGBA premultiplied).

    Args:
        rgba: [H, W, 4] uint8.

    Returns:
        [size, size, 4] uint8.

    Raises:
        BadInputError: the alpha channel is all zero (no object), or ``fill`` is not in (0, 1].
    """
    if rgba.dtype != np.uint8 or rgba.ndim != 3 or rgba.shape[2] != 4:
        raise BadInputError(f"rgba must be a uint8 array [H, W, 4], got {describe_value(rgba)}")
    if not 0 < fill <= 1:
        raise BadInputError(f"fill must be in (0, 1], got {fill}")
    box = mask_bbox(rgba[..., 3] > 0)
    if box is None:
        raise BadInputError("no object found: the mask (alpha channel) is empty")
    x0, y0, x1, y1 = box
    w, h = x1 - x0 + 1, y1 - y0 + 1
    side = int(max(w, h) / fill)
    centre = side // 2
    canvas = np.zeros((side, side, 4), np.uint8)
    top, left = centre - h // 2, centre - w // 2
    canvas[top : top + h, left : left + w] = rgba[y0 : y1 + 1, x0 : x1 + 1]
    return np.asarray(Image.fromarray(canvas, mode="RGBA").resize((size, size), Image.Resampling.LANCZOS))


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Alpha-composite over white: rgb·a + (1 − a) on floats in [0, 1], then ×255 and rounded.

    The reference truncates (``astype(np.uint8)``) instead of rounding, which turns e.g. an opaque 200 into 199 when
    the float product lands just below the integer; rounding keeps opaque pixels exact (differences ≤ 1 level).

    Args:
        rgba: [H, W, 4] uint8.

    Returns:
        [H, W, 3] uint8.
    """
    values = rgba.astype(np.float64) / 255.0
    alpha = values[..., 3:]
    rgb = values[..., :3] * alpha + (1.0 - alpha)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------------
# Entry point


@dataclass
class PreprocessResult:
    """The model input and how it was made."""

    image: np.ndarray
    """[256, 256, 3] uint8: the object recentred and composited on white (Zero123's input, ``input_256``)."""
    rgba: np.ndarray
    """[256, 256, 4] uint8: the same before compositing (alpha = the object mask, resampled)."""
    method: Method
    """Where the mask came from: ``"alpha"``, ``"sam"``, ``"foreground-estimate"`` or ``"none"`` (whole image)."""
    bbox: tuple[int, int, int, int]
    """Tight box (x_min, y_min, x_max, y_max), inclusive, of the object (alpha > 0) in the 512-thumbnail frame."""


def preprocess(
    source: ImageSource,
    remove_background: bool = True,
    segmenter: SamSegmenter | None = None,
) -> PreprocessResult:
    """Turn the user's image into Zero123's 256×256 input (spec §1.2).

    Args:
        source: anything :func:`load_image` accepts.
        remove_background: False keeps the whole (thumbnailed) image as the object (method ``"none"``); ignored when
            the image has a meaningful alpha channel, which always wins.
        segmenter: SAM, when its weights are available; the box prompt comes from :func:`estimate_foreground`.

    Raises:
        BadInputError: unreadable input, a background too busy for the estimate, or an empty mask.
    """
    image = load_image(source)
    # Pillow's thumbnail: only shrinks, keeps the aspect, same call as the reference.
    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.LANCZOS)
    rgb = np.asarray(image.convert("RGB"))
    method: Method
    if image.mode == "RGBA" and has_meaningful_alpha(image):
        rgba, method = np.array(image), "alpha"
    else:
        if image.mode == "RGBA" and not np.asarray(image.getchannel("A")).any():
            raise BadInputError("no object found: the image is fully transparent (alpha 0 everywhere)")
        if not remove_background:
            mask, method = np.ones(rgb.shape[:2], bool), "none"
        elif segmenter is not None:
            try:
                estimate = estimate_foreground(rgb)
            except BackgroundNotPlainError as error:
                # The reference boxes the object with rembg (another network); our box comes from the estimate.
                raise BadInputError(
                    "cannot place SAM's box prompt: the background is not plain enough for the weight-free object "
                    f"estimate that provides it (median border deviation {error.noise:.1f} ΔE, {error.outliers:.0%} "
                    "of the border unlike the background); supply an RGBA image with the background removed",
                    fix="remove the background (transparent PNG) or crop the image closer to the object",
                ) from error
            box = mask_bbox(estimate)
            if box is None:
                raise BadInputError("no object found: nothing differs from the plain background to prompt SAM with")
            mask, method = segmenter(rgb, box), "sam"
        else:
            mask, method = estimate_foreground(rgb), "foreground-estimate"
        if not mask.any():
            raise BadInputError(f"no object found: the {method} mask is empty")
        rgba = np.dstack([rgb, mask.astype(np.uint8) * 255])
    bbox = mask_bbox(rgba[..., 3] > 0)
    if bbox is None:
        raise BadInputError("no object found: the mask is empty")
    rgba_256 = recentre(rgba)
    return PreprocessResult(image=composite_on_white(rgba_256), rgba=rgba_256, method=method, bbox=bbox)
