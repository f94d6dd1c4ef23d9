"""Renders one held-out view of each procedural seed given, all in this one Blender process, unlit, as the texture
evaluation's renderer does between objects (build, render, remove). Run by ``test_render.py`` through the in-process
launcher: ``launch_inprocess.py render_sequence_script.py OUT SEED [SEED ...]``; writes ``OUT/<seed>.png``."""

import blenderproc as bproc  # noqa: I001  (BlenderProc must be imported first)

import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: `training`

from training.render import layout, render_views, scene_bpy
from training.render import texture_views as tv


def main(out: Path, seeds: list[int]) -> None:
    args = tv.parse_args(["--out", str(out), "--shading", "unlit", "--tiles", "4", "--surface", "textured",
                          "--threads", "1", "--size", "64", "--samples", "1"])
    settings = tv.eval_settings(args)
    tv.configure(settings, unlit=True)
    out.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        uid = f"texeval-{seed:06d}"
        baseline = scene_bpy.snapshot_objects()
        scene_bpy.add_procedural(tv.detailed_parts(seed, args.surface, args.tiles), uid)
        added, meshes = scene_bpy.prepare_imported(scene_bpy.added_objects(baseline))
        scene_bpy.normalise(added, meshes, settings.extent)
        tv.make_unlit(meshes)
        poses = layout.pose_file_for(settings.polar.for_uid(uid), settings.size)
        render_views.add_cameras(tv.heldout_poses(uid, poses, 1))
        rgba = np.asarray(bproc.renderer.render()["colors"][0], dtype=np.uint8)
        cv2.imwrite(str(out / f"{seed}.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
        scene_bpy.remove_objects_except(baseline)


if __name__ == "__main__":
    main(Path(sys.argv[1]), [int(s) for s in sys.argv[2:]])  # BlenderProc leaves argv as [script, *args]
