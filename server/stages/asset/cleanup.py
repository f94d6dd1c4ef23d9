"""Mesh clean-up and polygon budget: floaters, degenerate and duplicate faces, outward orientation, Taubin smoothing,
quadric decimation. Every function is pure: it returns a new :class:`~server.common.mesh_io.Mesh`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.sparse import csgraph
from scipy.spatial import cKDTree

from server.common.errors import BadInputError
from server.common.mesh_io import Mesh
from server.stages.asset.geometry import boundary_vertices, checked_mesh, face_areas, face_cross


@dataclass(frozen=True)
class CleanupConfig:
    """What :func:`clean_mesh` does. Defaults suit a marching-cubes surface of the reconstruction."""

    min_component_fraction: float = 0.05
    """Connected components (by shared vertices) whose surface area is below this fraction of the largest one's are
    dropped: floaters of the SDF. Area rather than face count, so a decimated or remeshed input is judged the same. 0
    keeps every component."""

    orient_outward: bool = True
    """Make the winding consistent across each component and flip components whose signed volume is negative."""

    smooth_iterations: int = 0
    """Taubin λ/μ iteration pairs; 0 (default) leaves the vertices where marching cubes put them. 5–10 removes the
    marching-cubes terracing without visibly rounding features."""

    smooth_lambda: float = 0.5
    """Taubin's shrinking step λ (0 < λ < 1)."""

    smooth_mu: float = -0.53
    """Taubin's inflating step μ (μ < −λ); λ = 0.5, μ = −0.53 gives the pass-band k = 1/λ + 1/μ ≈ 0.11 of the paper."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_component_fraction <= 1.0:
            raise BadInputError(f"min_component_fraction {self.min_component_fraction} is invalid; allowed: a number "
                                "in [0, 1] (e.g. 0.05)")
        if self.smooth_iterations < 0:
            raise BadInputError(f"smooth_iterations {self.smooth_iterations} is invalid; allowed: an integer ≥ 0")
        if not 0.0 < self.smooth_lambda < 1.0:
            raise BadInputError(f"smooth_lambda {self.smooth_lambda} is invalid; allowed: 0 < λ < 1 (e.g. 0.5)")
        if not self.smooth_mu < -self.smooth_lambda:
            raise BadInputError(f"smooth_mu {self.smooth_mu} is invalid; allowed: μ < −λ = {-self.smooth_lambda:g} "
                                "(e.g. −0.53)")


def clean_mesh(mesh: Mesh, config: CleanupConfig = CleanupConfig()) -> Mesh:  # frozen, so a shared default is safe
    """Remove floaters and broken faces, orient outward and optionally smooth.

    Steps: merge vertices at identical positions; drop faces with a repeated vertex or zero area and duplicate faces
    (the same three vertices in any order, the first kept); drop small connected components
    (``min_component_fraction``); drop unreferenced vertices; orient (:func:`orient_outward`); Taubin smoothing.

    Args:
        mesh: vertices [V, 3], faces [F, 3], colours [V, 3] uint8 or None.
        config: see :class:`CleanupConfig`.

    Returns:
        A new mesh; colours follow the kept vertices (a merged vertex keeps the colour of its first copy).

    Raises:
        BadInputError: a malformed mesh, or nothing left after the clean-up (every face degenerate).
    """
    mesh = checked_mesh(mesh)
    vertices, faces, colors = mesh.vertices, mesh.faces, mesh.colors

    # Exact duplicates only: marching cubes shares its vertices, so these come from files or concatenated parts.
    unique, first, inverse = np.unique(vertices, axis=0, return_index=True, return_inverse=True)
    faces = inverse.reshape(-1)[faces]
    vertices, colors = unique, None if colors is None else colors[first]

    repeated = (faces[:, 0] == faces[:, 1]) | (faces[:, 1] == faces[:, 2]) | (faces[:, 2] == faces[:, 0])
    faces = faces[~repeated & (face_areas(vertices, faces) > 0)]
    _, keep = np.unique(np.sort(faces, axis=1), axis=0, return_index=True)
    faces = faces[np.sort(keep)]
    if faces.shape[0] == 0:
        raise BadInputError(f"the mesh has no usable faces: all {mesh.faces.shape[0]} are degenerate (a repeated "
                            "vertex or zero area); allowed: a mesh with at least one proper triangle")

    if config.min_component_fraction > 0:
        faces = faces[_large_components(vertices, faces, config.min_component_fraction)]
    vertices, faces, colors = _compact(vertices, faces, colors)
    if config.orient_outward:
        faces = orient_outward(vertices, faces)
    if config.smooth_iterations:
        vertices = taubin_smooth(vertices, faces, config.smooth_iterations, config.smooth_lambda, config.smooth_mu)
    return Mesh(vertices.astype(np.float32), faces.astype(np.int64), colors)


def _large_components(vertices: np.ndarray, faces: np.ndarray, fraction: float) -> np.ndarray:
    """[F] bool: faces of vertex-connected components with area ≥ fraction × the largest component's."""
    labels = _vertex_components(vertices.shape[0], faces)[faces[:, 0]]
    area = np.bincount(labels, weights=face_areas(vertices, faces))
    return area[labels] >= fraction * area.max()


