"""The subcommands that make or read meshes: generate (from images or a prompt), imagine, reconstruct, remesh, bake,
elevation and sample-views."""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

from server.common.devices import resolve_device
from server.common.errors import BadInputError, CheckpointError, MissingWeightsError, One2345Error
from server.common.fsutil import check_folder_path, check_output_file, replace_dir
from server.service.cli.common import EXIT_FAILED, Bars, check_path


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


def _mesh_from_views(args: argparse.Namespace, views_dir: Path) -> int:
    """reconstruct and remesh: one views folder → the mesh at -o, with the asset options."""
    out = check_output_file(args.output)
    settings = _mesh_settings(args).check(out.suffix)
    check_path(views_dir, "views folder", folder=True)
    if args.checkpoint:
        check_path(args.checkpoint, "--checkpoint", folder=False)
    device = resolve_device(args.device)  # the first import of torch
    from server.common.views import load_views
    from server.pipeline.remesh import mesh_views

    start = time.perf_counter()
    load_views(views_dir)  # a broken folder is reported before the model loads
    model = _load_model(args)
    result = mesh_views(model, views_dir, [out], settings, device=device, progress=Bars(),
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

    check_path(args.mesh, "mesh file", folder=False)
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
    from server.pipeline.loading import loading_observer, progress_lines
    from server.pipeline.models import host_memory_warning

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
