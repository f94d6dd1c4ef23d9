import blenderproc as bproc  # noqa: I001  (`blenderproc run` requires this import before any other statement)

# Ground truth for the texture-bake evaluation (#13, training/texture_eval.py): procedural objects rendered by the #6
# renderer's own pieces (render_views.py, scene_bpy.py, layout.py) in its 40-view layout, plus held-out cameras.
#
# Per object <out>/<folder_id>/<uid>/ (uid texeval-<seed>): everything render_views.py writes (view PNGs, depth,
# pose.json, mesh.ply, meta.json with an extra "texture_eval" record), mesh_dense.ply, and heldout/pose.json +
# heldout/h<k>.png: --held-out cameras at polar angles within the range the 40 cameras span and any azimuth (seeded
# by the uid), radius 1.2, the same intrinsics. The views differ from render_views.py's in these ways, all for the
# measurement:
#
# * --shading unlit (default): every material's base colour goes straight to an Emission shader under the Standard
#   view transform, with dithering off, so a pixel is exactly the sRGB base colour averaged over the pixel. A baked
#   texture rendered without lighting can then be compared with it directly.
# * --shading lit: shaded as Zero123's training views are (Cycles, Filmic, the renderer's denoiser), so that the
#   evaluation also sees what real views bring — shading, shadows and view-dependent highlights:
#   - a sun (strength SUN_STRENGTH W/m², angular diameter SUN_ANGLE: soft-edged shadows) from the renderer's per-object
#     key-light direction (render_views.light_direction: upper hemisphere, polar 0–60°, seeded by the uid), instead of
#     the renderer's area light (its energy is set to 0);
#   - the renderer's soft environment: a uniform white world of strength RenderSettings.ambient (0.6);
#   - glossy parts: each part is glossy with probability 1/2 (at least one per object; drawn per uid, see
#     glossy_parts), a glossy part's Principled BSDF gets roughness GLOSSY_ROUGHNESS and specular IOR level
#     GLOSSY_SPECULAR (a varnished or plastic look with a visible highlight); the others keep the generator's
#     roughness 0.3–0.9 and the default specular.
#   Both the 40 layout views and the held-out views are rendered in this one scene, so the highlights move between
#   them as on a real object. The scene as Blender holds it (lights, each material's roughness) is written to
#   meta.json under "scene", read back from bpy, not from these settings.
# * the pixel filter is a 1-pixel box (the evaluation's supersampled rasteriser integrates the same footprint);
#   Cycles' default 1.5-pixel Blackman-Harris would make every GT edge softer than any rasteriser renders it.
# * --tiles T repeats each part's texture T×T times (colour detail T times finer than the renderer's default
#   patterns, which a 20 k-face mesh's vertex spacing can already resolve).
#
# Beside mesh.ply (the parts as modelled: a few hundred long, thin triangles each, overlapping one another) it writes
# mesh_dense.ply: the outer surface of their union, voxel-remeshed by Blender (OpenVDB) at --dense-voxel and
# shrink-wrapped back onto the modelled surface. That is the kind of surface the pipeline decimates — marching cubes
# of the SDF, ~1 pixel spacing, nothing inside the object — where quadric decimation stalls on mesh.ply's slivers.
#
#     .venv-bpy42/bin/python training/render/launch_inprocess.py training/render/texture_views.py \
#         --out data/texture-eval --procedural 0 --procedural 1 --size 256 --samples 64 --held-out 8
#
# `one2345-train evaluate-texture` runs this itself. Progress goes to stdout as "@@one2345-render {json}" lines.

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import bpy
import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: `server` and `training`

from server.common.cameras import NEAR_FAR, PoseFile, calc_pose
from training.render import layout, procedural, render_views, scene_bpy
from training.render.layout import ObjectJob, RenderSettings

HELDOUT_DIR = "heldout"
"""Sub-folder of an object holding the held-out views and their pose.json."""

SUN_STRENGTH = 3.0
"""Irradiance of the lit scene's sun (W/m²): a white surface facing it is ~5× brighter than in the shade of the 0.6
world alone — a clear key-to-fill ratio, with no channel clipped under Filmic."""
SUN_ANGLE = 5.0
"""Angular diameter of the sun's disc in degrees: shadow edges a few pixels soft, as an area light's."""
GLOSSY_SHARE = 0.5
"""Chance that a part is glossy in the lit scene (at least one part per object is)."""
GLOSSY_ROUGHNESS = 0.15
"""Principled BSDF roughness of a glossy part (the generator's parts have 0.3–0.9)."""
GLOSSY_SPECULAR = 0.8
"""Principled BSDF specular IOR level of a glossy part (Blender's default 0.5 is IOR 1.5; 0.8 a clear-coat look)."""
LIT_SCHEME = {"sun_strength": SUN_STRENGTH, "sun_angle": SUN_ANGLE, "glossy_share": GLOSSY_SHARE,
              "glossy_roughness": GLOSSY_ROUGHNESS, "glossy_specular": GLOSSY_SPECULAR}
