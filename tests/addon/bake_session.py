"""One headless Blender (a bpy wheel) for tests/addon/test_addon_bake.py: Quad Remesh and Bake Views onto Selected
against a stand-in server (:class:`fake_server.FakeBake`).

Run as ``<bpy python> bake_session.py --config CONFIG.json`` with ``BLENDER_USER_RESOURCES`` set to a scratch folder;
it installs the built zip, generates (the stand-in's result: a vertex-coloured sphere off the origin, as a PLY in the
job's frame), then records observations scenario by scenario into one JSON file (the uploaded meshes as files) for
the pytest side to judge.

Scenarios: ``quad_remesh`` (a quad copy of the imported object) → ``bake_own`` (the imported object, moved and
rotated, with a Subdivision modifier and two UV maps, the artist's active: baked onto it) → ``bake_history`` (a plain
object with a copy of that mesh and no One2345 properties, the job picked in History) → ``bake_errors`` (no job known;
a server that cannot use the UVs).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import bpy
import numpy as np
from mathutils import Matrix

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the stand-ins; not the repository root, so the source add-on stays out of reach
from blender_session import RESULTS, run_session, scenario  # noqa: E402 - after the path
from fake_server import FakeBake, ScriptedServer, json_reply  # noqa: E402

MODULE = "bl_ext.user_default.one2345"




def coords(obj) -> list:
    values = np.empty(len(obj.data.vertices) * 3, np.float64)
    obj.data.vertices.foreach_get("co", values)
    return values.reshape(-1, 3).tolist()


def select_only(obj) -> None:
    for other in bpy.context.view_layer.objects.selected:
        other.select_set(False)
    obj.select_set(True)
    bpy.context.view_layer.objects.active = obj


def material_of(obj) -> dict:
    """The object's materials and, for the first, its image texture, UV map node and links."""
    materials = [m.name if m else None for m in obj.data.materials]
    out: dict = {"materials": materials}
    material = obj.data.materials[0] if obj.data.materials else None
    if material is None or material.node_tree is None:
        return out
    tree = material.node_tree
    texture = next((n for n in tree.nodes if n.type == "TEX_IMAGE"), None)
    uv = next((n for n in tree.nodes if n.type == "UVMAP"), None)
    bsdf = next((n for n in tree.nodes if n.type == "BSDF_PRINCIPLED"), None)
    out["links"] = sorted(f"{link.from_node.type}.{link.from_socket.identifier}->{link.to_node.type}."
                          f"{link.to_socket.identifier}" for link in tree.links)
    out["uv_map"] = uv.uv_map if uv is not None else None
    if texture is not None and texture.image is not None:
        image = texture.image
        pixels = np.empty(image.size[0] * image.size[1] * 4, np.float32)
        image.pixels.foreach_get(pixels)
        out["image"] = {"name": image.name, "size": list(image.size), "packed": image.packed_file is not None,
                        "mean_rgba": pixels.reshape(-1, 4).mean(axis=0).tolist()}
    out["base_colour_linked"] = bool(bsdf is not None and bsdf.inputs["Base Color"].is_linked)
    return out


