"""The "One2345" tab of the 3D Viewport sidebar: drawing only (state lives in the scene settings and in core/jobs)."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import bpy

from ..core import images, jobs, server_state
from ..ops.history import describe_options
from ..ops.tasks import FIXES
from .history import draw_history
from .previews import preview_icon

MAIN_VIEW = re.compile(r"^\d+\.png$")
"""Previews shown in the panel: the generated views (``0.png`` …), not the nearby stage-2 views."""
MAX_PREVIEWS = 8


def wrapped_label(layout: bpy.types.UILayout, text: str, width: int = 48, icon: str = "NONE") -> None:
    """Labels do not wrap by themselves: one label per line, the first with the icon."""
    lines = [line for paragraph in text.splitlines() for line in (textwrap.wrap(paragraph, width) or [""])]
    for i, line in enumerate(lines):
        layout.label(text=line, icon=icon if i == 0 else "NONE")


def draw_image_source(layout: bpy.types.UILayout, context: bpy.types.Context,
                      settings: bpy.types.PropertyGroup) -> None:
    """Image or Prompt; for an image: a file, an image datablock, or the active image empty."""
    layout.prop(settings, "input_mode", expand=True)
    if settings.input_mode == "PROMPT":
        draw_prompt(layout, settings)
        return
    layout.prop(settings, "image_source", expand=True)
    if settings.image_source == "FILE":
        layout.prop(settings, "filepath", text="")
    elif settings.image_source == "IMAGE":
        layout.template_ID(settings, "image", open="image.open")
    else:
        obj = context.active_object
        ok = obj is not None and obj.type == "EMPTY" and obj.empty_display_type == "IMAGE" and obj.data is not None
        layout.label(text=f"{obj.name}: {obj.data.name}" if ok else "Select an image empty", icon=(
            "IMAGE_REFERENCE" if ok else "ERROR"))


def draw_prompt(layout: bpy.types.UILayout, settings: bpy.types.PropertyGroup) -> None:
    """The prompt, the optional negative prompt, how many pictures and their seed."""
    layout.prop(settings, "prompt", text="", icon="FONT_DATA")
    col = layout.column(align=True)
    col.use_property_split = True
    col.prop(settings, "negative_prompt")
    col.prop(settings, "image_count")
    row = col.row(align=True)
    row.enabled = not settings.use_random_image_seed
    row.prop(settings, "image_seed")
    col.prop(settings, "use_random_image_seed")


def draw_candidates(layout: bpy.types.UILayout) -> None:
    """The sets of pictures, newest first, each large with *Use This*; *More* and *Clear* under them."""
    shown = images.sets()
    if not shown:
        return
    for number, found in enumerate(shown):
        box = layout.box()
        wrapped_label(box, f"“{found.prompt}” · seed {found.seed}" + (" (newest)" if number == 0 else ""),
                      icon="IMAGE_DATA")
        grid = box.grid_flow(columns=2, even_columns=True, align=True)
        for index, path in enumerate(found.paths):
            cell = grid.column(align=True)
            cell.template_icon(icon_value=preview_icon(path), scale=6.0)
            op = cell.operator("one2345.use_candidate", text=f"Use This ({index + 1})", icon="CHECKMARK")
            op.job_id, op.index = found.job_id, index
    row = layout.row(align=True)
    row.operator("one2345.generate_images", text="More", icon="FILE_REFRESH").more = True
    row.operator("one2345.clear_candidates", icon="X")


def draw_options(layout: bpy.types.UILayout, settings: bpy.types.PropertyGroup) -> None:
    """The request options."""
    col = layout.column(align=True)
    col.use_property_split = True
    col.prop(settings, "elevation_mode")
    if settings.elevation_mode == "MANUAL":
        col.prop(settings, "elevation")
    row = col.row(align=True)
    row.prop(settings, "seed")
    row.prop(settings, "use_random_seed", text="", icon="FILE_REFRESH")
    col.prop(settings, "quality")
    if settings.quality == "CUSTOM":
        col.prop(settings, "steps_stage1")
        col.prop(settings, "steps_stage2")
        col.prop(settings, "guidance")
    col.prop(settings, "resolution")
    col.prop(settings, "remove_background")
    col.prop(settings, "colours")
    if settings.colours == "TEXTURE":
        col.prop(settings, "texture_size")
    else:
        col.prop(settings, "mesh_format")
    col.prop(settings, "target_faces")
    col.prop(settings, "review")


def draw_preflight(layout: bpy.types.UILayout) -> None:
    """What the add-on knows before Generate: server, weights, device and memory, the time to expect."""
    col = layout.column(align=True)
    col.scale_y = 0.8
    for ok, text in server_state.STATE.preflight():
        col.label(text=text, icon="CHECKMARK" if ok else "ERROR")


def draw_review(layout: bpy.types.UILayout, job: jobs.GenerateJob, settings: bpy.types.PropertyGroup) -> None:
    """The views to judge, large, each with its re-roll checkbox; the elevation to use; Re-roll and Continue."""
    review = job.review
    box = layout.box()
    box.label(text=f"Review the views (revision {review.revision}, seed {review.seed})", icon="HIDE_OFF")
    grid = box.grid_flow(columns=4, even_columns=True, align=True)
    for i, (path, number) in enumerate(zip(review.views, review.numbers, strict=True)):
        cell = grid.column(align=True)
        cell.template_icon(icon_value=preview_icon(path), scale=5.0)
        rerolled = f" (seed {review.view_seeds[str(number)]})" if str(number) in review.view_seeds else ""
        cell.prop(settings, "review_selected", index=i, text=f"View {number}{rerolled}")
    col = box.column(align=True)
    col.use_property_split = True
    col.prop(settings, "review_elevation")
    source = {"estimated": "estimated", "fallback": "fallback (no confident estimate)", "given": "given"}.get(
        review.elevation_source, review.elevation_source)
    col.label(text=f"Estimate {review.elevation:.1f}° ({source})",
              icon="ERROR" if review.elevation_uncertain else "INFO")
    col.prop(settings, "review_seed")
    for note in review.notes:
        wrapped_label(box, note, icon="INFO")
    if review.expires_in_s is not None:
        box.label(text=f"Waits {server_state.format_seconds(review.expires_in_s)} more, then expires", icon="TIME")
    row = box.row(align=True)
    row.scale_y = 1.3
    row.operator("one2345.reroll_views", icon="FILE_REFRESH")
    row.operator("one2345.continue_job", icon="PLAY")
    box.operator("one2345.cancel_job", text="Cancel", icon="CANCEL")


def draw_progress(layout: bpy.types.UILayout, job: jobs.GenerateJob) -> None:
    """Progress bar with stage and step, the previews so far, and Cancel."""
    factor, text = jobs.bar(job.progress, cancelling=job.cancel_requested)
    layout.progress(factor=factor, type="BAR", text=text)
    if job.progress.setup and not job.cancel_requested:
        layout.label(text="Only the first Generate does this (about a minute); later jobs start at once.",
                     icon="INFO")
    layout.operator("one2345.cancel_job", text="Cancel (Esc)", icon="CANCEL")
    draw_previews(layout, job.previews)


def draw_previews(layout: bpy.types.UILayout, previews: list[Path]) -> None:
    """The generated views, newest first."""
    views = [path for path in previews if MAIN_VIEW.match(path.name)][-MAX_PREVIEWS:]
    if not views:
        return
    grid = layout.grid_flow(columns=4, even_columns=True, align=True)
    for path in views:
        grid.template_icon(icon_value=preview_icon(path), scale=3.0)


def draw_outcome(layout: bpy.types.UILayout, task: jobs.Task | None) -> None:
    """The last task's notes, or its error with the buttons that fix it."""
    if task is None:
        return
    for note in task.notes:
        wrapped_label(layout, note, icon="INFO")
    if task.state == "running":
        p = task.progress
        layout.label(text=f"{task.name.capitalize()}: {p.stage}", icon="TIME")
    elif task.state == "failed" and task.error is not None:
        box = layout.box()
        box.alert = True
        wrapped_label(box, task.error.message, icon="ERROR")
        if task.error.fix:
            wrapped_label(box, f"Fix: {task.error.fix}.")
        for idname, text, icon in FIXES.get(task.error.kind, ()):
            box.operator(idname, text=text, icon=icon)
    elif task.state == "cancelled":
        layout.label(text="Cancelled.", icon="CANCEL")
    elif task.state == "done" and isinstance(task.result, jobs.JobResult):
        result = task.result
        layout.label(text=f"Done: {result.vertices} vertices, {result.faces} faces", icon="CHECKMARK")
        layout.operator("wm.path_open", text="Open Job Folder", icon="FILE_FOLDER").filepath = str(result.job_dir)
        draw_previews(layout, task.previews)


