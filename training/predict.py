"""``one2345-train predict``: Zero123's predictions of every object's 32 nearby views, cached next to the renders.

The reference trains on Zero123 predictions of the nearby views with ground-truth poses (spec §6, paper): for each
GT target ``view_{k}.png`` (composited on white, snapped as the pipeline's stage 2 input), Zero123 predicts the four
views at (Δpolar, Δazimuth) = (−10, 0), (+10, 0), (0, −10), (0, +10) — exactly the poses of the GT
``view_{k}_{j}_10.png`` — and writes them to ``<object>/zero123/view_{k}_{j}_10.png`` (RGB on white, resized to the
renders' size). The folder is filled under a temporary name and renamed, so an interrupted run never leaves a partial
cache; finished objects are skipped unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from server.cameras import NEARBY_DELTAS
from server.errors import BadInputError
from server.reconstruct import read_rgb
from training.data import NUM_NEARBY, NUM_TARGETS, PREDICTION_DIR, find_objects, nearby_name
from training.data import target_name as target_file

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
        model: a :class:`server.multiview.zero123.Zero123Model`.
        folder: the object's folder.
        steps: DDIM steps setting (the pipeline's stage 2 uses 50).
        guidance: classifier-free guidance scale (3).
        seed: base seed; each object draws from (seed, uid) so reruns reproduce it.
        batch: conditioning images per sampler call (each brings 4 views).
    """
    from server.multiview.zero123 import generate_views_batch, prepare_stage2_input

    final = folder / PREDICTION_DIR
    if final.is_dir() and not overwrite:
        return False
    tmp = folder / f".{PREDICTION_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    targets = [prepare_stage2_input(load_target(folder / target_file(k))) for k in range(NUM_TARGETS)]
    with Image.open(folder / nearby_name(0, 0)) as im:
        size = im.size  # predictions are stored at the renders' size, so GT and predicted sources are interchangeable
    object_seed = (seed * 1_000_003 + int.from_bytes(folder.name.encode()[:8].ljust(8, b"\0"), "little")) % 2**63
    for start in range(0, NUM_TARGETS, batch):
        chunk = list(range(start, min(start + batch, NUM_TARGETS)))
        views = generate_views_batch(model, [targets[k] for k in chunk], [list(NEARBY_DELTAS)] * len(chunk),
                                     num_steps=steps, guidance=guidance, seed=(object_seed + start) % 2**63)
        for k, images in zip(chunk, views, strict=True):
            for j in range(NUM_NEARBY):
                image = Image.fromarray(images[j])
                if image.size != size:
                    image = image.resize(size, Image.Resampling.LANCZOS)
                image.save(tmp / nearby_name(k, j))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return True


def run_predict(args: argparse.Namespace) -> int:
    import torch

    from server.multiview.zero123 import load_zero123, tiny_zero123

    objects = find_objects(args.data)
    if args.shard:
        index, count = (int(x) for x in args.shard.split("/"))
        if not 0 <= index < count:
            raise BadInputError(f"--shard {args.shard}: need INDEX/COUNT with 0 <= INDEX < COUNT")
        objects = objects[index::count]
    objects = objects[: args.limit] if args.limit else objects
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        model = tiny_zero123(seed=0).to(device)
    else:
        if args.zero123 is None:
            raise BadInputError("give --zero123 DIR (a converted diffusers-format Zero123 folder with unet/, vae/, "
                                "image_encoder/, cc_projection/) or --tiny for a random test model")
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        model = load_zero123(args.zero123, device, dtype)
    done = 0
    for n, folder in enumerate(objects):
        if predict_object(model, folder, args.steps, args.guidance, args.seed, args.batch, args.overwrite):
            done += 1
        log.info("%d/%d %s", n + 1, len(objects), folder.name)
    print(f"predicted {done} object(s), {len(objects) - done} already cached")
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
    p.add_argument("--steps", type=int, default=50, help="DDIM steps setting (default 50, as the pipeline's stage 2)")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (default 3)")
    p.add_argument("--batch", type=int, default=8, help="target images per sampler call, 4 views each (default 8)")
    p.add_argument("--seed", type=int, default=0, help="base seed; each object's noise derives from it and its uid")
    p.add_argument("--shard", help="INDEX/COUNT: only every COUNT-th object starting at INDEX (parallel workers)")
    p.add_argument("--limit", type=int, default=0, help="at most this many objects (0 = all)")
    p.add_argument("--overwrite", action="store_true", help="recompute objects that already have predictions")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.set_defaults(handler=run_predict, func=run_predict)
    return p
