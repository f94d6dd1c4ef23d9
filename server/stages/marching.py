"""Marching cubes in torch over the narrow band, with PyMCubes' exact output (#11: marching cubes on the GPU).

PyMCubes scans all (R − 1)³ cells of the grid on one CPU core (0.6 s at R = 256). Only the cells whose corners do
not share one side of the level hold triangles, a thin shell of a few hundred thousand; :func:`marching_cubes`
finds them with one vectorised pass and triangulates just those, on whatever device the grid is on.

Same output, not just the same surface. The result equals ``mcubes.marching_cubes(volume, level)`` array for
array: the same vertices in the same order, bit for bit in float64, and the same faces. That keeps every mesh test
and every downstream step (clean-up, decimation, colours) unchanged whichever path ran. It rests on three facts of
PyMCubes 0.1.x, all checked against it in ``tests/server/test_marching.py``:

1. A corner counts as below the level when its value is ``<= level``; case bit m is set for corner m below.
2. Cells are visited in C order. A cell creates the vertices of the crossing edges it *owns*, those that no earlier
   cell shares (:data:`_EDGES`' ``owned_if``), in the fixed order :data:`_CREATION_ORDER`; every other vertex is
   looked up. So the vertex order is: owner cell in C order, then rank of the local edge in that order.
3. A vertex on an edge from corner a to corner b (in PyMCubes' direction of the edge) lies at
   ``(b − a)·(level − f_a)/(f_b − f_a) + a`` along the edge's axis, computed in float64.
4. The level is rounded to float32 first (its Python binding declares it a C ``float``).

The triangulation of each of the 256 cases is not restated here: :func:`case_tables` reads it off PyMCubes itself,
by meshing one cell per case with corners ±1 (its vertices are then edge midpoints, which name the edges).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from server.common.errors import BadInputError

# The 8 corners of a cell as (di, dj, dk) offsets from its lowest corner, in PyMCubes' numbering.
_CORNERS = ((0, 0, 0), (1, 0, 0), (1, 1, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (1, 1, 1), (0, 1, 1))

# The 12 edges of a cell: (start corner, end corner, axis, owned_if). The vertex is interpolated from start to end.
# owned_if names the cell coordinates that must be 0 for this cell to be the first in C order to hold the edge
# ("" = always: no earlier cell shares it).
_EDGES = (
    (0, 1, 0, "jk"), (1, 2, 1, "k"), (2, 3, 0, "k"), (3, 0, 1, "ik"),
    (4, 5, 0, "j"), (5, 6, 1, ""), (6, 7, 0, ""), (7, 4, 1, "i"),
    (0, 4, 2, "ij"), (1, 5, 2, "j"), (2, 6, 2, ""), (3, 7, 2, "i"),
)

_CREATION_ORDER = (6, 5, 10, 0, 1, 2, 3, 4, 7, 8, 9, 11)
"""The order in which a PyMCubes cell creates the vertices of the crossing edges it owns."""


@functools.cache
def case_tables() -> tuple[np.ndarray, np.ndarray]:
    """The triangulation of each of the 256 cube cases, as PyMCubes meshes them.

    Returns:
        edge_mask: [256] int32, bit e set when edge e of the cell crosses the level in that case.
        triangles: [256, 15] int64, each case's triangles as local edge numbers, three per triangle in PyMCubes'
            order and winding, padded with −1 (at most 5 triangles per case).
    """
    import mcubes

    edge_mask = np.zeros(256, np.int32)
    triangles = np.full((256, 15), -1, np.int64)
    midpoints = {tuple(0.5 * (np.add(_CORNERS[a], _CORNERS[b]))): e for e, (a, b, _, _) in enumerate(_EDGES)}
    for case in range(256):
        cell = np.empty((2, 2, 2), np.float64)
        for m, corner in enumerate(_CORNERS):
            cell[corner] = -1.0 if case >> m & 1 else 1.0
        vertices, faces = mcubes.marching_cubes(cell, 0.0)
        edges = [midpoints[tuple(v)] for v in vertices.tolist()]
        local = [edges[i] for i in faces.reshape(-1).tolist()]
        triangles[case, : len(local)] = local
        edge_mask[case] = sum(1 << e for e, (a, b, _, _) in enumerate(_EDGES) if (case >> a & 1) != (case >> b & 1))
    return edge_mask, triangles


def marching_cubes(volume: torch.Tensor, level: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``mcubes.marching_cubes(volume, level)`` in torch, on the volume's device, visiting only cells that cross.

    Args:
        volume: [X, Y, Z] float values on the grid (each side ≥ 2), any device. A NaN corner counts as above the
            level, as in PyMCubes (:func:`server.stages.meshing.extract_surface` refuses grids with NaNs).
        level: the iso level (rounded to float32, as PyMCubes does).

    Returns:
        vertices: [V, 3] float64 in index units (the volume's own coordinates), on the volume's device.
        faces: [F, 3] int64 vertex indices, on the volume's device. Both exactly as PyMCubes returns them (V = F = 0
        when nothing crosses).

    Raises:
        BadInputError: a volume that is not 3-D with every side ≥ 2.
    """
    if volume.ndim != 3 or min(volume.shape) < 2:
        raise BadInputError(f"volume has shape {tuple(volume.shape)}; allowed: [X, Y, Z] with every side ≥ 2")
    device = volume.device
    nx, ny, nz = volume.shape
    edge_mask_np, triangles_np = case_tables()
    edge_mask = torch.from_numpy(edge_mask_np).to(device)
    triangles = torch.from_numpy(triangles_np).to(device)

    level = float(np.float32(level))  # fact 4

    # 1. The case of every cell (bit m: corner m at or below the level), and the cells that cross it, in C order.
    # A float32 level is exact in float32 and float64 volumes, so comparing in their own dtype gives float64's
    # answer without a float64 copy of the grid.
    exact = volume.dtype in (torch.float32, torch.float64)
    below = ((volume if exact else volume.to(torch.float64)) <= level).to(torch.uint8)
    case = torch.zeros((nx - 1, ny - 1, nz - 1), dtype=torch.uint8, device=device)
    for m, (di, dj, dk) in enumerate(_CORNERS):
        case |= below[di : nx - 1 + di, dj : ny - 1 + dj, dk : nz - 1 + dk] << m
    cells = torch.nonzero((case != 0) & (case != 255))  # [N, 3] (i, j, k), C order
    cell_case = case[cells[:, 0], cells[:, 1], cells[:, 2]].long()
    if cells.shape[0] == 0:
        return (torch.zeros((0, 3), dtype=torch.float64, device=device),
                torch.zeros((0, 3), dtype=torch.long, device=device))

    corners = torch.tensor(_CORNERS, device=device)  # [8, 3]
    start, end, axis = (torch.tensor([row[c] for row in _EDGES], device=device) for c in range(3))  # [12] each

    def edge_key(cell: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """A grid edge's id: 3 × (flat index of its lower grid point) + axis. cell: [..., 3], e: [...] local edges."""
        lower = cell + torch.minimum(corners[start[e]], corners[end[e]])
        return ((lower[..., 0] * ny + lower[..., 1]) * nz + lower[..., 2]) * 3 + axis[e]

    # 2. Vertices: each crossing edge once, created by its owner cell, ordered by (owner cell, creation rank).
    order = torch.tensor(_CREATION_ORDER, device=device)
    owned = torch.ones((cells.shape[0], 12), dtype=torch.bool, device=device)
    for e, (_, _, _, owned_if) in enumerate(_EDGES):
        for name in owned_if:
            owned[:, e] &= cells[:, "ijk".index(name)] == 0
    crossing = (edge_mask[cell_case, None] >> torch.arange(12, device=device)) & 1 == 1
    create = (owned & crossing)[:, order]  # [N, 12] in creation order
    vertex_cell, rank = torch.nonzero(create, as_tuple=True)  # row-major: cell order, then creation order
    vertex_edge = order[rank]
    owner = cells[vertex_cell]
    keys = edge_key(owner, vertex_edge)
    vertices = _interpolate(volume, owner + corners[start[vertex_edge]], owner + corners[end[vertex_edge]],
                            axis[vertex_edge], level)

    # 3. Faces: each crossing cell's triangles from the case table, in cell order, as vertex indices.
    table = triangles[cell_case]  # [N, 15]
    used = table >= 0
    face_cell, slot = torch.nonzero(used, as_tuple=True)
    corner_keys = edge_key(cells[face_cell], table[face_cell, slot])
    sorted_keys, by_key = torch.sort(keys)
    faces = by_key[torch.searchsorted(sorted_keys, corner_keys)].reshape(-1, 3)
    return vertices, faces


def _interpolate(values: torch.Tensor, a: torch.Tensor, b: torch.Tensor, axis: torch.Tensor,
                 level: float) -> torch.Tensor:
    """Vertex positions on the edges from grid points ``a`` to ``b`` [V, 3] along ``axis`` [V]: PyMCubes' formula
    (interpolated from ``a``, its start), in float64."""
    f_a = values[a[:, 0], a[:, 1], a[:, 2]].to(torch.float64)
    f_b = values[b[:, 0], b[:, 1], b[:, 2]].to(torch.float64)
    a_axis = a.gather(1, axis[:, None])[:, 0].to(torch.float64)
    b_axis = b.gather(1, axis[:, None])[:, 0].to(torch.float64)
    along = (b_axis - a_axis) * (level - f_a) / (f_b - f_a) + a_axis
    vertices = a.to(torch.float64)
    vertices.scatter_(1, axis[:, None], along[:, None])
    return vertices
