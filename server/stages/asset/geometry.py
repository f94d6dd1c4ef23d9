"""Small, pure mesh-geometry helpers shared by the asset stage (validation, areas, normals, volume)."""

from __future__ import annotations

import numpy as np

from server.common.errors import BadInputError
from server.common.mesh_io import Mesh


def checked_mesh(mesh: Mesh) -> Mesh:
    """Validate a :class:`~server.common.mesh_io.Mesh` and return it with canonical dtypes (a shallow copy).

    Raises:
        BadInputError: vertices not [V, 3] finite, faces not [F, 3] integers with F ≥ 1 indexing 0..V−1, or colours
            not [V, 3] uint8 / None; the message names the bad value and what is allowed.
    """
    vertices = np.asarray(mesh.vertices)
    faces = np.asarray(mesh.faces)
    if vertices.ndim != 2 or vertices.shape[1] != 3 or not np.all(np.isfinite(vertices)):
        raise BadInputError(f"mesh vertices have shape {vertices.shape}; allowed: [V, 3] finite floats")
    if faces.ndim != 2 or faces.shape[1] != 3 or faces.shape[0] == 0 or not np.issubdtype(faces.dtype, np.integer):
        raise BadInputError(f"mesh faces have shape {faces.shape} and dtype {faces.dtype}; allowed: [F, 3] integers "
                            "with F ≥ 1")
    if faces.min() < 0 or faces.max() >= vertices.shape[0]:
        raise BadInputError(f"mesh faces index vertices {int(faces.min())}..{int(faces.max())}; allowed: "
                            f"0..{vertices.shape[0] - 1} (V = {vertices.shape[0]})")
    colors = mesh.colors
    if colors is not None:
        colors = np.asarray(colors)
        if colors.shape != vertices.shape or colors.dtype != np.uint8:
            raise BadInputError(f"mesh colors have shape {colors.shape} and dtype {colors.dtype}; allowed: [V, 3] "
                                f"uint8 with V = {vertices.shape[0]}, or None")
    return Mesh(vertices.astype(np.float32), faces.astype(np.int64), colors)


def face_cross(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(v1 − v0) × (v2 − v0) per face, float64: direction = normal of the counter-clockwise winding, length = 2·area.

    Args:
        vertices: [V, 3]; faces: [F, 3] int.

    Returns:
        [F, 3] float64.
    """
    tri = np.asarray(vertices, dtype=np.float64)[faces]
    return np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])


def face_areas(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """[F] float64 triangle areas."""
    return 0.5 * np.linalg.norm(face_cross(vertices, faces), axis=1)


def signed_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    """Signed volume enclosed by the faces (divergence theorem about the vertex centroid); > 0 for a closed surface
    whose faces wind counter-clockwise seen from outside. For an open surface it is the volume of the cone from the
    centroid, still positive when the faces point away from it."""
    v = np.asarray(vertices, dtype=np.float64)
    tri = v[faces] - v[np.unique(faces)].mean(axis=0)
    return float(np.einsum("fi,fi->", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])) / 6.0)


def vertex_normals(vertices: np.ndarray, faces: np.ndarray, weld: bool = False) -> np.ndarray:
    """Area-weighted unit vertex normals.

    Args:
        vertices: [V, 3]; faces: [F, 3] int.
        weld: average over all vertices at the same position (so copies split along UV seams share one normal and the
            seam does not show in the shading).

    Returns:
        [V, 3] float32 unit normals; (0, 0, 1) for a vertex whose faces all have zero area (or no faces).
    """
    vertices = np.asarray(vertices)
    if weld:
        _, key = np.unique(vertices, axis=0, return_inverse=True)
        key = key.reshape(-1)
    else:
        key = np.arange(vertices.shape[0])
    cross = face_cross(vertices, faces)
    sums = np.zeros((int(key.max()) + 1, 3))
    for corner in range(3):
        np.add.at(sums, key[faces[:, corner]], cross)
    normals = sums[key]
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    normals = np.where(length > 0, normals / np.where(length > 0, length, 1.0), [0.0, 0.0, 1.0])
    return normals.astype(np.float32)


def edge_counts(faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Undirected edges and how many faces use each.

    Returns:
        edges: [E, 2] int64, sorted pairs (lo, hi), unique; counts: [E] int64.
    """
    edges = np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    return np.unique(edges, axis=0, return_counts=True)


def boundary_vertices(faces: np.ndarray) -> np.ndarray:
    """[B] int64 indices of vertices on an edge used by exactly one face (an open border)."""
    edges, counts = edge_counts(faces)
    return np.unique(edges[counts == 1])
