"""Blender-side helpers of the render script: build, import, normalise, light and clear objects.

Importable only inside Blender's Python (``bpy``; BlenderProc's API where noted). The script
:mod:`training.render.render_views` is the recipe that calls these in order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import bpy
import numpy as np

from training.render.procedural import MeshPart

IMPORTERS: dict[str, str] = {
    ".glb": "glTF",
    ".gltf": "glTF",
    ".obj": "Wavefront OBJ",
    ".ply": "PLY",
    ".fbx": "FBX",
}
"""File suffixes the render script imports (through ``bproc.loader.load_obj``) and their formats."""


def snapshot_objects() -> set[str]:
    """Names of all objects now in the file (to find what an import added)."""
    return {obj.name for obj in bpy.data.objects}


def added_objects(before: set[str]) -> list[bpy.types.Object]:
    """Objects created since :func:`snapshot_objects` returned ``before``."""
    return [obj for obj in bpy.data.objects if obj.name not in before]


def import_file(path: str | Path) -> None:
    """Import a GLB/GLTF/OBJ/PLY/FBX file into the scene with BlenderProc's loader.

    Raises:
        ValueError: unsupported suffix. Blender's importers raise RuntimeError on unreadable files.
    """
    import blenderproc as bproc  # inside Blender, after BlenderProc's own setup

    suffix = Path(path).suffix.lower()
    if suffix not in IMPORTERS:
        raise ValueError(f"cannot import {path}: suffix {suffix!r} is not one of {', '.join(IMPORTERS)}")
    bproc.loader.load_obj(str(path))


def add_procedural(parts: Sequence[MeshPart], name: str) -> None:
    """Create Blender meshes and materials for procedural parts (see :mod:`training.render.procedural`)."""
    for part in parts:
        mesh = bpy.data.meshes.new(f"{name}-{part.name}")
        mesh.from_pydata(part.vertices.tolist(), [], part.faces.tolist())
        uv_layer = mesh.uv_layers.new(name="UVMap")
        uv_layer.data.foreach_set("uv", part.corner_uvs.reshape(-1).astype(np.float32))
        material = bpy.data.materials.new(f"{name}-{part.name}")
        material.use_nodes = True
        nodes, links = material.node_tree.nodes, material.node_tree.links
        bsdf = nodes["Principled BSDF"]
        bsdf.inputs["Roughness"].default_value = part.roughness
        if part.texture is not None:
            height, width = part.texture.shape[:2]
            image = bpy.data.images.new(f"{name}-{part.name}", width=width, height=height, alpha=False)
            rgba = np.concatenate([part.texture, np.full((height, width, 1), 255, np.uint8)], -1)
            # Blender stores pixels bottom row first, as float RGBA.
            image.pixels.foreach_set((rgba[::-1].astype(np.float32) / 255.0).reshape(-1))
            image.pack()
            texture = nodes.new("ShaderNodeTexImage")
            texture.image = image
            links.new(texture.outputs["Color"], bsdf.inputs["Base Color"])
        else:
            colors = mesh.color_attributes.new(name="Col", type="FLOAT_COLOR", domain="CORNER")
            colors.data.foreach_set("color", part.corner_colors.reshape(-1).astype(np.float32))
            attribute = nodes.new("ShaderNodeVertexColor")
            attribute.layer_name = "Col"
            links.new(attribute.outputs["Color"], bsdf.inputs["Base Color"])
        mesh.materials.append(material)
        mesh.validate()
        obj = bpy.data.objects.new(f"{name}-{part.name}", mesh)
        bpy.context.scene.collection.objects.link(obj)


def prepare_imported(objects: Iterable[bpy.types.Object]) -> tuple[list[bpy.types.Object], list[bpy.types.Object]]:
    """Make an import static and renderable.

    Every camera pose is a keyframe, so animations would move the object between views: animation data is
    cleared (the evaluated pose of frame 0 is kept for all views). Imported cameras and lights are removed (the
    script owns both).

    Returns:
        (objects, meshes): the import's remaining objects, and those of them that are meshes with faces.

    Raises:
        ValueError: the import holds no mesh with faces.
    """
    bpy.context.scene.frame_set(0)
    kept = []
    for obj in list(objects):
        if obj.type in ("CAMERA", "LIGHT"):
            bpy.data.objects.remove(obj, do_unlink=True)
            continue
        obj.animation_data_clear()
        if obj.type == "MESH" and obj.data.shape_keys is not None:
            obj.data.shape_keys.animation_data_clear()
        kept.append(obj)
    meshes = [obj for obj in kept if obj.type == "MESH" and len(obj.data.polygons) > 0]
    if not meshes:
        raise ValueError("the file contains no mesh with faces")
    return kept, meshes


def world_triangles(meshes: Iterable[bpy.types.Object]) -> tuple[np.ndarray, np.ndarray]:
    """Evaluated (modifiers, armatures applied) world-space triangles of the given mesh objects.

    Returns:
        vertices [V, 3] float64; faces [F, 3] int64 into the concatenated vertices.
    """
    depsgraph = bpy.context.evaluated_depsgraph_get()
    all_vertices, all_faces, offset = [], [], 0
    for obj in meshes:
        evaluated = obj.evaluated_get(depsgraph)
        mesh = evaluated.to_mesh()
        try:
            mesh.calc_loop_triangles()
            vertices = np.empty(len(mesh.vertices) * 3, dtype=np.float64)
            mesh.vertices.foreach_get("co", vertices)
            faces = np.empty(len(mesh.loop_triangles) * 3, dtype=np.int64)
            mesh.loop_triangles.foreach_get("vertices", faces)
        finally:
            evaluated.to_mesh_clear()
        matrix = np.array(obj.matrix_world)
        vertices = vertices.reshape(-1, 3) @ matrix[:3, :3].T + matrix[:3, 3]
        all_vertices.append(vertices)
        all_faces.append(faces.reshape(-1, 3) + offset)
        offset += len(vertices)
    if not all_vertices or offset == 0:
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)
    return np.concatenate(all_vertices), np.concatenate(all_faces)


def normalise(objects: Sequence[bpy.types.Object], meshes: Sequence[bpy.types.Object], extent: float) -> dict:
    """Centre the bounding box of the meshes at the origin and scale its largest side to ``extent``.

    The transform is applied to the root objects of the import (those without a parent among ``objects``), so
    hierarchies (glTF nodes, FBX armatures) move as a whole. The box is that of the evaluated vertices, not of
    Blender's per-object bound boxes, so rotated parts do not inflate it.

    Returns:
        ``{"scale": s, "offset": [3]}`` with normalised = s · (original − centre) = s · original + offset.

    Raises:
        ValueError: the meshes have no vertices or zero extent.
    """
    vertices, _ = world_triangles(meshes)
    if len(vertices) == 0:
        raise ValueError("the object has no vertices")
    low, high = vertices.min(axis=0), vertices.max(axis=0)
    size = float((high - low).max())
    if not np.isfinite(size) or size <= 1e-9:
        raise ValueError(f"the object's bounding box is degenerate (largest side {size})")
    scale = extent / size
    centre = (low + high) / 2
    transform = np.eye(4)
    transform[:3, :3] *= scale
    transform[:3, 3] = -scale * centre
    names = {obj.name for obj in objects}
    from mathutils import Matrix  # Blender's math module

    for root in [obj for obj in objects if obj.parent is None or obj.parent.name not in names]:
        root.matrix_world = Matrix(transform.tolist()) @ root.matrix_world
    bpy.context.view_layer.update()
    return {"scale": scale, "offset": (-scale * centre).tolist()}


def make_key_light() -> object:
    """Create the key area light (a BlenderProc ``Light``); :func:`place_key_light` moves it per object."""
    import blenderproc as bproc

    light = bproc.types.Light(light_type="AREA", name="key_light")
    light.blender_obj.data.size = 1.0
    return light


def place_key_light(light: object, direction: np.ndarray, energy: float, distance: float = 3.0) -> None:
    """Put the key light at ``distance`` along ``direction`` [3], facing the origin."""
    import blenderproc as bproc

    position = distance * np.asarray(direction, dtype=np.float64) / np.linalg.norm(direction)
    light.set_location(position.tolist())
    light.set_rotation_mat(bproc.camera.rotation_from_forward_vec(-position))
    light.set_energy(energy)


def make_sun(angle_degrees: float) -> object:
    """Create a sun light (a BlenderProc ``Light``, energy 0 until :func:`place_key_light` sets it) whose disc spans
    ``angle_degrees`` (0 = hard shadows)."""
    import blenderproc as bproc

    sun = bproc.types.Light(light_type="SUN", name="sun")
    sun.blender_obj.data.angle = float(np.radians(angle_degrees))
    sun.set_energy(0.0)
    return sun


def describe_scene(meshes: Sequence[bpy.types.Object]) -> dict:
    """What the render's lighting and materials are, read back from Blender: every light (type, energy — W, or W/m² for
    a sun —, the direction it shines towards, sun angle in degrees), the world's strength, and per material of
    ``meshes`` its Principled BSDF roughness and specular IOR level and whether an Emission shader drives the
    output (unlit). A JSON-ready dict for meta.json."""
    lights = []
    for obj in bpy.data.objects:
        if obj.type != "LIGHT":
            continue
        shine = np.array(obj.matrix_world)[:3, :3] @ np.array([0.0, 0.0, -1.0])  # lights shine along local −z
        light = {"name": obj.name, "type": obj.data.type, "energy": float(obj.data.energy),
                 "direction": [round(float(v), 6) for v in shine]}
        if obj.data.type == "SUN":
            light["angle_degrees"] = float(np.degrees(obj.data.angle))
        lights.append(light)
    world = bpy.context.scene.world
    background = world.node_tree.nodes.get("Background") if world is not None and world.use_nodes else None
    materials = []
    for obj in meshes:
        for slot in obj.material_slots:
            tree = slot.material.node_tree
            bsdf = tree.nodes.get("Principled BSDF")
            output = next(n for n in tree.nodes if n.type == "OUTPUT_MATERIAL")
            links = output.inputs["Surface"].links
            materials.append({
                "name": slot.material.name,
                "roughness": None if bsdf is None else float(bsdf.inputs["Roughness"].default_value),
                "specular": None if bsdf is None else float(bsdf.inputs["Specular IOR Level"].default_value),
                "shader": links[0].from_node.type if links else None,
            })
    return {"lights": lights, "materials": materials,
            "world_strength": None if background is None else float(background.inputs["Strength"].default_value)}


def forget_between_objects() -> None:
    """Make Cycles rebuild its scene for every render. BlenderProc's init turns on persistent data, with which Cycles
    keeps its image cache between renders; after :func:`remove_objects_except` a new object's image can be allocated
    where a deleted one's was, and Cycles then draws the new object with the old object's pixels (seen in the texture
    evaluation: three of five parts of the fourth object in a process wore earlier objects' textures)."""
    bpy.context.scene.render.use_persistent_data = False


def remove_objects_except(keep: set[str]) -> None:
    """Delete every object whose name is not in ``keep`` (a :func:`snapshot_objects`), then every data block left
    without users (meshes, materials, images), so that memory stays flat over thousands of objects in one process."""
    for obj in [o for o in bpy.data.objects if o.name not in keep]:
        bpy.data.objects.remove(obj, do_unlink=True)
    bpy.data.orphans_purge(do_local_ids=True, do_linked_ids=True, do_recursive=True)
