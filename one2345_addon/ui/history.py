"""The History panel's body: the server's past jobs in a list (thumbnails of the input and of view 0, date, state,
time, settings) with Import, Regenerate, Variation, Delete and Open Folder. The list's data and its operators live
in ``ops/history.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bpy

from ..core import server_state
from ..ops.history import selected
from .previews import preview_icon

STATE = server_state.STATE


class ONE2345_UL_history(bpy.types.UIList):
    """A row per job: input and view-0 thumbnails, date, state, time."""

    def draw_item(self, context: bpy.types.Context, layout: bpy.types.UILayout, data: Any, item: Any, icon: int,
                  active_data: Any, active_property: str, index: int = 0, flt_flag: int = 0) -> None:
        """Draw one job."""
        row = layout.row(align=True)
        for thumb in (item.input_thumb, item.view_thumb):
            if thumb and Path(thumb).is_file():
                row.template_icon(icon_value=preview_icon(Path(thumb)), scale=1.6)
            else:
                row.label(text="", icon="IMAGE_DATA")
        col = row.column(align=True)
        took = f" · {server_state.format_seconds(item.seconds)}" if item.seconds else ""
        what = " · re-mesh" if item.remesh_of else " · pictures" if item.kind == "images" else ""
        col.label(text=f"{item.created}  {item.state}{took}{what}")
        col.label(text=item.settings)


def draw_history(layout: bpy.types.UILayout, context: bpy.types.Context) -> None:
    """The History panel's body."""
    wm = context.window_manager
    row = layout.row(align=True)
    row.operator("one2345.refresh_history", text="Refresh", icon="FILE_REFRESH")
    if STATE.history_next:
        row.operator("one2345.refresh_history", text="More", icon="TRIA_DOWN").more = True
    layout.template_list("ONE2345_UL_history", "", wm, "one2345_history", wm, "one2345_history_index", rows=4)
    item = selected(context)
    if item is None:
        return
    if item.kind == "images":  # candidate pictures: show them in the panel to use one
        row = layout.row(align=True)
        row.enabled = item.state == "done"
        row.operator("one2345.show_candidates", icon="IMAGE_DATA").job_id = item.job_id
        row.operator("one2345.delete_history_job", text="Delete", icon="TRASH").job_id = item.job_id
        return
    row = layout.row(align=True)
    row.enabled = item.state == "done"
    for action, text, icon in (("IMPORT", "Import", "IMPORT"), ("REGENERATE", "Regenerate", "FILE_REFRESH"),
                               ("VARIATION", "Variation", "SHADERFX")):
        op = row.operator("one2345.history_job", text=text, icon=icon)
        op.action, op.job_id = action, item.job_id
    row = layout.row(align=True)
    row.enabled = item.state == "done"
    row.operator("one2345.bake_views", text="Bake onto Active Object", icon="TEXTURE").job_id = item.job_id
    row = layout.row(align=True)
    row.operator("one2345.delete_history_job", text="Delete", icon="TRASH").job_id = item.job_id
    row.operator("one2345.open_history_folder", icon="FILE_FOLDER")


CLASSES = (ONE2345_UL_history,)


# Blender's own helper: CLASSES registered in order, unregistered in reverse.
register, unregister = bpy.utils.register_classes_factory(CLASSES)
