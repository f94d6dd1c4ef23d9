"""Blender data in and out: the input image to a file, the result mesh into the scene (main thread only).

Import decisions:

* PLY is the default format: the server writes it in the z-up pose.json frame (Blender's own), and Blender's PLY
  importer turns the uchar ``red/green/blue`` properties into a point-domain colour attribute (``Col``, linear
  FLOAT_COLOR) in 4.2 and 5.0 alike. GLB and OBJ are y-up; Blender's importers turn them back to z-up.
* The mesh is re-centred so that the object's origin sits at the middle of the bottom of its bounding box, and is
  scaled so its largest dimension equals the preference "Import Size" (1 m by default). The object is placed at the
  3D cursor with no rotation, so it stands upright on the cursor; its own scale stays 1.
* The material is a Principled BSDF whose Base Color comes from a Color Attribute node reading that attribute, so the
  colours show in Material Preview, EEVEE and Cycles. A textured result (glTF with a baked base-colour image and UVs,
  no vertex colours) gets an Image Texture node reading the image instead; the image stays packed in the .blend.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

import bpy
import numpy as np
from mathutils import Matrix, Vector

COLLECTION = "One2345"
FRAME_PROPERTY = "one2345_frame"
"""Custom property of an imported object: the 4×4 matrix (16 floats, row by row) from the job's frame (pose.json,
z-up) to the object's mesh coordinates, i.e. the import's scale and re-centring."""
UPLOAD_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
"""Image files sent as they are; anything else (EXR, TIFF, packed or painted images) is re-encoded as PNG."""


def write_png(path: Path, rgba: np.ndarray) -> Path:
    """Write an 8-bit RGBA PNG with the standard library.

    Args:
        path: destination file.
        rgba: [H, W, 4] float in 0…1 (display-referred, top row first) or uint8.
    """
    if rgba.dtype != np.uint8:
        rgba = (np.clip(rgba, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    height, width = rgba.shape[:2]
    raw = b"".join(b"\x00" + rgba[row].tobytes() for row in range(height))  # filter type 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    path = Path(path)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6))
                     + chunk(b"IEND", b""))
    return path


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
    """The sRGB transfer function (IEC 61966-2-1) applied to linear values."""
    x = np.clip(x, 0.0, 1.0)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1.0 / 2.4) - 0.055)


def image_to_file(image: bpy.types.Image, folder: Path) -> Path:
    """Save an image datablock for upload: its own file when unchanged on disk, else its pixels as PNG."""
    source = Path(bpy.path.abspath(image.filepath_raw)) if image.filepath_raw else None
    if (source is not None and source.suffix.lower() in UPLOAD_SUFFIXES and source.is_file()
            and image.packed_file is None and not image.is_dirty):
        return Path(shutil.copyfile(source, Path(folder) / f"input{source.suffix.lower()}"))
    width, height = image.size
    if width == 0 or height == 0:
        raise ValueError(f"The image {image.name!r} has no pixels (size {width}x{height}); load or paint it first.")
    pixels = np.empty(width * height * 4, dtype=np.float32)
    image.pixels.foreach_get(pixels)
    rgba = pixels.reshape(height, width, 4)[::-1]  # Blender stores the bottom row first
    if image.is_float:  # float buffers are scene-linear; PNG wants display (sRGB) values
        rgba = np.concatenate([linear_to_srgb(rgba[..., :3]), rgba[..., 3:]], axis=-1)
    return write_png(Path(folder) / "input.png", rgba)


def import_mesh(context: bpy.types.Context, path: Path, name: str, size: float = 1.0) -> bpy.types.Object:
    """Import a result mesh as one object named ``name`` in the "One2345" collection at the 3D cursor.

    Args:
        context: the current context (scene, view layer).
        path: a .ply, .glb or .obj file written by the server.
        name: object and mesh name (the input image's stem).
        size: largest dimension after import in scene units; 0 keeps the file's scale.

    Returns:
        The new object, selected and active, with a material showing its colour attribute.
    """
    path = Path(path)
    before = set(bpy.data.objects)
    _run_importer(path)
    new = [obj for obj in bpy.data.objects if obj not in before]
    meshes = [obj for obj in new if obj.type == "MESH"]
    if not meshes:
        raise ValueError(f"The file {str(path)!r} contained no mesh.")
    obj = meshes[0]
    for extra in new:  # importers may add empties (glTF) or further parts; the result is one object
        if extra is not obj:
            bpy.data.objects.remove(extra)
    obj.name = obj.data.name = name
    obj.parent = None
    _move_to_collection(context.scene, obj)
    frame = _normalise(obj.data, size)
    obj[FRAME_PROPERTY] = [value for row in frame for value in row]  # Bake Views onto Selected inverts it
    obj.matrix_world = Matrix.Translation(context.scene.cursor.location)
    obj.data.shade_smooth()
    attribute = _colour_attribute(obj.data)
    image = _imported_texture(obj)
    if image is not None:
        image.name = f"One2345 {name}"
    imported = [m for m in obj.data.materials if m is not None]
    obj.data.materials.clear()
    for material in imported:  # the importer's own material is replaced by ours; drop it unless shared
        if material.users == 0:
            bpy.data.materials.remove(material)
    obj.data.materials.append(colour_material(f"One2345 {name}", attribute, image))
    for other in context.view_layer.objects.selected:
        other.select_set(False)
    obj.select_set(True)
    context.view_layer.objects.active = obj
    context.view_layer.update()  # bounding box and dimensions reflect the normalised mesh right away
    return obj


def _run_importer(path: Path) -> None:
    suffix = path.suffix.lower()
    if suffix == ".ply":
        bpy.ops.wm.ply_import(filepath=str(path))
    elif suffix == ".obj":
        bpy.ops.wm.obj_import(filepath=str(path))
    elif suffix in (".glb", ".gltf"):
        import addon_utils

        addon_utils.enable("io_scene_gltf2", default_set=False)  # a core add-on, but the user may have disabled it
        bpy.ops.import_scene.gltf(filepath=str(path))
    else:
        raise ValueError(f"Cannot import {str(path)!r}: the format {suffix!r} is not one of .ply, .glb, .obj.")


def _move_to_collection(scene: bpy.types.Scene, obj: bpy.types.Object) -> None:
    collection = bpy.data.collections.get(COLLECTION)
    if collection is None:
        collection = bpy.data.collections.new(COLLECTION)
    if scene.collection.children.get(collection.name) is None:
        scene.collection.children.link(collection)
    for owner in list(obj.users_collection):
        owner.objects.unlink(obj)
    collection.objects.link(obj)


def _normalise(mesh: bpy.types.Mesh, size: float) -> Matrix:
    """Origin at the bottom centre of the bounding box; largest dimension ``size`` (if > 0). Returns the transform
    applied (the job's frame → the mesh's coordinates)."""
    coords = np.empty(len(mesh.vertices) * 3, dtype=np.float32)
    mesh.vertices.foreach_get("co", coords)
    coords = coords.reshape(-1, 3)
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    pivot = Vector(((lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, lo[2]))
    extent = float((hi - lo).max())
    scale = size / extent if size > 0 and extent > 0 else 1.0
    frame = Matrix.Scale(scale, 4) @ Matrix.Translation(-pivot)
    mesh.transform(frame)
    mesh.update()
    return frame


def _colour_attribute(mesh: bpy.types.Mesh) -> str | None:
    """Name of the imported colour attribute (made active and the render default), or None if there is none."""
    attributes = mesh.color_attributes
    if len(attributes) == 0:
        return None
    attribute = attributes[0]
    attributes.active_color = attribute
    attributes.render_color_index = attributes.find(attribute.name)
    return attribute.name


def _imported_texture(obj: bpy.types.Object) -> bpy.types.Image | None:
    """The base-colour image of a textured import (the glTF importer wires it into its own material), or None."""
    for material in obj.data.materials:
        if material is None or material.node_tree is None:
            continue
        for node in material.node_tree.nodes:
            if node.type == "TEX_IMAGE" and node.image is not None:
                return node.image
    return None


def colour_material(name: str, attribute: str | None, image: bpy.types.Image | None = None) -> bpy.types.Material:
    """A Principled BSDF material whose Base Color is wired to an Image Texture node reading ``image`` (a baked
    texture, on the mesh's UV map) if given, else to a Color Attribute node reading ``attribute``."""
    material = bpy.data.materials.new(name)
    if not material.use_nodes:  # always True (and deprecated) from Blender 5.0
        material.use_nodes = True
    tree = material.node_tree
    bsdf = next(node for node in tree.nodes if node.type == "BSDF_PRINCIPLED")
    bsdf.inputs["Roughness"].default_value = 0.8
    if image is not None:
        texture = tree.nodes.new("ShaderNodeTexImage")
        texture.image = image
        texture.interpolation = "Linear"
        texture.location = (bsdf.location.x - 320, bsdf.location.y)
        tree.links.new(texture.outputs["Color"], bsdf.inputs["Base Color"])
    elif attribute is not None:
        colour = tree.nodes.new("ShaderNodeVertexColor")
        colour.layer_name = attribute
        colour.location = (bsdf.location.x - 300, bsdf.location.y)
        tree.links.new(colour.outputs["Color"], bsdf.inputs["Base Color"])
    return material


def link_job(obj: bpy.types.Object, result: Any, name: str | None = None) -> None:
    """Record the job's files, its recipe and its input as custom properties (a :class:`jobs.JobResult`); ``name``
    is the result's base name (the object's may get a ``.001`` suffix)."""
    name = name or obj.name
    obj["one2345_job_id"] = result.job_id
    obj["one2345_job_dir"] = str(result.job_dir)
    obj["one2345_mesh"] = str(result.mesh)
    obj["one2345_meta"] = str(result.meta or "")
    obj["one2345_views"] = str(result.job_dir / "views")
    obj["one2345_pose"] = str(result.pose or "")
    obj["one2345_server_job_dir"] = str(result.server_job_dir or "")
    if result.elevation is not None:
        obj["one2345_elevation"] = float(result.elevation)
        obj["one2345_elevation_uncertain"] = bool(result.elevation_uncertain)
    obj["one2345_name"] = name
    obj["one2345_textured"] = bool(result.textured)
    if result.remesh_of:
        obj["one2345_remesh_of"] = result.remesh_of
    if result.input is not None and Path(result.input).is_file():
        obj["one2345_input"] = str(result.input)
        obj["one2345_input_sha256"] = hashlib.sha256(Path(result.input).read_bytes()).hexdigest()
    candidate = getattr(result, "candidate", None)
    if candidate:  # made from a prompt's picture: Regenerate names it again, so the new recipe keeps the prompt
        obj["one2345_image_of"], obj["one2345_index"] = str(candidate[0]), int(candidate[1])
    recipe = _read_recipe(result.meta)
    if recipe is not None:  # JSON text: an ID property would turn nested nulls and lists into Blender's own types
        obj["one2345_recipe"] = json.dumps(recipe, sort_keys=True)
        text = recipe.get("text")
        if isinstance(text, dict) and isinstance(text.get("prompt"), str):
            obj["one2345_prompt"] = text["prompt"]


def _read_recipe(meta: Path | None) -> dict[str, Any] | None:
    """meta.json's ``recipe``: everything that made the result (input hash, options, seeds, elevation, models)."""
    if meta is None:
        return None
    try:
        recipe = json.loads(Path(meta).read_text()).get("recipe")
    except (OSError, ValueError, AttributeError):
        return None
    return recipe if isinstance(recipe, dict) else None
