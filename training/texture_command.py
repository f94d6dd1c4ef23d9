"""``one2345-train evaluate-texture``: render the evaluation's procedural objects with Blender (each shading in its
own folder), score them with :mod:`training.texture_eval`, and write the report (``report.md``, ``report.json``,
``render.log``, optional GLBs). The evaluation itself (loading rendered objects, baking, scoring, the report's tables)
is :mod:`training.texture_eval`; this module is only the command around it.

    one2345-train evaluate-texture --out report/texture --count 4
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from server.common.errors import BadInputError
from training.texture_eval import (
    SHADINGS,
    EvalRow,
    TextureEvalConfig,
    evaluate_object,
    find_objects_by_shading,
    host_description,
    load_rendered_object,
    markdown_report,
    summarise,
)

logger = logging.getLogger("training.texture_eval")

RENDER_SCRIPT = Path(__file__).resolve().parent / "render" / "texture_views.py"
"""The Blender script that renders the evaluation's objects (run on the bpy 4.2 interpreter)."""


def object_folder(root: Path, seed: int) -> Path:
    """Where :mod:`training.render.texture_views` puts procedural seed ``seed`` (its uid ``texeval-<seed>``)."""
    from training.render import layout

    return Path(root) / layout.folder_id_for_index(seed) / f"texeval-{seed:06d}"


def render_objects(args: argparse.Namespace, data: Path, seeds: Sequence[int], log_path: Path,
                   shading: str = "unlit") -> None:
    """Run :mod:`training.render.texture_views` for ``seeds`` with ``shading`` into ``data`` (it skips objects
    already rendered with the same settings); its output is appended to ``log_path``.

    Raises:
        BadInputError: no bpy 4.2 interpreter; RuntimeError: the render process failed.
    """
    from training.render import driver, layout

    python = driver.bpy_python(args.blender_python)
    command = [str(python), str(driver.LAUNCHER), str(RENDER_SCRIPT), "--out", str(data)]
    for seed in seeds:
        command += ["--procedural", str(seed)]
    command += ["--size", str(args.size), "--samples", str(args.samples), "--held-out", str(args.held_out),
                "--shading", shading, "--tiles", str(args.tiles), "--surface", args.surface,
                "--polar", args.polar, "--dense-voxel", repr(args.dense_voxel), "--threads", str(args.threads)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   errors="replace", env=dict(os.environ, PYTHONUNBUFFERED="1"))
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            event = layout.parse_event(line)
            if event and event.get("event") in ("done", "skipped", "failed"):
                logger.info("render %s: %s%s", event.get("uid"), event["event"],
                            f" ({event['error']})" if event.get("error") else "")
        status = process.wait()
    if status != 0:
        raise RuntimeError(f"the render process exited with status {status}; see {log_path}")


def config_from_args(args: argparse.Namespace) -> TextureEvalConfig:
    """The evaluation settings of the command's options (BadInputError on unusable values)."""
    try:
        faces = tuple(int(n) for n in str(args.faces).split(",") if n.strip())
    except ValueError:
        raise BadInputError(f"--faces {args.faces!r} is not usable: give comma-separated integers, e.g. "
                            "5000,20000,100000") from None
    return TextureEvalConfig(face_counts=faces, texture_size=args.texture_size, supersample=args.supersample,
                             bake_repeats=args.bake_repeats)


def shadings_of(choice: str) -> tuple[str, ...]:
    """The shadings a ``--shading`` value asks for, in report order (``both``: every one of :data:`SHADINGS`)."""
    if choice == "both":
        return SHADINGS
    if choice not in SHADINGS:
        raise BadInputError(f"--shading {choice!r} is not usable; allowed: both, {', '.join(SHADINGS)}")
    return (choice,)


