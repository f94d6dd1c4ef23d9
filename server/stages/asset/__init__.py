"""The asset stage: a reconstructed mesh → a clean, budgeted, UV-textured asset file (architecture.md, "Decisions").

Runs after meshing and is reusable by ``remesh`` on a finished run (it needs only the mesh and the run's views
folder, never Zero123):

1. :func:`clean_mesh` — floaters (unless the views show them), degenerate and duplicate faces, unreferenced
   vertices, outward orientation, optional Taubin smoothing (:mod:`server.stages.asset.cleanup`).
2. :func:`decimate` — quadric edge collapse to a face budget (fast-simplification), shortest-edge collapse where that
   stalls; :func:`decimate_with_report` says what was reached and why.
3. :func:`bake_texture` — xatlas unwrap (or the mesh's own UVs, :func:`check_uvs`), then a base-colour texture
   projected from every posed view with a depth visibility test, unseen texels filled over the surface
   (:mod:`server.stages.asset.bake`, :mod:`server.stages.asset.views`, :mod:`server.stages.asset.unwrap`,
   :mod:`server.stages.asset.raster`, :mod:`server.stages.asset.fill`).
   :func:`vertex_colors_from_views` colours any mesh's vertices with the same sampler.
4. :func:`export_textured_mesh` — GLB with an embedded PBR texture, or OBJ + MTL + PNG
   (:mod:`server.stages.asset.export`).

:func:`build_asset` chains 1–3. Meshes are in the pose.json world (z-up) throughout; files get the y-up rotation of
:mod:`server.common.mesh_io`.

One pixel convention throughout (:mod:`server.stages.asset.raster`): pixel (i, j) is centred at (j + 0.5, i + 0.5).

A stage: imports :mod:`server.common` only.
"""

from server.stages.asset.bake import (
    BakeConfig,
    BakeReport,
    TexturedMesh,
    UvCheck,
    bake_texture,
    check_uvs,
    vertex_colors_from_views,
)
from server.stages.asset.cleanup import (
    CleanupConfig,
    CleanupReport,
    DecimateConfig,
    DecimateReport,
    clean_mesh,
    clean_mesh_with_report,
    decimate,
    decimate_with_report,
    orient_outward,
    taubin_smooth,
)
from server.stages.asset.export import TEXTURED_SUFFIXES, export_textured_mesh
from server.stages.asset.fill import fill_over_surface, fill_unseen
from server.stages.asset.raster import rasterize_uv, render_depth, render_face_ids
from server.stages.asset.stage import AssetConfig, build_asset
from server.stages.asset.unwrap import UnwrapConfig, UvLayout, unwrap
from server.stages.asset.views import BakeViews, load_bake_views

__all__ = [
    "TEXTURED_SUFFIXES",
    "AssetConfig",
    "BakeConfig",
    "BakeReport",
    "BakeViews",
    "CleanupConfig",
    "CleanupReport",
    "DecimateConfig",
    "DecimateReport",
    "TexturedMesh",
    "UnwrapConfig",
    "UvCheck",
    "UvLayout",
    "bake_texture",
    "build_asset",
    "check_uvs",
    "clean_mesh",
    "clean_mesh_with_report",
    "decimate",
    "decimate_with_report",
    "export_textured_mesh",
    "fill_over_surface",
    "fill_unseen",
    "load_bake_views",
    "orient_outward",
    "rasterize_uv",
    "render_depth",
    "render_face_ids",
    "taubin_smooth",
    "unwrap",
    "vertex_colors_from_views",
]
