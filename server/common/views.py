"""A views folder, read and checked: ``pose.json`` plus the 32 nearby views ``<i>_<j>.png`` (spec §1.3, §3.3).

This is the format the pipeline writes, the reconstruction reads and the asset stage bakes from; the stage-1 images
such as ``0.png`` may sit beside the nearby views; only the pose of ``0.png`` is needed, as the reference frame.

Pixel convention of the views and of pose.json's intrinsics: pixel (row i, column j) covers [j, j + 1] × [i, i + 1]
in pixel units and is centred at (j + 0.5, i + 0.5), so a centred camera has its principal point at (W/2, H/2) (128
for the 256² views) — Zero123's and Blender's renders. The asset stage samples the views in exactly this convention
(:mod:`server.stages.asset.raster`: a point projecting to (j + 0.5, i + 0.5) reads pixel (i, j)). The
reconstruction's colour blending (:mod:`server.stages.reconstruction.rendering_network`) keeps the reference code's
``grid_sample(align_corners=True)`` sampling, which puts pixel centres at integers: it reads the same views half a
pixel up and left of the bake, faithful to the trained weights rather than to the geometry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from server.common.cameras import PoseFile, ReconstructionCameras, normalise_cameras
from server.common.errors import BadInputError

NUM_SOURCE_VIEWS = 32
REFERENCE_ID = "0.png"
_NEARBY_ID = re.compile(r"^\d+_[0-3]\.png$")

MAX_VIEW_PIXELS = 16_000_000
"""Largest view accepted (16 MP, far above the 256² views the pipeline writes): the size is read from the header, so
an oversized or bomb file is refused before it is decoded."""


def read_rgb(path: Path) -> np.ndarray:
    """Any image Pillow reads → uint8 [H, W, 3]; transparency is composited on white (as the reference does).

    Raises:
        BadInputError: missing, a folder, not an image, truncated or corrupt, or over :data:`MAX_VIEW_PIXELS`.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"view {path} does not exist or is not a file")
    try:
        with Image.open(path) as im:
            width, height = im.size
            if width * height > MAX_VIEW_PIXELS:
                raise BadInputError(f"{path} is {width}×{height} px; views may have at most "
                                    f"{MAX_VIEW_PIXELS / 1e6:g} MP (the pipeline writes 256×256)")
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, im)
            elif im.mode in ("I;16", "I;16B", "I;16L", "I"):
                im = Image.fromarray((np.asarray(im, dtype=np.float64) / 257.0).round().clip(0, 255).astype(np.uint8))
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except UnidentifiedImageError:
        raise BadInputError(f"{path} is not a readable image (no image format Pillow knows)") from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise BadInputError(f"{path} is not a readable image ({e})") from None


@dataclass
class ViewSet:
    """The reconstruction's input, checked and in tensors."""

    ids: list[str]
    images: torch.Tensor
    """[V, 3, H, W] float32 in [0, 1]."""
    cameras: ReconstructionCameras


def load_views(views_dir: str | Path, arrays: dict[str, np.ndarray] | None = None) -> ViewSet:
    """Read and check ``pose.json`` and the 32 nearby views of a folder.

    Args:
        views_dir: the folder.
        arrays: views already in memory, by file name (e.g. ``"3_1.png"``: [H, W, 3] uint8, exactly what is being
            written there); those files need not exist yet. The pipeline passes the views it is still writing.
    """
    arrays = arrays or {}
    views_dir = Path(views_dir)
    if not views_dir.is_dir():
        raise BadInputError(f"views folder {views_dir} does not exist or is not a folder")
    pose_path = views_dir / "pose.json"
    if not pose_path.is_file():
        raise BadInputError(f"{views_dir} has no pose.json; a views folder holds pose.json and the 32 nearby views "
                            "<i>_<j>.png written by `one2345 generate`")
    poses = PoseFile.read(pose_path)
    ids = [i for i in poses.c2ws if _NEARBY_ID.match(i)]
    if len(ids) != NUM_SOURCE_VIEWS:
        raise BadInputError(f"{pose_path} lists {len(ids)} nearby views (<i>_<j>.png), the reconstruction needs "
                            f"exactly {NUM_SOURCE_VIEWS}: {ids[:8]}{'…' if len(ids) > 8 else ''}")
    poses.require([REFERENCE_ID])
    missing = [i for i in ids if i not in arrays and not (views_dir / i).is_file()]
    if missing:
        raise BadInputError(f"{views_dir} lacks {len(missing)} of the images pose.json lists: {missing[:8]}")
    images = [arrays[i] if i in arrays else read_rgb(views_dir / i) for i in ids]
    sizes = sorted({a.shape[:2] for a in images})
    if len(sizes) > 1:
        raise BadInputError(f"the views in {views_dir} have different sizes {[(w, h) for h, w in sizes]}; all must "
                            "share one size")
    height, width = sizes[0]
    if height % 4 or width % 4:
        raise BadInputError(f"view size {width}×{height} must be divisible by 4 (256×256 is the reference's)")
    cx, cy = poses.intrinsics[0, 2], poses.intrinsics[1, 2]
    if abs(cx - width / 2) > 2 or abs(cy - height / 2) > 2:
        raise BadInputError(f"pose.json's principal point ({cx:g}, {cy:g}) does not fit {width}×{height} images "
                            f"(expected about ({width / 2:g}, {height / 2:g})); were the images resized?")
    cameras = normalise_cameras(poses, ids, REFERENCE_ID, (height, width))
    tensor = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return ViewSet(ids=ids, images=tensor, cameras=cameras)
