"""Textured mesh files: GLB with an embedded PBR base-colour texture, and OBJ + MTL + PNG.

Frames and colours follow :mod:`server.common.mesh_io`: meshes are in the z-up pose.json world and both formats get the
y-up rotation (x, y, z) → (x, z, −y); vertex colours are sRGB bytes, stored in the GLB as linear float COLOR_0 (as
:func:`server.common.mesh_io.export_mesh` does, so :func:`server.common.mesh_io.load_mesh` reads the geometry and
colours back) and
in the OBJ as ``v x y z r g b``. The texture is an sRGB PNG (glTF's baseColorTexture is sRGB-encoded by definition).

UVs: glTF puts (0, 0) at the image's top-left corner, as :class:`~server.stages.asset.bake.TexturedMesh` does, so
TEXCOORD_0
is written unchanged; OBJ puts it at the bottom-left, so ``vt`` lines hold (u, 1 − v).

COLOR_0 and the texture. glTF 2.0 (§3.9.2) defines COLOR_0 as a *multiplier* of the base colour, so a viewer that
follows the spec (three.js, Babylon.js, Godot) shows texture × vertex colour — darker than either — when both are
present. ``vertex_colors=True`` (the default, so Blender imports the colours as a colour attribute, as for the
vertex-coloured GLB) keeps them anyway; pass ``vertex_colors=False`` for files meant for other viewers.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from server.common.errors import BadInputError
from server.common.fsutil import write_bytes_atomic
from server.common.mesh_io import (  # the y-up rotation, GLB container and OBJ rows have one owner
    GLTF_ARRAY_BUFFER,
    GLTF_ELEMENT_ARRAY_BUFFER,
    GLTF_FLOAT,
    GLTF_UNSIGNED_INT,
    format_rows,
    pack_glb,
    srgb_to_linear,
    to_y_up,
)
from server.stages.asset.bake import TexturedMesh
from server.stages.asset.geometry import vertex_normals

TEXTURED_SUFFIXES = (".glb", ".obj")
"""File formats :func:`export_textured_mesh` writes, chosen by the path's suffix."""

MATERIAL_NAME = "one2345"

_LINEAR, _LINEAR_MIPMAP_LINEAR, _CLAMP_TO_EDGE = 9729, 9987, 33071