"""The lit scene's parameters, part of meta.json's "texture_eval" record (renders of another scheme are redone)."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    """What to render (procedural seeds), where, and the evaluation's render settings."""
    parser = argparse.ArgumentParser(description="Render procedural objects for the texture-bake evaluation.")
    parser.add_argument("--out", required=True, help="output root; objects go to <out>/<folder_id>/<uid>/")
    parser.add_argument("--procedural", action="append", type=int, default=[], help="a procedural seed (repeatable)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--samples", type=int, default=64, help="Cycles samples per pixel (default 64)")
    parser.add_argument("--held-out", type=int, default=8, help="held-out cameras per object (default 8)")
    parser.add_argument("--shading", choices=("unlit", "lit"), default="unlit", help="emission-only or lit (unlit)")
    parser.add_argument("--tiles", type=int, default=4, help="texture repeats per part and axis (default 4)")
    parser.add_argument("--surface", choices=procedural.SURFACES, default="textured",
                        help="procedural paint (default textured)")
    parser.add_argument("--polar", default="45:105", help="ring polar: N or LOW:HIGH per object (default 45:105)")
    parser.add_argument("--dense-voxel", type=float, default=0.004,
                        help="voxel size of mesh_dense.ply in pose.json units (default 0.004, ~1 px at 256²)")
    parser.add_argument("--threads", type=int, default=0, help="Cycles CPU threads, 0 = all cores")
    args = parser.parse_args(argv)
    if args.held_out < 1 or args.tiles < 1:
        parser.error(f"--held-out {args.held_out} and --tiles {args.tiles} must both be ≥ 1")
    if not 0.0005 <= args.dense_voxel <= 0.05:
        parser.error(f"--dense-voxel {args.dense_voxel} is not usable: need 0.0005..0.05")
    return args


def eval_settings(args: argparse.Namespace) -> RenderSettings:
    """The renderer's settings for these views (unlit: Standard view transform, no denoiser, no lights; lit: the
    renderer's Filmic, denoiser and world strength — the sun and glossy parts come from :func:`render_object`)."""
    unlit = args.shading == "unlit"
    return RenderSettings(
        size=args.size, polar=layout.PolarSpec.parse(args.polar), samples=args.samples, denoise=not unlit,
        view_transform="Standard" if unlit else RenderSettings.view_transform, threads=args.threads,
        surface=args.surface, ambient=0.0 if unlit else RenderSettings.ambient,
    )


def eval_record(args: argparse.Namespace) -> dict:
    """What distinguishes these views from a plain render (stored in meta.json; a mismatch re-renders)."""
    record = {"shading": args.shading, "tiles": args.tiles, "held_out": args.held_out, "samples": args.samples,
              "size": args.size, "surface": args.surface, "pixel_filter": "box 1px", "dense_voxel": args.dense_voxel}
    if args.shading == "lit":
        record["lit"] = dict(LIT_SCHEME)
    return record


def glossy_parts(uid: str, count: int) -> list[bool]:
    """Which of an object's ``count`` parts are glossy in the lit scene: each with chance :data:`GLOSSY_SHARE`,
    drawn from the uid; if none is drawn, the first part is."""
    rng = np.random.default_rng(layout.stable_hash(f"glossy:{uid}"))
    glossy = [bool(g) for g in rng.random(count) < GLOSSY_SHARE]
    if count and not any(glossy):
        glossy[0] = True
    return glossy


def make_glossy(meshes: list, names: set[str]) -> None:
    """Give the materials of the mesh objects named in ``names`` the glossy Principled BSDF settings."""
    for obj in meshes:
        if obj.name not in names:
            continue
        for slot in obj.material_slots:
            bsdf = slot.material.node_tree.nodes["Principled BSDF"]
            bsdf.inputs["Roughness"].default_value = GLOSSY_ROUGHNESS
            bsdf.inputs["Specular IOR Level"].default_value = GLOSSY_SPECULAR


