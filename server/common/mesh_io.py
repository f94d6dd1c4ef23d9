"""Triangle meshes and their files: :class:`Mesh`, and PLY, GLB and OBJ written atomically and read back (spec §3.5).

Frame decision (spec §3.5). Meshes handed to :func:`export_mesh` are in the pose.json world frame, which is z-up, and
the PLY stores that frame unchanged (as the reference's ``mesh.ply`` does). GLB and OBJ are y-up formats. The reference
converts with (x, y, z) → (x, z, y), which is a mirror (det −1): the object comes out as its mirror image, and it has
to flip the face winding to keep normals outward. We instead apply the proper rotation −90° about x,
(x, y, z) → (x, z, −y), the same one Blender's glTF exporter applies for "+Y up". It keeps handedness and winding,
and a y-up importer that converts back to z-up (Blender's glTF and OBJ importers do) recovers the PLY's coordinates
exactly. This deliberately differs from the reference's OBJ/GLB files, which are mirrored.

Colour encoding. Vertex colours are sRGB bytes (sampled from sRGB images). PLY and OBJ store them as such; glTF
defines COLOR_0 as linear, so the GLB stores the decoded linear values as float32 (every sRGB byte round-trips).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from server.common.errors import BadInputError
from server.common.fsutil import write_bytes_atomic

MESH_SUFFIXES = (".ply", ".glb", ".obj")
"""File formats :func:`export_mesh` and :func:`load_mesh` understand, chosen by the path's suffix."""


@dataclass
class Mesh:
    """A triangle mesh with optional vertex colours, in the pose.json world frame (z-up) when exported."""

    vertices: np.ndarray
    """[V, 3] float32 positions."""

    faces: np.ndarray
    """[F, 3] int64 vertex indices, counter-clockwise seen from outside."""

    colors: np.ndarray | None = None
    """[V, 3] uint8 RGB per vertex, or None."""


@dataclass
class MeshUvs:
    """A mesh file's texture coordinates (GLB TEXCOORD_0, OBJ ``vt``, PLY ``s``/``t``), one UV triangle per face.

    The convention is glTF's, the one :func:`server.stages.asset.bake_texture` takes: origin at the texture's top-left
    corner, v downwards. An OBJ's or PLY's (u, v), whose origin is the bottom-left corner, is stored as (u, 1 − v).
    """

    uvs: np.ndarray
    """[T, 2] float32."""
    faces: np.ndarray
    """[F, 3] int64 indices into ``uvs``, row f for the mesh's face f (an OBJ's ``vt`` indices; the mesh's own faces
    for GLB and PLY, whose UVs are per vertex). A face the file gives no UVs points at a zero-area UV triangle, so
    :func:`server.stages.asset.check_uvs` counts it as degenerate."""


def to_y_up(vertices: np.ndarray) -> np.ndarray:
    """[V, 3] z-up → [V, 3] y-up via (x, y, z) → (x, z, −y): −90° about x, det +1 (Blender glTF "+Y up")."""
    return np.stack([vertices[:, 0], vertices[:, 2], -vertices[:, 1]], axis=1)


def _from_y_up(vertices: np.ndarray) -> np.ndarray:
    """[V, 3] y-up → [V, 3] z-up, the inverse of :func:`to_y_up`: (x, y, z) → (x, −z, y)."""
    return np.stack([vertices[:, 0], -vertices[:, 2], vertices[:, 1]], axis=1)


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in MESH_SUFFIXES:
        raise BadInputError(f"mesh file {str(path)!r} has suffix {path.suffix!r}; allowed: {', '.join(MESH_SUFFIXES)}")
    return suffix


