"""Tests of server/preprocess.py: loading every Pillow mode, the foreground estimate, recentring, SAM (tiny model)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, features

from server.common.errors import BadInputError, CheckpointError, MissingWeightsError
from server.stages import preprocess as pp

RNG_SEED = 0


# ---------------------------------------------------------------------------------------------------------------------
# helpers


def _png_bytes(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width``×``height`` RGB but whose data is a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _rgb_test_image(height: int = 48, width: int = 64) -> np.ndarray:
    rng = np.random.default_rng(RNG_SEED)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


# Synthetic scene: an ellipse plus a stem, coloured with a texture far from the background colours used below.
H, W = 300, 360
_YY, _XX = np.mgrid[:H, :W]
TRUTH = (((_XX - 180) / 90.0) ** 2 + ((_YY - 140) / 100.0) ** 2 <= 1) | (
    (np.abs(_XX - 180) < 25) & (_YY > 200) & (_YY < 270)
)
TRUTH_BOX = (90, 40, 270, 269)  # x_min, y_min, x_max, y_max of TRUTH, by construction


def _scene(background: np.ndarray, noise: float = 4.0, seed: int = RNG_SEED) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = background.astype(np.float64).copy()
    texture = np.stack([70 + 50 * np.sin(_XX / 11.0), 110 + 40 * np.cos(_YY / 7.0), 50 + 0 * _XX], axis=-1)
    image[TRUTH] = texture[TRUTH]
    image += rng.normal(0.0, noise, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


PLAIN = np.broadcast_to(np.array([236.0, 233.0, 229.0]), (H, W, 3))
GRADIENT = np.stack([140 + 100 * _XX / W, 175 + 60 * _YY / H, 215 - 60 * _XX / W], axis=-1)


# ---------------------------------------------------------------------------------------------------------------------
# load_image: formats and modes


def test_png_8bit_rgb_and_rgba_round_trip_exactly(tmp_path: Path) -> None:
    rgb = _rgb_test_image()
    Image.fromarray(rgb).save(tmp_path / "a.png")
    out = pp.load_image(tmp_path / "a.png")
    assert out.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(out), rgb)

    rgba = np.dstack([rgb, np.arange(rgb.shape[0] * rgb.shape[1]).reshape(rgb.shape[:2]) % 256]).astype(np.uint8)
    out = pp.load_image(_png_bytes(Image.fromarray(rgba, mode="RGBA")))
    assert out.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(out), rgba)


# 16-bit values chosen so that clipping to 255 (Pillow's own I;16 → L conversion) or taking the low byte would fail.
GREY16 = np.array([0, 256, 257, 300, 1000, 32768, 40000, 65535] * 4, dtype=np.uint16).reshape(2, 16).repeat(8, 0)
GREY16_AS_8BIT = np.rint(GREY16 / 257.0).astype(np.uint8)  # [0, 1, 1, 1, 4, 128, 156, 255]


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_grey_is_scaled_not_clipped(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"g16.{fmt.lower()}"
    Image.fromarray(GREY16).save(path, format=fmt)
    assert Image.open(path).mode.startswith("I;16")  # the file really is 16-bit
    out = np.asarray(pp.load_image(path))
    assert out.shape == (*GREY16.shape, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], GREY16_AS_8BIT)


def test_32bit_int_and_float_grey_are_scaled() -> None:
    out = np.asarray(pp.load_image(Image.fromarray(GREY16.astype(np.int32))))  # mode "I", taken as 16-bit
    np.testing.assert_array_equal(out[..., 0], GREY16_AS_8BIT)
    values = np.linspace(0.0, 1.0, 32 * 16, dtype=np.float32).reshape(16, 32)
    image = Image.fromarray(values)
    assert image.mode == "F"
    out = np.asarray(pp.load_image(_png_bytes(image, "TIFF")))
    np.testing.assert_array_equal(out[..., 1], np.rint(values.astype(np.float64) * 255).astype(np.uint8))


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_rgb_written_by_opencv(tmp_path: Path, fmt: str) -> None:
    rgb16 = np.random.default_rng(RNG_SEED).integers(0, 65536, (20, 24, 3), dtype=np.uint16)
    path = tmp_path / f"rgb16.{fmt.lower()}"
    assert cv2.imwrite(str(path), rgb16[..., ::-1])  # OpenCV writes BGR
    out = np.asarray(pp.load_image(path)).astype(np.float64)
    # Pillow keeps the high byte (floor(v/256)); the exact scaling is v/257: they differ by < 1 level.
    assert np.abs(out - rgb16 / 257.0).max() <= 1.0


def test_jpeg_and_webp(tmp_path: Path) -> None:
    smooth = np.stack([*np.meshgrid(np.linspace(30, 220, 64), np.linspace(50, 200, 48)), np.full((48, 64), 90.0)], -1)
    smooth = smooth.astype(np.uint8)
    out = np.asarray(pp.load_image(_png_bytes(Image.fromarray(smooth), "JPEG", quality=95)))
    assert np.abs(out.astype(int) - smooth).mean() < 2.0
    if not features.check("webp"):
        pytest.skip("this Pillow build has no WebP support")
    rgba = np.dstack([smooth, np.full(smooth.shape[:2], 255, np.uint8)])
    rgba[:10, :10, 3] = 0
    out = np.asarray(pp.load_image(_png_bytes(Image.fromarray(rgba, mode="RGBA"), "WEBP", lossless=True)))
    np.testing.assert_array_equal(out[..., 3], rgba[..., 3])
    visible = rgba[..., 3] > 0
    np.testing.assert_array_equal(out[visible][:, :3], smooth[visible])


def test_grey_and_grey_alpha() -> None:
    grey = _rgb_test_image()[..., 0]
    out = np.asarray(pp.load_image(_png_bytes(Image.fromarray(grey, mode="L"))))
    assert out.shape == (*grey.shape, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)
    alpha = np.flipud(grey)
    out = pp.load_image(_png_bytes(Image.fromarray(np.dstack([grey, alpha]), mode="LA")))
    assert out.mode == "RGBA"
    arr = np.asarray(out)
    np.testing.assert_array_equal(arr[..., 0], grey)
    np.testing.assert_array_equal(arr[..., 2], grey)
    np.testing.assert_array_equal(arr[..., 3], alpha)


def test_palette_with_and_without_transparency() -> None:
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9)
    index = (np.arange(32 * 32).reshape(32, 32) // 7 % 3).astype(np.uint8)
    image = Image.fromarray(index, mode="P")
    image.putpalette(palette)
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)

    out = pp.load_image(_png_bytes(image))
    assert out.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(out), colours[index])

    out = pp.load_image(_png_bytes(image, transparency=1))  # palette index 1 (green) is transparent
    assert out.mode == "RGBA"
    arr = np.asarray(out)
    np.testing.assert_array_equal(arr[..., 3], np.where(index == 1, 0, 255))
    np.testing.assert_array_equal(arr[index != 1][:, :3], colours[index[index != 1]])


def test_cmyk_jpeg() -> None:
    # Flat 16×16 patches with K = 0, so the expected RGB is simply 255 − (C, M, Y).
    cmy = np.array([[0, 255, 255], [255, 0, 255], [255, 255, 0], [0, 0, 0], [128, 64, 0], [0, 128, 200]], np.uint8)
    patches = np.concatenate([np.broadcast_to(np.append(c, 0).astype(np.uint8), (16, 16, 4)) for c in cmy], axis=1)
    data = _png_bytes(Image.fromarray(np.ascontiguousarray(patches), mode="CMYK"), "JPEG", quality=98)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = np.asarray(pp.load_image(data))
    assert out.shape == (16, 16 * len(cmy), 3)
    for i, c in enumerate(cmy):
        centre = out[4:12, 16 * i + 4 : 16 * i + 12].reshape(-1, 3).astype(int)
        assert np.abs(centre - (255 - c.astype(int))).max() <= 6, (c, centre.mean(0))


def test_premultiplied_rgba_is_unpremultiplied() -> None:
    rgba = np.dstack([_rgb_test_image(), np.full((48, 64), 255, np.uint8)])
    rgba[:, :32, 3] = 0
    out = np.asarray(pp.load_image(Image.fromarray(rgba, mode="RGBA").convert("RGBa")))
    np.testing.assert_array_equal(out[:, 32:], rgba[:, 32:])
    np.testing.assert_array_equal(out[:, :32, 3], 0)


def test_numpy_inputs() -> None:
    rgb16 = np.random.default_rng(RNG_SEED).integers(0, 65536, (20, 24, 3), dtype=np.uint16)
    np.testing.assert_array_equal(np.asarray(pp.load_image(rgb16)), np.rint(rgb16 / 257.0).astype(np.uint8))
    values = np.linspace(0, 1, 20 * 24).reshape(20, 24)
    np.testing.assert_array_equal(np.asarray(pp.load_image(values))[..., 0], np.rint(values * 255).astype(np.uint8))
    mask = values > 0.5
    np.testing.assert_array_equal(np.asarray(pp.load_image(mask))[..., 2], mask * 255)
    with pytest.raises(BadInputError, match=r"shape \(20, 24, 2\)"):
        pp.load_image(np.zeros((20, 24, 2), np.uint8))
    with pytest.raises(BadInputError, match="dtype complex128"):
        pp.load_image(np.zeros((20, 24), complex))


def test_exif_orientation_is_applied() -> None:
    stored = np.zeros((40, 80, 3), np.uint8)
    stored[:, :40] = (255, 0, 0)  # left half red
    stored[:, 40:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    data = _png_bytes(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())
    loaded = pp.load_image(data)
    out = np.asarray(loaded).astype(int)
    assert out.shape == (80, 40, 3)  # displayed upright: portrait
    assert pp.load_image(loaded).size == (40, 80)  # the tag is consumed: loading again does not rotate twice
    # Rotating clockwise moves the stored left column to the top row.
    assert np.abs(out[5:35].mean((0, 1)) - (255, 0, 0)).max() < 10
    assert np.abs(out[45:75].mean((0, 1)) - (0, 0, 255)).max() < 10


# ---------------------------------------------------------------------------------------------------------------------
# load_image: rejections


def test_rejects_missing_empty_and_non_image_files(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="does not exist"):
        pp.load_image(tmp_path / "nope.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(BadInputError, match=r"empty \(0 bytes\)"):
        pp.load_image(tmp_path / "empty.png")
    with pytest.raises(BadInputError, match=r"empty \(0 bytes\)"):
        pp.load_image(b"")
    (tmp_path / "notes.png").write_text("just some text, not pixels\n" * 20)
    with pytest.raises(BadInputError, match=r"not an image Pillow can identify.*PNG, JPEG, WebP, TIFF"):
        pp.load_image(tmp_path / "notes.png")
    with pytest.raises(BadInputError, match="type int"):
        pp.load_image(42)  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_rejects_truncated_files(fmt: str) -> None:
    data = _png_bytes(Image.fromarray(_rgb_test_image(128, 128)), fmt)
    with pytest.raises(BadInputError, match="truncated or corrupt"):
        pp.load_image(data[: len(data) // 2])


def test_rejects_huge_and_tiny_images(monkeypatch: pytest.MonkeyPatch) -> None:
    # 60k × 60k: Pillow's own decompression-bomb guard fires while reading the header.
    with pytest.raises(BadInputError, match=r"too large to decode safely.*40,000,000"):
        pp.load_image(_png_with_header(60_000, 60_000))
    # 7k × 7k = 49 MP is below Pillow's limit but above ours; rejected from the header, before decoding.
    with pytest.raises(BadInputError, match=r"7000×7000 = 49,000,000 pixels \(49.0 MP\), too large; allowed: "
                                             r".*at most 40,000,000"):
        pp.load_image(_png_with_header(7000, 7000))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # our limit does not depend on Pillow's
    with pytest.raises(BadInputError, match="at most 40,000,000"):
        pp.load_image(_png_with_header(60_000, 60_000))
    with pytest.raises(BadInputError, match="8×100 px, too small; allowed: each side at least 16 px"):
        pp.load_image(np.zeros((100, 8, 3), np.uint8))
    with pytest.raises(BadInputError, match="at least 16"):
        pp.load_image(_png_bytes(Image.new("RGB", (15, 300))))


def test_decompression_bomb_warning_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # 40×40 = 1600 px is above the (lowered) warning limit of 1000 but below the hard limit of 2000.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(BadInputError, match="too large to decode safely"):
        pp.load_image(_png_bytes(Image.new("RGB", (40, 40))))


# ---------------------------------------------------------------------------------------------------------------------
# alpha, foreground estimate


def test_has_meaningful_alpha() -> None:
    rgba = np.zeros((64, 64, 4), np.uint8)
    assert not pp.has_meaningful_alpha(rgba)  # all transparent: no object
    rgba[..., 3] = 255
    assert not pp.has_meaningful_alpha(rgba)  # constant opaque channel
    rgba[..., 3] = 250
    rgba[:4, :4, 3] = 200
    assert not pp.has_meaningful_alpha(rgba)  # varies, but nothing is clearly transparent
    rgba[10:30, 10:30, 3] = 0
    assert pp.has_meaningful_alpha(rgba)
    assert pp.has_meaningful_alpha(Image.fromarray(rgba, mode="RGBA"))
    assert not pp.has_meaningful_alpha(Image.fromarray(rgba[..., :3]))


@pytest.mark.parametrize("background", [PLAIN, GRADIENT], ids=["plain-noisy", "gradient-noisy"])
def test_foreground_estimate_matches_truth(background: np.ndarray) -> None:
    mask = pp.estimate_foreground(_scene(background))
    assert mask.dtype == bool and mask.shape == TRUTH.shape
    assert _iou(mask, TRUTH) > 0.95


def test_foreground_estimate_touching_border_and_jpeg() -> None:
    truth = (np.abs(_XX - 180) < 70) & (_YY > 120)  # stands on the bottom edge
    image = np.where(truth[..., None], np.array([90, 140, 170]), np.array([200, 200, 200])).astype(np.float64)
    image += np.random.default_rng(1).normal(0, 6, image.shape)
    ok, encoded = cv2.imencode(".jpg", np.clip(image, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok
    assert _iou(pp.estimate_foreground(cv2.imdecode(encoded, cv2.IMREAD_COLOR)), truth) > 0.95


def test_foreground_estimate_fills_holes_and_removes_specks() -> None:
    image = _scene(PLAIN)
    hole = (_XX - 180) ** 2 + (_YY - 140) ** 2 < 30**2
    image[hole] = (236, 233, 229)  # background colour enclosed by the object
    specks = np.zeros_like(TRUTH)
    for y, x in [(20, 20), (280, 30), (25, 330), (150, 20)]:
        specks[y : y + 2, x : x + 2] = True
    image[specks] = (0, 0, 0)
    mask = pp.estimate_foreground(image)
    assert mask[hole].all()
    assert not mask[specks].any()
    assert _iou(mask, TRUTH) > 0.95


def test_foreground_estimate_rejects_busy_background() -> None:
    rng = np.random.default_rng(RNG_SEED)
    tiles = rng.integers(0, 256, (H // 15, W // 15, 3)).astype(np.uint8)
    busy = cv2.resize(tiles, (W, H), interpolation=cv2.INTER_NEAREST)
    with pytest.raises(BadInputError, match="not plain enough") as info:
        pp.estimate_foreground(_scene(busy))
    assert "one2345 weights download --only sam" in str(info.value)
    assert "RGBA" in str(info.value)


def test_foreground_estimate_empty_on_blank_image() -> None:
    blank = np.clip(np.random.default_rng(0).normal(128, 3, (64, 64, 3)), 0, 255).astype(np.uint8)
    assert not pp.estimate_foreground(blank).any()


# ---------------------------------------------------------------------------------------------------------------------
# recentre, composite


@pytest.mark.parametrize(("box", "shape"), [((50, 40, 149, 99), (300, 200)), ((7, 3, 47, 120), (130, 64))])
def test_recentre_geometry(box: tuple[int, int, int, int], shape: tuple[int, int]) -> None:
    x0, y0, x1, y1 = box
    rgba = np.zeros((*shape, 4), np.uint8)
    rgba[y0 : y1 + 1, x0 : x1 + 1] = (10, 200, 30, 255)
    out = pp.recentre(rgba)
    assert out.shape == (256, 256, 4) and out.dtype == np.uint8

    # Independent arithmetic from the spec: side = int(max(w, h) / 0.75), crop pasted at (side//2 − w//2, …),
    # then scaled by 256 / side. The object's edges in the output are its pasted edges times that scale.
    w, h = x1 - x0 + 1, y1 - y0 + 1
    side = int(max(w, h) / 0.75)
    scale = 256 / side
    left, top = side // 2 - w // 2, side // 2 - h // 2
    columns = np.flatnonzero((out[..., 3] >= 128).any(axis=0))
    rows = np.flatnonzero((out[..., 3] >= 128).any(axis=1))
    assert abs(columns[0] - left * scale) <= 1 and abs(columns[-1] + 1 - (left + w) * scale) <= 1
    assert abs(rows[0] - top * scale) <= 1 and abs(rows[-1] + 1 - (top + h) * scale) <= 1
    longer = max(columns[-1] - columns[0] + 1, rows[-1] - rows[0] + 1)
    assert abs(longer - 0.75 * 256) <= 1
    centre = ((columns[0] + columns[-1] + 1) / 2, (rows[0] + rows[-1] + 1) / 2)
    assert abs(centre[0] - 128) <= 1.5 and abs(centre[1] - 128) <= 1.5
    # LANCZOS rings for 3 source pixels (up to ~6 output pixels here) next to an edge; the core is exact.
    inside = out[rows[0] + 8 : rows[-1] - 7, columns[0] + 8 : columns[-1] - 7]
    assert inside.size > 0 and (inside == (10, 200, 30, 255)).all()


def test_recentre_rejects_empty_mask() -> None:
    with pytest.raises(BadInputError, match="no object found"):
        pp.recentre(np.zeros((32, 32, 4), np.uint8))


def test_composite_on_white_values() -> None:
    rgba = np.array(
        [[[200, 100, 0, 255], [10, 20, 30, 0], [100, 50, 0, 128], [255, 255, 255, 64], [1, 3, 5, 128]]], np.uint8
    )
    # By hand: c·a/255 + 255·(1 − a/255), rounded. For a = 128 the white part is 127 and c·128/255 is added:
    # 100 → 177.196 → 177; 50 → 152.098 → 152; 0 → 127; 1 → 127.502 → 128; 3 → 128.506 → 129; 5 → 129.510 → 130
    # (the last three would truncate to 127, 128, 129).
    expected = np.array([[[200, 100, 0], [255, 255, 255], [177, 152, 127], [255, 255, 255], [128, 129, 130]]], np.uint8)
    np.testing.assert_array_equal(pp.composite_on_white(rgba), expected)


# ---------------------------------------------------------------------------------------------------------------------
# preprocess


def test_preprocess_uses_meaningful_alpha() -> None:
    rgba = np.zeros((512, 512, 4), np.uint8)
    rgba[100:300, 150:250] = (20, 40, 200, 255)
    result = pp.preprocess(Image.fromarray(rgba, mode="RGBA"))
    assert result.method == "alpha"
    assert result.bbox == (150, 100, 249, 299)
    assert result.image.shape == (256, 256, 3) and result.rgba.shape == (256, 256, 4)
    assert (result.image[0, 0] == 255).all() and (result.image[128, 128] == (20, 40, 200)).all()


def test_preprocess_foreground_estimate_and_thumbnail() -> None:
    big = cv2.resize(_scene(PLAIN), (W * 2, H * 2), interpolation=cv2.INTER_NEAREST)  # 720×600 → thumbnail 512×427
    result = pp.preprocess(big)
    assert result.method == "foreground-estimate"
    # Continuous edges of the object in the thumbnail: (first pixel, last pixel + 1) × 2 × 512/720; LANCZOS may
    # smear alpha > 0 by a pixel or two beyond them.
    scale = 512 / (W * 2)
    x0, y0, x1, y1 = TRUTH_BOX
    expected = np.array([x0, y0, x1 + 1, y1 + 1]) * 2 * scale
    got = np.array(result.bbox) + np.array([0, 0, 1, 1])
    assert np.abs(got - expected).max() <= 2.5
    assert (result.image[:5] == 255).all()  # background composited to white


def test_preprocess_ignores_constant_alpha() -> None:
    opaque = np.dstack([_scene(PLAIN), np.full((H, W), 255, np.uint8)])
    result = pp.preprocess(Image.fromarray(opaque, mode="RGBA"))
    assert result.method == "foreground-estimate"
    assert np.abs(np.array(result.bbox) - TRUTH_BOX).max() <= 1


def test_preprocess_without_background_removal() -> None:
    result = pp.preprocess(_scene(PLAIN), remove_background=False)
    assert result.method == "none"
    assert result.bbox == (0, 0, W - 1, H - 1)
    assert (result.rgba[128, 128, 3] == 255) and (result.rgba[2, 2, 3] == 0)  # opaque image on a transparent square


class _FakeSegmenter:
    def __init__(self, mask: np.ndarray) -> None:
        self.mask, self.boxes = mask, []

    def __call__(self, rgb: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        self.boxes.append(box)
        return self.mask


def test_preprocess_with_segmenter_prompts_with_estimated_box() -> None:
    sam_mask = np.zeros((H, W), bool)
    sam_mask[50:100, 60:90] = True
    fake = _FakeSegmenter(sam_mask)
    result = pp.preprocess(_scene(GRADIENT), segmenter=fake)  # type: ignore[arg-type]
    assert result.method == "sam"
    assert len(fake.boxes) == 1
    assert np.abs(np.array(fake.boxes[0]) - TRUTH_BOX).max() <= 2
    assert result.bbox == (60, 50, 89, 99)  # the object is SAM's mask, not the estimate


def test_preprocess_empty_masks_are_errors() -> None:
    with pytest.raises(BadInputError, match="no object found"):
        pp.preprocess(_scene(PLAIN), segmenter=_FakeSegmenter(np.zeros((H, W), bool)))  # type: ignore[arg-type]
    blank = np.full((64, 64, 3), 200, np.uint8)
    with pytest.raises(BadInputError, match="no object found"):
        pp.preprocess(blank)
    with pytest.raises(BadInputError, match="fully transparent"):
        pp.preprocess(Image.new("RGBA", (64, 64)))


def test_preprocess_busy_background_with_segmenter() -> None:
    tiles = np.random.default_rng(RNG_SEED).integers(0, 256, (20, 24, 3)).astype(np.uint8)
    busy = cv2.resize(tiles, (W, H), interpolation=cv2.INTER_NEAREST)
    with pytest.raises(BadInputError, match="cannot place SAM's box prompt"):
        pp.preprocess(busy, segmenter=_FakeSegmenter(TRUTH))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------------
# SAM


def test_missing_sam_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(MissingWeightsError) as info:
        pp.SamSegmenter.from_checkpoint(tmp_path / "sam_vit_h_4b8939.pth")
    assert "one2345 weights download --only sam" in str(info.value)
    monkeypatch.setenv("ONE2345_WEIGHTS", str(tmp_path))
    with pytest.raises(MissingWeightsError, match=r"sam_vit_h_4b8939\.pth") as info:
        pp.SamSegmenter.from_checkpoint(None)
    assert "one2345 weights download --only sam" in str(info.value)


def _tiny_sam(seed: int):
    """A randomly initialised SAM with a 64-px, 1-block, 32-wide ViT (same module tree as ViT-H, tiny sizes)."""
    import torch

    from server.stages.sam_compat import import_segment_anything

    modeling = import_segment_anything().modeling
    ImageEncoderViT, MaskDecoder, PromptEncoder = modeling.ImageEncoderViT, modeling.MaskDecoder, modeling.PromptEncoder
    Sam, TwoWayTransformer = modeling.Sam, modeling.TwoWayTransformer

    torch.manual_seed(seed)
    dim = 16
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=64,
            patch_size=16,
            embed_dim=32,
            depth=1,
            num_heads=2,
            out_chans=dim,
            use_rel_pos=True,
            window_size=2,
            global_attn_indexes=(),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim, image_embedding_size=(4, 4), input_image_size=(64, 64), mask_in_chans=4
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=dim,
            transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=32, num_heads=2),
            num_multimask_outputs=3,
            iou_head_depth=1,
            iou_head_hidden_dim=16,
        ),
    ).eval()


@pytest.fixture
def sam_checkpoint(tmp_path: Path):
    import torch

    model = _tiny_sam(seed=0)
    path = tmp_path / "sam_tiny.pth"
    torch.save(model.state_dict(), path)
    return path, model.state_dict()


def test_sam_checkpoint_loads_strictly(sam_checkpoint, tmp_path: Path) -> None:
    import torch

    path, saved = sam_checkpoint
    segmenter = pp.SamSegmenter.from_checkpoint(path, "cpu", build=lambda: _tiny_sam(seed=1))
    loaded = segmenter.model.state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)

    (tmp_path / "garbage.pth").write_text("not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot read SAM weights"):
        pp.SamSegmenter.from_checkpoint(tmp_path / "garbage.pth", build=lambda: _tiny_sam(seed=1))
    incomplete = dict(saved)
    del incomplete["mask_decoder.iou_token.weight"]
    torch.save(incomplete, tmp_path / "incomplete.pth")
    with pytest.raises(CheckpointError, match=r"missing \(1\): mask_decoder.iou_token.weight"):
        pp.SamSegmenter.from_checkpoint(tmp_path / "incomplete.pth", build=lambda: _tiny_sam(seed=1))
    reshaped = dict(saved, **{"mask_decoder.iou_token.weight": torch.zeros(1, 3)})
    torch.save(reshaped, tmp_path / "reshaped.pth")
    with pytest.raises(CheckpointError, match="wrong shape"):
        pp.SamSegmenter.from_checkpoint(tmp_path / "reshaped.pth", build=lambda: _tiny_sam(seed=1))


def test_sam_returns_the_last_of_three_masks(sam_checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = sam_checkpoint
    segmenter = pp.SamSegmenter.from_checkpoint(path, build=lambda: _tiny_sam(seed=1))
    rgb = _scene(PLAIN)[::3, ::3].copy()  # 100×120: the predictor resizes the longer side to img_size 64

    real_predict = segmenter.predictor.predict
    seen = {}

    def spy(**kwargs):
        seen["kwargs"] = kwargs
        seen["out"] = real_predict(**kwargs)
        return seen["out"]

    monkeypatch.setattr(segmenter.predictor, "predict", spy)
    mask = segmenter(rgb, (30, 13, 90, 89))
    masks, _scores, _ = seen["out"]
    assert masks.shape == (3, 100, 120)
    assert mask.dtype == bool and mask.shape == (100, 120)
    np.testing.assert_array_equal(mask, masks[-1])
    assert seen["kwargs"]["multimask_output"] is True
    np.testing.assert_array_equal(seen["kwargs"]["box"], [30, 13, 90, 89])

    # The best-scoring mask is not the one taken: the reference uses index −1 whatever the scores.
    fixed = np.zeros((3, 100, 120), bool)
    fixed[0, :10], fixed[1, :50], fixed[2, 60:] = True, True, True
    monkeypatch.setattr(segmenter.predictor, "predict", lambda **_: (fixed, np.array([0.9, 0.5, 0.1]), None))
    np.testing.assert_array_equal(segmenter(rgb, (30, 13, 90, 89)), fixed[2])
    with pytest.raises(BadInputError, match="not inside the 120×100 image"):
        segmenter(rgb, (30, 13, 130, 89))


def test_sam_is_built_without_weights_and_keeps_them_mapped(sam_checkpoint) -> None:
    """Issue #25: ViT-H's 2.4 GiB are neither initialised at random first (the network is built on the meta device)
    nor copied into the heap (the checkpoint is memory-mapped and its tensors become the parameters)."""
    import sys

    import torch

    from server.stages.sam_compat import ChunkedAttention

    path, saved = sam_checkpoint
    built_on: list[torch.device] = []

    def build():
        built_on.append(torch.empty(0).device)
        return _tiny_sam(seed=1)

    segmenter = pp.SamSegmenter.from_checkpoint(path, "cpu", build=build)
    assert built_on == [torch.device("meta")]
    assert not any(t.is_meta for t in (*segmenter.model.parameters(), *segmenter.model.buffers()))
    loaded = segmenter.model.state_dict()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert all(isinstance(block.attn, ChunkedAttention) for block in segmenter.model.image_encoder.blocks)
    if sys.platform.startswith("linux"):
        with open("/proc/self/maps") as maps:
            assert str(path) in maps.read()  # the weights are pages of the file, not a heap copy


def test_sam_tensors_left_without_values_are_an_error(sam_checkpoint) -> None:
    """A network whose non-checkpoint tensors were built on the meta device is refused, not run with empty values."""
    import torch

    path, _ = sam_checkpoint

    def build():
        model = _tiny_sam(seed=1)
        model.register_buffer("extra_scale", torch.empty(3, device="meta"), persistent=False)
        return model

    with pytest.raises(CheckpointError, match="extra_scale"):
        pp.SamSegmenter.from_checkpoint(path, "cpu", build=build)