def detailed_parts(seed: int, surface: str, tiles: int) -> list[procedural.MeshPart]:
    """The procedural object of ``seed`` with every texture repeated ``tiles``×``tiles`` times."""
    parts = procedural.make_object(seed, procedural.ProceduralConfig(surface=surface))
    return [dataclasses.replace(p, texture=None if p.texture is None else np.tile(p.texture, (tiles, tiles, 1)))
            for p in parts]


def heldout_poses(uid: str, pose_file: PoseFile, count: int) -> PoseFile:
    """``count`` cameras ``h<k>.png`` at polar angles uniform within those of ``pose_file``'s cameras and azimuths
    uniform in [0, 360), seeded by the uid; radius and intrinsics as in ``pose_file``."""
    centres = np.stack([c2w[:3, 3] for c2w in pose_file.c2ws.values()])
    radius = float(np.linalg.norm(centres, axis=1).mean())
    polars = np.degrees(np.arccos(np.clip(centres[:, 2] / np.linalg.norm(centres, axis=1), -1.0, 1.0)))
    rng = np.random.default_rng(layout.stable_hash(f"heldout:{uid}"))
    polar = rng.uniform(polars.min(), polars.max(), count)
    azimuth = rng.uniform(0.0, 360.0, count)
    c2ws = calc_pose(polar, azimuth, radius=radius)
    return PoseFile(pose_file.intrinsics, NEAR_FAR, {f"h{k}.png": c2ws[k] for k in range(count)})


def dense_surface(meshes: list, voxel: float) -> tuple[np.ndarray, np.ndarray]:
    """World-space triangles of the outer surface of the union of ``meshes``: voxel-remeshed (Blender's Remesh
    modifier, voxel mode) at ``voxel``, then every vertex moved to the nearest point of the modelled surface
    (Shrinkwrap), since the remesher's level set lies about half a voxel inside it. Returns vertices [V, 3] float64
    and faces [F, 3] int64."""
    vertices, faces = scene_bpy.world_triangles(meshes)
    # Parts are modelled with split seams and poles: weld them so the remesher sees closed surfaces.
    vertices, inverse = np.unique(np.round(vertices, 6), axis=0, return_inverse=True)
    faces = inverse.reshape(-1)[faces]
    added = []
    try:
        for name in ("texeval-gt", "texeval-dense"):
            mesh = bpy.data.meshes.new(name)
            mesh.from_pydata(vertices.tolist(), [], faces.tolist())
            obj = bpy.data.objects.new(name, mesh)
            bpy.context.scene.collection.objects.link(obj)
            added.append(obj)
        gt, dense = added
        remesh = dense.modifiers.new("remesh", "REMESH")
        remesh.mode = "VOXEL"
        remesh.voxel_size = voxel
        remesh.adaptivity = 0.0
        wrap = dense.modifiers.new("onto-gt", "SHRINKWRAP")
        wrap.wrap_method = "NEAREST_SURFACEPOINT"
        wrap.target = gt
        return scene_bpy.world_triangles([dense])
    finally:
        for obj in added:
            mesh = obj.data
            bpy.data.objects.remove(obj, do_unlink=True)
            bpy.data.meshes.remove(mesh)


def make_unlit(meshes: list) -> None:
    """Route each material's base colour (its linked texture or colour attribute, else the constant) into an
    Emission shader of strength 1 that drives the material output."""
    for obj in meshes:
        for slot in obj.material_slots:
            tree = slot.material.node_tree
            bsdf = tree.nodes["Principled BSDF"]
            emission = tree.nodes.new("ShaderNodeEmission")
            emission.inputs["Strength"].default_value = 1.0
            base = bsdf.inputs["Base Color"]
            if base.links:
                tree.links.new(base.links[0].from_socket, emission.inputs["Color"])
            else:
                emission.inputs["Color"].default_value = base.default_value
            output = next(n for n in tree.nodes if n.type == "OUTPUT_MATERIAL")
            tree.links.new(emission.outputs["Emission"], output.inputs["Surface"])


def configure(settings: RenderSettings, unlit: bool) -> tuple[object, object]:
    """The renderer's setup, then the evaluation's pixel filter (and, unlit, no bounces and no dithering). Returns the
    renderer's key light and the lit scene's sun (both at energy 0 until :func:`render_object` places them)."""
    light = render_views.configure_renderer(settings)
    sun = scene_bpy.make_sun(SUN_ANGLE)
    scene = bpy.context.scene
    scene.cycles.pixel_filter_type = "BOX"
    scene.cycles.filter_width = 1.0
    if unlit:
        scene.cycles.max_bounces = 0
        scene.render.dither_intensity = 0.0
        scene.view_settings.look = "None"
        scene.view_settings.exposure = 0.0
        scene.view_settings.gamma = 1.0
    return light, sun