class ONE2345_PT_generate(bpy.types.Panel):
    """Image to 3D mesh with One-2-3-45."""

    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "One2345"
    bl_label = "Generate Mesh"

    def draw(self, context: bpy.types.Context) -> None:
        """Image, options, then Generate or the running job's progress, then the last outcome."""
        layout = self.layout
        settings = context.scene.one2345
        draw_image_source(layout, context, settings)
        draw_options(layout, settings)
        job = jobs.active()
        if job is not None and job.review is not None:
            draw_review(layout, job, settings)
        elif job is not None:
            draw_progress(layout, job)
        elif settings.input_mode == "PROMPT":
            draw_preflight(layout)
            reason = images.text_block_reason(server_state.STATE.health, server_state.STATE.weights)
            if reason:  # the button's tooltip says it too, but only on hover
                wrapped_label(layout, reason, icon="ERROR")
            row = layout.row()
            row.scale_y = 1.5
            row.operator("one2345.generate_images", icon="IMAGE_DATA")
            draw_outcome(layout, jobs.last())
            draw_candidates(layout)
        else:
            draw_preflight(layout)
            row = layout.row()
            row.scale_y = 1.5
            row.operator("one2345.generate_mesh", icon="MESH_MONKEY")
            draw_outcome(layout, jobs.last())


