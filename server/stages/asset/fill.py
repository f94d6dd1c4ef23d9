"""Colour for what no view sees, and for the gutters (the bake's last step, :mod:`server.stages.asset.bake`).

Fill on the surface, not in the texture. Texels no view sees take their colour from the nearest seen surface across
the mesh: the seen texels are splatted onto the vertices of their triangles (positions welded, so UV seams do not cut
the surface), vertices with no seen texel take the colour of the nearest such vertex along the mesh's edges (a
multi-source Dijkstra over edge lengths), and an unseen texel interpolates its triangle's vertex colours. Colour
therefore never jumps an empty gap in UV space onto a surface it does not belong to. Texels outside every chart (the
gutters) then copy the nearest charted texel, so each gutter texel carries the colour of its own chart's border and
bilinear filtering and mip-mapping at a seam never mix two charts.

:func:`fill_unseen` is the texture-space fill for images with no mesh behind them; the bake does not use it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse import csgraph

from server.common.mesh_io import Mesh
from server.stages.asset.unwrap import UvLayout


def fill_over_surface(
    values: np.ndarray, known: np.ndarray, vertices: np.ndarray, faces: np.ndarray,
    fallback: np.ndarray | None = None,
) -> np.ndarray:
    """Give every unknown vertex the value of the nearest known vertex along the mesh's edges (geodesic along the
    edge graph, a multi-source Dijkstra). Vertices at the same position are welded first, so a seam split does not
    cut the surface. A connected part with no known vertex gets ``fallback``, else the mean known value (mid grey,
    128, when nothing is known).

    Args:
        values: [V, C] float; rows of unknown vertices are ignored.
        known: [V] bool.
        vertices: [V, 3]; faces: [F, 3] int.
        fallback: [C] for parts with nothing known.

    Returns:
        [V, C] float64.
    """
    values = np.asarray(values, dtype=np.float64)
    known = np.asarray(known, dtype=bool)
    out = values.copy()
    if known.all():
        return out
    _, weld = np.unique(np.asarray(vertices), axis=0, return_inverse=True)
    weld = weld.reshape(-1)
    count = int(weld.max()) + 1
    # Per welded point: the mean of its known copies.
    total = np.zeros((count, values.shape[1]))
    hits = np.bincount(weld[known], minlength=count).astype(np.float64)
    np.add.at(total, weld[known], values[known])
    point_known = hits > 0
    point_value = np.zeros_like(total)
    point_value[point_known] = total[point_known] / hits[point_known, None]
    if not point_known.any():
        rest = np.full(values.shape[1], 128.0) if fallback is None else np.asarray(fallback, dtype=np.float64)
        out[:] = rest
        return out

    points = np.zeros((count, 3))
    points[weld] = np.asarray(vertices, dtype=np.float64)
    edges = np.sort(weld[np.asarray(faces)][:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    edges = np.unique(edges[edges[:, 0] != edges[:, 1]], axis=0)
    # Zero-length edges would read as "no edge" in a sparse matrix: a floor keeps them.
    length = np.maximum(np.linalg.norm(points[edges[:, 0]] - points[edges[:, 1]], axis=1), 1e-12)
    graph = sparse.coo_matrix((length, (edges[:, 0], edges[:, 1])), shape=(count, count)).tocsr()
    sources = np.flatnonzero(point_known)
    distance, _, nearest = csgraph.dijkstra(graph, directed=False, indices=sources, min_only=True,
                                            return_predecessors=True)
    reached = np.isfinite(distance)
    filled = point_value.copy()
    filled[reached & ~point_known] = point_value[nearest[reached & ~point_known]]
    rest = point_value[point_known].mean(axis=0) if fallback is None else np.asarray(fallback, dtype=np.float64)
    filled[~reached] = rest
    out[~known] = filled[weld[~known]]
    return out


def surface_colours(
    mesh: Mesh, layout: UvLayout, corners: np.ndarray, bary: np.ndarray, colour_sum: np.ndarray,
    weight_sum: np.ndarray, pair_seen: np.ndarray, fallback: np.ndarray | None,
) -> np.ndarray:
    """[V', 3] colour per layout vertex from the seen surface points: each seen point adds its colour to its
    triangle's corners with its barycentric weight; corners with none take the nearest seen one along the surface."""
    point_colour = colour_sum[pair_seen] / weight_sum[pair_seen, None]
    owner = layout.vertex_map[corners[pair_seen]]  # [N, 3] input vertices
    weight = bary[pair_seen]
    count = mesh.vertices.shape[0]
    splat_weight = np.bincount(owner.reshape(-1), weight.reshape(-1), count)
    splat = np.stack([np.bincount(owner.reshape(-1), (weight[..., None] * point_colour[:, None, :])[..., c].reshape(-1),
                                  count) for c in range(3)], axis=1)
    known = splat_weight > 0
    colour = np.zeros((count, 3))
    colour[known] = splat[known] / splat_weight[known, None]
    colour = fill_over_surface(colour, known, mesh.vertices, mesh.faces, fallback)
    return colour[layout.vertex_map]


def dilate_charts(texture: np.ndarray, charted: np.ndarray, fallback: np.ndarray | None) -> np.ndarray:
    """Every texel outside the charts copies the nearest charted texel (so a gutter carries its own chart's border
    colour, never a mix of two charts). Returns [S, S, 3] uint8."""
    if not charted.any():
        rest = np.full(3, 128.0) if fallback is None else np.asarray(fallback, dtype=np.float64)
        return np.broadcast_to(np.clip(np.rint(rest), 0, 255).astype(np.uint8), texture.shape).copy()
    if not charted.all():
        index = ndimage.distance_transform_edt(~charted, return_distances=False, return_indices=True)
        texture = texture[index[0], index[1]]
    return np.clip(np.rint(texture), 0, 255).astype(np.uint8)


def fill_unseen(
    texture: np.ndarray, known: np.ndarray, iterations: int, fallback: np.ndarray | None = None
) -> np.ndarray:
    """Texture-space fill, for images with no mesh behind them: iterative one-texel dilation (each round, an unknown
    texel with known 8-neighbours takes their mean), then the mean known colour for whatever is left (``fallback``,
    else mid grey, if nothing is known). The bake does not use it: it fills on the surface (module docstring), as
    texture-space dilation carries colour across empty UV gaps onto charts it does not belong to.

    Args:
        texture: [S, S, 3] float colours (values at unknown texels are ignored).
        known: [S, S] bool.
        iterations: dilation rounds (each grows the known region by one texel).
        fallback: [3] colour used when no texel is known.

    Returns:
        [S, S, 3] uint8 sRGB.
    """
    import cv2  # OpenCV's box filter is ~10× faster than the numpy shifts at 1024²

    colour = np.where(known[..., None], texture, 0.0).astype(np.float32)
    mask = known.astype(np.float32)
    for _ in range(iterations):
        if mask.all():
            break
        total = cv2.boxFilter(colour, -1, (3, 3), normalize=False, borderType=cv2.BORDER_CONSTANT)
        count = cv2.boxFilter(mask, -1, (3, 3), normalize=False, borderType=cv2.BORDER_CONSTANT)
        grow = (mask == 0) & (count > 0)
        if not grow.any():
            break
        colour[grow] = total[grow] / count[grow, None]
        mask[grow] = 1.0
    if not mask.all():
        if mask.any():
            rest = colour[mask > 0].mean(axis=0)
        else:
            rest = np.full(3, 128.0) if fallback is None else np.asarray(fallback, dtype=np.float32)
        colour[mask == 0] = rest
    return np.clip(np.rint(colour), 0, 255).astype(np.uint8)
