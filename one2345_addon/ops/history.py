"""History's data and actions: the server's past jobs (input and view-0 thumbnails, date, state, time, settings),
with Import, Regenerate, Variation, Delete and Open Folder. The list is drawn by ``ui/history.py``.

The list lives in ``window_manager.one2345_history`` (not saved with the file: it mirrors the server). Refresh fetches
the newest page of ``GET /v1/jobs`` on a worker thread, More the next one; thumbnails are downloaded into the
extension's user folder once per job.
"""

# No `from __future__ import annotations`: Blender reads property annotations as objects, not strings.

import contextlib
from pathlib import Path
from typing import Any

import bpy
from bpy.props import BoolProperty, CollectionProperty, FloatProperty, IntProperty, StringProperty

from ..core import jobs, server_state
from ..core import settings as addon_prefs
from ..core.client import ServerError
from ..core.jobs import GenerateJob
from .generate import FollowJob, begin, keep_job, new_job_dir
from .tasks import redraw, report_failure, run_task

PAGE = 20
STATE = server_state.STATE


class ONE2345_PG_history_item(bpy.types.PropertyGroup):
    """One past job, as the server listed it."""

    job_id: StringProperty(name="Job")
    created: StringProperty(name="Created")
    state: StringProperty(name="State")
    seconds: FloatProperty(name="Time (s)")
    settings: StringProperty(name="Settings")
    remesh_of: StringProperty(name="Re-mesh Of")
    kind: StringProperty(name="Kind", description="mesh, or images (candidate pictures of a prompt)")
    input_thumb: StringProperty(name="Input Thumbnail", subtype="FILE_PATH")
    view_thumb: StringProperty(name="View 0 Thumbnail", subtype="FILE_PATH")


def describe_options(options: dict[str, Any]) -> str:
    """A one-line summary of a job's options: ``seed 7 · 75/50 steps · R 256 · 20k faces · texture 1024``."""
    parts = [f"seed {options.get('seed')}" if options.get("seed") is not None else "random seed",
             f"{options.get('steps_stage1')}/{options.get('steps_stage2')} steps", f"R {options.get('resolution')}"]
    if options.get("target_faces"):
        parts.append(f"{int(options['target_faces']) // 1000}k faces")
    if options.get("texture_size"):
        parts.append(f"texture {options['texture_size']}")
    if options.get("elevation") is not None:
        parts.append(f"elevation {float(options['elevation']):.0f}°")
    return " · ".join(parts)


def thumbs_dir() -> Path:
    """Where History keeps its thumbnails (one pair per job, fetched once)."""
    return addon_prefs.user_dir() / "history-thumbs"


def fetch_page(client: Any, folder: Path, after: str | None = None) -> dict[str, Any]:
    """One page of jobs with their thumbnails downloaded (worker thread): the page, with ``thumbs`` per job id."""
    page = client.job_page(limit=PAGE, after=after)
    thumbs = {}
    for status in page["jobs"]:
        job_id = status["id"]
        pair = []
        # An images job's thumbnails are its first two candidates; a mesh job's its input and view 0.
        remotes = (("input", "views/input_256.png"), ("view", "views/0.png"))
        if status.get("kind") == "images":
            remotes = (("input", "candidates/0.png"), ("view", "candidates/1.png"))
        for name, remote in remotes:
            path = folder / f"{job_id}_{name}.png"
            if not path.is_file():
                with contextlib.suppress(ServerError):
                    client.download(f"/v1/jobs/{job_id}/{remote}", path)
            pair.append(str(path) if path.is_file() else "")
        thumbs[job_id] = pair
    page["thumbs"] = thumbs
    return page


def fill(wm: bpy.types.WindowManager, page: dict[str, Any], append: bool) -> None:
    """Put a fetched page into the list (main thread)."""
    items = wm.one2345_history
    if not append:
        items.clear()
        STATE.history = []
    STATE.history = [*STATE.history, *page["jobs"]]
    STATE.history_next, STATE.history_total = page.get("next"), int(page.get("total") or 0)
    for status in page["jobs"]:
        item = items.add()
        item.job_id, item.state = status["id"], status["state"]
        item.created = status.get("created", "")[:19].replace("T", " ")
        item.seconds = float(status.get("elapsed_s") or 0.0)
        item.kind = status.get("kind") or "mesh"
        request = status.get("images") or {}
        item.settings = (f"“{request.get('prompt')}” · {request.get('count')} pictures · seed {request.get('seed')}"
                         if item.kind == "images" else describe_options(status.get("options") or {}))
        item.remesh_of = status.get("remesh_of") or ""
        item.input_thumb, item.view_thumb = page["thumbs"].get(status["id"], ("", ""))