class ONE2345_PT_object(bpy.types.Panel):
    """The active object's job: what made it, Re-mesh, Regenerate and Variation."""

    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "One2345"
    bl_label = "Active Object"
    bl_parent_id = "ONE2345_PT_generate"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        """Only for objects made by One2345."""
        obj = context.active_object
        return obj is not None and bool(obj.get("one2345_job_id"))

    def draw(self, context: bpy.types.Context) -> None:
        """The recipe in brief, and the actions on it."""
        layout = self.layout
        obj = context.active_object
        recipe = obj.get("one2345_recipe")
        kind = "texture" if obj.get("one2345_textured") else "vertex colours"
        layout.label(text=f"{obj.name}: {len(obj.data.polygons) if obj.type == 'MESH' else 0} faces, {kind}",
                     icon="OBJECT_DATA")
        if obj.get("one2345_prompt"):
            wrapped_label(layout, f"Prompt: “{obj['one2345_prompt']}”", icon="FONT_DATA")
        if recipe:
            options = json.loads(recipe).get("options") or {}
            layout.label(text=describe_options(options))
        if obj.get("one2345_remesh_of"):
            layout.label(text=f"Re-mesh of job {str(obj['one2345_remesh_of'])[:8]}", icon="MOD_REMESH")
        layout.operator("one2345.remesh", icon="MOD_REMESH")
        row = layout.row(align=True)
        row.operator("one2345.quad_remesh", icon="MOD_REMESH")
        row.operator("one2345.bake_views", icon="TEXTURE")
        row = layout.row(align=True)
        row.operator("one2345.regenerate", icon="FILE_REFRESH")
        row.operator("one2345.regenerate", text="Variation", icon="SHADERFX").variation = True
        layout.operator("wm.path_open", text="Open Job Folder", icon="FILE_FOLDER").filepath = str(
            obj.get("one2345_job_dir", ""))


class ONE2345_PT_history(bpy.types.Panel):
    """Past jobs on the server."""

    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "One2345"
    bl_label = "History"
    bl_parent_id = "ONE2345_PT_generate"
    bl_options = {"DEFAULT_CLOSED"}  # noqa: RUF012 - Blender reads a plain set; a ClassVar hint would be a property

    def draw(self, context: bpy.types.Context) -> None:
        """The list and its actions."""
        draw_history(self.layout, context)


CLASSES = (ONE2345_PT_generate, ONE2345_PT_object, ONE2345_PT_history)


# Blender's own helper: CLASSES registered in order, unregistered in reverse.
register, unregister = bpy.utils.register_classes_factory(CLASSES)
