"""``one2345-train predict``: Zero123's predictions of every object's 32 nearby views, cached next to the renders.

The reference trains on Zero123 predictions of the nearby views with ground-truth poses (spec §6, paper): for each
GT target ``view_{k}.png`` (composited on white, snapped as the pipeline's stage 2 input), Zero123 predicts the four
views at (Δpolar, Δazimuth) = (−10, 0), (+10, 0), (0, −10), (0, +10) — exactly the poses of the GT
``view_{k}_{j}_10.png`` — and writes them to ``<object>/zero123/view_{k}_{j}_10.png`` (RGB on white, resized to the
renders' size). The folder is filled under a temporary name and renamed, so an interrupted run never leaves a partial
cache; finished objects are skipped unless ``--overwrite``.

Batching: ``--batch-objects N`` puts the targets of N objects into one sampler run (N × 8 conditioning images × 4
views = 32N UNet rows, doubled for guidance), ``--batch`` target images per call at most (default all of them), so a
large GPU works on several objects at once. The noise of a sampler call derives from (seed, first object's uid,
position), so a rerun with the same objects and settings reproduces every image; a different grouping draws other
(equally valid) noise. The run ends with its throughput in target images (and predicted views) per second.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from server.common.cameras import NEARBY_DELTAS
from server.common.errors import BadInputError
from server.common.views import read_rgb
from training.data import NUM_NEARBY, NUM_TARGETS, PREDICTION_DIR, find_objects, nearby_name
from training.data import target_name as target_file
from training.render.layout import require_full_views

log = logging.getLogger(__name__)

ZERO123_SIZE = 256


def load_target(path: Path) -> np.ndarray:
    """A GT target as Zero123's conditioning: [256, 256, 3] uint8 on white (resized if rendered at another size)."""
    rgb = read_rgb(path)
    if rgb.shape[:2] != (ZERO123_SIZE, ZERO123_SIZE):
        rgb = np.asarray(Image.fromarray(rgb).resize((ZERO123_SIZE, ZERO123_SIZE), Image.Resampling.BICUBIC))
    return rgb


def predict_object(model, folder: Path, steps: int, guidance: float, seed: int, batch: int = 8,
                   overwrite: bool = False) -> bool:
    """Predict and cache one object's 32 nearby views. Returns False when the cache existed and was kept.

    Args:
        model: a :class:`server.stages.multiview.zero123.Zero123Model`.
        folder: the object's folder.
        steps: DDIM steps setting (the pipeline's stage 2 uses 50).
        guidance: classifier-free guidance scale (3).
        seed: base seed; each object draws from (seed, uid) so reruns reproduce it.
        batch: conditioning images per sampler call (each brings 4 views).
    """
    if (folder / PREDICTION_DIR).is_dir() and not overwrite:
        return False
    predict_objects(model, [folder], steps, guidance, seed, batch)
    return True


def object_seed(seed: int, folder: Path) -> int:
    """The noise seed of an object: a function of (seed, uid), so reruns reproduce it."""
    return (seed * 1_000_003 + int.from_bytes(folder.name.encode()[:8].ljust(8, b"\0"), "little")) % 2**63


def predict_objects(model, folders: Sequence[Path], steps: int, guidance: float, seed: int,
                    batch: int | None = None, unet=None) -> None:
    """Predict and cache the 32 nearby views of every object in ``folders`` (overwriting), their targets batched.

    The 8·len(folders) targets, object-major, go through the sampler ``batch`` at a time (None: all at once); call
    c starts at target ``start`` and draws its noise from ``object_seed(first object) + start``, which for one object
    is exactly :func:`predict_object`'s per-object seeding.

    Args:
        model: a :class:`server.stages.multiview.zero123.Zero123Model`.
        folders: the objects' folders.
        steps, guidance, seed: as :func:`predict_object`.
        batch: conditioning images per sampler call (each brings 4 views).
        unet: what evaluates ε (None: the model; a :class:`server.stages.multiview.graphs.UNetGraphs` replays CUDA
        graphs).
    """
    from server.stages.multiview.zero123 import generate_views_batch, prepare_stage2_input

    if not folders:
        return
    for folder in folders:
        require_full_views(folder)  # an elevation-only render has no targets 1–7 to predict from
    jobs = [(folder, k) for folder in folders for k in range(NUM_TARGETS)]
    batch = batch or len(jobs)
    tmps, sizes = {}, {}
    for folder in folders:
        tmps[folder] = folder / f".{PREDICTION_DIR}.tmp"
        shutil.rmtree(tmps[folder], ignore_errors=True)
        tmps[folder].mkdir()
        with Image.open(folder / nearby_name(0, 0)) as im:
            sizes[folder] = im.size  # stored at the renders' size, so GT and predicted sources are interchangeable
    base_seed = object_seed(seed, folders[0])
    for start in range(0, len(jobs), batch):
        chunk = jobs[start: start + batch]
        targets = [prepare_stage2_input(load_target(folder / target_file(k))) for folder, k in chunk]
        views = generate_views_batch(model, targets, [list(NEARBY_DELTAS)] * len(chunk), num_steps=steps,
                                     guidance=guidance, seed=(base_seed + start) % 2**63, unet=unet)
        for (folder, k), images in zip(chunk, views, strict=True):
            for j in range(NUM_NEARBY):
                image = Image.fromarray(images[j])
                if image.size != sizes[folder]:
                    image = image.resize(sizes[folder], Image.Resampling.LANCZOS)
                image.save(tmps[folder] / nearby_name(k, j))
    for folder in folders:
        final = folder / PREDICTION_DIR
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmps[folder], final)