def run_evaluate_texture(args: argparse.Namespace) -> int:
    """The ``evaluate-texture`` subcommand; returns the exit status."""
    config = config_from_args(args)
    shadings = shadings_of(args.shading)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else out / "renders"
    if args.no_render:
        found = find_objects_by_shading(data, shadings)
        missing = [shading for shading in shadings if shading not in found]
        if missing:
            raise BadInputError(f"{data} holds no {' or '.join(missing)} rendered objects with held-out views (looked "
                                f"in {data}/<shading>/ and {data}/ itself); drop --no-render to render them, or pass "
                                "--shading with the shading that was rendered")
    else:
        if args.count < 1:
            raise BadInputError(f"--count {args.count} is not usable: render at least one object")
        seeds = list(range(args.first_seed, args.first_seed + args.count))
        found = {}
        for shading in shadings:
            started = time.perf_counter()
            render_objects(args, data / shading, seeds, out / "render.log", shading)
            logger.info("rendered %s in %.0f s", shading, time.perf_counter() - started)
            found[shading] = [object_folder(data / shading, seed) for seed in seeds]
    folders = [folder for shading in shadings for folder in found[shading]]
    rows: list[EvalRow] = []
    for folder in folders:
        rows += evaluate_object(load_rendered_object(folder), config, out / "glb", args.export_glb or ())
    host = host_description()
    report = markdown_report(rows, config, host)
    (out / "report.md").write_text(report, encoding="utf-8")
    record = {"host": host, "config": {"face_counts": list(config.face_counts), "texture_size": config.texture_size,
                                       "supersample": config.supersample, "jitter": config.jitter,
                                       "bake_repeats": config.bake_repeats, "shadings": list(shadings)},
              "objects": [str(f) for f in folders], "rows": [asdict(r) for r in rows], "summary": summarise(rows)}
    (out / "report.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    print(report, end="")
    return 0


def add_evaluate_texture_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``evaluate-texture`` on ``one2345-train``'s subparsers."""
    p = subparsers.add_parser(
        "evaluate-texture", help="texture bake vs vertex colours on ground-truth renders (PSNR at held-out views)",
        description="Render procedural objects (40 layout views + held-out views; lit and unlit), bake textures onto "
                    "their GT surface decimated to each face count, colour the same meshes per vertex, and compare "
                    "renders of both with the GT at the held-out cameras (training/texture_eval.py).")
    p.add_argument("--out", required=True, help="report folder (report.md, report.json, render.log, glb/)")
    p.add_argument("--data", help="render root of the objects, one folder per shading (default <out>/renders: "
                                  "<out>/renders/lit, <out>/renders/unlit)")
    p.add_argument("--no-render", action="store_true", help="evaluate every object already under --data as it is")
    p.add_argument("--count", type=int, default=4, help="procedural objects (default 4)")
    p.add_argument("--first-seed", type=int, default=0, help="seed of the first object (default 0)")
    p.add_argument("--faces", default="5000,20000,100000", help="face budgets (default 5000,20000,100000)")
    p.add_argument("--texture-size", type=int, default=TextureEvalConfig.texture_size,
                   help=f"baked texture side (default {TextureEvalConfig.texture_size})")
    p.add_argument("--supersample", type=int, default=TextureEvalConfig.supersample,
                   help=f"evaluation render samples per pixel and axis (default {TextureEvalConfig.supersample})")
    p.add_argument("--bake-repeats", type=int, default=1,
                   help="run each bake this many times and report the fastest (default 1)")
    p.add_argument("--export-glb", type=int, action="append",
                   help="also write <out>/glb/<object>-<N>[-lit]-{texture,vertex-colours}.glb for budget N "
                        "(repeatable)")
    group = p.add_argument_group("rendering (training/render/texture_views.py)")
    group.add_argument("--size", type=int, default=256, help="image side (default 256, the pipeline's views)")
    group.add_argument("--samples", type=int, default=64, help="Cycles samples per pixel (default 64)")
    group.add_argument("--held-out", type=int, default=8, help="held-out cameras per object (default 8)")
    group.add_argument("--tiles", type=int, default=4, help="texture repeats per part and axis (default 4)")
    group.add_argument("--surface", default="textured", choices=("textured", "mixed", "flat"),
                       help="procedural paint (default textured)")
    group.add_argument("--shading", default="both", choices=("both", *SHADINGS),
                       help="both (default): score lit and unlit views side by side; unlit: base colour only; lit: a "
                            "sun, the soft environment, glossy parts and Filmic, as Zero123's views are shaded")
    group.add_argument("--polar", default="45:105", help="ring polar per object: N or LOW:HIGH (default 45:105)")
    group.add_argument("--dense-voxel", type=float, default=0.004, help="GT remesh voxel (default 0.004)")
    group.add_argument("--threads", type=int, default=0, help="Cycles CPU threads, 0 = all cores")
    group.add_argument("--blender-python", help="bpy 4.2 interpreter (default $ONE2345_BPY42_PYTHON or .venv-bpy42)")
    p.set_defaults(handler=run_evaluate_texture)
    return p