def selected(context: bpy.types.Context) -> ONE2345_PG_history_item | None:
    """The history item selected in the list."""
    wm = context.window_manager
    index = wm.one2345_history_index
    return wm.one2345_history[index] if 0 <= index < len(wm.one2345_history) else None


def objects_of(job_id: str) -> list[str]:
    """Names of the objects in the open file that came from ``job_id``."""
    return [obj.name for obj in bpy.data.objects if obj.get("one2345_job_id") == job_id]


class ONE2345_OT_refresh_history(bpy.types.Operator):
    """Fetch the server's past jobs (the newest page; More fetches the next one)"""

    bl_idname = "one2345.refresh_history"
    bl_label = "Refresh History"

    more: BoolProperty(name="More", description="Append the next page instead of reloading",
                       options={"SKIP_SAVE"})

    def execute(self, context: bpy.types.Context) -> set[str]:
        """Fetch on a worker thread (synchronously in background mode)."""
        connect, _ = addon_prefs.connector(addon_prefs.get(context))
        after = STATE.history_next if self.more else None
        folder = thumbs_dir()
        append = self.more

        def fetch(task: jobs.Task) -> dict[str, Any]:
            connection = connect()
            STATE.jobs_dir = connection.jobs_dir if connection.local else None
            return fetch_page(connection.client(), folder, after)

        def done(task: jobs.Task) -> None:
            if task.state == "done":
                fill(bpy.context.window_manager, task.result, append)
            else:
                jobs.set_last(task)
            redraw(bpy.context)

        task = run_task(jobs.FunctionTask("history", fetch), done)
        if task.finished and task.state != "done":
            report_failure(self, str(task.error))
            return {"CANCELLED"}
        return {"FINISHED"}


class ONE2345_OT_history_job(FollowJob, bpy.types.Operator):
    """Import a past job's mesh, or run its recipe again (Regenerate) or with a new seed (Variation)"""

    bl_idname = "one2345.history_job"
    bl_label = "History Job"
    bl_options = {"UNDO"}  # noqa: RUF012 - Blender reads a plain set; a ClassVar hint would be a property

    job_id: StringProperty(name="Job", description="Server job id (default: the selected history item)",
                           options={"SKIP_SAVE"})
    action: bpy.props.EnumProperty(
        name="Action", items=(("IMPORT", "Import", "Import its mesh"),
                              ("REGENERATE", "Regenerate", "Run its recipe again: the same mesh"),
                              ("VARIATION", "Variation", "Its recipe with a new seed")),
        default="IMPORT", options={"SKIP_SAVE"})

    @classmethod
    def description(cls, context: bpy.types.Context, properties: bpy.types.OperatorProperties) -> str:
        """The tooltip of the chosen action."""
        return {"IMPORT": "Import this job's mesh into the scene",
                "REGENERATE": "Run this job's recipe again (same image, settings and seeds: the same mesh)",
                "VARIATION": "Run this job's recipe with a new seed"}[properties.action]

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        """No other job runs."""
        return jobs.active() is None

    def make_job(self, context: bpy.types.Context) -> GenerateJob:
        item = selected(context)
        job_id = self.job_id or (item.job_id if item is not None else "")
        if not job_id:
            raise jobs.JobFailed(jobs.JobError("bad_input", "No history item is selected.",
                                               "Refresh the history and select a job"))
        if any(s["id"] == job_id and s.get("kind") == "images" for s in STATE.history):
            raise jobs.JobFailed(jobs.JobError("bad_input", f"Job {job_id[:8]} made pictures of a prompt, not a "
                                                            "mesh.", "Show Candidates, then Use This on one"))
        connect, exit_code = addon_prefs.connector(addon_prefs.get(context))
        kind = self.action.lower()
        job_dir = new_job_dir(f"{kind}")
        name = f"history_{job_id[:8]}"
        return begin(GenerateJob(
            None, {}, job_dir, connect, exit_code, mesh_name=name,
            existing=job_id if self.action == "IMPORT" else None,
            recipe_of=None if self.action == "IMPORT" else job_id, variation=self.action == "VARIATION"))


