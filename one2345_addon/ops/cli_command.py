"""``blender -b -c one2345 generate IMG... --out DIR [options]``: batch generation without a window.

Each image becomes ``DIR/<stem>.<format>`` and ``DIR/<stem>.meta.json``; progress goes to stdout, problems to stderr;
the exit status is 0 when every image succeeded, 1 when any failed and 2 for a bad command line. The server is the
one from the add-on preferences unless ``--server-python`` or ``--server-url`` say otherwise.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import bpy

from ..core import jobs, properties, server_process
from ..core import settings as addon_prefs

COMMAND = "one2345"
_HANDLE: Any = None


def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser."""
    parser = argparse.ArgumentParser(prog=f"blender -b -c {COMMAND}", description="One2345: image to 3D mesh.")
    sub = parser.add_subparsers(dest="action", required=True)
    gen = sub.add_parser("generate", help="Generate a mesh for each image.")
    gen.add_argument("images", nargs="+", type=Path, help="Input image files.")
    gen.add_argument("--out", type=Path, required=True, help="Output folder for the meshes.")
    opt = gen.add_argument_group("job options (default: the scene's panel settings)")
    opt.add_argument("--elevation", type=float, help="Camera elevation in degrees (−60…70); default: estimated.")
    opt.add_argument("--seed", type=int, help="Diffusion seed.")
    opt.add_argument("--random-seed", action="store_true", help="Let the server pick a seed.")
    opt.add_argument("--quality", choices=("fast", "balanced", "paper"), help="Step preset.")
    opt.add_argument("--steps", type=int, help="Stage-1 DDIM steps (overrides --quality).")
    opt.add_argument("--steps-stage2", type=int, help="Stage-2 DDIM steps (overrides --quality).")
    opt.add_argument("--guidance", type=float, help="Classifier-free guidance scale.")
    opt.add_argument("--resolution", type=int, help="Mesh resolution (32…512).")
    opt.add_argument("--format", choices=("ply", "glb", "obj"), help="Mesh format.")
    opt.add_argument("--keep-background", action="store_true", help="Use the image's alpha; no background removal.")
    opt.add_argument("--faces", type=int, help="Polygon budget: decimate to this many faces (1000…2000000).")
    opt.add_argument("--texture", type=int, choices=(512, 1024, 2048, 4096),
                     help="Bake a UV texture of this size instead of vertex colours (the mesh is glTF binary).")
    srv = gen.add_argument_group("server (default: the add-on preferences)")
    srv.add_argument("--server-python", help="Start the server with this Python.")
    srv.add_argument("--server-url", help="Use the server running at this URL instead.")
    srv.add_argument("--token", help="Bearer token for --server-url.")
    srv.add_argument("--device", choices=("auto", "cpu", "cuda"), help="Device of a server started here.")
    srv.add_argument("--preset", choices=("paper", "tiny"), help="Model preset of a server started here.")
    srv.add_argument("--weights-dir", help="Weights folder of a server started here.")
    return parser


def request_options(args: argparse.Namespace, scene: bpy.types.Scene) -> dict[str, Any]:
    """The scene's panel settings with the command line's options on top, through :func:`properties.to_request`."""
    values = properties.option_values(scene.one2345)
    if args.elevation is not None:
        values.update(elevation_mode="MANUAL", elevation=args.elevation)
    if args.seed is not None:
        values.update(seed=args.seed, use_random_seed=False)
    if args.random_seed:
        values["use_random_seed"] = True
    if args.quality:
        values["quality"] = args.quality.upper()
    if args.steps is not None or args.steps_stage2 is not None:
        preset = properties.QUALITY_STEPS.get(values["quality"], (values["steps_stage1"], values["steps_stage2"]))
        values.update(quality="CUSTOM", steps_stage1=args.steps if args.steps is not None else preset[0],
                      steps_stage2=args.steps_stage2 if args.steps_stage2 is not None else preset[1])
    for name, key in (("guidance", "guidance"), ("resolution", "resolution")):
        if getattr(args, name) is not None:
            values[key] = getattr(args, name)
    if args.format:
        values["mesh_format"] = args.format.upper()
    if args.keep_background:
        values["remove_background"] = False
    if args.faces is not None:
        values["target_faces"] = args.faces
    if args.texture is not None:
        values.update(colours="TEXTURE", texture_size=str(args.texture))
    values["review"] = False  # a batch never waits for an artist
    return properties.to_request(SimpleNamespace(**values))