def _checked(mesh: Mesh) -> Mesh:
    """Validate shapes and index range; return a copy with canonical dtypes."""
    vertices = np.asarray(mesh.vertices)
    faces = np.asarray(mesh.faces)
    if vertices.ndim != 2 or vertices.shape[1] != 3 or not np.all(np.isfinite(vertices)):
        raise BadInputError(f"mesh vertices have shape {vertices.shape}; allowed: [V, 3] finite floats")
    if faces.ndim != 2 or faces.shape[1] != 3 or faces.shape[0] == 0:
        raise BadInputError(f"mesh faces have shape {faces.shape}; allowed: [F, 3] integers with F ≥ 1")
    if faces.min() < 0 or faces.max() >= vertices.shape[0]:
        raise BadInputError(
            f"mesh faces index vertices {int(faces.min())}..{int(faces.max())}; "
            f"allowed: 0..{vertices.shape[0] - 1} (V = {vertices.shape[0]})"
        )
    if vertices.shape[0] >= 2**31:
        raise BadInputError(f"mesh has {vertices.shape[0]} vertices; allowed: fewer than 2³¹ (int32 indices)")
    colors = mesh.colors
    if colors is not None:
        colors = np.asarray(colors)
        if colors.shape != vertices.shape or colors.dtype != np.uint8:
            raise BadInputError(
                f"mesh colors have shape {colors.shape} and dtype {colors.dtype}; allowed: [V, 3] uint8 with V = "
                f"{vertices.shape[0]}, or None"
            )
    return Mesh(vertices.astype(np.float32), faces.astype(np.int64), colors)


def export_mesh(mesh: Mesh, path: str | os.PathLike[str]) -> Path:
    """Write a mesh as .ply, .glb or .obj (chosen by the suffix), atomically.

    PLY keeps the z-up world frame; GLB and OBJ get the y-up rotation (x, y, z) → (x, z, −y) (module docstring).
    The file is written to a temporary file in the same folder and moved into place with ``os.replace``, so a reader
    never sees a partial file and a failed write leaves the old file (if any) untouched.

    Args:
        mesh: vertices [V, 3] float32, faces [F, 3] int64 (F ≥ 1), colours [V, 3] uint8 or None.
        path: destination; its folder is created if missing.

    Returns:
        The path written.

    Raises:
        BadInputError: unknown suffix, or a mesh with wrong shapes, dtypes or out-of-range indices.
    """
    path = Path(path)
    suffix = _suffix(path)
    mesh = _checked(mesh)
    if suffix == ".ply":
        data = _ply_bytes(mesh)
    elif suffix == ".glb":
        data = _glb_bytes(mesh)
    else:
        data = _obj_bytes(mesh)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_bytes_atomic(path, data)  # mode 0666 less the umask, like any file the user makes


def load_mesh(path: str | os.PathLike[str]) -> Mesh:
    """Read a mesh written by :func:`export_mesh` (GLB: any glTF binary trimesh reads), back in the z-up world frame.

    Args:
        path: a .ply (binary little-endian, triangles), .glb or .obj file (polygons are fanned into triangles).

    Returns:
        Mesh with vertices [V, 3] float32, faces [F, 3] int64 and colours [V, 3] uint8 or None.

    Raises:
        BadInputError: unknown suffix, or a file this reader does not understand.
    """
    return load_mesh_with_uvs(path)[0]


