"""Views → mesh file: the reconstruction, the asset stage and the export, shared by a fresh run and a re-mesh.

A run's ``views/`` folder holds everything the mesh needs (the 32 nearby views, the stage-1 views and pose.json), so
a finished run can be meshed again at another resolution, polygon budget or texture size without Zero123:

    one2345 remesh photo.one2345 -o photo_low.glb --faces 20000 --texture 1024

:func:`mesh_views` runs the three steps for both paths; a fresh run and a re-mesh with the same settings write the
same mesh.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.common.errors import BadInputError

if TYPE_CHECKING:  # imported where used: the CLI checks its options and the run folder before torch loads
    import numpy as np
    import torch

    from server.pipeline.reconstruct import Progress
    from server.stages.meshing import MeshingConfig
    from server.stages.reconstruction.model import ReconstructionModel

TEXTURE_SIZE_RANGE = (256, 4096)
"""Allowed texture sides: below 256 texels a 40-view bake loses the views' detail; 4096² is 16 M texels."""
TARGET_FACES_RANGE = (1000, 2_000_000)
"""Allowed polygon budgets: 1 k triangles is a low-poly prop; a 512³ marching-cubes surface has ~2 M."""


@dataclass(frozen=True)
class MeshSettings:
    """What shapes the mesh file of a run; the fields of :class:`server.pipeline.GenerateOptions` of the same names."""

    resolution: int = 256
    """Marching-cubes grid per axis (the paper's 256)."""
    target_faces: int | None = None
    """Polygon budget (quadric decimation); None keeps every face."""
    texture_size: int | None = None
    """Side of a baked base-colour texture; None gives vertex colours only (the paper's output)."""
    meshing: MeshingConfig | None = None
    """How the SDF grid is sampled and meshed (None: :class:`MeshingConfig`'s defaults); its resolution is replaced
    by ``resolution``."""

    @property
    def asset(self) -> bool:
        """Whether the asset stage (clean-up, budget, texture) runs."""
        return self.target_faces is not None or self.texture_size is not None

    def check(self, suffix: str) -> MeshSettings:
        """Validate against the output's suffix (``.glb``, ``.obj``, ``.ply``); BadInputError names what is wrong."""
        lo, hi = TEXTURE_SIZE_RANGE
        if self.texture_size is not None and not (_is_int(self.texture_size) and lo <= self.texture_size <= hi):
            raise BadInputError(f"texture size {self.texture_size!r} is not allowed: null (vertex colours) or an "
                                f"integer in [{lo}, {hi}] (e.g. 1024)")
        lo, hi = TARGET_FACES_RANGE
        if self.target_faces is not None and not (_is_int(self.target_faces) and lo <= self.target_faces <= hi):
            raise BadInputError(f"target faces {self.target_faces!r} is not allowed: null (keep every face) or an "
                                f"integer in [{lo:,}, {hi:,}] (e.g. 50000)")
        if self.texture_size is not None and suffix.lower() == ".ply":
            raise BadInputError(f"a texture was asked for (size {self.texture_size}) but the mesh format is ply, "
                                "which has no texture", fix="use glb or obj, or leave the texture out")
        return self


@dataclass
class MeshOutcome:
    """What :func:`mesh_views` wrote."""

    files: list[Path]
    """The mesh file first, then an OBJ's material and texture."""
    vertices: int
    faces: int
    timings: dict[str, float]
    """Seconds: ``reconstruct.<stage>`` per reconstruction stage, ``asset.<step>`` per asset step, ``export``."""
    asset: dict[str, Any] | None = field(default=None)
    """For meta.json when the asset stage ran: the settings, the raw and final face counts, the bake's coverage."""


