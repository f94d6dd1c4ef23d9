"""The ``one2345`` command.

Subcommands are thin: they parse flags, call one library function, and turn :class:`server.common.errors.One2345Error`
into a readable message and a non-zero exit code (2 for bad input, 1 otherwise). Results go to stdout (the output path
is the last line), progress and logs to stderr. Everything a command can check before the expensive part — the
inputs readable, the output path writable as a file, the options in range — it checks first, so a mistake costs
seconds, not a finished run.
"""

from __future__ import annotations

import argparse
import math
import shutil
import signal
import stat
import sys
import threading
import time
from pathlib import Path

from server import __version__
from server.common.devices import resolve_device
from server.common.errors import BadInputError, CheckpointError, MissingWeightsError, One2345Error
from server.common.fsutil import check_folder_path, check_output_file, replace_dir
from server.service.serve import add_serve_parser

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process SIGTERM ended


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that every clean-up that runs for Ctrl+C runs for it too."""


class _Bars:
    """A tqdm bar on stderr for each stage that reports more than one step."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self._bars: dict[str, object] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if total <= 1:
            return
        bar = self._bars.get(stage)
        if bar is None:
            bar = self._bars[stage] = self._tqdm(total=total, desc=stage, leave=False, file=sys.stderr,
                                                 dynamic_ncols=True, unit_scale=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()


def _load_model(args: argparse.Namespace):
    from server.stages.reconstruction.checkpoint import load_reconstruction_model
    from server.stages.reconstruction.model import build_model

    if args.checkpoint:
        try:
            return load_reconstruction_model(args.checkpoint)
        except (CheckpointError, MissingWeightsError) as e:  # a file the user named: their input, not our weights
            raise BadInputError(f"--checkpoint: {e.message}", fix="pass an official ckpt_215000.pth or a folder "
                                "written by one2345-train (check it with: one2345 weights verify PATH)") from None
    if args.preset == "tiny":
        return build_model("tiny", seed=0)
    from server.common.weights import resolve

    return load_reconstruction_model(resolve("reconstruction", args.weights_dir))


def _mesh_settings(args: argparse.Namespace):
    from server.pipeline.remesh import MeshSettings

    if not 32 <= args.resolution <= 1024:
        raise BadInputError(f"--resolution {args.resolution} is outside 32…1024 (the reference uses 256)")
    meshing = None  # MeshingConfig's defaults (coarse to fine), without importing torch for it now
    if args.dense:
        from server.stages.meshing import MeshingConfig

        meshing = MeshingConfig(coarse_to_fine=False)
    return MeshSettings(resolution=args.resolution, target_faces=args.faces, texture_size=args.texture,
                        meshing=meshing)


def _check_path(path: str | Path, what: str, folder: bool) -> Path:
    """``path`` if it exists and is a folder (``folder``) or a regular file; a FIFO or device is refused before
    anything opens it (reading one would wait for ever). Cheap: checked before torch is imported."""
    path = Path(path).expanduser()
    try:
        mode = path.stat().st_mode
    except OSError:
        raise BadInputError(f"{what} {path} does not exist") from None
    if folder and not stat.S_ISDIR(mode):
        raise BadInputError(f"{what} {path} is not a folder")
    if not folder and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise BadInputError(f"{what} {path} is not a regular file or a folder (a FIFO, socket or device)")
    return path


def _mesh_from_views(args: argparse.Namespace, views_dir: Path) -> int:
    """reconstruct and remesh: one views folder → the mesh at -o, with the asset options."""
    out = check_output_file(args.output)
    settings = _mesh_settings(args).check(out.suffix)
    _check_path(views_dir, "views folder", folder=True)
    if args.checkpoint:
        _check_path(args.checkpoint, "--checkpoint", folder=False)
    device = resolve_device(args.device)  # the first import of torch
    from server.common.views import load_views
    from server.pipeline.remesh import mesh_views

    start = time.perf_counter()
    load_views(views_dir)  # a broken folder is reported before the model loads
    model = _load_model(args)
    result = mesh_views(model, views_dir, [out], settings, device=device, progress=_Bars(),
                        on_asset=lambda: print("asset stage: clean-up, polygon budget, texture…", file=sys.stderr))
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
    print(f"{result.vertices:,} vertices, {result.faces:,} faces in {time.perf_counter() - start:.1f}s ({stages})",
          file=sys.stderr)
    for extra in result.files[1:]:
        print(f"also wrote {extra}", file=sys.stderr)
    print(result.files[0])
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    return _mesh_from_views(args, Path(args.views_dir))


def cmd_remesh(args: argparse.Namespace) -> int:
    from server.pipeline.remesh import find_run, read_run_meta

    run = find_run(args.run_dir)
    # Unless told otherwise, the network and resolution the run was made with (from its meta.json, if it has one).
    meta: dict = {}
    if (args.resolution is None or (args.preset is None and not args.checkpoint)) and (run / "meta.json").exists():
        try:
            meta = read_run_meta(run)
        except BadInputError as e:
            raise BadInputError(e.message, fix="pass --preset and --resolution to re-mesh the views without it") \
                from None
    options = meta.get("options") if isinstance(meta.get("options"), dict) else {}
    if args.resolution is None:
        resolution = options.get("resolution")
        args.resolution = resolution if isinstance(resolution, int) and not isinstance(resolution, bool) else 256
    if args.preset is None and not args.checkpoint:
        args.preset = meta.get("preset") if meta.get("preset") in ("paper", "tiny") else "paper"
        print(f"re-meshing {run} with the {args.preset} reconstruction network at resolution {args.resolution}",
              file=sys.stderr)
    return _mesh_from_views(args, run / "views")


def cmd_bake(args: argparse.Namespace) -> int:
    """A finished run's views baked onto the user's mesh (server.pipeline.bake): every path and option is checked
    before the views are read (which brings torch)."""
    from server.pipeline.bake import bake_run, check_bake_request

    _check_path(args.mesh, "mesh file", folder=False)
    explicit_texture = args.texture is not None
    texture = args.texture if explicit_texture else 1024
    if explicit_texture and (args.vertex_colors or Path(args.output).suffix.lower() == ".ply"):
        what = "so was --vertex-colors" if args.vertex_colors else "the output is a PLY, which has no texture"
        raise BadInputError(f"--texture {args.texture} was given, but {what}",
                            fix="leave --texture out, or write a .glb or .obj")
    check_bake_request(args.run_dir, args.mesh, args.output, texture, vertex_colors=args.vertex_colors)
    start = time.perf_counter()
    outcome = bake_run(args.run_dir, args.mesh, args.output, texture_size=texture, keep_uvs=args.keep_uvs,
                       vertex_colors=args.vertex_colors)
    onto = "its own UVs" if outcome.uv_source == "mesh" else "a fresh unwrap"
    what = "vertex colours" if outcome.texture_size is None else f"a {outcome.texture_size}² texture on {onto}"
    print(f"baked {what}: {outcome.uv_reason}; {outcome.vertices:,} vertices, {outcome.faces:,} faces in "
          f"{time.perf_counter() - start:.1f}s", file=sys.stderr)
    for extra in [*outcome.files[1:], outcome.meta_path]:
        print(f"also wrote {extra}", file=sys.stderr)
    print(outcome.files[0])
    return 0


def cmd_weights_verify(args: argparse.Namespace) -> int:
    if args.all == (args.file is not None):
        raise BadInputError("give either a checkpoint FILE or --all (every weight file of the weights folder)")
    if args.all:
        return _weights_verify_all(args)
    if args.dir is not None:
        raise BadInputError("--dir goes with --all; a FILE is checked where it is")
    _check_path(args.file, "checkpoint", folder=False)  # a FIFO is refused unopened (it would hang the read)
    from server.stages.reconstruction.checkpoint import verify_checkpoint

    result = verify_checkpoint(args.file)
    if result.ok:
        print(f"OK: {result.path} is a {result.kind}: {result.details}")
        return 0
    if result.report is None:  # not a checkpoint at all: bad input (2), unlike a checkpoint with wrong keys (1)
        raise BadInputError(f"{result.path} is not a reconstruction checkpoint: {result.details}")
    print(f"FAILED: {result.path} ({result.kind}):\n{result.details}", file=sys.stderr)
    return EXIT_FAILED


def _weights_verify_all(args: argparse.Namespace) -> int:
    """``one2345 weights verify --all``: hash every present weight file (digests cached by size and mtime) and say
    which are damaged; exit 1 if any is."""
    from tqdm import tqdm

    from server.common.weights import default_weights_dir, download_command, verify_all

    bars: dict[str, tqdm] = {}

    def on_hash(name: str, done: int, total: int) -> None:
        bar = bars.get(name) or bars.setdefault(name, tqdm(total=total, desc=f"verifying {name}", unit="B",
                                                           unit_scale=True, file=sys.stderr, leave=False))
        bar.update(done - bar.n)

    try:
        states = verify_all(args.dir, on_hash=on_hash)
    finally:
        for bar in bars.values():
            bar.close()
    for s in states:
        print(f"{s.name:<15} {'damaged' if s.state == 'corrupt' else s.state:<8} {s.checksum or '-':<12} {s.filename}")
        if s.problem:
            print(f"{'':<15} {s.problem}")
    damaged = [s.name for s in states if s.state == "corrupt"]
    folder = args.dir if args.dir is not None else default_weights_dir()
    if damaged:
        print(f"one2345 weights verify: {len(damaged)} damaged file(s) in {folder}: {', '.join(damaged)}\n"
              f"  fix: run `{download_command(damaged, args.dir)}` (the damaged file stays until the new one is whole)",
              file=sys.stderr)
        return EXIT_FAILED
    return 0


def cmd_weights_import(args: argparse.Namespace) -> int:
    """``one2345 weights import PATH``: take the weight files of a One-2-3-45 checkout (or a folder of them)."""
    from tqdm import tqdm

    from server.common.weights import import_weights

    if args.dir is not None:
        check_folder_path(args.dir, "--dir")
    bar: list[tqdm] = []

    def on_progress(p) -> None:
        if p.phase == "done":
            if bar:
                bar.pop().close()
            return
        if not bar or bar[0].desc != f"{p.phase} {p.file}":
            if bar:
                bar.pop().close()
            bar.append(tqdm(total=p.file_total, desc=f"{p.phase} {p.file}", unit="B", unit_scale=True,
                            file=sys.stderr, leave=False))
        bar[0].update((p.hashed or p.file_done) - bar[0].n)

    try:
        results = import_weights(args.path, args.dir, on_progress=on_progress)
    finally:
        for b in bar:
            b.close()
    for r in results:
        how = f" ({r.how})" if r.how else ""
        print(f"{r.name:<15} {r.outcome}{how}" + (f": {r.source}" if r.source else "")
              + (f" — {r.detail}" if r.detail else ""))
    return EXIT_FAILED if any(r.outcome == "damaged" for r in results) else 0


def cmd_sample_views(args: argparse.Namespace) -> int:
    from server.common.synthetic import write_views_dir

    if not (math.isfinite(args.polar) and 30.0 <= args.polar <= 150.0):
        raise BadInputError(f"--polar {args.polar:g} is outside 30…150 degrees (the nearby views and the second ring "
                            "must stay inside 0…180)")
    print(write_views_dir(check_folder_path(args.out_dir, "views folder"), polar=args.polar))
    return 0


def _run_dir_for(mesh_path: Path) -> Path:
    """Where a run's intermediates go: ``photo.glb`` → ``photo.one2345/`` beside it."""
    return mesh_path.with_name(mesh_path.stem + ".one2345")


def _partial_dir_for(run_dir: Path) -> Path:
    """Where a run is made before it is complete: ``.photo.one2345.incomplete/`` beside ``photo.one2345/``. Only a
    finished run is renamed to ``run_dir`` (replacing an older one); a failed or interrupted run's folder is removed,
    and one a SIGKILL left behind is removed by the next run of the same output."""
    return run_dir.with_name(f".{run_dir.name}.incomplete")


def _check_images(images: list[str]) -> None:
    """Read and decode every image now (Pillow only), so that a bad one in a batch is reported before minutes of
    work on the others — and before torch is imported."""
    from server.common.images import open_image, read_image_file

    unusable = []
    for image in images:
        try:
            open_image(read_image_file(image), str(Path(image).expanduser()))
        except BadInputError as e:
            unusable.append(e)
    if len(images) == 1 and unusable:
        raise BadInputError(unusable[0].message, fix=unusable[0].fix)
    if unusable:
        raise BadInputError(f"{len(unusable)} of {len(images)} input images cannot be used:\n  " +
                            "\n  ".join(e.message for e in unusable),
                            fix="fix or leave out those images; nothing was generated")


def _check_prompt_args(args: argparse.Namespace) -> None:
    """``generate --prompt``: no images beside it, one mesh (-o), a count in 1…8 and a pick among them."""
    from server.stages.text_to_image import MAX_COUNT, check_request

    if args.images:
        raise BadInputError(f"give either input images or --prompt, not both ({len(args.images)} image(s) and a "
                            "prompt were given)")
    if not args.output:
        raise BadInputError("--prompt makes one mesh: say where it goes with -o OUT.glb")
    check_request(args.prompt, args.count, args.seed)
    if not 0 <= args.pick < args.count:
        raise BadInputError(f"--pick {args.pick} is not among the {args.count} candidate(s) of --count {args.count}: "
                            f"give 0…{args.count - 1} (or a larger --count, at most {MAX_COUNT})")


def _candidates(args: argparse.Namespace, device: str):
    """Text → candidate images (``imagine`` and ``generate --prompt``): the model is loaded, used and released."""
    from server.stages.text_to_image import make_candidates

    print(f"making {args.count} image(s) from the prompt with the {args.preset} text-to-image model…",
          file=sys.stderr)
    return make_candidates(args.prompt, count=args.count, seed=args.seed, negative_prompt=args.negative_prompt,
                           preset=args.preset, device=device, weights_dir=args.weights_dir, low_vram=args.low_vram,
                           download_missing=not args.offline)


def cmd_imagine(args: argparse.Namespace) -> int:
    """``one2345 imagine PROMPT --count N --out-dir DIR``: candidate images of one object, ``<i>.png`` and
    ``candidates.json`` (each image's prompt, model, seed and index)."""
    from server.stages.text_to_image import check_request

    check_folder_path(args.out_dir, "--out-dir")
    check_request(args.prompt, args.count, args.seed)
    candidates = _candidates(args, resolve_device(args.device))
    paths = candidates.write(args.out_dir)
    print(f"seed {candidates.seed} ({candidates.model}); make a mesh of one with: one2345 generate IMAGE -o OUT.glb",
          file=sys.stderr)
    for path in paths:
        print(path)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from server.pipeline.options import GenerateOptions  # no torch: the options are checked before it loads

    if args.prompt is None and not args.images:
        raise BadInputError("give the input image(s), or --prompt \"…\" to make the image from text")
    if args.output and len(args.images) > 1:
        raise BadInputError(f"-o/--output names one mesh but {len(args.images)} images were given; use --out-dir DIR")
    if not args.output and not args.out_dir:
        raise BadInputError("say where the mesh goes: -o OUT.glb (one image) or --out-dir DIR")
    fmt = args.format
    if args.output:
        fmt = check_output_file(args.output).suffix.lower().lstrip(".")
    else:
        check_folder_path(args.out_dir, "--out-dir")
    options = GenerateOptions(elevation=args.elevation, seed=args.seed, steps_stage1=args.steps_stage1,
                              steps_stage2=args.steps_stage2, guidance=args.guidance, resolution=args.resolution,
                              format=fmt, remove_background=not args.keep_background, target_faces=args.faces,
                              texture_size=args.texture).check()
    if args.prompt is not None:
        _check_prompt_args(args)
    else:
        _check_images(args.images)
    device = resolve_device(args.device)  # the first import of torch
    # Text first, so that the text-to-image model is released before the image-to-3D models load.
    made = _candidates(args, device) if args.prompt is not None else None
    if made is not None:
        import dataclasses

        options = dataclasses.replace(options, seed=made.seed if options.seed is None else options.seed)
        if args.preset == "tiny" and options.remove_background:
            # The tiny model's picture is random noise: there is no object for the weight-free cut-out to find.
            print("one2345 generate: the tiny text-to-image model paints noise, not an object: its background is "
                  "kept (as --keep-background)", file=sys.stderr)
            options = dataclasses.replace(options, remove_background=False)

    from tqdm import tqdm

    from server.pipeline import One2345Pipeline
    from server.pipeline.models import host_memory_warning, loading_observer, progress_lines

    memory_warning = host_memory_warning(args.preset, device)
    if memory_warning:
        print(f"one2345 generate: warning: {memory_warning}", file=sys.stderr)
    print(f"loading the {args.preset} models…", file=sys.stderr)
    # A first run converts Zero123-XL (about a minute): say so (SIGTERM and Ctrl+C remove its temporary folder).
    with loading_observer(progress_lines(lambda line: print(line, file=sys.stderr, flush=True))):
        pipe = One2345Pipeline.from_preset(args.preset, device=args.device, weights_dir=args.weights_dir,
                                           download_missing=not args.offline, low_vram=args.low_vram)
    failures = 0
    for image in args.images or [f"prompt candidate {args.pick}"]:
        out = Path(args.output) if args.output else Path(args.out_dir) / f"{Path(image).stem}.{fmt}"
        run_dir = _run_dir_for(out)
        partial = _partial_dir_for(run_dir)
        shutil.rmtree(partial, ignore_errors=True)  # what a run killed outright (SIGKILL, power loss) left
        bar = tqdm(total=1000, desc=Path(image).name, file=sys.stderr, dynamic_ncols=True,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix} [{elapsed}<{remaining}]")

        def on_progress(p, bar=bar) -> None:
            bar.update(int(p.fraction * 1000) - bar.n)
            bar.set_postfix_str(f"{p.stage} {p.step}/{p.total}", refresh=False)

        try:
            if made is None:
                result = pipe(image, partial, options, progress=on_progress, outputs=[out])
            else:  # the chosen candidate, recorded with its prompt; every candidate is kept in the run folder
                result = pipe(made.images[args.pick], partial, options, progress=on_progress, outputs=[out],
                              text=made.source(args.pick))
                made.write(partial / "candidates")
            replace_dir(partial, run_dir)
        except BaseException as e:  # failed, Ctrl+C or SIGTERM: nothing of this run stays; an older run is kept
            bar.close()
            shutil.rmtree(partial, ignore_errors=True)
            if not isinstance(e, One2345Error):
                raise
            print(f"one2345 generate: {image}: error: {e}", file=sys.stderr)
            failures += 1
            continue
        bar.close()
        print(f"{image}: elevation {result.elevation:.0f}° ({result.elevation_source}), background "
              f"{result.background}, {result.vertices:,} vertices; intermediates in {run_dir}",
              file=sys.stderr)
        if result.elevation_uncertain:
            print(f"{image}: warning: elevation uncertain (confidence {result.elevation_confidence:.2f}); used "
                  f"{result.elevation:.0f}°. If the mesh looks wrong, set it by hand: --elevation DEG",
                  file=sys.stderr)
        print(out)
    return EXIT_FAILED if failures else 0




def cmd_weights_download(args: argparse.Namespace) -> int:
    from server.common.weights import download

    if args.dir is not None:
        check_folder_path(args.dir, "--dir")
    if args.offline:
        return _report_offline(args)
    paths = download(args.only or None, args.dir, offline=False)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def cmd_weights_prepare(args: argparse.Namespace) -> int:
    """``one2345 weights prepare``: the one-time Zero123-XL conversion now, ahead of the first Generate, with a
    progress line per step. SIGTERM (see :func:`main`) and Ctrl+C stop it; the conversion removes what it had
    written on the way out."""
    from server.pipeline.models import prepare_weights, progress_lines

    if args.weights_dir is not None:
        check_folder_path(args.weights_dir, "--weights-dir")
    folder = prepare_weights(args.weights_dir, progress=progress_lines(lambda line: print(line, file=sys.stderr,
                                                                                          flush=True)))
    print(f"Zero123-XL is converted and checked: {folder}", file=sys.stderr)
    print(folder)
    return 0


def _report_offline(args: argparse.Namespace) -> int:
    """``weights download --offline``: what is present and what is missing, with the one command that fetches the
    missing files; exit 1 if any is missing."""
    import shlex

    from server.common.weights import default_weights_dir, inspect_weights

    names = set(args.only or ())
    folder = Path(args.dir) if args.dir is not None else default_weights_dir()
    states = [s for s in inspect_weights(args.dir) if not names or s.name in names]
    for s in states:
        print(f"{s.name}: {folder / s.filename if s.state == 'present' else s.state}")
    missing = [s.name for s in states if s.state != "present"]
    if not missing:
        return 0
    command = "one2345 weights download" + "".join(f" --only {n}" for n in missing if names) + (
        f" --dir {shlex.quote(str(args.dir))}" if args.dir is not None else "")
    print(f"one2345 weights download: {len(missing)} weight file(s) missing or incomplete in {folder}: "
          f"{', '.join(missing)} (--offline: nothing was fetched)\n  fix: run `{command}` with network access",
          file=sys.stderr)
    return EXIT_FAILED


def cmd_weights_list(args: argparse.Namespace) -> int:
    """``one2345 weights list``: every weight file's state (what the server's GET /v1/weights lists)."""
    import json

    from server.common.weights import (
        _human_size,
        default_weights_dir,
        disk_needed_bytes,
        inspect_weights,
        missing_bytes,
    )

    states = inspect_weights(args.dir, verify=args.verify)
    if args.json:
        print(json.dumps([s.to_json() for s in states], indent=2))
        return 0
    for s in states:
        size = f"{_human_size(s.bytes_on_disk)} / {'' if s.size_exact else '~'}{_human_size(s.expected_bytes)}"
        print(f"{s.name:<15} {s.state:<8} {size:<20} {s.checksum or '-':<12} "
              f"{'required' if s.required else 'optional':<9} {s.filename}")
        if s.problem:
            print(f"{'':<15} {s.problem}")
    left = missing_bytes(states)
    folder = args.dir if args.dir is not None else default_weights_dir()
    print(f"weights folder: {folder}; " + (f"~{_human_size(left)} still to download, "
                                           f"~{_human_size(disk_needed_bytes(states))} of disk with the one-time "
                                           "conversion (one2345 weights download)"
                                           if left else "every file is present"))
    return 0


def cmd_elevation(args: argparse.Namespace) -> int:
    import json

    from server.common.images import read_image_file

    for view in args.views:  # missing, a folder or a FIFO: said before torch loads, and a FIFO is never opened
        read_image_file(view)
    from server.common.views import read_rgb
    from server.stages.elevation import ElevationEstimator, available_matchers

    images = [read_rgb(Path(v)) for v in args.views]
    estimator = ElevationEstimator(available_matchers(args.weights_dir, prefer=args.matcher))
    print(json.dumps(estimator(images).to_json()))
    return 0


def _add_weights_dir(parser: argparse.ArgumentParser, flag: str = "--weights-dir") -> None:
    parser.add_argument(flag, type=Path, default=None,
                        help="weights folder (default: $ONE2345_WEIGHTS or ~/.cache/one2345/weights)")


def _add_asset_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--faces", type=int, default=None, metavar="N",
                        help="polygon budget: clean the mesh and decimate it to N triangles (1000…2000000; default: "
                             "every marching-cubes face)")
    parser.add_argument("--texture", type=int, default=None, metavar="SIZE",
                        help="bake a SIZE×SIZE UV texture from the views (256…4096, e.g. 1024; glb or obj); default: "
                             "vertex colours only")


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="one2345", description="One-2-3-45 image-to-3D: views → mesh, weights.")
    parser.add_argument("--version", action="version", version=f"one2345 {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("reconstruct", help="32 posed views + pose.json → vertex-coloured mesh",
                       description="Reconstruct a mesh from a folder holding pose.json and the 32 nearby views "
                                   "<i>_<j>.png (the layout `one2345 generate` writes).")
    p.add_argument("views_dir", help="folder with pose.json and the 32 views <i>_<j>.png")
    p.add_argument("-o", "--output", required=True, help="output mesh: .ply (z-up, as pose.json), .glb or .obj (y-up)")
    p.add_argument("--preset", choices=["paper", "tiny"], default="paper",
                   help="paper: full-size network with the official weights; tiny: small random network, no weights "
                        "(for trying the tool and for tests)")
    p.add_argument("--checkpoint", help="a reconstruction checkpoint (official ckpt_215000.pth or our folder); "
                                        "overrides --preset")
    _add_weights_dir(p)
    p.add_argument("--resolution", type=int, default=256, help="marching-cubes grid per axis (default 256, as the "
                                                               "reference)")
    _add_device(p)
    p.add_argument("--dense", action="store_true", help="evaluate the SDF on every grid point instead of coarse to "
                                                        "fine (slower; same mesh for well-behaved SDFs)")
    _add_asset_options(p)
    p.set_defaults(func=cmd_reconstruct)

    r = sub.add_parser("remesh", help="mesh a finished run again (resolution, polygon budget, texture) without "
                                      "re-running Zero123",
                       description="Re-run reconstruction, the asset stage and export on the views of a finished run: "
                                   "RUN_DIR is the <mesh stem>.one2345/ folder `one2345 generate` wrote, or a server "
                                   "job's folder. The run is not changed; the new mesh goes to -o.")
    r.add_argument("run_dir", help="the run's folder (<mesh stem>.one2345/) or a server job's folder")
    r.add_argument("-o", "--output", required=True, help="output mesh: .glb, .obj or .ply")
    r.add_argument("--preset", choices=["paper", "tiny"], default=None,
                   help="reconstruction network (default: the run's, from its meta.json)")
    r.add_argument("--checkpoint", help="a reconstruction checkpoint; overrides --preset")
    _add_weights_dir(r)
    r.add_argument("--resolution", type=int, default=None,
                   help="marching-cubes grid per axis (default: the run's, else 256)")
    _add_device(r)
    r.add_argument("--dense", action="store_true", help="evaluate the SDF on every grid point")
    _add_asset_options(r)
    r.set_defaults(func=cmd_remesh)

    w = sub.add_parser("weights", help="check and fetch model weights").add_subparsers(dest="weights_command",
                                                                                       required=True, metavar="ACTION")
    v = w.add_parser("verify", help="load a checkpoint strictly into its network and say what it is",
                     description="Exit 0 and describe the file if it loads strictly; otherwise exit 1 listing "
                                 "missing, unexpected and mis-shaped keys.")
    v.add_argument("file", nargs="?", help="checkpoint file or folder")
    v.add_argument("--all", action="store_true",
                   help="instead: check every weight file of the weights folder against its exact size and SHA-256 "
                        "(streamed; digests are remembered per size and mtime, so a second run is instant); exit 1 "
                        "if any is damaged")
    _add_weights_dir(v, "--dir")
    v.set_defaults(func=cmd_weights_verify)

    im = w.add_parser("import", help="take the weight files from an official One-2-3-45 checkout or a folder of them",
                      description="Look for the four files under PATH (the reference's layout, e.g. "
                                  "reconstruction/exp/lod0/checkpoints/ckpt_215000.pth, the hub's, or a flat "
                                  "folder), verify each (size and SHA-256) and hard-link, reflink or copy it into the "
                                  "weights folder. Exit 1 if a file found is damaged.")
    im.add_argument("path", help="folder of a One-2-3-45 checkout, or a folder holding the weight files")
    _add_weights_dir(im, "--dir")
    im.set_defaults(func=cmd_weights_import)

    d = w.add_parser("download", help="fetch the reference's weight files (resumable) into the weights folder")
    d.add_argument("--only", action="append", choices=["sam", "zero123-xl", "loftr", "reconstruction",
                                                       "text-to-image"],
                   help="fetch only this file (repeat it for several: --only zero123-xl --only reconstruction); "
                        "default: all four. text-to-image: the optional text-to-image model (4.3 GB, for text "
                        "input; never fetched by default). A damaged file is fetched again")
    _add_weights_dir(d, "--dir")
    d.add_argument("--offline", action="store_true", help="never touch the network: only report what is missing")
    d.set_defaults(func=cmd_weights_download)

    pr = w.add_parser("prepare", help="convert Zero123-XL once now (15.5 GB → 5 GB, about a minute) instead of in the "
                                      "first Generate",
                      description="Convert the downloaded zero123-xl.ckpt into the diffusers folder the server loads "
                                  "(<weights dir>/converted/), printing a line per step. Nothing is done when it is "
                                  "already converted and its files have their recorded sizes. SIGTERM or Ctrl+C stop "
                                  "it cleanly (exit 143 or 130, nothing half-written left).")
    pr.add_argument("--weights-dir", "--dir", dest="weights_dir", type=Path, default=None,
                    help="weights folder (default: $ONE2345_WEIGHTS or ~/.cache/one2345/weights)")
    pr.set_defaults(func=cmd_weights_prepare)

    ls = w.add_parser("list", help="every weight file: state (present/partial/missing/corrupt), size, checksum")
    _add_weights_dir(ls, "--dir")
    ls.add_argument("--verify", action="store_true",
                    help="hash the files not hashed yet (about a minute for 15 GB; digests are remembered)")
    ls.add_argument("--json", action="store_true", help="print the states as JSON")
    ls.set_defaults(func=cmd_weights_list)

    g = sub.add_parser("generate", help="image(s) → vertex-coloured mesh(es): the whole One-2-3-45 pipeline",
                       description="Run preprocessing, Zero123 multi-view generation, elevation estimation and "
                                   "reconstruction. Intermediates (views, pose.json, meta.json) are kept in "
                                   "<mesh stem>.one2345/ next to each mesh.")
    g.add_argument("images", nargs="*", help="input image(s): PNG, JPEG, WebP, TIFF… (RGBA is used as the mask)")
    g.add_argument("--prompt", default=None, help="make the input image from this text instead (one object; needs "
                                                  "-o). The text-to-image model is fetched on first use")
    g.add_argument("--negative-prompt", default=None, help="with --prompt: what the image must not show (default: "
                                                           "cropped, cluttered, several objects…)")
    g.add_argument("--count", type=int, default=1, help="with --prompt: candidates to make (1–8, default 1); all "
                                                        "are kept in the run folder's candidates/")
    g.add_argument("--pick", type=int, default=0, help="with --prompt: which candidate becomes the mesh (0-based, "
                                                       "default 0)")
    g.add_argument("-o", "--output", help="output mesh for a single image (.glb, .ply or .obj)")
    g.add_argument("--out-dir", help="folder for the meshes of several images (<stem>.<format> each)")
    g.add_argument("--preset", choices=["paper", "tiny"], default="paper",
                   help="paper: official weights (fetched on first use); tiny: small random models, no weights")
    g.add_argument("--elevation", type=float, default=None,
                   help="degrees above the horizon of the input view (default: estimated)")
    g.add_argument("--seed", type=int, default=None, help="seed for all diffusion noise (default: random, recorded "
                                                          "in meta.json)")
    g.add_argument("--steps-stage1", type=int, default=75, help="DDIM steps of the 8 ring views (default 75)")
    g.add_argument("--steps-stage2", type=int, default=50, help="DDIM steps of the 32 nearby views (default 50)")
    g.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (default 3)")
    g.add_argument("--resolution", type=int, default=256, help="marching-cubes grid per axis (default 256)")
    g.add_argument("--format", choices=["glb", "ply", "obj"], default="glb",
                   help="mesh format with --out-dir (with -o the suffix decides)")
    g.add_argument("--keep-background", action="store_true",
                   help="do not segment the object: use the whole image (RGBA alpha is still used)")
    _add_asset_options(g)
    _add_device(g)
    _add_weights_dir(g)
    g.add_argument("--offline", action="store_true", help="never download weights; fail clearly if any is missing")
    g.add_argument("--low-vram", action="store_true",
                   help="keep the models in CPU memory and move each to the GPU only for its stage (for GPUs with "
                        "little memory; slower, same result)")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("elevation", help="estimate the polar angle from the four nearby views of view 0",
                       description="Print a JSON line {polar, elevation, matcher, confidence, uncertain, inliers, "
                                   "source, note}: the views are ordered as spec §4 (polar −10, polar +10, azimuth "
                                   "−10, azimuth +10 around the input view). The most confident fit is kept; "
                                   "when even it is not confident, uncertain is true (set the elevation by hand if "
                                   "the mesh looks wrong). Only when no fit is possible at all is the reference's "
                                   "polar 90 printed, with source 'fallback'.")
    e.add_argument("views", nargs=4, help="the four nearby views 0_0.png 0_1.png 0_2.png 0_3.png")
    e.add_argument("--matcher", choices=["auto", "loftr", "flow", "sift"], default="auto",
                   help="auto: every available matcher pooled (LoFTR when its weights are present, dense flow, "
                        "SIFT), then each alone; loftr: LoFTR or a clear error; flow; sift")
    _add_weights_dir(e)
    e.set_defaults(func=cmd_elevation)

    t = sub.add_parser("imagine", help="text → candidate images of one object (pick one for `generate`)",
                       description="Make COUNT candidate images of one whole object on a plain background with the "
                                   "text-to-image model (LCM-Dreamshaper-v7; fetched on first use, 4.3 GB), "
                                   "write them as OUT_DIR/<i>.png with candidates.json (each image's prompt, model, "
                                   "seed and index). Candidate i comes from seed SEED + i alone.")
    t.add_argument("prompt", help="the object, e.g. \"a rusty fire hydrant\" (the template adds: whole, centred, "
                                  "plain background, soft light)")
    t.add_argument("--count", type=int, default=4, help="how many candidates (1–8, default 4)")
    t.add_argument("--out-dir", required=True, help="folder for the candidates (created)")
    t.add_argument("--seed", type=int, default=None, help="seed of candidate 0 (default: random, recorded)")
    t.add_argument("--negative-prompt", default=None, help="what the images must not show (default: cropped, "
                                                           "cluttered, several objects…)")
    t.add_argument("--preset", choices=["paper", "tiny"], default="paper",
                   help="paper: LCM-Dreamshaper-v7 (fetched on first use); tiny: a small random model, no weights")
    _add_device(t)
    _add_weights_dir(t)
    t.add_argument("--offline", action="store_true", help="never download weights; fail clearly if any is missing")
    t.add_argument("--low-vram", action="store_true", help="move each part of the model to the GPU only for its "
                                                           "step (for GPUs with little memory)")
    t.set_defaults(func=cmd_imagine)

    add_serve_parser(sub)

    b = sub.add_parser("bake", help="bake a finished run's views onto your own mesh (a retopology with its UVs)",
                       description="Colour a mesh of your own from the 40 posed views of a finished run, without any "
                                   "network: a texture baked onto the mesh's own UVs when it has usable ones (else a "
                                   "fresh unwrap), or vertex colours. The mesh must be in the run's frame (PLY: the "
                                   "z-up pose.json world; GLB/OBJ: the same y-up files `generate` writes). The "
                                   "geometry is kept as it is; a record goes to OUT_STEM.meta.json beside -o.")
    b.add_argument("run_dir", help="the run's folder (<mesh stem>.one2345/) or a server job's folder")
    b.add_argument("mesh", help="the mesh to colour: .glb, .obj (polygons are triangulated) or .ply")
    b.add_argument("-o", "--output", required=True,
                   help="output: .glb or .obj (textured; an OBJ also writes .mtl and _texture.png) or .ply (vertex "
                        "colours)")
    b.add_argument("--texture", type=int, default=None, metavar="SIZE",
                   help="texture side, 256…4096 (default 1024)")
    b.add_argument("--no-keep-uvs", dest="keep_uvs", action="store_false",
                   help="unwrap afresh even when the mesh has usable UVs")
    b.add_argument("--vertex-colors", action="store_true",
                   help="colour the vertices instead of baking a texture (always so for a .ply)")
    b.set_defaults(func=cmd_bake)

    s = sub.add_parser("sample-views", help="write a synthetic views folder (pose.json + 40 views: the 8 stage-1 "
                                            "views and their 32 nearby views) to try `reconstruct` without running "
                                            "the diffusion model")
    s.add_argument("out_dir", help="folder to create")
    s.add_argument("--polar", type=float, default=75.0, help="polar angle of the input view in degrees (default 75)")
    s.set_defaults(func=cmd_sample_views)
    return parser


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM ends a command the way Ctrl+C does (its clean-up runs); `serve` installs its own handlers.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        return args.func(args)
    except One2345Error as e:
        print(f"one2345 {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT if e.kind == "bad_input" else EXIT_FAILED
    except OSError as e:  # the machine, not the input: a full disk, a permission, a vanished file
        where = f": {e.filename}" if e.filename else ""
        print(f"one2345 {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return EXIT_FAILED
    except _Terminated:
        print(f"one2345 {args.command}: terminated (SIGTERM); nothing of the unfinished work was kept", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print(f"one2345 {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