def connector(args: argparse.Namespace) -> tuple[Callable[[], server_process.Connection], Callable[[], int | None]]:
    """(connect, exit_code) for the preferences' server with the command line's overrides."""
    prefs = addon_prefs.get()
    if args.server_url:
        connection = server_process.Connection(url=args.server_url, token=args.token, local=False)
        return (lambda: connection), (lambda: None)
    if prefs.server_mode == "REMOTE" and not args.server_python:
        return addon_prefs.connector(prefs)
    settings = addon_prefs.launch_settings(prefs)
    settings = replace(settings, python=args.server_python or settings.python, device=args.device or settings.device,
                       preset=args.preset or settings.preset, weights_dir=args.weights_dir or settings.weights_dir)
    manager = server_process.manager(settings.state_dir)
    return (lambda: manager.ensure(settings)), manager.exit_code


def _printer(name: str) -> Callable[[jobs.Progress], None]:
    last = [""]

    def show(p: jobs.Progress) -> None:
        if p.setup:  # the one-time conversion: what it does and its own steps, not the job's 0 %
            line = f"[{name}] {jobs.bar(p)[1]}"
        else:
            steps = f" {p.step}/{p.total}" if p.total > 1 else ""
            line = f"[{name}] {p.stage}{steps} {p.fraction:4.0%}"
        if line != last[0]:
            last[0] = line
            print(line, flush=True)

    return show


def generate(args: argparse.Namespace) -> int:
    """Run one job per image, one after the other; return the exit status."""
    options = request_options(args, bpy.context.scene)
    connect, exit_code = connector(args)
    out = args.out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    failures = 0
    for index, image in enumerate(args.images):
        image = image.expanduser().resolve()
        if not image.is_file():
            print(f"[{image.name}] error: the image file {str(image)!r} does not exist.", file=sys.stderr)
            failures += 1
            continue
        job_dir = addon_prefs.user_dir() / "jobs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{index}-{image.stem}"
        job_dir.mkdir(parents=True, exist_ok=True)
        copy = Path(shutil.copyfile(image, job_dir / f"input{image.suffix.lower()}"))
        job = jobs.GenerateJob(copy, options, job_dir, connect, exit_code, mesh_name=image.stem)
        job.on("progress", _printer(image.name)).on("note", lambda note: print(f"note: {note}", flush=True))
        job.start().wait()
        if job.state != "done":
            print(f"[{image.name}] {job.state}: {job.error}", file=sys.stderr, flush=True)
            failures += 1
            continue
        mesh = Path(shutil.copyfile(job.result.mesh, out / job.result.mesh.name))
        if job.result.meta is not None:
            shutil.copyfile(job.result.meta, out / f"{image.stem}.meta.json")
        print(f"[{image.name}] wrote {mesh} ({job.result.vertices} vertices, {job.result.faces} faces)", flush=True)
    return 1 if failures else 0


def command(argv: list[str]) -> int:
    """The function registered with ``bpy.utils.register_cli_command``: parse ``argv`` and run it."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help or a usage error: argparse already printed why
        return int(exc.code or 0)
    return generate(args)


def register() -> None:
    """Register ``blender -c one2345``."""
    global _HANDLE
    _HANDLE = bpy.utils.register_cli_command(COMMAND, command)


def unregister() -> None:
    """Unregister the command."""
    global _HANDLE
    if _HANDLE is not None:
        bpy.utils.unregister_cli_command(_HANDLE)
        _HANDLE = None