def run(config: dict) -> None:
    work = Path(config["work"])
    bpy.ops.extensions.package_install_files(filepath=config["zip"], repo="user_default", enable_on_install=True)
    fake = FakeBake(Path(config["mesh"]).read_bytes(), "ply", Path(config["baked"]).read_bytes())

    def handler(request: dict):
        if request["path"] == "/v1/health":
            return json_reply(200, {"status": "ok", "version": "0", "device": "cpu", "preset": "tiny",
                                    "models_loaded": {}, "queue_length": 0, "running": None})
        reply = fake.handle(request)
        return reply if reply is not None else json_reply(404, {"error": {
            "kind": "not_found", "message": request["path"], "fix": None}})

    server = ScriptedServer(handler).__enter__()
    prefs = bpy.context.preferences.addons[MODULE].preferences
    prefs.server_mode, prefs.server_url, prefs.server_token, prefs.import_size = "REMOTE", server.url, "t", 1.0
    for obj in list(bpy.data.objects):
        bpy.data.objects.remove(obj)
    bpy.context.scene.cursor.location = (1.0, 2.0, 0.5)
    generated = sorted(bpy.ops.one2345.generate_mesh(filepath=config["image"]))
    source = bpy.context.active_object
    RESULTS["generate"] = {"result": generated, "name": source.name, "frame": list(source["one2345_frame"]),
                           "matrix": [list(row) for row in source.matrix_world]}

    @scenario
    def quad_remesh(record):
        select_only(source)
        before = coords(source)
        record["poll"] = bpy.ops.one2345.quad_remesh.poll()
        record["result"] = sorted(bpy.ops.one2345.quad_remesh(target_faces=300))
        copy = bpy.context.active_object
        record["copy"] = copy.name
        record["source_unchanged"] = coords(source) == before and source.name == RESULTS["generate"]["name"]
        record["source_faces"] = len(source.data.polygons)
        record["shared_mesh"] = copy.data == source.data
        record["faces"] = len(copy.data.polygons)
        record["quads"] = sum(1 for p in copy.data.polygons if p.loop_total == 4)
        record["job_id"] = copy.get("one2345_job_id")
        record["frame"] = list(copy.get("one2345_frame") or [])
        record["collections"] = [c.name for c in copy.users_collection]
        record["bl_options"] = sorted(bpy.types.ONE2345_OT_quad_remesh.bl_options)

    @scenario
    def bake_own(record):
        obj = source
        select_only(obj)
        obj.location = (4.0, -1.0, 2.0)  # the artist moves and turns it: the mesh still goes up in the job's frame
        obj.rotation_euler = (0.3, 0.0, 1.1)
        obj.scale = (2.0, 2.0, 2.0)
        mesh = obj.data
        mesh.uv_layers.new(name="Other")
        artist = mesh.uv_layers.new(name="ArtistUV")
        mesh.uv_layers.active = artist
        for loop in mesh.loops:  # a known map: u, v linear in the mesh coordinates
            co = mesh.vertices[loop.vertex_index].co
            artist.data[loop.index].uv = (0.3 * co.x + 0.5, 0.3 * co.y + 0.5)
        modifier = obj.modifiers.new("Subdivide", "SUBSURF")
        modifier.subdivision_type, modifier.levels = "SIMPLE", 1
        before = coords(obj)
        record["poll"] = bpy.ops.one2345.bake_views.poll()
        record["result"] = sorted(bpy.ops.one2345.bake_views(texture_size="512"))
        record["uploads"] = len(fake.uploads)
        if fake.uploads:
            (work / "upload_own.glb").write_bytes(fake.uploads[-1]["mesh"])
            record["options"] = fake.uploads[-1]["options"]
        record["material"] = material_of(obj)
        record["active_uv"] = mesh.uv_layers.active.name
        record["uv_maps"] = [layer.name for layer in mesh.uv_layers]
        record["mesh_unchanged"] = coords(obj) == before
        record["modifiers"] = [m.name for m in obj.modifiers]
        record["bake_job"] = obj.get("one2345_bake_job_id")
        record["leftovers"] = [o.name for o in bpy.data.objects if o.name.startswith("one2345_bake")]
        record["bl_options"] = sorted(bpy.types.ONE2345_OT_bake_views.bl_options)

    @scenario
    def bake_history(record):
        plain = bpy.data.objects.new("Retopo", source.data.copy())
        bpy.context.scene.collection.objects.link(plain)
        # Another placement, the same surface in the world: the mesh goes up through the job's object.
        plain.matrix_world = source.matrix_world @ Matrix.Translation((0.25, 0.0, 0.0))
        plain.data.transform(Matrix.Translation((-0.25, 0.0, 0.0)))
        plain.modifiers.clear()
        for layer in list(plain.data.uv_layers):  # a fresh retopology: no UV map yet
            plain.data.uv_layers.remove(layer)
        select_only(plain)
        record["poll_without_job"] = bpy.ops.one2345.bake_views.poll()
        wm = bpy.context.window_manager
        item = wm.one2345_history.add()
        item.job_id, item.state = FakeBake.SOURCE, "done"
        wm.one2345_history_index = 0
        record["poll_with_history"] = bpy.ops.one2345.bake_views.poll()
        count = len(fake.uploads)
        record["result"] = sorted(bpy.ops.one2345.bake_views())
        record["uploaded"] = len(fake.uploads) == count + 1
        if len(fake.uploads) > count:
            (work / "upload_history.glb").write_bytes(fake.uploads[-1]["mesh"])
        record["material"] = material_of(plain)
        record["uv_maps"] = [layer.name for layer in plain.data.uv_layers]

    @scenario
    def bake_errors(record):
        bare = bpy.data.objects.new("Bare", source.data.copy())
        bpy.context.scene.collection.objects.link(bare)
        select_only(bare)
        wm = bpy.context.window_manager
        wm.one2345_history.clear()
        record["poll_no_job"] = bpy.ops.one2345.bake_views.poll()
        select_only(source)
        fake.uv_source = "unwrap"
        materials = [m.name for m in source.data.materials]
        record["unwrap_result"] = sorted(bpy.ops.one2345.bake_views())
        last = importlib.import_module(f"{MODULE}.core.jobs").last()
        record["unwrap_error"] = str(last.error) if last is not None and last.error is not None else None
        record["materials_kept"] = [m.name for m in source.data.materials] == materials
        fake.uv_source = "mesh"

    server.__exit__(None, None, None)


if __name__ == "__main__":
    run_session(run)
