"""Actions on an object a job made (the "Active Object" panel): Re-mesh its job from the views, Regenerate its
recipe, or a Variation with a new seed; Quad Remesh a copy of it (QuadriFlow) and Bake Views onto Selected (the job's
views baked onto the selected mesh, the artist's own topology and UVs, into a new material on it).

The job's frame: the server takes a bake's mesh in the pose.json world frame (z-up). An imported object keeps the
import's scale and re-centring as ``one2345_frame`` (job frame → its mesh coordinates, see
:data:`mesh_import.FRAME_PROPERTY`), so a mesh goes back with the inverse: an object carrying the frame (the import,
or a Quad Remesh copy of it) by its own mesh coordinates, whatever its placement; any other mesh through the world,
relative to the job's object as it is placed now.
"""

# No `from __future__ import annotations`: Blender reads property annotations as objects, not strings.

import json
import struct
from pathlib import Path
from typing import Any

import bpy
from bpy.props import BoolProperty, EnumProperty, IntProperty
from mathutils import Matrix

from ..core import jobs, mesh_import, properties, recipes
from ..core import settings as addon_prefs
from ..core.client import Client
from ..core.jobs import GenerateJob, JobError, JobFailed
from . import history
from .generate import FollowJob, begin, keep_job, new_job_dir, report_outcome
from .tasks import report_failure


def active_result(context: bpy.types.Context) -> bpy.types.Object | None:
    """The active object if it came from a One2345 job (it has the job's custom properties)."""
    obj = context.active_object
    return obj if obj is not None and obj.get("one2345_job_id") else None


class ONE2345_OT_remesh(FollowJob, bpy.types.Operator):
    """Mesh the active object's job again from its views (no diffusion: seconds), with the panel's resolution,
    colours and target faces; the result is a new object next to it"""

    bl_idname = "one2345.remesh"
    bl_label = "Re-mesh"
    bl_options = {"UNDO"}  # noqa: RUF012 - Blender reads a plain set; a ClassVar hint would be a property

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        """A One2345 object is active and no job runs."""
        if active_result(context) is None:
            cls.poll_message_set("Select an object made by One2345")
            return False
        return jobs.active() is None

    def make_job(self, context: bpy.types.Context) -> GenerateJob:
        obj = active_result(context)
        request = properties.to_request(context.scene.one2345)
        overrides = {name: request[name] for name in ("resolution", "target_faces", "texture_size", "format")}
        connect, exit_code = addon_prefs.connector(addon_prefs.get(context))
        name = f"{obj.get('one2345_name') or obj.name}_remesh"
        return begin(GenerateJob(None, overrides, new_job_dir("remesh"), connect, exit_code, mesh_name=name,
                                 remesh_of=str(obj["one2345_job_id"])))


class ONE2345_OT_regenerate(FollowJob, bpy.types.Operator):
    """Run the active object's recipe again: the same image and settings give the same mesh; Variation uses a new
    seed"""

    bl_idname = "one2345.regenerate"
    bl_label = "Regenerate"
    bl_options = {"UNDO"}  # noqa: RUF012 - Blender reads a plain set; a ClassVar hint would be a property

    variation: BoolProperty(name="Variation", description="A new seed (and no kept re-rolls) instead of the "
                                                          "recipe's", default=False, options={"SKIP_SAVE"})
    seed: IntProperty(name="Seed", description="The variation's seed (default: a random one)", min=0,
                      options={"SKIP_SAVE"})

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        """A One2345 object with a recipe is active and no job runs."""
        obj = active_result(context)
        if obj is None or not obj.get("one2345_recipe"):
            cls.poll_message_set("Select an object made by One2345 (it keeps the recipe it was made with)")
            return False
        return jobs.active() is None

    def make_job(self, context: bpy.types.Context) -> GenerateJob:
        obj = active_result(context)
        recipe = recipes.parse_recipe(obj["one2345_recipe"])
        seed = self.seed if self.properties.is_property_set("seed") else None
        options = recipes.recipe_options(recipe, variation=self.variation, seed=seed)
        job_dir = new_job_dir("variation" if self.variation else "regenerate")
        image = recipes.recipe_input(Path(obj.get("one2345_input") or ""), obj.get("one2345_input_sha256", ""), job_dir)
        connect, exit_code = addon_prefs.connector(addon_prefs.get(context))
        # A picture of a prompt is named by reference while the server has it, so the new recipe keeps the prompt.
        candidate = (str(obj["one2345_image_of"]), int(obj["one2345_index"])) if obj.get("one2345_image_of") else None
        return begin(GenerateJob(image, options, job_dir, connect, exit_code,
                                 mesh_name=obj.get("one2345_name") or obj.name, candidate=candidate))


