"""Actions on an object a job made (the "Active Object" panel): Re-mesh its job from the views, Regenerate its
recipe, or a Variation with a new seed."""

# No `from __future__ import annotations`: Blender reads property annotations as objects, not strings.

from pathlib import Path

import bpy
from bpy.props import BoolProperty, IntProperty

from ..core import jobs, properties
from ..core import settings as addon_prefs
from ..core.jobs import GenerateJob
from .generate import FollowJob, begin, new_job_dir


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
        recipe = jobs.parse_recipe(obj["one2345_recipe"])
        seed = self.seed if self.properties.is_property_set("seed") else None
        options = jobs.recipe_options(recipe, variation=self.variation, seed=seed)
        job_dir = new_job_dir("variation" if self.variation else "regenerate")
        image = jobs.recipe_input(Path(obj.get("one2345_input") or ""), obj.get("one2345_input_sha256", ""), job_dir)
        connect, exit_code = addon_prefs.connector(addon_prefs.get(context))
        return begin(GenerateJob(image, options, job_dir, connect, exit_code,
                                 mesh_name=obj.get("one2345_name") or obj.name))


CLASSES = (ONE2345_OT_remesh, ONE2345_OT_regenerate)


def register() -> None:
    """Register the object actions."""
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister() -> None:
    """Unregister them."""
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
