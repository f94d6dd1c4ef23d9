"""A finished run's views baked onto a given mesh: the artist's retopology, with its own UVs, coloured by the job.

Every run keeps its 40 posed views (``views/``: the 8 stage-1 views, the 32 nearby views and pose.json), so any mesh
in the run's frame can be textured from them without the network (architecture.md, "The views are the asset's source
of truth"):

    one2345 bake photo.one2345 retopo.obj -o retopo_baked.glb --texture 2048

The mesh is given in the job's frame: the pose.json world (z-up) for a PLY; GLB and OBJ are y-up files, turned into
that frame by :func:`server.common.mesh_io.load_mesh_with_uvs` as every mesh file of this project is. Its own UVs are
baked onto when it has them and they are usable (:func:`server.stages.asset.check_uvs`: non-degenerate, inside
[0, 1]²; overlaps are reported, never fatal), else it is unwrapped afresh; the outcome and the meta file say which.
A vertex-coloured result (``vertex_colors``, or a PLY, which cannot hold a texture) takes the same sampler per vertex
(:func:`server.stages.asset.vertex_colors_from_views`). The mesh's geometry and face order are kept: nothing is
cleaned or decimated, since the artist's topology is the point.

Beside the output, ``<stem>.meta.json`` records the run's own meta.json (seed, elevation, options) with the bake's
settings, UV source, UV check, coverage, counts and timings.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from server import __version__
from server.common.errors import BadInputError, CancelledError
from server.common.fsutil import check_output_file, write_json_atomic
from server.common.mesh_io import MESH_SUFFIXES
from server.pipeline.options import Progress
from server.pipeline.remesh import MeshSettings, find_run, read_run_meta

# The asset stage (numpy, scipy, xatlas) and the mesh reader are imported where used: the CLI checks every path and
# option with this module imported, before anything heavy loads.

BAKE_STAGES = ("load", "bake", "export")
"""The stages a bake reports, in order."""
_STAGE_WEIGHTS = {"load": 0.15, "bake": 0.75, "export": 0.10}
"""Typical share of a bake's time per stage (CPU, 1024², a 20 k-face mesh): the overall fraction's weights."""


@dataclass
class BakeOutcome:
    """What :func:`bake_run` wrote and how."""

    files: list[Path]
    """The mesh file first, then an OBJ's material and texture."""
    meta_path: Path
    """The meta file written beside the output (or where asked)."""
    vertices: int
    faces: int
    texture_size: int | None
    """Side of the baked texture; None for a vertex-coloured result."""
    uv_source: str | None
    """``"mesh"``: baked onto the mesh's own UVs; ``"unwrap"``: a fresh xatlas unwrap (the mesh had none, or they were
    not usable, or ``keep_uvs`` was False); None for a vertex-coloured result."""
    uv_check: dict[str, Any] | None
    """:class:`server.stages.asset.UvCheck` of the mesh's own UVs (degenerate, outside and overlapping), when it had
    some and ``keep_uvs`` was True; None otherwise."""
    uv_reason: str
    """One line saying why these UVs were used."""
    coverage: float | None
    """Share of the charted texels some view sees (textured results)."""
    timings: dict[str, float]
    """Seconds per stage: ``load``, ``bake.<step>`` (unwrap, rasterize, views, fill, total) and ``export``."""
    meta: dict[str, Any] = field(default_factory=dict)
    """What the meta file holds."""


def default_meta_path(out_path: str | os.PathLike[str]) -> Path:
    """``OUT.meta.json`` beside ``OUT.glb`` (the stem's, as the headless add-on writes it)."""
    out = Path(out_path)
    return out.with_name(f"{out.stem}.meta.json")


