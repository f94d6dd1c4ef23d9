"""Rendering a mesh for evaluation and scoring it: a z-buffer rasteriser of vertex-coloured or textured meshes at the
reference's cameras, compositing on white, and PSNR against held-out ground truth."""

from __future__ import annotations

import math

import cv2
import numpy as np

from server.common.errors import BadInputError
from server.common.mesh_io import Mesh, linear_to_srgb, srgb_to_linear
from server.stages.asset import TexturedMesh
from server.stages.asset.raster import triangle_pixels


def rasterize(
    vertices: np.ndarray, faces: np.ndarray, intrinsics: np.ndarray, w2c: np.ndarray, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest triangle at every pixel centre and its perspective-correct barycentric coordinates.

    Same camera and pixel conventions as :func:`server.stages.asset.render_depth` (OpenCV w2c, pixel (i, j) centred at
    (j + 0.5, i + 0.5)); triangles with a corner at or behind the camera plane are skipped.

    Returns:
        face: [H, W] int64, −1 where nothing is hit; bary: [H, W, 3] float64 (zeros where nothing is hit).
    """
    camera = np.asarray(vertices, dtype=np.float64) @ w2c[:3, :3].T + w2c[:3, 3]
    z = camera[:, 2]
    faces = np.asarray(faces, dtype=np.int64)
    kept = np.flatnonzero((z[faces] > 1e-6).all(axis=1))
    safe_z = np.where(z > 1e-6, z, 1.0)
    pixels = np.stack([(intrinsics[0, 0] * camera[:, 0] + intrinsics[0, 1] * camera[:, 1]) / safe_z
                       + intrinsics[0, 2], intrinsics[1, 1] * camera[:, 1] / safe_z + intrinsics[1, 2]], axis=1)
    local, pixel, bary = triangle_pixels(pixels[faces[kept]], height, width)
    face = kept[local]
    inverse_z = bary / z[faces[face]]  # b_k / z_k: screen-space barycentrics → perspective-correct ones
    depth_key = inverse_z.sum(axis=1)
    order = np.lexsort((-depth_key, pixel))  # per pixel, the largest 1/z (nearest) first
    first = order[np.r_[True, pixel[order][1:] != pixel[order][:-1]]] if order.size else order
    face_map = np.full(height * width, -1, dtype=np.int64)
    bary_map = np.zeros((height * width, 3))
    face_map[pixel[first]] = face[first]
    bary_map[pixel[first]] = inverse_z[first] / depth_key[first, None]
    return face_map.reshape(height, width), bary_map.reshape(height, width, 3)


def render_mesh(
    mesh: Mesh | TexturedMesh, intrinsics: np.ndarray, w2c: np.ndarray, height: int, width: int, supersample: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Unlit render of a textured or vertex-coloured mesh, composited on white.

    Each pixel averages supersample² sub-pixel samples (a 1-pixel box filter). A sample's colour is the bilinear
    texture lookup (UVs interpolated perspective-correctly; texel (i, j) centred at ((j + 0.5)/S, (i + 0.5)/S)) or the
    interpolated vertex colour, both in linear light; the covered samples' mean is encoded to sRGB and blended over
    white by the coverage, as a straight-alpha Cycles render composited on white.

    Args:
        mesh: :class:`TexturedMesh` (texture used) or :class:`~server.common.mesh_io.Mesh` with colours.
        intrinsics: [3, 3] for the height×width image; w2c: [4, 4] OpenCV.

    Returns:
        rgb: [H, W, 3] float64 sRGB in [0, 255] on white; coverage: [H, W] float64 in [0, 1].
    """
    s = int(supersample)
    k = np.diag([s, s, 1.0]) @ np.asarray(intrinsics, dtype=np.float64)
    face, bary = rasterize(mesh.vertices, mesh.faces, k, w2c, height * s, width * s)
    hit = face >= 0
    corners = np.asarray(mesh.faces)[face[hit]]
    linear = np.zeros((height * s, width * s, 3))
    if isinstance(mesh, TexturedMesh):
        size = mesh.texture.shape[0]
        uv = np.einsum("nk,nkc->nc", bary[hit], np.asarray(mesh.uvs, dtype=np.float64)[corners])
        texture = srgb_to_linear(mesh.texture / 255.0).astype(np.float32)
        linear[hit] = _bilinear_lookup(texture, uv[:, 0] * size - 0.5, uv[:, 1] * size - 0.5)
    else:
        if mesh.colors is None:
            raise BadInputError("the mesh has no vertex colours and no texture; allowed: a TexturedMesh or a Mesh "
                                "with colours [V, 3] uint8")
        colours = srgb_to_linear(np.asarray(mesh.colors) / 255.0)
        linear[hit] = np.einsum("nk,nkc->nc", bary[hit], colours[corners])
    covered = hit.reshape(height, s, width, s).mean(axis=(1, 3))
    total = linear.reshape(height, s, width, s, 3).sum(axis=(1, 3))
    mean = total / np.maximum(covered * s * s, 1e-12)[..., None]
    rgb = linear_to_srgb(mean) * 255.0 * covered[..., None] + 255.0 * (1.0 - covered[..., None])
    return rgb, covered


def _bilinear_lookup(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[N, 3] bilinear samples of an [H, W, 3] float32 image at index-space positions x, y [N], clamped at the
    borders (cv2.remap, fed in rows because its maps must stay below 32767 rows)."""
    count, row = x.shape[0], 4096
    rows = -(-count // row)
    map_x = np.zeros(rows * row, dtype=np.float32)
    map_y = np.zeros(rows * row, dtype=np.float32)
    map_x[:count], map_y[:count] = x, y
    out = cv2.remap(image, map_x.reshape(rows, row), map_y.reshape(rows, row), cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_REPLICATE)
    return out.reshape(-1, image.shape[2])[:count].astype(np.float64)


def composite_on_white(rgba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[H, W, 4] uint8 straight-alpha sRGB → rgb [H, W, 3] float64 on white and alpha [H, W] float64 in [0, 1]."""
    alpha = rgba[..., 3].astype(np.float64) / 255.0
    return rgba[..., :3] * alpha[..., None] + 255.0 * (1.0 - alpha[..., None]), alpha


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB of two images [..., 3] over the pixels of ``mask`` (all if None).

    Returns:
        10·log10(peak² / MSE); +inf for identical images.

    Raises:
        BadInputError: shapes that differ, or an empty mask.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise BadInputError(f"images of shapes {a.shape} and {b.shape} cannot be compared; allowed: equal shapes")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            raise BadInputError("the PSNR mask selects no pixel; allowed: a mask with at least one pixel")
        a, b = a[mask], b[mask]
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(peak**2 / mse)