class ONE2345_OT_delete_history_job(bpy.types.Operator):
    """Delete a past job from the server (objects made from it keep their mesh but can no longer be re-meshed)"""

    bl_idname = "one2345.delete_history_job"
    bl_label = "Delete Job"

    job_id: StringProperty(name="Job", options={"SKIP_SAVE"})

    def invoke(self, context: bpy.types.Context, event: bpy.types.Event) -> set[str]:
        """Ask first."""
        return context.window_manager.invoke_confirm(self, event)

    def execute(self, context: bpy.types.Context) -> set[str]:
        """DELETE the job, then drop it from the list."""
        item = selected(context)
        job_id = self.job_id or (item.job_id if item is not None else "")
        if not job_id:
            report_failure(self, "No history item is selected.")
            return {"CANCELLED"}
        connect, _ = addon_prefs.connector(addon_prefs.get(context))

        def delete(task: jobs.Task) -> str:
            connect().client().cancel(job_id)
            return job_id

        def done(task: jobs.Task) -> None:
            if task.state == "done":
                items = bpy.context.window_manager.one2345_history
                for i, entry in enumerate(items):
                    if entry.job_id == job_id:
                        items.remove(i)
                        break
                STATE.history = [s for s in STATE.history if s["id"] != job_id]
            jobs.set_last(task)
            redraw(bpy.context)

        task = run_task(jobs.FunctionTask("delete", delete), done)
        users = objects_of(job_id)
        if users:
            self.report({"WARNING"}, f"Objects {', '.join(users)} came from the deleted job; they keep their mesh.")
        if task.finished and task.state != "done":
            report_failure(self, str(task.error))
            return {"CANCELLED"}
        return {"FINISHED"}


class ONE2345_OT_open_history_folder(bpy.types.Operator):
    """Open the selected job's folder on the server's machine (local servers)"""

    bl_idname = "one2345.open_history_folder"
    bl_label = "Open Folder"

    def execute(self, context: bpy.types.Context) -> set[str]:
        """Open ``<server jobs folder>/<id>``; its path is reported in background mode."""
        item = selected(context)
        if item is None or not STATE.jobs_dir:
            report_failure(self, "No job selected, or the server is remote (its folders are on its "
                                           "machine).")
            return {"CANCELLED"}
        folder = Path(STATE.jobs_dir) / item.job_id
        if bpy.app.background:
            self.report({"INFO"}, str(folder))
        else:
            bpy.ops.wm.path_open(filepath=str(folder))
        return {"FINISHED"}


CLASSES = (ONE2345_PG_history_item, ONE2345_OT_refresh_history, ONE2345_OT_history_job,
           ONE2345_OT_delete_history_job, ONE2345_OT_open_history_folder)


@bpy.app.handlers.persistent
def _pin_referenced_jobs(*args: object) -> None:
    """After a file opens, pin the server jobs its objects came from, so the size limit never deletes them."""
    ids = sorted({str(obj["one2345_job_id"]) for obj in bpy.data.objects if obj.get("one2345_job_id")})
    if ids:
        keep_job(addon_prefs.get(), *ids, start_server=False)


def register() -> None:
    """Register the list's items, its operators and the pinning handler."""
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.WindowManager.one2345_history = CollectionProperty(type=ONE2345_PG_history_item)
    bpy.types.WindowManager.one2345_history_index = IntProperty(name="History Index", default=0)
    bpy.app.handlers.load_post.append(_pin_referenced_jobs)


def unregister() -> None:
    """Unregister."""
    if _pin_referenced_jobs in bpy.app.handlers.load_post:
        bpy.app.handlers.load_post.remove(_pin_referenced_jobs)
    del bpy.types.WindowManager.one2345_history_index
    del bpy.types.WindowManager.one2345_history
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