def check_bake_request(
    run_dir: str | os.PathLike[str],
    mesh_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    texture_size: int | None = 1024,
    format: str | None = None,
    vertex_colors: bool = False,
) -> tuple[Path, Path, Path, int | None]:
    """Everything about a bake that can be checked without reading a file's contents or importing anything heavy.

    Args: as :func:`bake_run`.

    Returns:
        (the run folder, the mesh file, the output file, the texture size or None for vertex colours).

    Raises:
        BadInputError: no run folder there, a mesh path that is missing, not a regular file or not .glb/.obj/.ply,
            an output path that cannot be a file, a format that disagrees with the output's suffix, or a texture size
            outside 256…4096 (or asked for with vertex colours or a PLY).
    """
    run = find_run(run_dir)
    mesh = Path(mesh_path).expanduser()
    if mesh.suffix.lower() not in MESH_SUFFIXES:
        raise BadInputError(f"mesh file {mesh.name!r} has suffix {mesh.suffix!r}; allowed: "
                            f"{', '.join(MESH_SUFFIXES)}", fix="export the mesh as GLB, OBJ or PLY")
    if not mesh.is_file():  # also a FIFO or a folder: reading one would hang or fail
        raise BadInputError(f"mesh file {mesh} does not exist or is not a regular file")
    out = check_output_file(out_path)
    suffix = out.suffix.lower()
    if format is not None and f".{format}" != suffix:
        raise BadInputError(f"format {format!r} disagrees with the output file {out.name!r}; allowed: the output's "
                            f"own suffix ({suffix or 'none'}) or no format")
    if vertex_colors or suffix == ".ply":
        texture_size = None  # documented: a vertex-coloured result has no texture to size
    elif texture_size is None:
        raise BadInputError("no texture size was given for a textured result; allowed: an integer in [256, 4096] "
                            "(e.g. 1024)", fix="give a texture size, or ask for vertex colours")
    else:
        MeshSettings(texture_size=texture_size).check(suffix)  # the range 256…4096, as generate and remesh
    return run, mesh, out, texture_size


