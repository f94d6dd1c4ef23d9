"""Issue #26 in the add-on, in the bpy wheels of Blender 4.2 and 5.0: *Quad Remesh* and *Bake Views onto Selected*
against a stand-in server (``fake_server.FakeBake``), one ``bake_session.py`` per version.

The stand-in's generation result is a vertex-coloured sphere off the origin (a PLY in the job's frame); the uploaded
meshes are read back here with the server's own reader (``server.common.mesh_io``, which turns the GLB's y-up into
the job's z-up) and compared with that sphere's vertices: the add-on must invert its import (re-centring, scale,
placement) exactly. A missing bpy environment fails the tests; it is never a skip.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.addon.test_blender import VERSIONS, built_zip, run_in_both_blenders  # noqa: F401 - the zip fixture

HERE = Path(__file__).resolve().parent
SESSION = HERE / "bake_session.py"
CENTRE = np.array([0.2, -0.1, 0.7])
RADIUS = 0.6
COLOUR = (30, 200, 90)
"""The stand-in bake's texture: one colour, so the image on the object is easy to check."""


def sphere():
    import trimesh

    mesh = trimesh.creation.icosphere(subdivisions=2, radius=RADIUS)
    mesh.apply_translation(CENTRE)
    return mesh


def make_files(work: Path) -> dict:
    """The generation's result (PLY, vertex colours), the bake's result (a textured GLB) and an input image."""
    import trimesh
    from PIL import Image

    mesh = sphere()
    mesh.visual.vertex_colors = np.tile(np.array([[200, 40, 40, 255]], np.uint8), (len(mesh.vertices), 1))
    mesh.export(work / "result.ply")
    textured = sphere()
    uv = (textured.vertices[:, :2] - CENTRE[:2]) / (2 * RADIUS) + 0.5
    texture = Image.new("RGB", (16, 16), COLOUR)
    textured.visual = trimesh.visual.TextureVisuals(uv=uv, image=texture)
    (work / "baked.glb").write_bytes(textured.export(file_type="glb"))
    Image.new("RGBA", (32, 32), (200, 60, 40, 255)).save(work / "input.png")
    return {"mesh": str(work / "result.ply"), "baked": str(work / "baked.glb"), "image": str(work / "input.png")}


