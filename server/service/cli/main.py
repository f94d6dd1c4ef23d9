"""The parser of every subcommand and :func:`main`, which turns errors into a message and an exit code."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from server import __version__
from server.common.errors import One2345Error
from server.service.cli.commands import (
    cmd_bake,
    cmd_elevation,
    cmd_generate,
    cmd_imagine,
    cmd_reconstruct,
    cmd_remesh,
    cmd_sample_views,
)
from server.service.cli.common import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated
from server.service.cli.weights import (
    cmd_weights_download,
    cmd_weights_import,
    cmd_weights_list,
    cmd_weights_prepare,
    cmd_weights_verify,
)
from server.service.serve import add_serve_parser


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
    raise Terminated()


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
    except Terminated:
        print(f"one2345 {args.command}: terminated (SIGTERM); nothing of the unfinished work was kept", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print(f"one2345 {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

