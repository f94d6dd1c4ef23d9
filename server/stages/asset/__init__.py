"""The asset stage: a reconstructed mesh → a clean, budgeted, UV-textured asset file (architecture.md, "Decisions").

Runs after meshing and is reusable by ``remesh`` on a finished run (it needs only the mesh and the run's views
folder, never Zero123):

1. :func:`clean_mesh` — floaters, degenerate and duplicate faces, unreferenced vertices, outward orientation,
   optional Taubin smoothing (:mod:`server.stages.asset.cleanup`).
2. :func:`decimate` — quadric edge collapse to a face budget (fast-simplification).
3. :func:`bake_texture` — xatlas unwrap, then a base-colour texture projected from every posed view with a depth
   visibility test (:mod:`server.stages.asset.bake`, :mod:`server.stages.asset.unwrap`,
   :mod:`server.stages.asset.raster`).
4. :func:`export_textured_mesh` — GLB with an embedded PBR texture, or OBJ + MTL + PNG
   (:mod:`server.stages.asset.export`).

:func:`build_asset` chains 1–3. Meshes are in the pose.json world (z-up) throughout; files get the y-up rotation of
:mod:`server.common.mesh_io`.
"""

from server.stages.asset.bake import (
    BakeConfig,
    BakeReport,
    BakeViews,
    TexturedMesh,
    bake_texture,
    fill_unseen,
    load_bake_views,
)
from server.stages.asset.cleanup import (
    CleanupConfig,
    DecimateConfig,
    clean_mesh,
    decimate,
    orient_outward,
    taubin_smooth,
)
from server.stages.asset.export import TEXTURED_SUFFIXES, export_textured_mesh
from server.stages.asset.raster import rasterize_uv, render_depth
from server.stages.asset.stage import AssetConfig, build_asset
from server.stages.asset.unwrap import UnwrapConfig, UvLayout, unwrap

__all__ = [
    "TEXTURED_SUFFIXES",
    "AssetConfig",
    "BakeConfig",
    "BakeReport",
    "BakeViews",
    "CleanupConfig",
    "DecimateConfig",
    "TexturedMesh",
    "UnwrapConfig",
    "UvLayout",
    "bake_texture",
    "build_asset",
    "clean_mesh",
    "decimate",
    "export_textured_mesh",
    "fill_unseen",
    "load_bake_views",
    "orient_outward",
    "rasterize_uv",
    "render_depth",
    "taubin_smooth",
    "unwrap",
]
