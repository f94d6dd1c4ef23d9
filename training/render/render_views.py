import blenderproc as bproc  # noqa: I001  (`blenderproc run` requires this import before any other statement)

# Render One-2-3-45 training ground truth with BlenderProc (spec §3, §6).
#
# For every object: load it, normalise it (bounding box centred, largest side --extent), put the 40 cameras of
# pose.json around it (8 target views of the stage-1 layout at the object's polar angle and the 4 nearby ±10° views of
# each), light it, render RGBA + z-depth with Cycles, and write <out>/<folder_id>/<uid>/ in the layout described in
# training/render/layout.py (view PNGs, millimetre depth PNGs, pose.json in the inference format, mesh.ply, meta.json).
# With --views elevation only 5 of the 40 cameras are rendered: view 0 and its 4 nearby views.
#
# Users with internet:
#     blenderproc run training/render/render_views.py --out renders --object chair.glb --object lamp.obj
#     blenderproc run training/render/render_views.py --out renders --procedural 0 --procedural 1
# Offline, on the bpy 4.2 wheel (what `one2345-train render` does, with a jobs file):
#     .venv-bpy42/bin/python training/render/launch_inprocess.py training/render/render_views.py --out renders ...
#
# One process renders many objects (Blender's start-up is paid once). Each object is assembled in a temporary folder
# and renamed into place when complete, and a finished object is never rendered again, so a killed process loses at
# most the object in flight. An object that fails to load or render is logged, recorded as failed in the manifest and
# skipped. Progress goes to stdout as "@@one2345-render {json}" lines for the driver.

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: `server` and `training`

from server.common.cameras import PoseFile, calc_pose
from training.render import layout, procedural, scene_bpy
from training.render.layout import ObjectJob, RenderSettings


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The script's options: what to render (a jobs file, files, seeds), where, and the render settings."""
    parser = argparse.ArgumentParser(description="Render One-2-3-45 training views of objects with BlenderProc.")
    parser.add_argument("--out", required=True, help="output root; objects go to <out>/<folder_id>/<uid>/")
    parser.add_argument("--jobs", help="JSON-lines file of objects (written by one2345-train render)")
    parser.add_argument("--object", action="append", default=[], help="a GLB/GLTF/OBJ/PLY/FBX file (repeatable)")
    parser.add_argument("--procedural", action="append", type=int, default=[], help="a procedural seed (repeatable)")
    parser.add_argument("--shard", default="0/1", help="i/N: names this process's manifest file (default 0/1)")
    layout.add_settings_arguments(parser)
    return parser.parse_args(argv)


def collect_jobs(args: argparse.Namespace) -> list[ObjectJob]:
    """Objects of the jobs file, then of ``--object`` (uid = file stem), then of ``--procedural``."""
    jobs = layout.read_jobs(args.jobs) if args.jobs else []
    start = len(jobs)
    for n, path in enumerate(args.object):
        jobs.append(ObjectJob(Path(path).stem, layout.folder_id_for_index(start + n), path=str(Path(path).resolve())))
    for seed in args.procedural:
        jobs.append(ObjectJob(f"proc-{seed:06d}", layout.folder_id_for_index(seed), seed=seed))
    return jobs


def configure_renderer(settings: RenderSettings) -> object:
    """Renderer, intrinsics and outputs: set once per process. Returns the key light."""
    bproc.init()
    bproc.renderer.set_max_amount_of_samples(settings.samples)
    bproc.renderer.set_noise_threshold(0.0)  # fixed sample count: same cost and noise for every object
    bproc.renderer.set_denoiser("INTEL" if settings.denoise else None)
    bproc.renderer.set_cpu_threads(settings.threads)
    bproc.renderer.set_output_format(enable_transparency=True, view_transform=settings.view_transform)
    bproc.renderer.enable_depth_output(activate_antialiasing=False)  # z-depth along the optical axis
    bproc.renderer.set_world_background([1.0, 1.0, 1.0], strength=settings.ambient)
    # pose.json puts pixel j's centre at u = j + 0.5 (principal point size/2 = the image centre); BlenderProc puts it
    # at u = j, so its K has cx, cy = size/2 − 0.5 for the same camera.
    k = layout.intrinsics_for_size(settings.size)
    k[:2, 2] -= 0.5
    bproc.camera.set_intrinsics_from_K_matrix(k, settings.size, settings.size, clip_start=0.05, clip_end=100.0)
    scene_bpy.forget_between_objects()  # many objects per process: none may see another's textures
    return scene_bpy.make_key_light()


def load_object(job: ObjectJob, settings: RenderSettings) -> list:
    """Import or build the object; returns every object it added to the scene."""
    before = scene_bpy.snapshot_objects()
    if job.seed is not None:
        config = procedural.ProceduralConfig(surface=settings.surface)
        scene_bpy.add_procedural(procedural.make_object(job.seed, config), job.uid)
    else:
        scene_bpy.import_file(job.path)
    return scene_bpy.added_objects(before)


def add_cameras(pose_file: PoseFile) -> None:
    """One keyframe per pose.json camera, in file order (frame n renders the n-th id)."""
    bproc.utility.reset_keyframes()
    for c2w in pose_file.c2ws.values():
        bproc.camera.add_camera_pose(c2w)  # OpenGL c2w: Blender cameras look along −z with y up, as calc_pose's