def mesh_views(
    model: ReconstructionModel,
    views_dir: str | os.PathLike[str],
    outputs: Sequence[str | os.PathLike[str]],
    settings: MeshSettings,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    on_asset: Callable[[], None] | None = None,
    arrays: dict[str, np.ndarray] | None = None,
) -> MeshOutcome:
    """A views folder → mesh file(s), written at every path of ``outputs`` (the format from each suffix).

    Args:
        model: the reconstruction network.
        views_dir: pose.json and the 32 nearby views (the stage-1 views beside them are used by the bake).
        outputs: one or more mesh paths (.glb, .obj or .ply; .ply only without a texture).
        settings: see :class:`MeshSettings`.
        device: where the network runs.
        progress: ``progress(stage, done, total)`` of the reconstruction's sub-stages.
        on_asset: called once as the asset stage starts (after the reconstruction), e.g. to report progress.
        arrays: nearby views already in memory, by file name (see :func:`server.pipeline.reconstruct.load_views`); the
            reconstruction and the bake use them instead of the files.

    Returns:
        The files of the first output, the final counts, timings and the asset record.

    Raises:
        BadInputError: an unusable views folder or settings that do not fit an output's format.
    """
    from server.common.mesh_io import export_mesh
    from server.common.views import load_views
    from server.pipeline.reconstruct import reconstruct_mesh
    from server.stages.asset import (
        AssetConfig,
        build_asset,
        clean_mesh,
        decimate_with_report,
        export_textured_mesh,
        load_bake_views,
    )
    from server.stages.meshing import MeshingConfig

    if not outputs:
        raise BadInputError("no output path given for the mesh")
    for out in outputs:
        settings.check(Path(out).suffix)

    # 1. Reconstruction: cost volume → SDF → marching cubes → vertex colours (spec §5).
    meshing = replace(settings.meshing or MeshingConfig(), resolution=settings.resolution)
    out = reconstruct_mesh(model, load_views(views_dir, arrays), meshing, device, progress)
    timings = {f"reconstruct.{k}": v for k, v in out.timings.items()}
    mesh, textured, asset = out.mesh, None, None

    # 2. Asset stage (when asked): clean-up, polygon budget, then a texture baked from every posed view.
    if settings.asset:
        if on_asset is not None:
            on_asset()
        raw_faces = len(mesh.faces)
        if settings.texture_size is not None:
            config = AssetConfig(target_faces=settings.target_faces, texture_size=settings.texture_size)
            # The bake follows the reconstruction onto a GPU; on a CPU its numpy path is the faster one.
            bake_device = str(device) if str(device).startswith("cuda") else None
            textured = build_asset(mesh, load_bake_views(views_dir, arrays), config, device=bake_device)
            report = textured.report
            timings.update({f"asset.{k}": v for k, v in report.timings.items()})
            faces, vertices = len(textured.faces), len(textured.vertices)
            coverage = round(report.coverage, 4)
            decimation = report.decimation
        else:
            start = time.perf_counter()
            mesh, decimation = decimate_with_report(clean_mesh(mesh), settings.target_faces)
            timings["asset.total"] = time.perf_counter() - start
            faces, vertices, coverage = len(mesh.faces), len(mesh.vertices), None
        asset = {"target_faces": settings.target_faces, "texture_size": settings.texture_size,
                 "raw_faces": raw_faces, "faces": faces, "vertices": vertices, "texture_coverage": coverage,
                 # the faces reached and, when the budget was missed, why (issue #26)
                 "decimation": None if decimation is None else decimation.as_dict()}

    # 3. Export. A textured GLB carries no COLOR_0: glTF multiplies it into the base colour
    # (server.stages.asset.export).
    start = time.perf_counter()
    written: list[Path] = []
    for path in outputs:
        if textured is not None:
            files = export_textured_mesh(textured, path, vertex_colors=False)
        else:
            files = [export_mesh(mesh, path)]
        written = written or files
    timings["export"] = time.perf_counter() - start
    final = textured if textured is not None else mesh
    return MeshOutcome(files=written, vertices=len(final.vertices), faces=len(final.faces), timings=timings,
                       asset=asset)


def find_run(path: str | os.PathLike[str]) -> Path:
    """The run folder under ``path``: a CLI run's ``<output>.one2345/`` (holding ``views/pose.json``) or a server
    job's folder (holding ``run/views/pose.json``).

    Raises:
        BadInputError: neither layout, saying what was looked for.
    """
    path = Path(path)
    if not path.is_dir():
        raise BadInputError(f"run folder {path} does not exist or is not a folder",
                            fix="pass the <output>.one2345/ folder `one2345 generate` wrote beside the mesh, or a "
                                "server job's folder")
    for run in (path, path / "run"):
        if (run / "views" / "pose.json").is_file():
            return run
    raise BadInputError(f"{path} is not a run folder: it has neither views/pose.json nor run/views/pose.json",
                        fix="pass the <output>.one2345/ folder `one2345 generate` wrote beside the mesh, or a server "
                            "job's folder")


def read_run_meta(run_dir: str | os.PathLike[str], required: Sequence[str] = ()) -> dict[str, Any]:
    """A run's ``meta.json`` as a dict.

    Args:
        run_dir: the run folder (:func:`find_run`).
        required: keys the caller needs; their absence makes the record unusable.

    Raises:
        BadInputError: the file is missing, unreadable, not UTF-8 JSON (also: nested too deeply, an absurdly long
            number), not an object, or lacks a required key; the message names the file and the fault.
    """
    path = Path(run_dir) / "meta.json"
    fix = "re-mesh a folder written by `one2345 generate` or the server"
    if path.exists() and not path.is_file():  # a folder, or a FIFO that reading would wait on for ever
        raise BadInputError(f"{path} is not a regular file", fix=fix)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInputError(f"{path} does not exist: the run has no record", fix=fix) from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadInputError(f"{path} cannot be read as UTF-8 text ({e})", fix=fix) from None
    try:
        meta = json.loads(text)
    except RecursionError:  # the JSON parser recurses once per nesting level: [[[[…]]]] beyond ~1000
        raise BadInputError(f"{path} is not the record of a run: its JSON is nested too deeply", fix=fix) from None
    except ValueError as e:
        raise BadInputError(f"{path} is not the record of a run: not JSON ({str(e)[:200]})", fix=fix) from None
    if not isinstance(meta, dict):
        raise BadInputError(f"{path} is not the record of a run: a JSON {type(meta).__name__}, not an object",
                            fix=fix)
    missing = [k for k in required if k not in meta]
    if missing:
        raise BadInputError(f"{path} is not the record of a run: it lacks {', '.join(missing)}", fix=fix)
    return meta


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