def load_mesh_with_uvs(path: str | os.PathLike[str]) -> tuple[Mesh, MeshUvs | None]:
    """Read a mesh file as :func:`load_mesh` does, with its texture coordinates when it has any.

    UVs come from a GLB's TEXCOORD_0, an OBJ's ``vt`` lines (the ``a/t`` of its faces) or a PLY's ``s``/``t`` (or
    ``u``/``v``, ``texture_u``/``texture_v``) vertex properties, in the glTF convention of :class:`MeshUvs`.

    Args:
        path: a .ply, .glb or .obj file; anything may be in it (an upload): whatever does not parse is a
            BadInputError naming the file and its format, never another exception.

    Returns:
        (the mesh, checked as :func:`export_mesh` checks it; its UVs, or None when the file has none).

    Raises:
        BadInputError: unknown suffix, or a file this reader does not understand.
    """
    path = Path(path)
    suffix = _suffix(path)
    reader = {".ply": _read_ply_uvs, ".glb": _read_glb_uvs, ".obj": _read_obj_uvs}[suffix]
    try:
        mesh, uvs = reader(path)
    except BadInputError:
        raise
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, struct.error, UnicodeDecodeError) as e:
        # A damaged or hostile file: its parser's own error, as bad input naming the file.
        raise BadInputError(f"{path} could not be read as {suffix[1:].upper()} ({type(e).__name__}: "
                            f"{str(e)[:200]}); allowed: a triangle or polygon mesh in {', '.join(MESH_SUFFIXES)}") \
            from None
    mesh = _checked(mesh)
    if uvs is not None:
        uv, uv_faces = np.asarray(uvs.uvs, dtype=np.float32), np.asarray(uvs.faces, dtype=np.int64)
        if uv.ndim != 2 or uv.shape[1] != 2 or uv.shape[0] == 0 or not np.all(np.isfinite(uv)) or \
                uv_faces.shape != mesh.faces.shape or uv_faces.min() < 0 or uv_faces.max() >= uv.shape[0]:
            raise BadInputError(f"{path} has texture coordinates of shape {uv.shape} indexed {uv_faces.shape}; "
                                f"allowed: finite (u, v) pairs, one UV triangle per face ({mesh.faces.shape[0]})")
        uvs = MeshUvs(uv, uv_faces)
    return mesh, uvs


# PLY -----------------------------------------------------------------------------------------------------------------

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "<i2", "int16": "<i2", "ushort": "<u2",
    "uint16": "<u2", "int": "<i4", "int32": "<i4", "uint": "<u4", "uint32": "<u4", "float": "<f4", "float32": "<f4",
    "double": "<f8", "float64": "<f8",
}  # fmt: skip


def _ply_bytes(mesh: Mesh) -> bytes:
    """Binary little-endian PLY: float x/y/z, uchar red/green/blue (Blender reads these as a colour attribute)."""
    v, f = mesh.vertices.shape[0], mesh.faces.shape[0]
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if mesh.colors is not None:
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {v}"]
    header += [f"property {'float' if t == '<f4' else 'uchar'} {name}" for name, t in fields]
    header += [f"element face {f}", "property list uchar int vertex_indices", "end_header"]
    vertex_data = np.empty(v, dtype=fields)
    for axis, name in enumerate("xyz"):
        vertex_data[name] = mesh.vertices[:, axis]
    if mesh.colors is not None:
        for channel, name in enumerate(("red", "green", "blue")):
            vertex_data[name] = mesh.colors[:, channel]
    face_data = np.empty(f, dtype=[("count", "u1"), ("indices", "<i4", (3,))])
    face_data["count"] = 3
    face_data["indices"] = mesh.faces
    return ("\n".join(header) + "\n").encode("ascii") + vertex_data.tobytes() + face_data.tobytes()


_PLY_UV_NAMES = (("s", "t"), ("u", "v"), ("texture_u", "texture_v"))
"""Vertex properties that hold texture coordinates (Blender writes s/t), origin bottom-left like an OBJ's vt."""


