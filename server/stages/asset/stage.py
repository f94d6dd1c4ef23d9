"""The asset stage in one call: clean-up → polygon budget → UV unwrap and texture bake (export stays separate)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from server.common.errors import BadInputError
from server.common.mesh_io import Mesh
from server.stages.asset.bake import BakeConfig, TexturedMesh, bake_texture
from server.stages.asset.cleanup import (
    MIN_TARGET_FACES,
    CleanupConfig,
    DecimateConfig,
    clean_mesh_with_report,
    decimate_with_report,
)
from server.stages.asset.views import BakeViews

if TYPE_CHECKING:
    from server.common.views import ViewSet


@dataclass(frozen=True)
class AssetConfig:
    """Settings of :func:`build_asset`."""

    cleanup: CleanupConfig = field(default_factory=CleanupConfig)
    """Floaters, broken faces, orientation, smoothing."""

    target_faces: int | None = 50_000
    """Polygon budget; None keeps every face. 50 k faces hold the detail of a 256³ marching-cubes surface of a
    Zero123 object (~100–200 k faces) at a size game engines and viewers take in their stride."""

    decimate: DecimateConfig = field(default_factory=DecimateConfig)
    """How the budget is reached."""

    texture_size: int = 1024
    """Side of the base-colour texture in texels."""

    bake: BakeConfig = field(default_factory=BakeConfig)
    """How the texture is baked."""

    def __post_init__(self) -> None:
        if self.target_faces is not None and self.target_faces < MIN_TARGET_FACES:
            raise BadInputError(f"target_faces {self.target_faces} is invalid; allowed: None (no budget) or an "
                                f"integer ≥ {MIN_TARGET_FACES} (e.g. 50000)")
        if self.texture_size < 8:
            raise BadInputError(f"texture_size {self.texture_size} is invalid; allowed: an integer ≥ 8 (e.g. 1024)")


def build_asset(mesh: Mesh, views: BakeViews | ViewSet, config: AssetConfig = AssetConfig(),
                device: str | None = None) -> TexturedMesh:
    """A reconstructed, vertex-coloured mesh → a clean, budgeted, textured mesh (export with
    :func:`server.stages.asset.export_textured_mesh`).

    Args:
        mesh: in the pose.json world (as :func:`server.pipeline.reconstruct.reconstruct_mesh` returns it).
        views: the posed views (:func:`server.stages.asset.load_bake_views` of the run's views folder, or the ViewSet).
        config: see :class:`AssetConfig`.
        device: where the bake runs (:func:`~server.stages.asset.bake_texture`): None for the numpy path, which is
            the faster one on a CPU; a CUDA device for the torch path.

    Returns:
        The textured mesh; its report's timings gain ``cleanup`` and ``decimate``, and it carries the clean-up's
        :class:`~server.stages.asset.cleanup.CleanupReport` (small parts kept because the views show them) and the
        :class:`~server.stages.asset.cleanup.DecimateReport` (faces reached, and why not the budget when missed).
    """
    start = time.perf_counter()
    if not isinstance(views, BakeViews):
        views = BakeViews.from_view_set(views)
    mesh, cleanup = clean_mesh_with_report(mesh, config.cleanup, views)
    cleaned = time.perf_counter()
    decimation = None
    if config.target_faces is not None:
        mesh, decimation = decimate_with_report(mesh, config.target_faces, config.decimate)
    decimated = time.perf_counter()
    textured = bake_texture(mesh, views, config.texture_size, config.bake, device=device)
    if textured.report is not None:
        textured.report.timings = {"cleanup": cleaned - start, "decimate": decimated - cleaned,
                                   **textured.report.timings, "total": time.perf_counter() - start}
        textured.report.cleanup, textured.report.decimation = cleanup, decimation
    return textured
