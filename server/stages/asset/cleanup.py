"""Mesh clean-up and polygon budget: floaters, degenerate and duplicate faces, outward orientation, Taubin smoothing,
quadric decimation with a fallback. Every function is pure: it returns a new :class:`~server.common.mesh_io.Mesh`.

Floaters and the views. A marching-cubes surface of a learnt SDF has small floating pieces no view shows; but an
object also has small real parts (a statue's eyes, an aircraft's engines). With the views at hand, a small component
is kept when enough views show it with its own silhouette: the mesh is z-buffered from each camera (the bake's
rasteriser and pixel convention, :mod:`server.stages.asset.raster`), and a view supports the component when at
least ``min_view_pixels`` of its pixels show that component in front (not hidden by the main part) and most of them
are foreground in the view (not the white background the views are composited on). Without views, the area rule
alone decides.

Budgets. fast-simplification's quadric collapse refuses any collapse that leaves a near-degenerate triangle, so on
slivers and fans (a cylinder's caps, long thin strips of planar patches) it stalls far above the target. When it
stops short by more than ``tolerance``, a second method takes over: rounds of shortest-edge collapses (to the edge
midpoint) over an independent set of edges, each checked for the link condition and for normals that would flip.
:func:`decimate_with_report` says which ran, how many faces were reached and why, when the target was missed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import sparse
from scipy.sparse import csgraph
from scipy.spatial import cKDTree

from server.common.errors import BadInputError
from server.common.mesh_io import Mesh
from server.stages.asset.geometry import boundary_vertices, checked_mesh, face_areas, face_cross
from server.stages.asset.raster import render_face_ids
from server.stages.asset.reports import CleanupReport, DecimateReport

if TYPE_CHECKING:
    from server.stages.asset.views import BakeViews

logger = logging.getLogger("server.stages.asset")


@dataclass(frozen=True)
class CleanupConfig:
    """What :func:`clean_mesh` does. Defaults suit a marching-cubes surface of the reconstruction."""

    min_component_fraction: float = 0.05
    """Connected components (by shared vertices) whose surface area is below this fraction of the largest one's are
    dropped: floaters of the SDF, unless the views show them (module docstring). Area rather than face count, so a
    decimated or remeshed input is judged the same. 0 keeps every component."""

    min_supporting_views: int = 3
    """With views: a small component is kept when at least this many views show it (module docstring)."""

    min_view_pixels: int = 4
    """Pixels of a component a view must show in front of everything else to count as showing it."""

    foreground_fraction: float = 0.5
    """Share of those pixels that must be foreground in the view (not background) for the view to support it."""

    background_threshold: int = 12
    """A view pixel within this many sRGB levels of white on every channel is background (the views are composited
    on white). A small part that is itself pure white therefore needs the area rule."""

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
        if self.min_supporting_views < 1 or self.min_view_pixels < 1:
            raise BadInputError(f"min_supporting_views {self.min_supporting_views} and min_view_pixels "
                                f"{self.min_view_pixels} are invalid; allowed: integers ≥ 1 (e.g. 3 and 4)")
        if not 0.0 <= self.foreground_fraction <= 1.0:
            raise BadInputError(f"foreground_fraction {self.foreground_fraction} is invalid; allowed: a number in "
                                "[0, 1] (e.g. 0.5)")
        if not 0 <= self.background_threshold <= 255:
            raise BadInputError(f"background_threshold {self.background_threshold} is invalid; allowed: an integer "
                                "in [0, 255] (e.g. 12)")
        if self.smooth_iterations < 0:
            raise BadInputError(f"smooth_iterations {self.smooth_iterations} is invalid; allowed: an integer ≥ 0")
        if not 0.0 < self.smooth_lambda < 1.0:
            raise BadInputError(f"smooth_lambda {self.smooth_lambda} is invalid; allowed: 0 < λ < 1 (e.g. 0.5)")
        if not self.smooth_mu < -self.smooth_lambda:
            raise BadInputError(f"smooth_mu {self.smooth_mu} is invalid; allowed: μ < −λ = {-self.smooth_lambda:g} "
                                "(e.g. −0.53)")


def clean_mesh(
    mesh: Mesh,
    config: CleanupConfig = CleanupConfig(),  # frozen, so a shared default is safe
    views: BakeViews | None = None,
) -> Mesh:
    """Remove floaters and broken faces, orient outward and optionally smooth (:func:`clean_mesh_with_report`)."""
    return clean_mesh_with_report(mesh, config, views)[0]


def clean_mesh_with_report(
    mesh: Mesh, config: CleanupConfig = CleanupConfig(), views: BakeViews | None = None
) -> tuple[Mesh, CleanupReport]:
    """Remove floaters and broken faces, orient outward and optionally smooth.

    Steps: merge vertices at identical positions; drop faces with a repeated vertex or zero area and duplicate faces
    (the same three vertices in any order, the first kept); drop small connected components
    (``min_component_fraction``) that the views do not show (module docstring; without views, every small one); drop
    unreferenced vertices; orient (:func:`orient_outward`); Taubin smoothing.

    Args:
        mesh: vertices [V, 3], faces [F, 3], colours [V, 3] uint8 or None.
        config: see :class:`CleanupConfig`.
        views: the posed views in the mesh's frame (intrinsics in the pixel convention of
            :mod:`server.stages.asset.raster`: a point projecting to (j + 0.5, i + 0.5) lands in pixel (i, j)), or
            None for the area rule alone.

    Returns:
        A new mesh (colours follow the kept vertices; a merged vertex keeps the colour of its first copy) and what
        happened to the components.

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

    keep, report = _kept_components(vertices, faces, config, views)
    faces = faces[keep]
    vertices, faces, colors = _compact(vertices, faces, colors)
    if config.orient_outward:
        faces = orient_outward(vertices, faces)
    if config.smooth_iterations:
        vertices = taubin_smooth(vertices, faces, config.smooth_iterations, config.smooth_lambda, config.smooth_mu)
    return Mesh(vertices.astype(np.float32), faces.astype(np.int64), colors), report