def _read_ply_uvs(path: Path) -> tuple[Mesh, MeshUvs | None]:
    """Binary little-endian PLY with a vertex element of scalar properties and a triangle face list."""
    raw = path.read_bytes()
    end = raw.find(b"end_header\n")
    if not raw.startswith(b"ply\n") or end < 0:
        raise BadInputError(f"{path} is not a PLY file; allowed: a PLY with a header ending in 'end_header'")
    lines = raw[:end].decode("ascii").splitlines()
    body = memoryview(raw)[end + len(b"end_header\n") :]
    if "format binary_little_endian 1.0" not in lines:
        raise BadInputError(f"{path} is not binary little-endian PLY; allowed: 'format binary_little_endian 1.0'")
    elements: list[tuple[str, int, list[list[str]]]] = []
    for line in lines:
        words = line.split()
        if words[:1] == ["element"]:
            elements.append((words[1], int(words[2]), []))
        elif words[:1] == ["property"] and elements:
            elements[-1][2].append(words[1:])
    vertices = faces = colors = uvs = None
    offset = 0
    for name, count, props in elements:
        if name == "vertex":
            dtype = np.dtype([(p[1], _PLY_TYPES[p[0]]) for p in props])
            data = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
            offset += dtype.itemsize * count
            vertices = np.stack([data["x"], data["y"], data["z"]], axis=1).astype(np.float32)
            if {"red", "green", "blue"} <= set(dtype.names or ()):
                colors = np.stack([data["red"], data["green"], data["blue"]], axis=1).astype(np.uint8)
            for u, v in _PLY_UV_NAMES:
                if {u, v} <= set(dtype.names or ()):
                    uvs = np.stack([data[u], 1.0 - data[v].astype(np.float64)], axis=1).astype(np.float32)
                    break
        elif name == "face" and len(props) == 1 and props[0][0] == "list":
            dtype = np.dtype([("count", _PLY_TYPES[props[0][1]]), ("indices", _PLY_TYPES[props[0][2]], (3,))])
            data = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
            offset += dtype.itemsize * count
            if np.any(data["count"] != 3):
                raise BadInputError(f"{path} has non-triangular faces; allowed: triangles only")
            faces = data["indices"].astype(np.int64)
        else:
            raise BadInputError(f"{path} has PLY element {name!r} this reader does not know; allowed: vertex, face")
    if vertices is None or faces is None:
        raise BadInputError(f"{path} lacks a vertex or face element; allowed: a triangle mesh")
    return Mesh(vertices, faces, colors), None if uvs is None else MeshUvs(uvs, faces)


# GLB -----------------------------------------------------------------------------------------------------------------


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    """IEC 61966-2-1 decoding of sRGB values in [0, 1]."""
    c = np.asarray(c, dtype=np.float64)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(c: np.ndarray) -> np.ndarray:
    """IEC 61966-2-1 encoding of linear values in [0, 1]."""
    c = np.clip(np.asarray(c, dtype=np.float64), 0.0, 1.0)
    return np.where(c <= 0.0031308, 12.92 * c, 1.055 * c ** (1 / 2.4) - 0.055)


_GLB_MAGIC, _JSON_CHUNK, _BIN_CHUNK = 0x46546C67, 0x4E4F534A, 0x004E4942
GLTF_FLOAT, GLTF_UNSIGNED_INT, GLTF_ARRAY_BUFFER, GLTF_ELEMENT_ARRAY_BUFFER = 5126, 5125, 34962, 34963
"""glTF's accessor ``componentType`` codes (float32, uint32) and bufferView ``target`` codes (vertex data,
indices)."""


def _glb_bytes(mesh: Mesh) -> bytes:
    """glTF 2.0 binary, y-up: POSITION float32, COLOR_0 float32 *linear* (the spec defines COLOR_0 as linear, so
    our sRGB vertex colours are decoded; storing floats keeps every 8-bit sRGB value exact), uint32 indices.

    Written by hand (about as long as driving an exporter) so the colour encoding is explicit."""
    positions = np.ascontiguousarray(to_y_up(mesh.vertices), dtype="<f4")
    indices = np.ascontiguousarray(mesh.faces, dtype="<u4")
    arrays = [positions]
    attributes = {"POSITION": 0}
    accessors = [{"bufferView": 0, "componentType": GLTF_FLOAT, "count": len(positions), "type": "VEC3",
                  "min": positions.min(axis=0).tolist(), "max": positions.max(axis=0).tolist()}]
    if mesh.colors is not None:
        arrays.append(np.ascontiguousarray(srgb_to_linear(mesh.colors / 255.0), dtype="<f4"))
        attributes["COLOR_0"] = 1
        accessors.append({"bufferView": 1, "componentType": GLTF_FLOAT, "count": len(positions), "type": "VEC3"})
    arrays.append(indices)
    accessors.append({"bufferView": len(arrays) - 1, "componentType": GLTF_UNSIGNED_INT, "count": indices.size,
                      "type": "SCALAR"})

    gltf = {
        "asset": {"version": "2.0", "generator": "one2345"},
        "scene": 0, "scenes": [{"nodes": [0]}], "nodes": [{"mesh": 0, "name": "one2345"}],
        "meshes": [{"primitives": [{"attributes": attributes, "indices": len(accessors) - 1, "mode": 4}]}],
        "accessors": accessors,
    }
    targets = [GLTF_ARRAY_BUFFER] * (len(arrays) - 1) + [GLTF_ELEMENT_ARRAY_BUFFER]
    return pack_glb(gltf, [(array.tobytes(), target) for array, target in zip(arrays, targets, strict=True)])


