"""The reconstruction stage: a folder of 32 posed views → a vertex-coloured mesh in the pose.json world frame.

Input layout (what the pipeline writes, spec §1.3 and §3.3): ``pose.json`` plus the 32 nearby views
``<i>_<j>.png`` (the stage-1 images such as ``0.png`` may sit beside them; only the pose of ``0.png`` is needed, as the
reference frame).

Output frame: z-up, object at the origin, the input camera at azimuth 30° and radius 1.2 (spec §3.5). Vertex colours
are rounded to uint8 rather than truncated as the reference does (truncation darkens every colour by half a level
on average, and turns a flat 200 into 199).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from server.cameras import PoseFile, ReconstructionCameras, normalise_cameras
from server.errors import BadInputError
from server.meshing import Mesh, MeshingConfig, extract_surface, sample_sdf_volume
from server.reconstruction.model import ReconstructionModel
from server.reconstruction.rendering_network import blend_vertex_colors

NUM_SOURCE_VIEWS = 32
REFERENCE_ID = "0.png"
_NEARBY_ID = re.compile(r"^\d+_[0-3]\.png$")

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total): called as work advances; stages are named as in :func:`reconstruct_mesh`."""

STAGE_COST: dict[str, dict[str, float]] = {
    # Shares of the reconstruction's time per stage, from `python -m server.benchmarks.reconstruct --preset paper
    # --resolution 256`: 2 CPU cores (22.0 s in all) and one H200 (1.13 s in all; features + volume ≈ 0.05 s).
    "cpu": {"features": 1.4, "volume": 4.9, "sdf": 3.9, "marching_cubes": 0.5, "colors": 11.3},
    "cuda": {"features": 0.02, "volume": 0.03, "sdf": 0.39, "marching_cubes": 0.62, "colors": 0.07},
}
"""Relative cost of each stage of :func:`reconstruct_mesh` by device type, so progress moves in proportion to time."""


def reconstruction_fraction(stage: str, done: int, total: int, device: str | torch.device) -> float:
    """How much of the reconstruction is done when ``stage`` reports ``done`` of ``total`` (stages run in the order
    of :data:`STAGE_COST`; all earlier ones are complete). Returns a value in [0, 1]."""
    costs = STAGE_COST["cuda" if torch.device(device).type == "cuda" else "cpu"]
    names = list(costs)
    before = sum(costs[n] for n in names[: names.index(stage)])
    part = costs[stage] * min(max(done / total, 0.0), 1.0) if total > 0 else 0.0
    return (before + part) / sum(costs.values())


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


@dataclass
class ReconstructionOutput:
    mesh: Mesh
    """Vertex-coloured mesh in the pose.json world frame."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage."""


@torch.no_grad()
def reconstruct_mesh(
    model: ReconstructionModel,
    views: ViewSet,
    meshing: MeshingConfig | None = None,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> ReconstructionOutput:
    """Views → mesh, in numbered stages (spec §5.3–§5.8)."""
    meshing = meshing or MeshingConfig()
    model = model.to(device)
    cams = views.cameras
    images = views.images.to(device)
    proj = torch.as_tensor(cams.proj, dtype=torch.float32, device=device)
    centres = torch.as_tensor(cams.centres, dtype=torch.float32, device=device)
    sdf_net = model.sdf_network_lod0
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        if device != "cpu" and torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        timings[stage] = now - clock
        clock = now
        if progress:
            progress(stage, 1, 1)

    # 1. Fused 2D features of every source view.
    fused = model.pyramid_feature_network.fused(images)
    lap("features")
    # 2. Cost volume → sparse 3D CNN → latent volume.
    volume = sdf_net.conditional_volume(fused, proj)
    lap("volume")
    # 3. SDF on the meshing grid (coarse to fine).
    grid = sample_sdf_volume(lambda p: sdf_net.sdf(p, volume), meshing, device=device,
                             progress=(lambda d, t: progress("sdf", d, t)) if progress else None)
    lap("sdf")
    # 4. Marching cubes on −SDF, where the grid is.
    vertices, faces = extract_surface(grid)
    lap("marching_cubes")
    # 5. Vertex colours blended from the source views.
    colors = blend_vertex_colors(model.rendering_network_lod0, lambda p: sdf_net.gradient(p, volume), volume, fused,
                                 images, proj, centres, torch.as_tensor(vertices, device=device))
    lap("colors")
    # 6. Back to the pose.json world frame.
    mesh = Mesh(vertices=cams.to_world(vertices).astype(np.float32), faces=faces,
                colors=(colors.cpu().numpy() * 255).round().astype(np.uint8))
    return ReconstructionOutput(mesh=mesh, timings=timings)
