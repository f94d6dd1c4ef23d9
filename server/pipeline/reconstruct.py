"""The reconstruction stage: a folder of 32 posed views → a vertex-coloured mesh in the pose.json world frame.

Input layout: :mod:`server.common.views`. Output frame: z-up, object at the origin, the input camera at azimuth 30°
and radius 1.2 (spec §3.5). Vertex colours are rounded to uint8 rather than truncated as the reference does
(truncation darkens every colour by half a level on average, and turns a flat 200 into 199).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from server.common.mesh_io import Mesh
from server.common.views import ViewSet
from server.stages.meshing import MeshingConfig, extract_surface, sample_sdf_volume
from server.stages.reconstruction.model import ReconstructionModel
from server.stages.reconstruction.rendering_network import blend_vertex_colors

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