def pack_glb(gltf: dict[str, Any], pieces: Sequence[tuple[bytes, int | None]]) -> bytes:
    """A glTF 2.0 binary file: the JSON ``gltf`` and one BIN chunk holding ``pieces`` back to back, each padded to
    4 bytes. Piece i (its bytes and its bufferView ``target``, None for none, e.g. an embedded image) becomes
    bufferView i; ``bufferViews`` and ``buffers`` are added as the JSON's last keys."""
    views, blob = [], b""
    for data, target in pieces:
        view: dict[str, int] = {"buffer": 0, "byteOffset": len(blob), "byteLength": len(data)}
        if target is not None:
            view["target"] = target
        views.append(view)
        blob += data + b"\0" * (-len(data) % 4)
    gltf = {**gltf, "bufferViews": views, "buffers": [{"byteLength": len(blob)}]}
    text = json.dumps(gltf, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 4)
    total = 12 + 8 + len(text) + 8 + len(blob)
    return (struct.pack("<III", _GLB_MAGIC, 2, total) + struct.pack("<II", len(text), _JSON_CHUNK) + text
            + struct.pack("<II", len(blob), _BIN_CHUNK) + blob)


def _read_glb_uvs(path: Path) -> tuple[Mesh, MeshUvs | None]:
    """Read a GLB back into z-up world coordinates with sRGB uint8 colours (COLOR_0 is linear in glTF) and its
    TEXCOORD_0 (every primitive's, as trimesh concatenates them; None when any lacks them)."""
    import trimesh

    try:
        tm = trimesh.load(path, file_type="glb", force="mesh", process=False)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, struct.error, OSError) as error:
        raise BadInputError(
            f"{path} could not be read as glTF binary ({type(error).__name__}: {str(error)[:200]}); allowed: a .glb "
            "triangle mesh"
        ) from None
    if not isinstance(tm, trimesh.Trimesh):  # a file of points or lines only: trimesh gives back an empty scene
        raise BadInputError(f"{path} holds no triangles; allowed: a .glb triangle mesh")
    colors = _glb_linear_colors(path, len(tm.vertices))
    if colors is None and tm.visual.kind == "vertex":  # a GLB of another writer, stored as 8-bit (linear) values
        colors = np.asarray(tm.visual.vertex_colors)[:, :3] / 255.0
    srgb = None if colors is None else np.round(linear_to_srgb(colors) * 255).astype(np.uint8)
    vertices = _from_y_up(np.asarray(tm.vertices, dtype=np.float32))
    faces = np.asarray(tm.faces, dtype=np.int64)
    uvs = None
    # Read TEXCOORD_0 as stored (glTF's convention, origin top-left): trimesh keeps UVs only on a textured visual,
    # so it drops them from a GLB without a material or with vertex colours, as artists' exports often are.
    stored = _glb_attribute(path, "TEXCOORD_0", len(vertices))
    uv = getattr(tm.visual, "uv", None) if tm.visual.kind == "texture" else None
    if stored is not None:
        uvs = MeshUvs(stored.astype(np.float32), faces)
    elif uv is not None and len(uv) == len(vertices):
        # trimesh turns glTF's (u, v) (origin top-left) into OpenGL's (origin bottom-left); turn it back.
        uv = np.asarray(uv, dtype=np.float64)
        uvs = MeshUvs(np.stack([uv[:, 0], 1.0 - uv[:, 1]], axis=1).astype(np.float32), faces)
    return Mesh(vertices.astype(np.float32), faces, srgb), uvs


