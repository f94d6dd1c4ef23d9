"""Seeded procedural objects: compound shapes of textured and coloured primitives (numpy only).

For offline work and tests, where Objaverse is out of reach. An object is 2–5 parts — boxes, UV spheres, capped
cylinders, cones and tori — each randomly scaled, rotated and placed so that they overlap into one compound, and each
either image-textured (checkerboard, stripes or smooth noise made with numpy, mapped through per-corner UVs) or
coloured per vertex or per face (:attr:`ProceduralConfig.surface` forces one or the other for every part). The same
seed gives the same object on every machine (numpy's PCG64), and the same shapes in every surface mode.

The arrays are built here; :mod:`training.render.scene_bpy` turns them into Blender meshes and materials.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from server.common.errors import BadInputError

PRIMITIVES: tuple[str, ...] = ("box", "sphere", "cylinder", "cone", "torus")
"""Kinds of parts the generator draws from."""

SURFACES: tuple[str, ...] = ("mixed", "textured", "flat")
"""Values of :attr:`ProceduralConfig.surface` (and of ``one2345-train render --surface``)."""


@dataclass(frozen=True)
class ProceduralConfig:
    """Ranges of the generator."""

    min_parts: int = 2
    """Fewest primitives per object."""
    max_parts: int = 5
    """Most primitives per object."""
    texture_size: int = 64
    """Side in pixels of generated texture images."""
    segments: int = 24
    """Subdivisions around curved primitives (spheres, cylinders, cones, tori)."""
    surface: str = "mixed"
    """How parts are painted, one of :data:`SURFACES`: ``mixed`` image-textures each part with probability 0.5 and
    colours the others per vertex or per face; ``textured`` image-textures every part; ``flat`` colours every part
    per corner (no image textures). For a seed, shapes, placement, roughness and the parts whose mixed draw already
    matches the mode are identical in all three modes; only the other parts' paint differs."""

    def __post_init__(self) -> None:
        if self.surface not in SURFACES:
            raise BadInputError(f"surface {self.surface!r} is not usable: choose one of {', '.join(SURFACES)}")


@dataclass(frozen=True)
class MeshPart:
    """One primitive in object space, ready to become a Blender mesh.

    Exactly one of ``corner_colors`` and ``texture`` is set.
    """

    name: str
    """Primitive kind and index, e.g. ``"sphere-1"``."""
    vertices: np.ndarray
    """[V, 3] float64 positions."""
    faces: np.ndarray
    """[F, 3] int64 triangle vertex indices, counter-clockwise seen from outside."""
    corner_uvs: np.ndarray
    """[F, 3, 2] float32 texture coordinates of each triangle corner."""
    corner_colors: np.ndarray | None
    """[F, 3, 4] float32 linear RGBA per triangle corner (per-vertex or per-face colouring), or None."""
    texture: np.ndarray | None
    """[H, W, 3] uint8 sRGB image (row 0 = top), or None."""
    roughness: float
    """Principled BSDF roughness."""


# ---------------------------------------------------------------------------------------------------------------------
# Primitives
# ---------------------------------------------------------------------------------------------------------------------