def bake_run(
    run_dir: str | os.PathLike[str],
    mesh_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    texture_size: int | None = 1024,
    keep_uvs: bool = True,
    format: str | None = None,
    vertex_colors: bool = False,
    progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    meta_path: str | os.PathLike[str] | None = None,
) -> BakeOutcome:
    """Bake a finished run's posed views onto a given mesh and write the result.

    Args:
        run_dir: the run (``<output>.one2345/``, a server job's folder, or a ``run/`` folder: holding
            ``views/pose.json`` and the views; see :func:`server.pipeline.remesh.find_run`).
        mesh_path: the mesh, in the run's frame (module docstring): .glb, .obj or .ply, with or without UVs.
        out_path: the result: .glb or .obj (textured: an OBJ also writes ``<stem>.mtl`` and ``<stem>_texture.png``),
            or .ply (vertex colours).
        texture_size: texture side, 256…4096; ignored for a vertex-coloured result.
        keep_uvs: bake onto the mesh's own UVs when usable; False always unwraps afresh.
        format: ``glb``, ``obj`` or ``ply``; None takes the output's suffix (when given, it must agree with it).
        vertex_colors: colour the vertices instead of baking a texture (always so for a PLY).
        progress: called with a :class:`~server.pipeline.Progress` at each stage (``load``, ``bake``, ``export``).
        should_cancel: polled between stages; True stops the bake with :class:`CancelledError` before anything is
            written.
        meta_path: where the record goes (default: ``<out stem>.meta.json`` beside the output).

    Returns:
        The :class:`BakeOutcome`: files, counts, which UVs were used and their check, coverage, timings.

    Raises:
        BadInputError: any input of :func:`check_bake_request`, a mesh file that cannot be read or has no triangles,
            a views folder without usable views.
        CancelledError: ``should_cancel`` said so.
    """
    from server.common.mesh_io import Mesh, export_mesh, load_mesh_with_uvs
    from server.stages.asset import (
        BakeConfig,
        bake_texture,
        check_uvs,
        export_textured_mesh,
        load_bake_views,
        vertex_colors_from_views,
    )

    run, mesh_file, out, texture_size = check_bake_request(run_dir, mesh_path, out_path, texture_size, format,
                                                           vertex_colors)
    meta_file = Path(meta_path) if meta_path is not None else default_meta_path(out)
    start = time.perf_counter()
    timings: dict[str, float] = {}
    done = 0.0

    def report(stage: str, finished: bool = False, message: str = "") -> None:
        nonlocal done
        if should_cancel is not None and should_cancel():
            raise CancelledError("the bake was cancelled")
        if finished:
            done += _STAGE_WEIGHTS[stage]
        if progress is not None:
            progress(Progress(stage=stage, step=int(finished), total=1, fraction=min(done, 1.0), message=message))

    # 1. The mesh (with its UVs) and the posed views.
    report("load", message="the mesh and the views")
    mesh, uvs = load_mesh_with_uvs(mesh_file)
    views = load_bake_views(run / "views")
    meta: dict[str, Any] = {}
    run_meta_note = None
    if (run / "meta.json").exists():
        try:
            meta = read_run_meta(run)
        except BadInputError as e:  # the record is provenance only: the views are all a bake needs
            run_meta_note = f"the run's meta.json was not used: {e.message}"
    timings["load"] = time.perf_counter() - start
    report("load", finished=True)

    # 2. The bake: a texture on the mesh's UVs (or a fresh unwrap), or colours per vertex.
    report("bake", message="vertex colours" if texture_size is None else f"a {texture_size}² texture")
    clock = time.perf_counter()
    config = BakeConfig()
    uv_check = None
    textured = None
    coverage = None
    if texture_size is None:
        coloured = Mesh(mesh.vertices, mesh.faces, vertex_colors_from_views(mesh, views, config))
        uv_source = None
        reason = "colours per vertex need no UVs"
        timings["bake.total"] = time.perf_counter() - clock
    else:
        given = (uvs.uvs, uvs.faces) if uvs is not None and keep_uvs else (None, None)
        textured = bake_texture(mesh, views, texture_size, config, uvs=given[0], uv_faces=given[1])
        uv_source, uv_check = textured.report.uv_source, textured.report.uv_check
        coverage = round(textured.report.coverage, 4)
        timings.update({f"bake.{k}": v for k, v in textured.report.timings.items()})
        if uvs is None:
            reason = "the mesh has no UVs: unwrapped afresh"
        elif not keep_uvs:
            reason = "keep_uvs is off: unwrapped afresh"
        else:
            reason = uv_check.reason + ("" if uv_check.usable else ": unwrapped afresh")
    if uvs is not None and keep_uvs and uv_check is None and texture_size is None:
        uv_check = check_uvs(mesh, uvs.uvs, uvs.faces)  # reported for the record; vertex colours need no UVs
    report("bake", finished=True)

    # 3. The file(s), then the record beside them. A textured GLB carries no COLOR_0: glTF would multiply it into
    # the texture (server.stages.asset.export).
    clock = time.perf_counter()
    report("export")
    if textured is not None:
        files = export_textured_mesh(textured, out, vertex_colors=False)
        counts = len(textured.vertices), len(textured.faces)
    else:
        files = [export_mesh(coloured, out)]
        counts = len(coloured.vertices), len(coloured.faces)
    timings["export"] = time.perf_counter() - clock
    timings["total"] = time.perf_counter() - start
    record = {"mesh_file": mesh_file.name, "input_vertices": len(mesh.vertices),
              "input_faces": len(mesh.faces), "input_has_uvs": uvs is not None, "keep_uvs": bool(keep_uvs),
              "texture_size": texture_size, "uv_source": uv_source, "uv_reason": reason,
              "uv_check": None if uv_check is None else uv_check.as_dict(), "texture_coverage": coverage,
              "views": len(views.ids), "run_meta": run_meta_note}
    meta.update({
        "version": __version__, "baked": datetime.now(timezone.utc).isoformat(timespec="seconds"), "bake": record,
        "vertices": counts[0], "faces": counts[1], "mesh": files[0].name, "files": [f.name for f in files],
        "textured": textured is not None,
        "asset": None,  # the run's clean-up and budget describe its own mesh, not this one
        "frame": "ply: z-up pose.json world frame; glb/obj: y-up, (x, y, z) -> (x, z, -y)",
        "timings": {k: round(v, 3) for k, v in timings.items()},
    })
    written = write_json_atomic(meta_file, meta)
    report("export", finished=True)
    return BakeOutcome(files=files, meta_path=written, vertices=counts[0], faces=counts[1],
                       texture_size=texture_size, uv_source=uv_source,
                       uv_check=record["uv_check"], uv_reason=reason, coverage=coverage, timings=timings, meta=meta)
