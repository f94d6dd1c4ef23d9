"""Triangle rasterisation in numpy: texels of UV triangles, and a z-buffer of the mesh seen from a camera.

Pixel convention (both images and textures): pixel (row i, column j) covers [j, j + 1] × [i, i + 1] in pixel units
and is sampled at its centre (j + 0.5, i + 0.5) — the convention of the intrinsics in pose.json (principal point at
W/2) and of Blender's renders. A pixel belongs to a triangle when its centre lies inside or on its edges.

Both rasterisers enumerate, for every triangle, the pixel centres in its bounding box (in chunks, so memory stays
bounded) and keep those with non-negative barycentric coordinates: fully vectorised, and fast for the small
triangles of a marching-cubes mesh (most cover a handful of pixels).
"""

from __future__ import annotations

import numpy as np

from server.common.errors import BadInputError

_CHUNK = 1 << 22
"""Candidate pixels evaluated at once (about 200 MB of temporaries at most)."""

_INSIDE_EPS = 1e-7
"""Barycentric slack: centres on a shared edge are not lost to round-off (they may then count for both triangles)."""


def triangle_pixels(xy: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (triangle, pixel) pairs whose pixel centre lies in the triangle.

    Args:
        xy: [F, 3, 2] float64 corner positions in pixel units (x along the width, y along the height).
        height, width: image size; pixels outside it are skipped.

    Returns:
        face: [N] int64 triangle index; pixel: [N] int64 flat index row·width + column; bary: [N, 3] float64
        barycentric coordinates of the pixel centre (sum 1). Degenerate (zero-area) triangles cover nothing.
    """
    xy = np.asarray(xy, dtype=np.float64)
    x0 = np.clip(np.ceil(xy[..., 0].min(axis=1) - 0.5), 0, width).astype(np.int64)
    x1 = np.clip(np.floor(xy[..., 0].max(axis=1) - 0.5), -1, width - 1).astype(np.int64)
    y0 = np.clip(np.ceil(xy[..., 1].min(axis=1) - 0.5), 0, height).astype(np.int64)
    y1 = np.clip(np.floor(xy[..., 1].max(axis=1) - 0.5), -1, height - 1).astype(np.int64)
    box_w, box_h = np.maximum(x1 - x0 + 1, 0), np.maximum(y1 - y0 + 1, 0)
    e1, e2 = xy[:, 1] - xy[:, 0], xy[:, 2] - xy[:, 0]
    det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    count = np.where(det != 0, box_w * box_h, 0)
    faces_out, pixels_out, bary_out = [], [], []
    ends = np.cumsum(count)
    start_face = 0
    while start_face < xy.shape[0]:
        # Faces [start_face, stop_face) hold at most _CHUNK candidates (or one face, however large).
        base = ends[start_face - 1] if start_face else 0
        stop_face = max(int(np.searchsorted(ends, base + _CHUNK, side="right")), start_face + 1)
        idx = np.arange(start_face, stop_face)
        idx = idx[count[idx] > 0]
        start_face = stop_face
        if idx.shape[0] == 0:
            continue
        face = np.repeat(idx, count[idx])
        local = np.arange(face.shape[0]) - np.repeat(np.cumsum(count[idx]) - count[idx], count[idx])
        px = x0[face] + local % box_w[face]
        py = y0[face] + local // box_w[face]
        dx, dy = px + 0.5 - xy[face, 0, 0], py + 0.5 - xy[face, 0, 1]
        b1 = (dx * e2[face, 1] - dy * e2[face, 0]) / det[face]
        b2 = (dy * e1[face, 0] - dx * e1[face, 1]) / det[face]
        b0 = 1.0 - b1 - b2
        inside = (b0 >= -_INSIDE_EPS) & (b1 >= -_INSIDE_EPS) & (b2 >= -_INSIDE_EPS)
        faces_out.append(face[inside])
        pixels_out.append(py[inside] * width + px[inside])
        bary_out.append(np.stack([b0[inside], b1[inside], b2[inside]], axis=1))
    if not faces_out:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3))
    return np.concatenate(faces_out), np.concatenate(pixels_out), np.concatenate(bary_out)


def rasterize_uv(uvs: np.ndarray, faces: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Which triangle covers each texel centre of a size×size texture, and where.

    Args:
        uvs: [V, 2] texture coordinates in [0, 1], origin at the top-left texel corner, v growing downwards (the glTF
            convention; texel (i, j) is centred at ((j + 0.5)/size, (i + 0.5)/size)).
        faces: [F, 3] int vertex indices.
        size: texture side in texels.

    Returns:
        face_index: [size, size] int32, −1 where no triangle covers the texel centre; bary: [size, size, 3] float32
        barycentric coordinates within that triangle (zeros where uncovered). A centre exactly on an edge shared by
        two triangles goes to one of them.
    """
    if size < 1:
        raise BadInputError(f"texture size {size} is invalid; allowed: an integer ≥ 1 (e.g. 1024)")
    xy = np.asarray(uvs, dtype=np.float64)[faces] * size
    face, pixel, bary = triangle_pixels(xy, size, size)
    face_index = np.full(size * size, -1, dtype=np.int32)
    weights = np.zeros((size * size, 3), dtype=np.float32)
    face_index[pixel] = face
    weights[pixel] = bary
    return face_index.reshape(size, size), weights.reshape(size, size, 3)


def render_depth(
    vertices: np.ndarray, faces: np.ndarray, intrinsics: np.ndarray, w2c: np.ndarray, height: int, width: int
) -> np.ndarray:
    """Z-buffer of a mesh seen by a pinhole camera: the depth of the nearest surface at every pixel centre.

    Depth is interpolated perspective-correctly (1/z is affine in screen space), so it is exact for planar triangles.
    Triangles with a corner at or behind the camera plane (z ≤ 1e-6) are skipped: cameras here look at the object
    from outside it.

    Args:
        vertices: [V, 3] world positions; faces: [F, 3] int.
        intrinsics: [3, 3] pixel intrinsics of this image, in the module's pixel convention (pixel (i, j) is sampled
            at (j + 0.5, i + 0.5); a centred camera has its principal point at (W/2, H/2)).
        w2c: [4, 4] OpenCV world-to-camera (x right, y down, looking along +z).
        height, width: image size in pixels.

    Returns:
        [height, width] float32 z-depth along the optical axis, +inf where no triangle covers the pixel centre.
    """
    return render_face_ids(vertices, faces, intrinsics, w2c, height, width)[0]


def render_face_ids(
    vertices: np.ndarray, faces: np.ndarray, intrinsics: np.ndarray, w2c: np.ndarray, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`render_depth` plus which triangle is nearest at every pixel centre (same arguments and convention).

    Returns:
        depth: [height, width] float32 (+inf where uncovered); face: [height, width] int64 index into ``faces``, −1
        where uncovered.
    """
    faces = np.asarray(faces)
    camera = np.asarray(vertices, dtype=np.float64) @ w2c[:3, :3].T + w2c[:3, 3]
    z = camera[:, 2]
    valid = np.flatnonzero((z[faces] > 1e-6).all(axis=1))
    safe_z = np.where(z > 1e-6, z, 1.0)
    pixels = np.stack([intrinsics[0, 0] * camera[:, 0] / safe_z + intrinsics[0, 1] * camera[:, 1] / safe_z
                       + intrinsics[0, 2], intrinsics[1, 1] * camera[:, 1] / safe_z + intrinsics[1, 2]], axis=1)
    face, pixel, bary = triangle_pixels(pixels[faces[valid]], height, width)
    depth_n = 1.0 / np.maximum(np.einsum("nk,nk->n", bary, 1.0 / z[faces[valid][face]]), 1e-12)
    depth = np.full(height * width, np.inf)
    ids = np.full(height * width, -1, dtype=np.int64)
    if face.shape[0]:
        order = np.lexsort((depth_n, pixel))  # by pixel, nearest first
        first = order[np.r_[True, pixel[order][1:] != pixel[order][:-1]]]
        depth[pixel[first]] = depth_n[first]
        ids[pixel[first]] = valid[face[first]]
    return depth.reshape(height, width).astype(np.float32), ids.reshape(height, width)