def render_object(job: ObjectJob, args: argparse.Namespace, settings: RenderSettings, out: Path,
                  lights: tuple[object, object]) -> dict:
    """Render one object (40 layout views + held-out views) into <out>/<folder_id>/<uid>/ atomically; ``lights`` are
    :func:`configure`'s key light and sun."""
    started = time.time()
    final = layout.object_dir(out, job)
    temp = final.parent / f".tmp-{job.uid}-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    (temp / HELDOUT_DIR).mkdir(parents=True)
    baseline = scene_bpy.snapshot_objects()
    try:
        before = scene_bpy.snapshot_objects()
        parts = detailed_parts(job.seed, args.surface, args.tiles)
        scene_bpy.add_procedural(parts, job.uid)
        added, meshes = scene_bpy.prepare_imported(scene_bpy.added_objects(before))
        normalisation = scene_bpy.normalise(added, meshes, settings.extent)
        key, sun = lights
        key.set_energy(0.0)
        if args.shading == "unlit":
            make_unlit(meshes)
            sun.set_energy(0.0)
        else:
            glossy = glossy_parts(job.uid, len(parts))
            make_glossy(meshes, {f"{job.uid}-{p.name}" for p, g in zip(parts, glossy, strict=True) if g})
            scene_bpy.place_key_light(sun, render_views.light_direction(job.uid), SUN_STRENGTH)

        polar = settings.polar.for_uid(job.uid)
        pose_file = layout.pose_file_for(polar, settings.size)
        heldout = heldout_poses(job.uid, pose_file, args.held_out)
        render_views.add_cameras(PoseFile(pose_file.intrinsics, pose_file.near_far, {**pose_file.c2ws,
                                                                                     **heldout.c2ws}))
        data = bproc.renderer.render()
        rendered = time.time()

        names = render_views.write_object(temp, data, pose_file, polar, settings, meshes)
        for frame, view_id in enumerate(heldout.c2ws, start=len(pose_file.c2ws)):
            rgba = np.asarray(data["colors"][frame], dtype=np.uint8)
            cv2.imwrite(str(temp / HELDOUT_DIR / view_id), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
        heldout.write(temp / HELDOUT_DIR / "pose.json")
        layout.write_ply(temp / "mesh_dense.ply", *dense_surface(meshes, args.dense_voxel))
        record = {"uid": job.uid, "folder_id": job.folder_id, "status": "done", "source": f"procedural:{job.seed}",
                  "polar": polar, "seconds": {"render": rendered - started, "total": time.time() - started}}
        meta = {**record, "views": "all", "normalisation": normalisation, "files": names,
                "settings": settings.to_json(), "texture_eval": eval_record(args),
                "scene": scene_bpy.describe_scene(meshes)}
        (temp / layout.META_NAME).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        temp.rename(final)
        return record
    finally:
        shutil.rmtree(temp, ignore_errors=True)
        scene_bpy.remove_objects_except(baseline)


def is_current(folder: Path, record: dict) -> bool:
    """Whether ``folder`` already holds this object rendered with the same evaluation settings."""
    try:
        meta = json.loads((folder / layout.META_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("texture_eval") == record


def main(argv: list[str]) -> int:
    """Render every seed not yet rendered with these settings; returns 0 (failures are printed and recorded)."""
    args = parse_args(argv)
    settings = eval_settings(args)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    jobs = [ObjectJob(f"texeval-{seed:06d}", layout.folder_id_for_index(seed), seed=seed) for seed in args.procedural]
    lights = configure(settings, args.shading == "unlit")
    print(layout.format_event({"event": "start", "objects": len(jobs)}), flush=True)
    failed = 0
    for job in jobs:
        if is_current(layout.object_dir(out, job), eval_record(args)):
            print(layout.format_event({"event": "skipped", "uid": job.uid}), flush=True)
            continue
        print(layout.format_event({"event": "begin", "uid": job.uid}), flush=True)
        try:
            record = render_object(job, args, settings, out, lights)
        except Exception as err:  # one broken object must not stop the others
            failed += 1
            record = {"uid": job.uid, "status": "failed", "error": f"{type(err).__name__}: {err}"}
            print(f"failed to render {job.uid}:\n{traceback.format_exc()}", file=sys.stderr)
        print(layout.format_event({"event": record["status"], **record}), flush=True)
    print(layout.format_event({"event": "end", "failed": failed}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