def _kept_components(
    vertices: np.ndarray, faces: np.ndarray, config: CleanupConfig, views: BakeViews | None
) -> tuple[np.ndarray, CleanupReport]:
    """[F] bool faces to keep: components with area ≥ fraction × the largest's, and smaller ones the views show."""
    labels = _vertex_components(vertices.shape[0], faces)[faces[:, 0]]
    _, labels = np.unique(labels, return_inverse=True)
    labels = labels.reshape(-1)
    area = np.bincount(labels, weights=face_areas(vertices, faces))
    small = np.flatnonzero(area < config.min_component_fraction * area.max())
    small = small[np.argsort(-area[small], kind="stable")]
    keep_component = np.ones(area.shape[0], dtype=bool)
    keep_component[small] = False
    support: list[int] = []
    if views is not None and small.shape[0]:
        counts = component_view_support(vertices, faces, labels, views, config)
        support = [int(counts[c]) for c in small]
        keep_component[small] = counts[small] >= config.min_supporting_views
    kept_by_views = int(keep_component[small].sum())
    report = CleanupReport(components=int(area.shape[0]), small=int(small.shape[0]), kept_by_views=kept_by_views,
                           dropped=int(small.shape[0]) - kept_by_views, supporting_views=support)
    return keep_component[labels], report