def _glb_attribute(path: Path, name: str, count: int) -> np.ndarray | None:
    """[count, width] float64 of a float vertex attribute (``COLOR_0``, ``TEXCOORD_0``) of a single-primitive GLB,
    read exactly as stored; None when the file has several primitives or the attribute is absent or not float."""
    data = path.read_bytes()
    (json_length,) = struct.unpack_from("<I", data, 12)
    gltf = json.loads(data[20: 20 + json_length])
    blob = data[20 + json_length + 8:]
    meshes = gltf.get("meshes", [])
    if len(meshes) != 1 or len(meshes[0]["primitives"]) != 1:
        return None
    index = meshes[0]["primitives"][0]["attributes"].get(name)
    if index is None:
        return None
    accessor = gltf["accessors"][index]
    if accessor["componentType"] != GLTF_FLOAT or accessor["count"] != count:
        return None
    view = gltf["bufferViews"][accessor["bufferView"]]
    width = {"VEC2": 2, "VEC3": 3, "VEC4": 4}[accessor["type"]]
    start = view.get("byteOffset", 0) + accessor.get("byteOffset", 0)
    return np.frombuffer(blob, dtype="<f4", count=count * width, offset=start).reshape(count, width).astype(np.float64)


def _glb_linear_colors(path: Path, count: int) -> np.ndarray | None:
    """The exact float COLOR_0 of a single-primitive GLB as we write it, else None (trimesh's 8-bit copy is used)."""
    values = _glb_attribute(path, "COLOR_0", count)
    return None if values is None else values[:, :3]


# OBJ -----------------------------------------------------------------------------------------------------------------


def _obj_bytes(mesh: Mesh) -> bytes:
    """Wavefront OBJ, y-up: ``v x y z [r g b]`` (colour floats in 0..1) and 1-based ``f a b c``."""
    vertices = to_y_up(mesh.vertices).astype(np.float64)
    # %.9g round-trips float32 exactly; colours c/255 with 6 digits round back to the same byte.
    if mesh.colors is not None:
        rows = np.concatenate([vertices, mesh.colors.astype(np.float64) / 255.0], axis=1)
        v_lines = format_rows("v %.9g %.9g %.9g %.6g %.6g %.6g\n", rows)
    else:
        v_lines = format_rows("v %.9g %.9g %.9g\n", vertices)
    f_lines = format_rows("f %d %d %d\n", mesh.faces + 1)
    return b"# One2345 mesh, y-up\n" + v_lines + f_lines


def format_rows(row_format: str, rows: np.ndarray, chunk: int = 65536) -> bytes:
    """Apply a printf row format to every row of a [N, K] array, in chunks (far faster than a per-row loop)."""
    parts = []
    for start in range(0, rows.shape[0], chunk):
        block = rows[start : start + chunk]
        parts.append((row_format * block.shape[0]) % tuple(block.ravel().tolist()))
    return "".join(parts).encode("ascii")