def _vertex_components(num_vertices: int, faces: np.ndarray) -> np.ndarray:
    """[V] component label of every vertex, connectivity through shared faces."""
    rows = faces[:, [0, 1, 2]].reshape(-1)
    cols = faces[:, [1, 2, 0]].reshape(-1)
    graph = sparse.coo_matrix((np.ones(rows.shape[0], dtype=np.int8), (rows, cols)), shape=(num_vertices,) * 2)
    return csgraph.connected_components(graph, directed=False)[1]


def _compact(
    vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Drop unreferenced vertices (keeping the order of the others) and renumber the faces."""
    used = np.unique(faces)
    remap = np.full(vertices.shape[0], -1, dtype=np.int64)
    remap[used] = np.arange(used.shape[0])
    return vertices[used], remap[faces], None if colors is None else colors[used]


def orient_outward(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Consistent winding per edge-connected component, then each component flipped if its signed volume is < 0.

    Consistency is propagated over a breadth-first spanning tree of the faces across manifold edges (edges of exactly
    two faces): two neighbours agree when they traverse their shared edge in opposite directions. Non-manifold edges
    do not propagate, and a non-orientable component (a Möbius band) keeps the tree's choice.

    Args:
        vertices: [V, 3]; faces: [F, 3] int64.

    Returns:
        [F, 3] int64 faces, the same triangles with some windings reversed, counter-clockwise seen from outside.
    """
    faces = np.asarray(faces, dtype=np.int64)
    num_faces = faces.shape[0]
    directed = faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    forward = directed[:, 0] < directed[:, 1]  # does this face run along its edge from the lower index?
    key = np.sort(directed, axis=1)
    _, edge_id, counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    edge_id = edge_id.reshape(-1)
    corner_face = np.repeat(np.arange(num_faces), 3)
    manifold = counts[edge_id] == 2
    order = np.argsort(edge_id[manifold], kind="stable")
    pairs = corner_face[manifold][order].reshape(-1, 2)
    # Same direction along the shared edge = inconsistent winding: one of the two must flip.
    disagree = (forward[manifold][order].reshape(-1, 2)[:, 0] == forward[manifold][order].reshape(-1, 2)[:, 1])
    graph = sparse.coo_matrix(
        (disagree.astype(np.int8) + 1, (pairs[:, 0], pairs[:, 1])), shape=(num_faces, num_faces)
    ).tocsr()
    graph = (graph + graph.T).tocsr()  # values: 1 = agree, 2 = disagree (0 means "no edge" in a sparse matrix)

    count, labels = csgraph.connected_components(graph, directed=False)
    flip = np.zeros(num_faces, dtype=bool)
    starts = np.unique(labels, return_index=True)[1]
    for start in starts:
        visit, parent = csgraph.breadth_first_order(graph, start, directed=False, return_predecessors=True)
        if visit.shape[0] > 1:
            child = visit[1:]
            relation = np.asarray(graph[child, parent[child]]).reshape(-1) == 2
            _propagate_parity(flip, visit[1:].tolist(), parent[child].tolist(), relation.tolist())
    faces = np.where(flip[:, None], faces[:, ::-1], faces)

    # Whole components: outward means positive signed volume about the component's own centroid (any reference point
    # gives the same volume for a closed surface; the centroid keeps the test meaningful for an open one).
    tri = np.asarray(vertices, dtype=np.float64)[faces]
    sizes = np.bincount(labels, minlength=count)[:, None]
    centroid = np.stack([np.bincount(labels, tri[:, :, k].mean(axis=1), count) for k in range(3)], axis=1) / sizes
    volume = np.bincount(labels, np.einsum("fi,fi->f", tri[:, 0] - centroid[labels], face_cross(vertices, faces)),
                         count)
    return np.where((volume < 0)[labels][:, None], faces[:, ::-1], faces)


def _propagate_parity(flip: np.ndarray, children: list[int], parents: list[int], relation: list[bool]) -> None:
    """flip[child] = flip[parent] XOR relation, in breadth-first order (every parent precedes its children)."""
    values = flip.tolist()
    for child, parent, differs in zip(children, parents, relation, strict=True):
        values[child] = values[parent] ^ differs
    flip[:] = values


def taubin_smooth(
    vertices: np.ndarray, faces: np.ndarray, iterations: int = 10, lam: float = 0.5, mu: float = -0.53
) -> np.ndarray:
    """Taubin λ|μ smoothing with the uniform (umbrella) Laplacian; border vertices stay fixed.

    Each iteration moves every vertex by λ·L(v), then by μ·L(v), with L(v) = mean of the neighbours − v: the μ step
    undoes the shrinkage of the λ step for low frequencies, so the volume is kept to within a fraction of a percent
    where plain Laplacian smoothing would shrink it.

    Args:
        vertices: [V, 3]; faces: [F, 3] int.
        iterations: λ/μ pairs.
        lam, mu: the two step sizes (see :class:`CleanupConfig`).

    Returns:
        [V, 3] float32 smoothed positions.
    """
    num = vertices.shape[0]
    rows = faces[:, [0, 1, 2, 1, 2, 0]].reshape(-1)
    cols = faces[:, [1, 2, 0, 0, 1, 2]].reshape(-1)
    adjacency = sparse.coo_matrix((np.ones(rows.shape[0]), (rows, cols)), shape=(num, num)).tocsr()
    adjacency.data[:] = 1.0  # an edge shared by two faces was summed twice
    degree = np.asarray(adjacency.sum(axis=1)).reshape(-1)
    averaging = sparse.diags(1.0 / np.maximum(degree, 1.0)) @ adjacency
    movable = (degree > 0)[:, None].astype(np.float64)
    movable[boundary_vertices(faces)] = 0.0
    v = np.asarray(vertices, dtype=np.float64).copy()
    for _ in range(iterations):
        for step in (lam, mu):
            v += step * movable * (averaging @ v - v)
    return v.astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------------
# Polygon budget
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecimateConfig:
    """Settings of :func:`decimate` (fast-simplification's quadric edge collapse)."""

    aggressiveness: float = 7.0
    """fast-simplification's ``agg``: lower keeps the shape better and is slower; 7 is its default."""

    preserve_border: bool = True
    """Never collapse an edge touching an open border, so holes and cut edges keep their outline."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.aggressiveness) and self.aggressiveness >= 0):
            raise BadInputError(f"aggressiveness {self.aggressiveness} is invalid; allowed: a finite number ≥ 0 "
                                "(e.g. 7)")


MIN_TARGET_FACES = 4
"""The smallest polygon budget :func:`decimate` accepts (a tetrahedron)."""


def decimate(mesh: Mesh, target_faces: int, config: DecimateConfig = DecimateConfig()) -> Mesh:
    """Reduce a mesh to ``target_faces`` triangles by quadric edge collapse (fast-simplification).

    The collapsed vertices move to the quadric-optimal positions, so they have no original vertex to take a colour
    from: each new vertex takes the colour of the *nearest original vertex* (a k-d tree lookup). That is exact for
    the vertices that did not move and within one original edge length elsewhere, which at a budget well below the
    input's face count is finer than the new triangles can show.

    Args:
        mesh: vertices [V, 3], faces [F, 3], colours [V, 3] uint8 or None.
        target_faces: the budget; a mesh already within it is returned unchanged (as a copy).
        config: see :class:`DecimateConfig`.

    Returns:
        A mesh with ``target_faces`` faces (fast-simplification stops at the exact count on closed surfaces; a border
        that may not be collapsed can leave it a little above), winding kept.

    Raises:
        BadInputError: a malformed mesh or a target below :data:`MIN_TARGET_FACES`.
    """
    import fast_simplification  # imported here: only this stage needs it

    if isinstance(target_faces, bool) or not isinstance(target_faces, (int, np.integer)) \
            or target_faces < MIN_TARGET_FACES:
        raise BadInputError(f"target_faces {target_faces!r} is invalid; allowed: an integer ≥ {MIN_TARGET_FACES}")
    mesh = checked_mesh(mesh)
    if mesh.faces.shape[0] <= target_faces:
        return Mesh(mesh.vertices.copy(), mesh.faces.copy(), None if mesh.colors is None else mesh.colors.copy())
    points, faces = fast_simplification.simplify(
        mesh.vertices.astype(np.float64), mesh.faces.astype(np.int32), target_count=int(target_faces),
        agg=config.aggressiveness, preserve_border=config.preserve_border,
    )
    vertices, faces, _ = _compact(np.asarray(points), np.asarray(faces, dtype=np.int64), None)
    colors = None
    if mesh.colors is not None:
        nearest = cKDTree(mesh.vertices).query(vertices, k=1)[1]
        colors = mesh.colors[nearest]
    return Mesh(vertices.astype(np.float32), faces, colors)