# -- Quad Remesh ------------------------------------------------------------------------------------------------------

class ONE2345_OT_quad_remesh(bpy.types.Operator):
    """Make a quad copy of the active One2345 object with Blender's QuadriFlow remesher, ready for Bake Views onto
    Selected (the original is left as it is)"""

    bl_idname = "one2345.quad_remesh"
    bl_label = "Quad Remesh"
    bl_options = {"REGISTER", "UNDO"}  # noqa: RUF012 - Blender reads a plain set; a ClassVar hint would be a property

    target_faces: IntProperty(name="Target Faces", description="About how many quads the copy gets", default=5000,
                              min=10, max=1_000_000)

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        """A One2345 mesh object is active."""
        obj = active_result(context)
        if obj is None or obj.type != "MESH":
            cls.poll_message_set("Select a mesh object made by One2345")
            return False
        return True

    def execute(self, context: bpy.types.Context) -> set[str]:
        """Duplicate the object (its own mesh data, its One2345 properties and frame) and remesh the copy."""
        source = active_result(context)
        copy = source.copy()
        copy.data = source.data.copy()
        copy.name = copy.data.name = f"{source.name}_quads"
        for collection in source.users_collection:
            collection.objects.link(copy)
        copy["one2345_quads_of"] = source.name
        with context.temp_override(active_object=copy, object=copy, selected_objects=[copy],
                                   selected_editable_objects=[copy]):
            try:
                done = bpy.ops.object.quadriflow_remesh(target_faces=self.target_faces)
            except RuntimeError as exc:  # QuadriFlow refuses non-manifold meshes and the like: say why
                done, error = {"CANCELLED"}, str(exc).strip()
            else:
                error = "QuadriFlow gave up on this mesh (it needs a closed, manifold surface)"
        if "FINISHED" not in done:
            mesh = copy.data
            bpy.data.objects.remove(copy)
            bpy.data.meshes.remove(mesh)
            report_failure(self, f"Quad Remesh of {source.name!r} failed: {error}. The object is unchanged; "
                                 "make it manifold (Mesh > Clean Up) or try another target.")
            return {"CANCELLED"}
        for other in context.view_layer.objects.selected:
            other.select_set(False)
        copy.select_set(True)
        context.view_layer.objects.active = copy
        quads = sum(1 for polygon in copy.data.polygons if polygon.loop_total == 4)
        self.report({"INFO"}, f"{copy.name!r}: {len(copy.data.polygons)} faces ({quads} quads) from "
                              f"{len(source.data.polygons)}; bake the views onto it with Bake Views onto Selected")
        return {"FINISHED"}


# -- Bake Views onto Selected ------------------------------------------------------------------------------------------

def bake_job_id(context: bpy.types.Context) -> str:
    """The job whose views a bake onto the active object uses: the object's own job, else the one picked in
    History ("" when neither)."""
    obj = context.active_object
    if obj is not None and obj.get("one2345_job_id"):
        return str(obj["one2345_job_id"])
    item = history.selected(context) if hasattr(context.window_manager, "one2345_history") else None
    return item.job_id if item is not None else ""


def read_frame(obj: bpy.types.Object) -> Matrix | None:
    """An object's ``one2345_frame`` (job frame → its mesh coordinates), or None when it has none."""
    values = obj.get(mesh_import.FRAME_PROPERTY)
    if values is None or len(values) != 16:
        return None
    return Matrix([list(values[row * 4:row * 4 + 4]) for row in range(4)])