def component_view_support(
    vertices: np.ndarray, faces: np.ndarray, labels: np.ndarray, views: BakeViews,
    config: CleanupConfig = CleanupConfig(),
) -> np.ndarray:
    """How many views show each face component with its own silhouette (module docstring).

    Args:
        vertices: [V, 3] in the views' frame; faces: [F, 3] int; labels: [F] component index 0..C−1 per face.
        views: the posed views (intrinsics in the pixel convention of :mod:`server.stages.asset.raster`).
        config: ``min_view_pixels``, ``foreground_fraction``, ``background_threshold``.

    Returns:
        [C] int64: views in which at least ``min_view_pixels`` pixels show the component in front of the rest of the
        mesh, and at least ``foreground_fraction`` of those pixels are foreground in the image.
    """
    count = int(labels.max()) + 1
    support = np.zeros(count, dtype=np.int64)
    for image, k, w2c in zip(views.images, views.intrinsics, views.w2c, strict=True):
        height, width = image.shape[:2]
        _, face = render_face_ids(vertices, faces, k, w2c, height, width)
        covered = face >= 0
        component = labels[face[covered]]
        foreground = (255 - image[covered].astype(np.int64) > config.background_threshold).any(axis=1)
        shown = np.bincount(component, minlength=count)
        fg = np.bincount(component, weights=foreground.astype(np.float64), minlength=count)
        support += (shown >= config.min_view_pixels) & (fg >= config.foreground_fraction * np.maximum(shown, 1))
    return support


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
    """Settings of :func:`decimate` (fast-simplification's quadric edge collapse, then the fallback)."""

    aggressiveness: float = 7.0
    """fast-simplification's ``agg``: lower keeps the shape better and is slower; 7 is its default."""

    preserve_border: bool = True
    """Never collapse an edge touching an open border, so holes and cut edges keep their outline (the fallback never
    moves a border vertex either way)."""

    tolerance: float = 0.01
    """The budget counts as reached within this fraction of it; the fallback starts when quadric collapse stops
    further above."""

    fallback: bool = True
    """Run shortest-edge collapse (module docstring) when quadric collapse stalls above the budget."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.aggressiveness) and self.aggressiveness >= 0):
            raise BadInputError(f"aggressiveness {self.aggressiveness} is invalid; allowed: a finite number ≥ 0 "
                                "(e.g. 7)")
        if not (math.isfinite(self.tolerance) and 0 <= self.tolerance < 1):
            raise BadInputError(f"tolerance {self.tolerance} is invalid; allowed: a number in [0, 1) (e.g. 0.01)")


MIN_TARGET_FACES = 4
"""The smallest polygon budget :func:`decimate` accepts (a tetrahedron)."""


def decimate(mesh: Mesh, target_faces: int, config: DecimateConfig = DecimateConfig()) -> Mesh:
    """Reduce a mesh to ``target_faces`` triangles (:func:`decimate_with_report`; a missed target is logged as a
    warning with its reason — callers that record results should use :func:`decimate_with_report`)."""
    result, report = decimate_with_report(mesh, target_faces, config)
    if not report.reached:
        logger.warning("decimate: %d faces for a target of %d: %s", report.faces, report.target_faces, report.reason)
    return result


def decimate_with_report(
    mesh: Mesh, target_faces: int, config: DecimateConfig = DecimateConfig()
) -> tuple[Mesh, DecimateReport]:
    """Reduce a mesh to ``target_faces`` triangles: quadric edge collapse (fast-simplification), then, where that
    stalls above the budget, rounds of shortest-edge collapses (module docstring).

    The collapsed vertices move to new positions, so they have no original vertex to take a colour from: each new
    vertex takes the colour of the *nearest original vertex* (a k-d tree lookup). That is exact for the vertices that
    did not move and within one original edge length elsewhere, which at a budget well below the input's face count is
    finer than the new triangles can show.

    Args:
        mesh: vertices [V, 3], faces [F, 3], colours [V, 3] uint8 or None.
        target_faces: the budget; a mesh already within it is returned unchanged (as a copy).
        config: see :class:`DecimateConfig`.

    Returns:
        The mesh (winding kept) and the report. On a closed manifold each collapse removes two faces, so the result
        has ``target_faces`` or one fewer; where it has more than target × (1 + tolerance) (open borders that may not
        move, non-manifold edges, every remaining collapse would flip a face), ``report.reason`` says why.

    Raises:
        BadInputError: a malformed mesh or a target below :data:`MIN_TARGET_FACES`.
    """
    import fast_simplification  # imported here: only this stage needs it

    if isinstance(target_faces, bool) or not isinstance(target_faces, (int, np.integer)) \
            or target_faces < MIN_TARGET_FACES:
        raise BadInputError(f"target_faces {target_faces!r} is invalid; allowed: an integer ≥ {MIN_TARGET_FACES}")
    target = int(target_faces)
    mesh = checked_mesh(mesh)
    input_faces = int(mesh.faces.shape[0])
    if input_faces <= target:
        copy = Mesh(mesh.vertices.copy(), mesh.faces.copy(), None if mesh.colors is None else mesh.colors.copy())
        return copy, DecimateReport(target, input_faces, input_faces, "none", input_faces, True)
    points, faces = fast_simplification.simplify(
        mesh.vertices.astype(np.float64), mesh.faces.astype(np.int32), target_count=target,
        agg=config.aggressiveness, preserve_border=config.preserve_border,
    )
    vertices, faces, _ = _compact(np.asarray(points), np.asarray(faces, dtype=np.int64), None)
    quadric_faces = int(faces.shape[0])
    limit = target * (1.0 + config.tolerance)
    method, reason = "quadric", None
    if quadric_faces > limit and config.fallback:
        method = "quadric+shortest-edge"
        vertices, faces, reason = _collapse_shortest_edges(vertices, faces, target)
        vertices, faces, _ = _compact(vertices, faces, None)
    elif quadric_faces > limit:
        reason = "quadric collapse stalled (every further collapse would leave a near-degenerate triangle) and the " \
                 "fallback is off"
    reached = faces.shape[0] <= limit
    if reached:
        reason = None
    elif reason is None:
        reason = "quadric collapse stalled"
    colors = None
    if mesh.colors is not None:
        nearest = cKDTree(mesh.vertices).query(vertices, k=1)[1]
        colors = mesh.colors[nearest]
    report = DecimateReport(target, input_faces, int(faces.shape[0]), method, quadric_faces, reached, reason)
    return Mesh(vertices.astype(np.float32), faces, colors), report


def _collapse_shortest_edges(
    vertices: np.ndarray, faces: np.ndarray, target: int
) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Rounds of midpoint collapses of the shortest interior manifold edges until ``target`` faces (or one fewer).

    Each round, fully vectorised: rank the candidate edges (both ends off borders and non-manifold edges) by length;
    select every edge that is the shortest candidate incident to the one-rings of both its ends, so no face touches
    two selected collapses and they can be applied at once; reject those that fail the link condition (the ends share
    exactly two neighbours: no pinch) or would flip or flatten a surrounding face, and keep them out until something
    else has been collapsed; collapse the rest, the shortest first, no more than the budget needs.

    Returns:
        vertices [V, 3] float64 (some unreferenced), faces [F', 3] int64, and the reason when the target was not
        reached (None otherwise).
    """
    v = np.asarray(vertices, dtype=np.float64).copy()
    f = np.asarray(faces, dtype=np.int64)
    blocked = np.zeros((0, 2), dtype=np.int64)
    while f.shape[0] > target:
        count = v.shape[0]
        pairs_all = np.sort(f[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
        keys, uses = np.unique(pairs_all[:, 0] * count + pairs_all[:, 1], return_counts=True)  # 1-D: far faster
        edges = np.stack([keys // count, keys % count], axis=1)
        fixed = np.zeros(count, dtype=bool)
        fixed[edges[uses != 2].reshape(-1)] = True  # borders stay; non-manifold edges are not touched
        usable = (uses == 2) & ~fixed[edges].any(axis=1)
        if blocked.shape[0]:
            usable &= ~_rows_in(edges, blocked)
        candidates = edges[usable]
        if candidates.shape[0] == 0:
            reason = ("every remaining collapse would pinch the surface or flip a face" if blocked.shape[0] else
                      "no interior manifold edge is left to collapse (open borders or non-manifold edges)")
            return v, f, f"shortest-edge collapse stopped at {f.shape[0]} faces: {reason}"
        rank = np.empty(candidates.shape[0], dtype=np.int64)
        rank[np.argsort(np.linalg.norm(v[candidates[:, 0]] - v[candidates[:, 1]], axis=1), kind="stable")] = \
            np.arange(candidates.shape[0])
        none = np.iinfo(np.int64).max
        ring = np.full(count, none)
        np.minimum.at(ring, candidates[:, 0], rank)
        np.minimum.at(ring, candidates[:, 1], rank)
        # Spread over one ring: two selected edges then have no end adjacent to an end of the other, so no face
        # touches both and each one's checks hold whatever the other does.
        spread = ring.copy()
        np.minimum.at(spread, edges[:, 0], ring[edges[:, 1]])
        np.minimum.at(spread, edges[:, 1], ring[edges[:, 0]])
        ring = spread
        chosen = (ring[candidates[:, 0]] == rank) & (ring[candidates[:, 1]] == rank)
        pairs, pair_rank = candidates[chosen], rank[chosen]

        # Link condition: exactly two common neighbours.
        adjacency = sparse.coo_matrix((np.ones(edges.shape[0] * 2), (edges.reshape(-1), edges[:, ::-1].reshape(-1))),
                                      shape=(count, count)).tocsr()
        common = np.asarray(adjacency[pairs[:, 0]].multiply(adjacency[pairs[:, 1]]).sum(axis=1)).reshape(-1)
        ok = common == 2
        # Flips: every face touching one end (but not both) keeps its orientation and some area.
        owner = np.full(count, -1, dtype=np.int64)
        owner[pairs[:, 0]] = np.arange(pairs.shape[0])
        owner[pairs[:, 1]] = np.arange(pairs.shape[0])
        face_owner = owner[f].max(axis=1)
        touched = np.flatnonzero(face_owner >= 0)
        tri = f[touched]
        pair_of = face_owner[touched]
        ends = pairs[pair_of]
        on_end = (tri == ends[:, :1]) | (tri == ends[:, 1:])
        survives = on_end.sum(axis=1) == 1
        tri, pair_of, on_end = tri[survives], pair_of[survives], on_end[survives]
        before = v[tri]
        after = np.where(on_end[..., None], (0.5 * (v[pairs[pair_of, 0]] + v[pairs[pair_of, 1]]))[:, None], before)
        n_before = np.cross(before[:, 1] - before[:, 0], before[:, 2] - before[:, 0])
        n_after = np.cross(after[:, 1] - after[:, 0], after[:, 2] - after[:, 0])
        l_before, l_after = np.linalg.norm(n_before, axis=1), np.linalg.norm(n_after, axis=1)
        bad = (np.einsum("ij,ij->i", n_before, n_after) <= 1e-3 * l_before * l_after) | \
              (l_after <= 1e-12 * np.maximum(l_before, 1e-300))
        ok &= np.bincount(pair_of[bad], minlength=pairs.shape[0]) == 0

        blocked = np.concatenate([blocked, pairs[~ok]])
        pairs, pair_rank = pairs[ok], pair_rank[ok]
        if pairs.shape[0] == 0:
            continue
        blocked = np.zeros((0, 2), dtype=np.int64)  # the surface changed: give them another chance
        needed = (f.shape[0] - target + 1) // 2
        pairs = pairs[np.argsort(pair_rank, kind="stable")[:needed]]
        v[pairs[:, 0]] = 0.5 * (v[pairs[:, 0]] + v[pairs[:, 1]])
        remap = np.arange(count)
        remap[pairs[:, 1]] = pairs[:, 0]
        f = remap[f]
        f = f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 2] != f[:, 0])]
    return v, f, None


def _rows_in(rows: np.ndarray, table: np.ndarray) -> np.ndarray:
    """[N] bool: which rows of an [N, 2] int array appear in an [M, 2] int array."""
    width = int(max(rows.max(), table.max())) + 1
    return np.isin(rows[:, 0] * width + rows[:, 1], table[:, 0] * width + table[:, 1])