def run_predict(args: argparse.Namespace) -> int:
    import torch

    from server.stages.multiview.checkpoint import load_zero123, tiny_zero123

    objects = find_objects(args.data)
    if args.shard:
        index, count = (int(x) for x in args.shard.split("/"))
        if not 0 <= index < count:
            raise BadInputError(f"--shard {args.shard}: need INDEX/COUNT with 0 <= INDEX < COUNT")
        objects = objects[index::count]
    objects = objects[: args.limit] if args.limit else objects
    if args.batch_objects < 1:
        raise BadInputError(f"--batch-objects {args.batch_objects}: need at least 1 object per sampler run")
    if args.batch is not None and args.batch < 1:
        raise BadInputError(f"--batch {args.batch}: need at least 1 target image per sampler call")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    if args.tiny:
        model = tiny_zero123(seed=0).to(device)
    elif args.random_paper:
        from server.benchmarks.pipeline import random_paper_zero123

        model = random_paper_zero123().to(device=device, dtype=dtype)
    else:
        if args.zero123 is None:
            raise BadInputError("give --zero123 DIR (a converted diffusers-format Zero123 folder with unet/, vae/, "
                                "image_encoder/, cc_projection/), or --tiny / --random-paper for a random model")
        model = load_zero123(args.zero123, device, dtype)
    unet = None
    if device.startswith("cuda") and args.cuda_graphs:  # the pipeline's UNet speed-up (#11); one graph per batch
        from server.stages.multiview.graphs import UNetGraphs

        unet = UNetGraphs(model)
    todo = [f for f in objects if args.overwrite or not (f / PREDICTION_DIR).is_dir()]
    # --batch defaults to the whole group; with one object per group that is the 8 targets, as before.
    batch = args.batch or NUM_TARGETS * args.batch_objects
    start = time.perf_counter()
    for first in range(0, len(todo), args.batch_objects):
        group = todo[first: first + args.batch_objects]
        predict_objects(model, group, args.steps, args.guidance, args.seed, batch, unet)
        log.info("%d/%d %s", first + len(group), len(todo), ", ".join(f.name for f in group))
    seconds = time.perf_counter() - start
    targets = NUM_TARGETS * len(todo)
    rate = (f"; {targets} target images ({NUM_NEARBY * targets} views) in {seconds:.1f} s: "
            f"{targets / seconds:.2f} target images/s, {NUM_NEARBY * targets / seconds:.2f} views/s" if todo else "")
    print(f"predicted {len(todo)} object(s), {len(objects) - len(todo)} already cached{rate}")
    return 0


def add_predict_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``predict``."""
    p = subparsers.add_parser(
        "predict", help="cache Zero123's predictions of the 32 nearby views of every rendered object",
        description="For each object's 8 GT targets, predict the 4 nearby views (±10° polar, ±10° azimuth) with "
                    "Zero123 and cache them in <object>/zero123/ (the sources of `fit` with --prediction-ratio > 0).")
    p.add_argument("--data", required=True, help="render root of `one2345-train render`")
    p.add_argument("--zero123", type=Path, help="converted Zero123 folder (as `one2345 weights download` leaves it)")
    p.add_argument("--tiny", action="store_true", help="use a tiny random Zero123 (tests; meaningless images)")
    p.add_argument("--random-paper", action="store_true",
                   help="use Zero123-XL's architecture with random weights (throughput without the weights; "
                        "meaningless images)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps setting (default 50, as the pipeline's stage 2)")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (default 3)")
    p.add_argument("--batch", type=int,
                   help="target images per sampler call, 4 views each (default: all of a group, 8 × --batch-objects)")
    p.add_argument("--batch-objects", type=int, default=1,
                   help="objects whose targets share sampler calls (default 1; a big GPU takes several)")
    p.add_argument("--seed", type=int, default=0, help="base seed; each object's noise derives from it and its uid")
    p.add_argument("--shard", help="INDEX/COUNT: only every COUNT-th object starting at INDEX (parallel workers)")
    p.add_argument("--limit", type=int, default=0, help="at most this many objects (0 = all)")
    p.add_argument("--overwrite", action="store_true", help="recompute objects that already have predictions")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="on CUDA, run the UNet eagerly instead of replaying CUDA graphs")
    p.set_defaults(handler=run_predict, func=run_predict)
    return p