def job_from_mesh(obj: bpy.types.Object, job_id: str) -> tuple[Matrix, str | None]:
    """The matrix from ``obj``'s mesh coordinates to the job's frame, and a note when it had to be assumed.

    An object with the frame: the frame's inverse. Otherwise through the world, from the job's object (an object of
    that job with a frame) as it is placed now. With neither, the world is taken as the job's frame (noted)."""
    frame = read_frame(obj)
    if frame is not None and str(obj.get("one2345_job_id") or "") == job_id:
        return frame.inverted(), None
    source = next((other for other in bpy.data.objects if other is not obj and other.get("one2345_job_id") == job_id
                   and read_frame(other) is not None), None)
    if source is None:
        return obj.matrix_world.copy(), (f"No object of job {job_id[:8]} is in this file: the mesh's world "
                                         "coordinates were taken as the job's frame (z-up, as pose.json).")
    return read_frame(source).inverted() @ source.matrix_world.inverted() @ obj.matrix_world, None


def export_for_bake(context: bpy.types.Context, obj: bpy.types.Object, job_id: str,
                    path: Path) -> tuple[str, str | None]:
    """Write ``obj`` (modifiers applied) as a GLB in the job's frame with only its active UV map, unwrapping it
    first (Smart UV Project, a new map "UVMap") when it has none. Returns (the UV map's name, a note or None)."""
    if obj.mode == "EDIT":  # the edit-mode mesh is what the artist sees
        obj.update_from_editmode()
    if obj.data.uv_layers.active is None:
        with context.temp_override(active_object=obj, object=obj, selected_objects=[obj],
                                   selected_editable_objects=[obj]):
            bpy.ops.object.mode_set(mode="EDIT")
            bpy.ops.mesh.select_all(action="SELECT")
            bpy.ops.uv.smart_project()
            bpy.ops.object.mode_set(mode="OBJECT")
    uv_name = obj.data.uv_layers.active.name
    matrix, note = job_from_mesh(obj, job_id)
    mesh = bpy.data.meshes.new_from_object(obj.evaluated_get(context.evaluated_depsgraph_get()))
    for layer in [layer for layer in mesh.uv_layers if layer.name != uv_name]:  # the bake's UVs: TEXCOORD_0
        mesh.uv_layers.remove(layer)
    mesh.uv_layers.active = mesh.uv_layers[uv_name]  # the exporter writes UVs only with an active map
    mesh.uv_layers[uv_name].active_render = True
    # The server's GLB reader (trimesh) keeps TEXCOORD_0 only for a primitive with a material and no COLOR_0: so no
    # colours, and one plain material.
    for attribute in list(mesh.color_attributes):
        mesh.color_attributes.remove(attribute)
    mesh.materials.clear()
    placeholder = bpy.data.materials.new("one2345_bake_export")
    mesh.materials.append(placeholder)
    mesh.transform(matrix)
    temp = bpy.data.objects.new("one2345_bake_export", mesh)
    context.scene.collection.objects.link(temp)
    selected = list(context.view_layer.objects.selected)
    active = context.view_layer.objects.active
    try:
        for other in selected:
            other.select_set(False)
        temp.select_set(True)
        context.view_layer.objects.active = temp
        import addon_utils

        addon_utils.enable("io_scene_gltf2", default_set=False)  # a core add-on, but the user may have disabled it
        bpy.ops.export_scene.gltf(filepath=str(path), export_format="GLB", use_selection=True, export_apply=True,
                                  export_yup=True, export_materials="EXPORT")
    finally:
        bpy.data.objects.remove(temp)
        bpy.data.meshes.remove(mesh)
        bpy.data.materials.remove(placeholder)
        for other in selected:
            other.select_set(True)
        context.view_layer.objects.active = active
    return uv_name, note