def light_direction(uid: str) -> np.ndarray:
    """Key light direction of this object: upper hemisphere, polar 0–60°, any azimuth (seeded by the uid)."""
    rng = np.random.default_rng(layout.stable_hash(f"light:{uid}"))
    c2w = calc_pose(rng.uniform(0.0, 60.0), rng.uniform(0.0, 360.0), radius=1.0)
    return c2w[:3, 3]


def write_object(
    folder: Path, data: dict, pose_file: PoseFile, polar: int, settings: RenderSettings, meshes: list
) -> dict:
    """Write the images, depths, pose.json and mesh.ply of one object into ``folder``; returns the file map."""
    names = layout.view_file_names(polar, settings.views)
    targets = [view_id for view_id in names if "_" not in view_id]  # stage-1 ids ("<i>.png"): get depth maps
    for frame, view_id in enumerate(pose_file.c2ws):
        rgba = np.asarray(data["colors"][frame], dtype=np.uint8)
        if view_id in targets:
            k = targets.index(view_id)
            alpha, depth = layout.reconcile_alpha_depth(rgba[..., 3], np.asarray(data["depth"][frame]))
            rgba = np.concatenate([rgba[..., :3], alpha[..., None]], axis=-1)
            cv2.imwrite(str(folder / layout.depth_file_name(k)), layout.depth_to_mm(depth))
            if settings.exr_depth:
                cv2.imwrite(str(folder / layout.depth_file_name(k, exr=True)), depth.astype(np.float32))
        cv2.imwrite(str(folder / names[view_id]), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    pose_file.write(folder / "pose.json")
    if settings.export_mesh:
        vertices, faces = scene_bpy.world_triangles(meshes)
        layout.write_ply(folder / "mesh.ply", vertices, faces)
    return names


def render_object(job: ObjectJob, settings: RenderSettings, out: Path, light: object) -> dict:
    """Render one object into <out>/<folder_id>/<uid>/ atomically; returns its manifest record."""
    started = time.time()
    final = layout.object_dir(out, job)
    temp = final.parent / f".tmp-{job.uid}-{os.getpid()}"
    for stale in final.parent.glob(f".tmp-{job.uid}-*"):  # left by a killed run of this object
        shutil.rmtree(stale, ignore_errors=True)
    temp.mkdir(parents=True)
    baseline = scene_bpy.snapshot_objects()  # camera and key light: everything else goes after this object
    try:
        added, meshes = scene_bpy.prepare_imported(load_object(job, settings))
        normalisation = scene_bpy.normalise(added, meshes, settings.extent)
        loaded = time.time()

        polar = settings.polar.for_uid(job.uid)
        pose_file = layout.pose_file_for(polar, settings.size, settings.views)
        add_cameras(pose_file)
        scene_bpy.place_key_light(light, light_direction(job.uid), settings.light_energy)
        data = bproc.renderer.render()
        rendered = time.time()

        names = write_object(temp, data, pose_file, polar, settings, meshes)
        record = {
            "uid": job.uid,
            "folder_id": job.folder_id,
            "status": "done",
            "source": job.path if job.path is not None else f"procedural:{job.seed}",
            "polar": polar,
            "seconds": {"load": loaded - started, "render": rendered - loaded, "write": time.time() - rendered},
        }
        meta = {**record, "views": settings.views, "normalisation": normalisation, "files": names}
        meta["settings"] = settings.to_json()
        (temp / layout.META_NAME).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        if final.exists():  # an incomplete folder (no meta.json) from a copy or an older tool
            shutil.rmtree(final)
        temp.rename(final)
        record["seconds"]["total"] = time.time() - started
        return record
    finally:
        shutil.rmtree(temp, ignore_errors=True)
        scene_bpy.remove_objects_except(baseline)  # also after a failure, e.g. a half-finished import


def main(argv: list[str]) -> int:
    """Render every object that is not done yet; returns 0 (failed objects are recorded, not fatal)."""
    args = parse_args(argv)
    settings = layout.settings_from_args(args)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    manifest = layout.manifest_path(out, layout.parse_shard(args.shard))
    jobs = collect_jobs(args)
    light = configure_renderer(settings)
    print(layout.format_event({"event": "start", "objects": len(jobs)}), flush=True)

    for job in jobs:
        if layout.is_done(out, job, settings.views):
            print(layout.format_event({"event": "skipped", "uid": job.uid}), flush=True)
            continue
        started = time.time()
        print(layout.format_event({"event": "begin", "uid": job.uid}), flush=True)
        try:
            record = render_object(job, settings, out, light)
        except Exception as err:  # one broken object must never stop the shard
            record = {
                "uid": job.uid,
                "folder_id": job.folder_id,
                "status": "failed",
                "source": job.path if job.path is not None else f"procedural:{job.seed}",
                "error": f"{type(err).__name__}: {err}",
                "seconds": {"total": time.time() - started},
            }
            print(f"failed to render {job.uid} ({record['source']}):\n{traceback.format_exc()}", file=sys.stderr)
        layout.append_record(manifest, record)
        print(layout.format_event({"event": record["status"], **record}), flush=True)
    print(layout.format_event({"event": "end"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