def export_textured_mesh(
    mesh: TexturedMesh, path: str | os.PathLike[str], vertex_colors: bool = True
) -> list[Path]:
    """Write a textured mesh as .glb (one file) or .obj (plus ``<stem>.mtl`` and ``<stem>_texture.png`` beside it).

    Each file is written to a temporary file in the same folder and moved into place, the OBJ last, so a reader that
    finds the OBJ also finds its material and texture complete.

    Args:
        mesh: the textured mesh (vertices [V, 3], faces [F, 3], uvs [V, 2], texture [S, S, 3] uint8, colours).
        path: destination; its folder is created if missing.
        vertex_colors: also store the vertex colours, if the mesh has them (module docstring on COLOR_0).

    Returns:
        The paths written, the mesh file first.

    Raises:
        BadInputError: an unknown suffix or a malformed mesh.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TEXTURED_SUFFIXES:
        raise BadInputError(f"textured mesh file {path.name!r} has suffix {path.suffix!r}; allowed: "
                            f"{', '.join(TEXTURED_SUFFIXES)} (PLY has no texture; use "
                            "server.common.mesh_io.export_mesh)")
    _check(mesh)
    colors = mesh.colors if vertex_colors else None
    png = _png_bytes(mesh.texture)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".glb":
        return [_write_atomic(path, _glb_bytes(mesh, colors, png))]
    texture_path, material_path = path.with_name(f"{path.stem}_texture.png"), path.with_suffix(".mtl")
    _write_atomic(texture_path, png)
    _write_atomic(material_path, _mtl_bytes(texture_path.name))
    return [_write_atomic(path, _obj_bytes(mesh, colors, material_path.name)), material_path, texture_path]


def _check(mesh: TexturedMesh) -> None:
    v = np.asarray(mesh.vertices)
    f = np.asarray(mesh.faces)
    if v.ndim != 2 or v.shape[1] != 3 or not np.all(np.isfinite(v)):
        raise BadInputError(f"textured mesh vertices have shape {v.shape}; allowed: [V, 3] finite floats")
    if f.ndim != 2 or f.shape[1] != 3 or f.shape[0] == 0 or f.min() < 0 or f.max() >= v.shape[0]:
        raise BadInputError(f"textured mesh faces have shape {f.shape}; allowed: [F, 3] indices in 0..{v.shape[0] - 1}")
    if np.shape(mesh.uvs) != (v.shape[0], 2):
        raise BadInputError(f"textured mesh uvs have shape {np.shape(mesh.uvs)}; allowed: [{v.shape[0]}, 2]")
    t = np.asarray(mesh.texture)
    if t.ndim != 3 or t.shape[2] != 3 or t.dtype != np.uint8:
        raise BadInputError(f"texture has shape {t.shape} and dtype {t.dtype}; allowed: [S, S, 3] uint8")
    if mesh.colors is not None and (np.shape(mesh.colors) != v.shape or np.asarray(mesh.colors).dtype != np.uint8):
        raise BadInputError(f"textured mesh colors have shape {np.shape(mesh.colors)}; allowed: [V, 3] uint8 or None")


def _png_bytes(texture: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(texture, dtype=np.uint8), "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _write_atomic(path: Path, data: bytes) -> Path:
    return write_bytes_atomic(path, data)  # mode 0666 less the umask, like any file the user makes


def _glb_bytes(mesh: TexturedMesh, colors: np.ndarray | None, png: bytes) -> bytes:
    """glTF 2.0 binary, y-up: POSITION, NORMAL (welded across UV seams), TEXCOORD_0, optional linear COLOR_0,
    uint32 indices, one metallic-roughness material whose baseColorTexture is the embedded PNG."""
    positions = np.ascontiguousarray(to_y_up(mesh.vertices), dtype="<f4")
    normals = np.ascontiguousarray(to_y_up(vertex_normals(mesh.vertices, mesh.faces, weld=True)), dtype="<f4")
    arrays: list[tuple[bytes, int | None]] = []
    accessors: list[dict] = []
    attributes: dict[str, int] = {}

    def add(name: str | None, array: np.ndarray, kind: str, component: int, target: int | None, **extra) -> int:
        arrays.append((array.tobytes(), target))
        accessors.append({"bufferView": len(arrays) - 1, "componentType": component,
                          "count": int(array.shape[0]) if kind != "SCALAR" else int(array.size), "type": kind,
                          **extra})
        if name is not None:
            attributes[name] = len(accessors) - 1
        return len(accessors) - 1

    add("POSITION", positions, "VEC3", GLTF_FLOAT, GLTF_ARRAY_BUFFER,
        min=positions.min(axis=0).tolist(), max=positions.max(axis=0).tolist())
    add("NORMAL", normals, "VEC3", GLTF_FLOAT, GLTF_ARRAY_BUFFER)
    add("TEXCOORD_0", np.ascontiguousarray(mesh.uvs, dtype="<f4"), "VEC2", GLTF_FLOAT, GLTF_ARRAY_BUFFER)
    if colors is not None:
        add("COLOR_0", np.ascontiguousarray(srgb_to_linear(colors / 255.0), dtype="<f4"), "VEC3", GLTF_FLOAT,
            GLTF_ARRAY_BUFFER)
    indices = add(None, np.ascontiguousarray(mesh.faces, dtype="<u4"), "SCALAR", GLTF_UNSIGNED_INT,
                  GLTF_ELEMENT_ARRAY_BUFFER)
    arrays.append((png, None))
    image_view = len(arrays) - 1

    gltf = {
        "asset": {"version": "2.0", "generator": "one2345"},
        "scene": 0, "scenes": [{"nodes": [0]}], "nodes": [{"mesh": 0, "name": "one2345"}],
        "meshes": [{"name": "one2345", "primitives": [{"attributes": attributes, "indices": indices, "material": 0,
                                                       "mode": 4}]}],
        "materials": [{"name": MATERIAL_NAME, "pbrMetallicRoughness": {
            "baseColorTexture": {"index": 0, "texCoord": 0}, "metallicFactor": 0.0, "roughnessFactor": 0.8}}],
        "textures": [{"sampler": 0, "source": 0}],
        "images": [{"bufferView": image_view, "mimeType": "image/png", "name": "base_color"}],
        "samplers": [{"magFilter": _LINEAR, "minFilter": _LINEAR_MIPMAP_LINEAR, "wrapS": _CLAMP_TO_EDGE,
                      "wrapT": _CLAMP_TO_EDGE}],
        "accessors": accessors,
    }
    return pack_glb(gltf, arrays)


def _mtl_bytes(texture_name: str) -> bytes:
    """One diffuse-textured material; Kd 1 so the map is not tinted, no specular (matching the GLB's roughness)."""
    return (f"# One2345 material\nnewmtl {MATERIAL_NAME}\nKa 0 0 0\nKd 1 1 1\nKs 0 0 0\nNs 10\nd 1\nillum 1\n"
            f"map_Kd {texture_name}\n").encode("ascii")


def _obj_bytes(mesh: TexturedMesh, colors: np.ndarray | None, material_name: str) -> bytes:
    """Wavefront OBJ, y-up: ``v`` (with colours in 0..1 when given), ``vt`` (u, 1 − v), ``vn``, ``f a/a/a …``."""
    vertices = to_y_up(mesh.vertices).astype(np.float64)
    normals = to_y_up(vertex_normals(mesh.vertices, mesh.faces, weld=True)).astype(np.float64)
    uvs = np.stack([mesh.uvs[:, 0], 1.0 - mesh.uvs[:, 1]], axis=1).astype(np.float64)
    # %.9g round-trips float32 exactly; colours c/255 with 6 digits round back to the same byte.
    if colors is not None:
        v_lines = format_rows("v %.9g %.9g %.9g %.6g %.6g %.6g\n",
                               np.concatenate([vertices, colors.astype(np.float64) / 255.0], axis=1))
    else:
        v_lines = format_rows("v %.9g %.9g %.9g\n", vertices)
    corners = np.repeat(mesh.faces + 1, 3, axis=1)
    return b"".join([
        f"# One2345 textured mesh, y-up\nmtllib {material_name}\n".encode("ascii"), v_lines,
        format_rows("vt %.9g %.9g\n", uvs), format_rows("vn %.6g %.6g %.6g\n", normals),
        f"usemtl {MATERIAL_NAME}\n".encode("ascii"), format_rows("f %d/%d/%d %d/%d/%d %d/%d/%d\n", corners),
    ])