def _grid(
    surface: Callable[[np.ndarray, np.ndarray], np.ndarray], nu: int, nv: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Triangulated parametric surface over (u, v) ∈ [0, 1]².

    Args:
        surface: maps u [N], v [N] to points [N, 3].
        nu, nv: subdivisions along u and v.

    Returns:
        vertices [(nu+1)(nv+1), 3]; faces [2·nu·nv, 3]; corner uvs [F, 3, 2].
    """
    u, v = np.meshgrid(np.linspace(0, 1, nu + 1), np.linspace(0, 1, nv + 1), indexing="ij")
    vertices = surface(u.ravel(), v.ravel())
    index = np.arange((nu + 1) * (nv + 1)).reshape(nu + 1, nv + 1)
    a, b = index[:-1, :-1].ravel(), index[1:, :-1].ravel()
    c, d = index[1:, 1:].ravel(), index[:-1, 1:].ravel()
    faces = np.concatenate([np.stack([a, b, c], -1), np.stack([a, c, d], -1)])
    uv = np.stack([u.ravel(), v.ravel()], -1)
    return vertices, faces, uv[faces].astype(np.float32)


def _drop_degenerate(vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray) -> tuple[np.ndarray, ...]:
    """Remove zero-area triangles (grid rows collapsed onto a pole or an apex)."""
    corners = vertices[faces]
    area = np.linalg.norm(np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=-1)
    keep = area > 1e-12
    return vertices, faces[keep], uvs[keep]


def _merge(*pieces: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate (vertices, faces, uvs) pieces into one mesh."""
    vertices, faces, uvs, offset = [], [], [], 0
    for v, f, t in pieces:
        vertices.append(v)
        faces.append(f + offset)
        uvs.append(t)
        offset += len(v)
    return np.concatenate(vertices), np.concatenate(faces), np.concatenate(uvs)


def _disc(z: float, radius: float, segments: int, up: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A triangle fan closing a cylinder or cone at height z, facing +z (``up``) or −z."""
    angle = np.linspace(0, 2 * np.pi, segments, endpoint=False)
    rim = np.stack([radius * np.cos(angle), radius * np.sin(angle), np.full(segments, z)], -1)
    vertices = np.concatenate([[[0.0, 0.0, z]], rim])
    i = np.arange(segments)
    faces = np.stack([np.zeros(segments, int), 1 + i, 1 + (i + 1) % segments], -1)
    if not up:
        faces = faces[:, ::-1]
    uv = np.concatenate([[[0.5, 0.5]], 0.5 + 0.5 * np.stack([np.cos(angle), np.sin(angle)], -1)])
    return vertices, faces, uv[faces].astype(np.float32)


def box() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cube [−1, 1]³ with 4 vertices per face (flat shading) and a full [0, 1]² UV square on each face."""
    pieces = []
    for axis in range(3):
        for sign in (-1.0, 1.0):

            def face(u: np.ndarray, v: np.ndarray, axis: int = axis, sign: float = sign) -> np.ndarray:
                p = np.zeros((len(u), 3))
                p[:, axis] = sign
                p[:, (axis + 1) % 3] = (2 * u - 1) * sign
                p[:, (axis + 2) % 3] = 2 * v - 1
                return p

            pieces.append(_grid(face, 1, 1))
    return _merge(*pieces)


def sphere(segments: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit UV sphere (seam and poles duplicated in the grid, degenerate pole triangles removed)."""

    def surface(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        azimuth, polar = 2 * np.pi * u, np.pi * (1 - v)
        return np.stack([np.sin(polar) * np.cos(azimuth), np.sin(polar) * np.sin(azimuth), np.cos(polar)], -1)

    return _drop_degenerate(*_grid(surface, segments, segments // 2))


def cylinder(segments: int, top_radius: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Capped cylinder of radius 1 (bottom) and ``top_radius`` (0 → cone), z ∈ [−1, 1]."""

    def surface(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        radius = 1.0 + (top_radius - 1.0) * v
        return np.stack([radius * np.cos(2 * np.pi * u), radius * np.sin(2 * np.pi * u), 2 * v - 1], -1)

    pieces = [_drop_degenerate(*_grid(surface, segments, 2)), _disc(-1.0, 1.0, segments, up=False)]
    if top_radius > 0:
        pieces.append(_disc(1.0, top_radius, segments, up=True))
    return _merge(*pieces)


def torus(segments: int, minor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Torus around z with major radius 1 and minor radius ``minor``."""

    def surface(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        a, b = 2 * np.pi * u, 2 * np.pi * v
        ring = 1.0 + minor * np.cos(b)
        return np.stack([ring * np.cos(a), ring * np.sin(a), minor * np.sin(b)], -1)

    return _grid(surface, segments, max(8, segments // 2))


# ---------------------------------------------------------------------------------------------------------------------
# Appearance
# ---------------------------------------------------------------------------------------------------------------------


def _srgb_to_linear(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1] → linear (Blender's colour attributes are linear)."""
    return np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)


def make_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """[size, size, 3] uint8 image: a checkerboard, stripes or smooth noise in 2–3 random colours."""
    palette = rng.uniform(0.05, 0.95, size=(3, 3))
    y, x = np.mgrid[0:size, 0:size] / size
    kind = rng.integers(3)
    if kind == 0:
        cells = int(rng.integers(2, 9))
        weight = ((np.floor(x * cells) + np.floor(y * cells)) % 2)[..., None]
        image = palette[0] * (1 - weight) + palette[1] * weight
    elif kind == 1:
        frequency, angle = rng.uniform(2, 8), rng.uniform(0, np.pi)
        phase = (x * np.cos(angle) + y * np.sin(angle)) * frequency
        weight = (0.5 + 0.5 * np.sin(2 * np.pi * phase))[..., None]
        image = palette[0] * (1 - weight) + palette[2] * weight
    else:
        coarse = rng.uniform(size=(5, 5, 3))
        rows = np.linspace(0, 4, size)  # bilinear upsampling of a 5×5 grid of random colours
        i0 = np.floor(rows).astype(int).clip(0, 3)
        t = (rows - i0)[:, None, None]
        lines = coarse[i0] * (1 - t) + coarse[i0 + 1] * t
        t = (rows - i0)[None, :, None]
        image = lines[:, i0] * (1 - t) + lines[:, i0 + 1] * t
        image = palette[0] * 0.3 + image * 0.7
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


def _corner_colors(rng: np.random.Generator, vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """[F, 3, 4] linear RGBA: a smooth per-vertex colour field or one random colour per face."""
    if rng.random() < 0.5:
        base, amplitude = rng.uniform(0.2, 0.8, size=3), rng.uniform(0.15, 0.4)
        frequency, phase = rng.uniform(1, 4, size=(3, 3)), rng.uniform(0, 2 * np.pi, size=3)
        rgb = base + amplitude * np.sin(vertices @ frequency + phase)
        colors = rgb[faces]
    else:
        colors = np.repeat(rng.uniform(0.05, 0.95, size=(len(faces), 1, 3)), 3, axis=1)
    linear = _srgb_to_linear(np.clip(colors, 0.0, 1.0))
    return np.concatenate([linear, np.ones((*linear.shape[:2], 1))], -1).astype(np.float32)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """[3, 3] rotation uniformly distributed over SO(3) (QR of a Gaussian matrix with the sign fix)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


# ---------------------------------------------------------------------------------------------------------------------
# Objects
# ---------------------------------------------------------------------------------------------------------------------


def make_part(
    rng: np.random.Generator,
    kind: str,
    index: int,
    config: ProceduralConfig,
    surface_rng: np.random.Generator | None = None,
) -> MeshPart:
    """One randomly shaped, placed and painted primitive of the given kind.

    Args:
        rng: draws the shape, placement, roughness and the ``mixed`` paint — the same draws in every surface mode.
        surface_rng: draws the paint of a part that :attr:`ProceduralConfig.surface` forces away from its mixed draw
            (default ``rng``, after all of this part's other draws).
    """
    if kind == "box":
        vertices, faces, uvs = box()
    elif kind == "sphere":
        vertices, faces, uvs = sphere(config.segments)
    elif kind == "cylinder":
        vertices, faces, uvs = cylinder(config.segments)
    elif kind == "cone":
        vertices, faces, uvs = cylinder(config.segments, top_radius=0.0)
    elif kind == "torus":
        vertices, faces, uvs = torus(config.segments, minor=float(rng.uniform(0.2, 0.45)))
    else:
        raise ValueError(f"unknown primitive {kind!r}; known: {', '.join(PRIMITIVES)}")
    scale = rng.uniform(0.2, 0.6, size=3)
    vertices = (vertices * scale) @ _random_rotation(rng).T + rng.uniform(-0.45, 0.45, size=3)
    # The mixed paint is always drawn from ``rng``, so its stream — hence every later part — is the same in all modes.
    textured = rng.random() < 0.5
    corner_colors = None if textured else _corner_colors(rng, vertices, faces)
    texture = make_texture(rng, config.texture_size) if textured else None
    roughness = float(rng.uniform(0.3, 0.9))
    forced = {"mixed": textured, "textured": True, "flat": False}[config.surface]
    if forced != textured:
        repaint = rng if surface_rng is None else surface_rng
        corner_colors = None if forced else _corner_colors(repaint, vertices, faces)
        texture = make_texture(repaint, config.texture_size) if forced else None
    return MeshPart(
        name=f"{kind}-{index}",
        vertices=vertices,
        faces=faces.astype(np.int64),
        corner_uvs=uvs.astype(np.float32),
        corner_colors=corner_colors,
        texture=texture,
        roughness=roughness,
    )


def make_object(seed: int, config: ProceduralConfig | None = None) -> list[MeshPart]:
    """The procedural object of this seed: 2–5 overlapping parts, centred near the origin (not normalised).

    Args:
        seed: any non-negative integer; the same seed gives the same object everywhere (and the same shapes for
            every :attr:`ProceduralConfig.surface`).
        config: generator ranges and surface mode (defaults: :class:`ProceduralConfig`).

    Returns:
        The parts (at least :attr:`ProceduralConfig.min_parts`).
    """
    config = config or ProceduralConfig()
    rng = np.random.default_rng(int(seed))
    # Forced paint comes from a child stream of the seed, so it never shifts the main stream's shapes.
    surface_rng = np.random.default_rng(np.random.SeedSequence(int(seed)).spawn(1)[0])
    count = int(rng.integers(config.min_parts, config.max_parts + 1))
    kinds = rng.choice(len(PRIMITIVES), size=count)
    return [make_part(rng, PRIMITIVES[k], i, config, surface_rng) for i, k in enumerate(kinds)]