def glb_image(path: Path, folder: Path, stem: str) -> Path:
    """The base-colour image of a textured GLB (the bake's result) written next to it as a file.

    Raises:
        ValueError: not a GLB, or one without an embedded image.
    """
    data = Path(path).read_bytes()
    if data[:4] != b"glTF" or len(data) < 20:
        raise ValueError(f"{path} is not a GLB file")
    (length,) = struct.unpack_from("<I", data, 12)
    gltf = json.loads(data[20:20 + length])
    binary_at = 20 + length + 8
    images = gltf.get("images") or []
    if not images:
        raise ValueError(f"{path} has no texture image (the bake's result should be textured)")
    index = 0
    for material in gltf.get("materials") or []:
        texture = (material.get("pbrMetallicRoughness") or {}).get("baseColorTexture")
        if texture is not None:
            index = gltf["textures"][texture["index"]]["source"]
            break
    image = images[index]
    view = gltf["bufferViews"][image["bufferView"]]
    start = binary_at + view.get("byteOffset", 0)
    suffix = ".jpg" if image.get("mimeType") == "image/jpeg" else ".png"
    out = Path(folder) / f"{stem}{suffix}"
    out.write_bytes(data[start:start + view["byteLength"]])
    return out


def bake_material(obj: bpy.types.Object, image_file: Path, uv_name: str, name: str) -> bpy.types.Material:
    """A new Principled BSDF material on ``obj`` (its only one) whose Base Color is the baked image read on the UV
    map ``uv_name``; the image is packed into the .blend."""
    image = bpy.data.images.load(str(image_file))
    image.name = f"One2345 Bake {name}"
    image.pack()
    material = mesh_import.colour_material(f"One2345 Bake {name}", None, image)
    tree = material.node_tree
    texture = next(node for node in tree.nodes if node.type == "TEX_IMAGE")
    uv = tree.nodes.new("ShaderNodeUVMap")
    uv.uv_map = uv_name
    uv.location = (texture.location.x - 220, texture.location.y)
    tree.links.new(uv.outputs["UV"], texture.inputs["Vector"])
    obj.data.materials.clear()
    obj.data.materials.append(material)
    return material


class BakeJob(GenerateJob):
    """Upload a mesh to ``POST /v1/jobs/{id}/bake`` and follow the new job like a re-mesh."""

    def __init__(self, mesh: Path, source: str, options: dict[str, Any], job_dir: Path, *args: Any,
                 **kwargs: Any) -> None:
        super().__init__(None, options, job_dir, *args, **kwargs)
        self.name, self.mesh_file, self.bake_of = "bake", Path(mesh), source
        self.uv_source: str | None = None
        """The result's ``uv_source``: ``mesh`` (the uploaded UVs) or ``unwrap`` (the server's own)."""

    def _submit(self, client: Client) -> dict[str, Any]:
        self.post("progress", jobs.Progress(stage="Uploading the mesh"))
        return client.bake(self.bake_of, self.mesh_file, self.options)

    def _collect(self, client: Client, connection: Any, status: dict[str, Any]) -> jobs.JobResult:
        self.uv_source = (status.get("result") or {}).get("uv_source")
        return super()._collect(client, connection, status)


