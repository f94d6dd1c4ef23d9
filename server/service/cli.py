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
import sys
import time
from pathlib import Path

from server import __version__
from server.common.devices import resolve_device
from server.common.errors import BadInputError, CheckpointError, MissingWeightsError, One2345Error
from server.common.fsutil import check_folder_path, check_output_file
from server.service.serve import add_serve_parser

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


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
    from server.stages.meshing import MeshingConfig

    if not 32 <= args.resolution <= 1024:
        raise BadInputError(f"--resolution {args.resolution} is outside 32…1024 (the reference uses 256)")
    return MeshSettings(resolution=args.resolution, target_faces=args.faces, texture_size=args.texture,
                        meshing=MeshingConfig(coarse_to_fine=not args.dense))


def _mesh_from_views(args: argparse.Namespace, views_dir: Path) -> int:
    """reconstruct and remesh: one views folder → the mesh at -o, with the asset options."""
    from server.common.views import load_views
    from server.pipeline.remesh import mesh_views

    out = check_output_file(args.output)
    settings = _mesh_settings(args).check(out.suffix)
    device = resolve_device(args.device)
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
    import json

    from server.pipeline.remesh import find_run

    run = find_run(args.run_dir)
    # Unless told otherwise, the network and resolution the run was made with (from its meta.json, if any).
    try:
        meta = json.loads((run / "meta.json").read_text(encoding="utf-8"))
        meta = meta if isinstance(meta, dict) else {}
    except (OSError, ValueError):
        meta = {}
    options = meta.get("options") if isinstance(meta.get("options"), dict) else {}
    if args.resolution is None:
        resolution = options.get("resolution")
        args.resolution = resolution if isinstance(resolution, int) and not isinstance(resolution, bool) else 256
    if args.preset is None and not args.checkpoint:
        args.preset = meta.get("preset") if meta.get("preset") in ("paper", "tiny") else "paper"
        print(f"re-meshing {run} with the {args.preset} reconstruction network at resolution {args.resolution}",
              file=sys.stderr)
    return _mesh_from_views(args, run / "views")


def cmd_weights_verify(args: argparse.Namespace) -> int:
    from server.stages.reconstruction.checkpoint import verify_checkpoint

    if not Path(args.file).exists():
        raise BadInputError(f"checkpoint {args.file} does not exist")
    result = verify_checkpoint(args.file)
    if result.ok:
        print(f"OK: {result.path} is a {result.kind}: {result.details}")
        return 0
    if result.report is None:  # not a checkpoint at all: bad input (2), unlike a checkpoint with wrong keys (1)
        raise BadInputError(f"{result.path} is not a reconstruction checkpoint: {result.details}")
    print(f"FAILED: {result.path} ({result.kind}):\n{result.details}", file=sys.stderr)
    return EXIT_FAILED


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


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from server.pipeline import GenerateOptions, One2345Pipeline
    from server.stages.preprocess import load_image

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
    resolve_device(args.device)
    # Every image is read once now, so a bad one in a batch is reported before minutes of work on the others.
    unusable = []
    for image in args.images:
        try:
            load_image(image)
        except BadInputError as e:
            unusable.append(e.message)
    if unusable:
        raise BadInputError(f"{len(unusable)} of {len(args.images)} input image(s) cannot be used:\n  " +
                            "\n  ".join(unusable), fix="fix or leave out those images; nothing was generated")

    print(f"loading the {args.preset} models…", file=sys.stderr)
    pipe = One2345Pipeline.from_preset(args.preset, device=args.device, weights_dir=args.weights_dir,
                                       download_missing=not args.offline, low_vram=args.low_vram)
    failures = 0
    for image in args.images:
        out = Path(args.output) if args.output else Path(args.out_dir) / f"{Path(image).stem}.{fmt}"
        bar = tqdm(total=1000, desc=Path(image).name, file=sys.stderr, dynamic_ncols=True,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix} [{elapsed}<{remaining}]")

        def on_progress(p, bar=bar) -> None:
            bar.update(int(p.fraction * 1000) - bar.n)
            bar.set_postfix_str(f"{p.stage} {p.step}/{p.total}", refresh=False)

        try:
            result = pipe(image, _run_dir_for(out), options, progress=on_progress, outputs=[out])
        except One2345Error as e:
            bar.close()
            print(f"one2345 generate: {image}: error: {e}", file=sys.stderr)
            failures += 1
            continue
        bar.close()
        print(f"{image}: elevation {result.elevation:.0f}° ({result.elevation_source}), background "
              f"{result.background}, {result.vertices:,} vertices; intermediates in {result.views_dir.parent}",
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
    paths = download(args.only or None, args.dir, offline=args.offline)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def cmd_weights_list(args: argparse.Namespace) -> int:
    """``one2345 weights list``: every weight file's state (what the server's GET /v1/weights lists)."""
    import json

    from server.common.weights import _human_size, default_weights_dir, inspect_weights, missing_bytes

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
    print(f"weights folder: {folder}; " + (f"~{_human_size(left)} still to download (one2345 weights download)"
                                           if left else "every file is present"))
    return 0


def cmd_elevation(args: argparse.Namespace) -> int:
    import json

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
    v.add_argument("file", help="checkpoint file or folder")
    v.set_defaults(func=cmd_weights_verify)

    d = w.add_parser("download", help="fetch the reference's weight files (resumable) into the weights folder")
    d.add_argument("--only", action="append", choices=["sam", "zero123-xl", "loftr", "reconstruction"],
                   help="fetch only this file (repeatable); default: all four")
    _add_weights_dir(d, "--dir")
    d.add_argument("--offline", action="store_true", help="never touch the network: only report what is missing")
    d.set_defaults(func=cmd_weights_download)

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
    g.add_argument("images", nargs="+", help="input image(s): PNG, JPEG, WebP, TIFF… (RGBA is used as the mask)")
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
                                   "−10, azimuth +10 around the input view). When no fit is confident the "
                                   "reference's polar 90 is printed with source 'fallback' and uncertain true.")
    e.add_argument("views", nargs=4, help="the four nearby views 0_0.png 0_1.png 0_2.png 0_3.png")
    e.add_argument("--matcher", choices=["auto", "loftr", "flow", "sift"], default="auto",
                   help="auto: every available matcher pooled (LoFTR when its weights are present, dense flow, "
                        "SIFT), then each alone; loftr: LoFTR or a clear error; flow; sift")
    _add_weights_dir(e)
    e.set_defaults(func=cmd_elevation)

    add_serve_parser(sub)

    s = sub.add_parser("sample-views", help="write a synthetic views folder (pose.json + 32 views) to try "
                                            "`reconstruct` without running the diffusion model")
    s.add_argument("out_dir", help="folder to create")
    s.add_argument("--polar", type=float, default=75.0, help="polar angle of the input view in degrees (default 75)")
    s.set_defaults(func=cmd_sample_views)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except One2345Error as e:
        print(f"one2345 {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT if e.kind == "bad_input" else EXIT_FAILED
    except OSError as e:  # the machine, not the input: a full disk, a permission, a vanished file
        where = f": {e.filename}" if e.filename else ""
        print(f"one2345 {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"one2345 {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