@pytest.fixture(scope="module")
def sessions(built_zip: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:  # noqa: F811 - the fixture
    """Run the session in both bpy versions at once; version → observations (and its work folder)."""
    return run_in_both_blenders(SESSION, tmp_path_factory, "bake",
                                lambda version, work: {"zip": str(built_zip), **make_files(work)}, timeout_s=300)


def observed(session: dict, name: str) -> dict:
    record = session.get(name)
    assert record is not None, f"scenario {name} did not run:\n{session['_log'][-3000:]}"
    assert "exception" not in record, record["exception"]
    return record


def uploaded(path: Path):
    """The uploaded GLB as the server reads it (z-up job frame) with its UVs."""
    from server.common.mesh_io import load_mesh_with_uvs

    assert path.is_file(), f"nothing was uploaded ({path.name} missing)"
    return load_mesh_with_uvs(path)


def nearest(points: np.ndarray, to: np.ndarray) -> np.ndarray:
    """Distance from each of ``points`` to its nearest point of ``to``."""
    return np.sqrt(((points[:, None, :] - to[None, :, :]) ** 2).sum(-1)).min(axis=1)


VERSION_IDS = list(VERSIONS)


@pytest.mark.parametrize("version", VERSION_IDS)
def test_quad_remesh_makes_a_quad_copy_and_leaves_the_original(sessions, version):
    session = sessions[version]
    assert session["generate"]["result"] == ["FINISHED"]
    record = observed(session, "quad_remesh")
    assert record["poll"] is True and record["result"] == ["FINISHED"]
    assert record["copy"] != session["generate"]["name"] and not record["shared_mesh"]
    assert record["source_unchanged"] and record["source_faces"] == 320
    assert record["faces"] >= 100 and record["quads"] / record["faces"] >= 0.9, record
    # The copy is a One2345 object of the same job, in the same frame: ready for the bake.
    assert record["job_id"] == "5" * 32 and record["frame"] == session["generate"]["frame"]
    assert record["collections"] == ["One2345"]
    assert record["bl_options"] == ["REGISTER", "UNDO"]


@pytest.mark.parametrize("version", VERSION_IDS)
def test_bake_views_onto_the_object_itself(sessions, version):
    """The imported object, moved, turned, scaled, with a Subdivision modifier and the artist's active UV map: the
    upload is that mesh (modifier applied) in the job's frame with that UV map, and the baked image comes back in a
    new material reading it on that map."""
    record = observed(sessions[version], "bake_own")
    assert record["poll"] is True and record["result"] == ["FINISHED"] and record["uploads"] == 1
    assert record["options"] == {"texture_size": 512, "keep_uvs": True, "format": "glb"}
    mesh, uvs = uploaded(sessions[version]["_work"] / "upload_own.glb")
    original = sphere().vertices
    vertices = np.asarray(mesh.vertices, np.float64)
    assert len(vertices) > len(original)  # the Subdivision modifier was applied
    assert nearest(original, vertices).max() < 1e-4  # every original vertex round-trips to the job's frame
    assert np.linalg.norm(vertices - CENTRE, axis=1).max() < RADIUS + 1e-4
    # The artist's UV map went up (u, v linear in the mesh coordinates: the import's frame of the job's frame).
    frame = np.array(sessions[version]["generate"]["frame"]).reshape(4, 4)
    local = vertices @ frame[:3, :3].T + frame[:3, 3]
    assert uvs is not None
    uv = np.asarray(uvs.uvs, np.float64)[np.asarray(uvs.faces)]  # [F, 3, 2] per corner, glTF convention (v down)
    corners = local[np.asarray(mesh.faces)]
    expected = np.stack([0.3 * corners[..., 0] + 0.5, 1.0 - (0.3 * corners[..., 1] + 0.5)], axis=-1)
    assert np.abs(uv - expected).max() < 1e-4
    material = record["material"]
    assert len(material["materials"]) == 1 and material["materials"][0].startswith("One2345 Bake")
    assert material["uv_map"] == "ArtistUV" == record["active_uv"]
    assert "UVMAP.UV->TEX_IMAGE.Vector" in material["links"] and material["base_colour_linked"]
    assert "TEX_IMAGE.Color->BSDF_PRINCIPLED.Base Color" in material["links"]
    image = material["image"]
    assert image["size"] == [16, 16] and image["packed"]
    assert np.allclose(image["mean_rgba"][:3], np.array(COLOUR) / 255, atol=2 / 255)
    assert record["uv_maps"] == ["Other", "ArtistUV"] and record["mesh_unchanged"]
    assert record["modifiers"] == ["Subdivide"] and record["bake_job"] == "b" * 32 and record["leftovers"] == []
    assert record["bl_options"] == ["REGISTER", "UNDO"]


@pytest.mark.parametrize("version", VERSION_IDS)
def test_bake_views_onto_a_plain_object_with_the_job_picked_in_history(sessions, version):
    """An object with no One2345 properties (another placement, the same surface): the job comes from History and
    the mesh goes up through the job's object as placed now; with no UV map it is unwrapped first."""
    record = observed(sessions[version], "bake_history")
    assert record["poll_without_job"] is False and record["poll_with_history"] is True
    assert record["result"] == ["FINISHED"] and record["uploaded"]
    mesh, uvs = uploaded(sessions[version]["_work"] / "upload_history.glb")
    original = sphere().vertices
    vertices = np.asarray(mesh.vertices, np.float64)
    assert nearest(original, vertices).max() < 1e-4 and nearest(vertices, original).max() < 1e-4
    assert uvs is not None
    assert record["uv_maps"] == ["UVMap"]  # Smart UV Project's map, which the material reads
    assert record["material"]["uv_map"] == "UVMap" and record["material"]["image"]["packed"]


@pytest.mark.parametrize("version", VERSION_IDS)
def test_bake_views_refuses_without_a_job_and_keeps_the_material_when_the_uvs_are_refused(sessions, version):
    record = observed(sessions[version], "bake_errors")
    assert record["poll_no_job"] is False
    assert record["unwrap_result"] == ["CANCELLED"]
    assert "fresh unwrap" in record["unwrap_error"] and "material is unchanged" in record["unwrap_error"], record
    assert record["materials_kept"]

