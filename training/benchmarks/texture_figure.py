"""The README's texture figure: a Cycles render of a baked GLB beside its vertex-coloured version (#13).

Run on the bpy 4.2 interpreter with two GLBs of ``one2345-train evaluate-texture --export-glb 20000`` (the same object
decimated to the same face count, one with the baked texture and no COLOR_0, one with vertex colours only)::

    .venv-bpy42/bin/python training/benchmarks/texture_figure.py \\
        --textured report/texture-eval/glb/texeval-000000-20000-texture.glb \\
        --vertex-colours report/texture-eval/glb/texeval-000000-20000-vertex-colours.glb \\
        --out docs/images/texture_vs_vertex_colours.png

Both are imported with Blender's glTF importer and given the same Principled BSDF, whose base colour is the image
texture for one and a Color Attribute node reading the imported COLOR_0 for the other (the importer alone leaves the
vertex colours unused), lit by a white world and a sun, and rendered with Cycles on the CPU from one camera of the
pose.json kind (radius 1.2, the views' field of view). The two renders go side by side, labelled, on white.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import bpy
import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: `server`

from server.common.cameras import FOCAL, IMAGE_SIZE, calc_pose


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Cycles render of a textured GLB beside its vertex-coloured twin.")
    parser.add_argument("--textured", required=True, help="GLB with a baked base-colour texture")
    parser.add_argument("--vertex-colours", required=True, help="GLB with vertex colours (COLOR_0)")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--size", type=int, default=256, help="side of each render in pixels (default 256)")
    parser.add_argument("--samples", type=int, default=32, help="Cycles samples per pixel (default 32)")
    # The defaults frame the checkered box and the striped cone of procedural seed 0 (the README's object).
    parser.add_argument("--polar", type=float, default=70.0, help="camera polar angle in degrees (default 70)")
    parser.add_argument("--azimuth", type=float, default=120.0, help="camera azimuth in degrees (default 120)")
    parser.add_argument("--labels", nargs=2, default=None, metavar=("LEFT", "RIGHT"),
                        help="captions (default: 'baked texture' and 'vertex colours' with the face count)")
    return parser.parse_args(argv)


def setup_scene(size: int, samples: int, polar: float, azimuth: float) -> None:
    """Empty scene, Cycles on the CPU, transparent film, white world light, a sun, and the camera."""
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = samples
    scene.cycles.use_adaptive_sampling = False
    try:
        scene.cycles.use_denoising = True
        scene.cycles.denoiser = "OPENIMAGEDENOISE"
    except (AttributeError, TypeError):  # a build without OIDN: render without denoising
        scene.cycles.use_denoising = False
    scene.render.resolution_x = scene.render.resolution_y = size
    scene.render.resolution_percentage = 100
    scene.render.film_transparent = True
    scene.render.image_settings.file_format = "PNG"
    scene.render.image_settings.color_mode = "RGBA"
    scene.view_settings.view_transform = "Standard"

    world = bpy.data.worlds.new("world")
    world.use_nodes = True
    world.node_tree.nodes["Background"].inputs["Color"].default_value = (1.0, 1.0, 1.0, 1.0)
    world.node_tree.nodes["Background"].inputs["Strength"].default_value = 0.55
    scene.world = world

    sun = bpy.data.objects.new("sun", bpy.data.lights.new("sun", "SUN"))
    sun.data.energy = 2.5
    sun.data.angle = math.radians(10.0)
    sun.rotation_euler = (math.radians(40.0), 0.0, math.radians(azimuth - 60.0))
    scene.collection.objects.link(sun)

    camera = bpy.data.objects.new("camera", bpy.data.cameras.new("camera"))
    camera.data.angle = 2.0 * math.atan(IMAGE_SIZE / 2 / FOCAL)  # the pose.json views' field of view
    camera.data.clip_start, camera.data.clip_end = 0.05, 100.0
    from mathutils import Matrix

    camera.matrix_world = Matrix(calc_pose(polar, azimuth).tolist())  # OpenGL c2w, as Blender's cameras
    scene.collection.objects.link(camera)
    scene.camera = camera


def import_glb(path: str) -> list:
    """Import a GLB; returns its mesh objects."""
    before = set(bpy.data.objects)
    bpy.ops.import_scene.gltf(filepath=str(Path(path).resolve()))
    return [obj for obj in bpy.data.objects if obj not in before and obj.type == "MESH"]


def shade(objects: list, textured: bool) -> None:
    """Give the objects one Principled BSDF whose base colour is their image texture or their colour attribute."""
    for obj in objects:
        image = None
        if textured:
            images = [n.image for slot in obj.material_slots if slot.material and slot.material.use_nodes
                      for n in slot.material.node_tree.nodes if n.type == "TEX_IMAGE" and n.image]
            if not images:
                raise SystemExit(f"{obj.name}: the textured GLB has no base-colour image")
            image = images[0]
        elif not obj.data.color_attributes:
            raise SystemExit(f"{obj.name}: the vertex-coloured GLB has no colour attribute")
        material = bpy.data.materials.new(f"{obj.name}-figure")
        material.use_nodes = True
        nodes, links = material.node_tree.nodes, material.node_tree.links
        bsdf = nodes["Principled BSDF"]
        bsdf.inputs["Roughness"].default_value = 0.7
        if textured:
            source = nodes.new("ShaderNodeTexImage")
            source.image = image
        else:
            source = nodes.new("ShaderNodeVertexColor")  # the "Color Attribute" node
            source.layer_name = obj.data.color_attributes[0].name
        links.new(source.outputs["Color"], bsdf.inputs["Base Color"])
        obj.data.materials.clear()
        obj.data.materials.append(material)


def render(objects: list, others: list, path: Path) -> np.ndarray:
    """Render with only ``objects`` visible; returns the frame composited on white, [H, W, 3] uint8 BGR."""
    for obj in objects:
        obj.hide_render = False
    for obj in others:
        obj.hide_render = True
    bpy.context.scene.render.filepath = str(path)
    bpy.ops.render.render(write_still=True)
    rgba = cv2.imread(str(path), cv2.IMREAD_UNCHANGED).astype(np.float64)
    alpha = rgba[..., 3:4] / 255.0
    return np.clip(np.rint(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)), 0, 255).astype(np.uint8)


def caption(image: np.ndarray, text: str) -> np.ndarray:
    """The image with ``text`` in dark grey at its top-left corner."""
    out = image.copy()
    scale = image.shape[0] / 512
    cv2.putText(out, text, (int(10 * scale * 2), int(24 * scale * 2)), cv2.FONT_HERSHEY_SIMPLEX, 0.9 * scale,
                (60, 60, 60), 1 if scale < 0.75 else 2, cv2.LINE_AA)
    return out


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    setup_scene(args.size, args.samples, args.polar, args.azimuth)
    textured = import_glb(args.textured)
    vertex = import_glb(args.vertex_colours)
    shade(textured, textured=True)
    shade(vertex, textured=False)
    faces = sum(len(obj.data.polygons) for obj in vertex)
    count = f"{round(faces / 1000)} k faces"
    left, right = args.labels or (f"baked texture, {count}", f"vertex colours, {count}")
    with tempfile.TemporaryDirectory() as temp:
        images = [caption(render(textured, vertex, Path(temp) / "texture.png"), left),
                  caption(render(vertex, textured, Path(temp) / "vertex.png"), right)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), np.concatenate(images, axis=1), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"wrote {out} ({out.stat().st_size // 1024} KB, {faces} faces per object)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