class ONE2345_OT_bake_views(FollowJob, bpy.types.Operator):
    """Bake the job's 40 views onto the selected mesh (modifiers applied, its own active UV map, else a Smart UV
    Project) into a new material on that object"""

    bl_idname = "one2345.bake_views"
    bl_label = "Bake Views onto Selected"
    bl_options = {"REGISTER", "UNDO"}  # noqa: RUF012 - Blender reads a plain set; a ClassVar hint would be a property

    texture_size: EnumProperty(name="Texture Size", description="The baked image's side in pixels",
                               items=[(str(n), f"{n}²", "") for n in (512, 1024, 2048, 4096)], default="1024")
    job_id: bpy.props.StringProperty(name="Job", description="The job whose views to bake (default: the object's, "
                                                             "else the one selected in History)",
                                     options={"SKIP_SAVE"})

    _target = ""
    _uv_name = ""
    _note = None

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        """A mesh object is active, its job is known, and no job runs."""
        obj = context.active_object
        if obj is None or obj.type != "MESH":
            cls.poll_message_set("Select a mesh object")
            return False
        if not bake_job_id(context):
            cls.poll_message_set("Select an object made by One2345, or pick a job in History")
            return False
        return jobs.active() is None

    def make_job(self, context: bpy.types.Context) -> GenerateJob:
        obj = context.active_object
        job_id = self.job_id or bake_job_id(context)
        job_dir = new_job_dir("bake")
        job_dir.mkdir(parents=True, exist_ok=True)
        mesh_file = job_dir / f"{mesh_import_name(obj)}_upload.glb"
        try:
            self._uv_name, self._note = export_for_bake(context, obj, job_id, mesh_file)
        except (RuntimeError, ValueError) as exc:
            raise JobFailed(JobError("bad_input", f"Could not export {obj.name!r} for the bake: {exc}")) from exc
        self._target = obj.name
        connect, exit_code = addon_prefs.connector(addon_prefs.get(context))
        options = {"texture_size": int(self.texture_size), "keep_uvs": True, "format": "glb"}
        return begin(BakeJob(mesh_file, job_id, options, job_dir, connect, exit_code,
                             mesh_name=f"{mesh_import_name(obj)}_baked"))

    def finish(self, context: bpy.types.Context, job: GenerateJob) -> set[str]:
        """Put the baked image into a new material on the object (instead of importing the result as an object);
        a failure leaves the object as it was and becomes the job's error (the panel shows it)."""
        jobs.set_active(None)
        if self._note:
            job.notes.append(self._note)
        material = None
        if job.state == "done":
            try:
                material = self._apply(job)
            except JobFailed as exc:
                job.state, job.error = "failed", exc.error
        if material is None:
            return report_outcome(self, job, None)
        for note in job.notes:
            self.report({"WARNING"}, note)
        keep_job(addon_prefs.get(context), job.result.job_id)
        self.report({"INFO"}, f"Baked the views of job {job.bake_of[:8]} onto {self._target!r} (material "
                              f"{material.name!r}, UV map {self._uv_name!r}); job folder {job.result.job_dir}")
        return {"FINISHED"}

    def _apply(self, job: GenerateJob) -> bpy.types.Material:
        mesh = job.result.mesh
        obj = bpy.data.objects.get(self._target)
        if obj is None or obj.type != "MESH":
            raise JobFailed(JobError("bad_result", f"The object {self._target!r} is gone; the baked mesh is {mesh}."))
        meta = _bake_meta(job.result.meta)
        if (job.uv_source or meta.get("uv_source")) == "unwrap":
            raise JobFailed(JobError(
                "bad_result", f"The server could not use the UV map {self._uv_name!r} of {obj.name!r} "
                              f"({meta.get('uv_reason') or 'see meta.json'}) and baked onto a fresh unwrap instead: "
                              f"{mesh}. The object's material is unchanged.",
                "Fix the UVs (no overlapping or zero-area faces) and bake again, or import that file"))
        try:
            image = glb_image(mesh, job.result.job_dir, f"{job.mesh_name}_texture")
            material = bake_material(obj, image, self._uv_name, obj.name)
        except (OSError, ValueError, KeyError, IndexError, RuntimeError) as exc:
            raise JobFailed(JobError("bad_result", f"Could not read the baked texture of {mesh}: {exc}")) from exc
        obj["one2345_bake_job_id"] = job.result.job_id
        return material


def mesh_import_name(obj: bpy.types.Object) -> str:
    """A file-safe stem for the object's files."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in obj.name).strip("._") or "mesh"


def _bake_meta(meta: Path | None) -> dict[str, Any]:
    """meta.json's ``bake`` section (``uv_source`` and the UV check), or {}."""
    if meta is None:
        return {}
    try:
        text = json.loads(Path(meta).read_text())
    except (OSError, ValueError):
        return {}
    bake = text.get("bake") if isinstance(text, dict) else None
    return bake if isinstance(bake, dict) else {}


CLASSES = (ONE2345_OT_remesh, ONE2345_OT_regenerate, ONE2345_OT_quad_remesh, ONE2345_OT_bake_views)


# Blender's own helper: CLASSES registered in order, unregistered in reverse.
register, unregister = bpy.utils.register_classes_factory(CLASSES)