def _read_obj_uvs(path: Path) -> tuple[Mesh, MeshUvs | None]:
    """Wavefront OBJ: ``v x y z [r g b]``, ``vt u [v]`` and ``f`` lines of three or more corners ``a``, ``a/t``,
    ``a//n`` or ``a/t/n`` with positive indices; polygons are fanned into triangles (a fan from the first corner, as
    Blender's and most importers triangulate a convex polygon).

    UVs: the faces' ``t`` indices into the ``vt`` lines, as (u, 1 − v) (:class:`MeshUvs`); None when no face has
    one. A face without (in a file where others have them) points at an extra zero-area UV triangle."""
    vertex_lines: list[str] = []
    uv_lines: list[str] = []
    face_lines: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("v "):
            vertex_lines.append(line[2:])
        elif line.startswith("vt "):
            uv_lines.append(line[3:])
        elif line.startswith("f "):
            face_lines.append(line[2:].split("#", 1)[0])
    allowed = ("allowed: 'v x y z' or 'v x y z r g b' lines, 'vt u v' lines and 'f' lines of 3 or more corners "
               "'a', 'a/t', 'a//n' or 'a/t/n' with 1-based indices")
    if not vertex_lines or not face_lines:
        raise BadInputError(f"{path} has {len(vertex_lines)} vertices and {len(face_lines)} faces; {allowed}")
    width = len(vertex_lines[0].split())
    face_text = " ".join(face_lines)
    try:
        # One joined parse instead of a per-line loop: ~10× faster on meshes with 10⁵–10⁶ vertices.
        table = np.array(" ".join(vertex_lines).split(), dtype=np.float64)
        words = face_text.split()
        if "/" in face_text:
            parts = [w.split("/") for w in words]
            corners = np.array([p[0] for p in parts], dtype=np.int64)
            uv_index = np.array([int(p[1]) if len(p) > 1 and p[1] else 0 for p in parts], dtype=np.int64)
        else:
            corners, uv_index = np.array(words, dtype=np.int64), np.zeros(len(words), dtype=np.int64)
        uv_table = np.array([[*row, 0.0, 0.0][:2] for row in ([float(x) for x in t.split()[:2]] for t in uv_lines)],
                            dtype=np.float64).reshape(-1, 2)
    except ValueError as error:
        raise BadInputError(f"{path} has an unreadable number ({error}); {allowed}") from None
    if width not in (3, 6) or table.shape[0] != width * len(vertex_lines):
        raise BadInputError(f"{path} has vertex lines of varying or unknown length; {allowed}")
    counts = np.array([len(f.split()) for f in face_lines], dtype=np.int64)
    if counts.min() < 3 or corners.min() < 1 or corners.max() > len(vertex_lines):
        raise BadInputError(f"{path} has a face of fewer than 3 corners or vertex indices outside "
                            f"1..{len(vertex_lines)}; {allowed}")
    if uv_index.min() < 0 or uv_index.max() > len(uv_table):
        raise BadInputError(f"{path} has texture indices outside 1..{len(uv_table)}; {allowed}")
    # Fan triangulation: face k with n corners from offset o gives (o, o + i, o + i + 1) for i = 1 … n − 2.
    fans = counts - 2
    first = np.repeat(np.cumsum(counts) - counts, fans)
    step = np.arange(int(fans.sum())) - np.repeat(np.cumsum(fans) - fans, fans) + 1
    triangles = np.stack([first, first + step, first + step + 1], axis=1)
    table = table.reshape(-1, width)
    colors = np.clip(np.rint(table[:, 3:6] * 255.0), 0, 255).astype(np.uint8) if width == 6 else None
    vertices = _from_y_up(table[:, :3].astype(np.float32))
    mesh = Mesh(vertices.astype(np.float32), corners[triangles] - 1, colors)
    uv_faces = uv_index[triangles]
    if not uv_faces.any():
        return mesh, None
    # A face with any corner lacking a vt gets the zero-area triangle of an extra UV (0, 0) appended at the end.
    incomplete = (uv_faces == 0).any(axis=1)
    uv_faces = uv_faces - 1
    uv_faces[incomplete] = len(uv_table)
    uv_table = np.concatenate([uv_table, np.zeros((1, 2))]) if incomplete.any() else uv_table
    uvs = np.stack([uv_table[:, 0], 1.0 - uv_table[:, 1]], axis=1).astype(np.float32)
    return mesh, MeshUvs(uvs, uv_faces)
