"""Generating: Generate Mesh (modal interactively, synchronous in background mode), the review of the views
(Re-roll, Continue), Cancel, and what every job-following operator shares (:class:`FollowJob`, :func:`begin`,
:func:`finish_generation`).
"""

# No `from __future__ import annotations`: Blender reads property annotations as objects, not strings.

import contextlib
import re
import shutil
import threading
import time
from pathlib import Path

import bpy
from bpy.props import IntProperty, StringProperty

from ..core import jobs, mesh_import, properties, server_process, server_state
from ..core import settings as addon_prefs
from ..core.client import ServerError
from ..core.jobs import GenerateJob, JobError
from .tasks import redraw, report_failure

# -- generating ---------------------------------------------------------------------------------------------------

def resolve_input(context: bpy.types.Context, filepath: str, image_name: str, job_dir: Path) -> tuple[Path, str]:
    """Put the input image into ``job_dir`` and return (its path, the name for the mesh and the object).

    The source is ``filepath`` if given, else the image datablock ``image_name``, else the panel's choice: a file,
    an image datablock, or the image of the active image empty / reference image.

    Raises:
        jobs.JobFailed: ``bad_input`` naming what is missing.
    """
    settings = context.scene.one2345
    image = None
    if not filepath and not image_name:
        if settings.image_source == "FILE":
            filepath = settings.filepath
        elif settings.image_source == "IMAGE":
            image = settings.image
        else:
            obj = context.active_object
            if obj is None or obj.type != "EMPTY" or obj.empty_display_type != "IMAGE" or obj.data is None:
                raise jobs.JobFailed(JobError("bad_input", "The active object is not an image empty or reference "
                                              "image with an image.", "Select one, or choose File or Image"))
            image = obj.data
    elif image_name:
        image = bpy.data.images.get(image_name)
        if image is None:
            raise jobs.JobFailed(JobError("bad_input", f"There is no image named {image_name!r} in this file."))
    job_dir.mkdir(parents=True, exist_ok=True)
    if image is not None:
        try:
            return mesh_import.image_to_file(image, job_dir), _safe_name(Path(image.name).stem)
        except (ValueError, RuntimeError) as exc:
            raise jobs.JobFailed(JobError("bad_input", str(exc))) from exc
    if not filepath:
        raise jobs.JobFailed(JobError("bad_input", "No input image chosen.", "Pick an image file in the panel"))
    source = Path(bpy.path.abspath(filepath))
    if not source.is_file():
        raise jobs.JobFailed(JobError("bad_input", f"The image file {str(source)!r} does not exist.",
                                      "Choose an existing image file"))
    return Path(shutil.copyfile(source, job_dir / f"input{source.suffix.lower()}")), _safe_name(source.stem)


def _safe_name(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "image"


def new_job_dir(tag: str = "") -> Path:
    """A fresh folder for one job under the extension's user folder: ``jobs/<date-time-ms>[-tag]`` (the tag cut
    short: Windows paths stay under MAX_PATH)."""
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{int(time.time() * 1000) % 1000:03d}"
    return addon_prefs.user_dir() / "jobs" / (f"{stamp}-{tag[:16]}" if tag else stamp)


def begin(job: GenerateJob) -> GenerateJob:
    """Make ``job`` the active job, keep the review settings in step with it, and start it (main thread)."""
    job.on("review", _on_review)
    jobs.set_active(job)
    return job.start()


def _on_review(review: jobs.ReviewState | None) -> None:
    """A new set of views to review: clear the re-roll checkboxes and show the elevation the run would use."""
    if review is None:
        return
    settings = bpy.context.scene.one2345
    settings.review_selected = (False,) * len(settings.review_selected)
    settings.review_elevation = review.elevation
    redraw(bpy.context)


def start_generation(context: bpy.types.Context, operator: bpy.types.Operator | None = None, filepath: str = "",
                     image_name: str = "") -> GenerateJob:
    """Start a generation job on a worker thread and make it the active job (main thread).

    Raises:
        jobs.JobFailed: the input could not be prepared (nothing was started).
    """
    prefs = addon_prefs.get(context)
    options = properties.to_request(context.scene.one2345, operator)
    job_dir = new_job_dir()
    image, name = resolve_input(context, filepath, image_name, job_dir)
    connect, exit_code = addon_prefs.connector(prefs)
    return begin(GenerateJob(image, options, job_dir, connect, exit_code, mesh_name=name))


def finish_generation(context: bpy.types.Context, job: GenerateJob) -> bpy.types.Object | None:
    """Import the result of a finished job (main thread); stop the server unless it is kept warm."""
    jobs.set_active(None)
    prefs = addon_prefs.get(context)
    obj = None
    if job.state == "done":
        try:
            obj = mesh_import.import_mesh(context, job.result.mesh, job.mesh_name, prefs.import_size)
        except (ValueError, RuntimeError) as exc:  # an unreadable file: the job is kept, the import failed
            job.state, job.error = "failed", JobError("bad_result", f"Could not import {job.result.mesh}: {exc}")
        else:
            mesh_import.link_job(obj, job.result, job.mesh_name)
            keep_job(prefs, job.result.job_id)
    manager = server_process.current_manager()
    if not prefs.keep_warm and manager is not None:
        manager.stop()
    return obj


def keep_job(prefs: bpy.types.AddonPreferences, *job_ids: str, start_server: bool = True) -> None:
    """Pin server jobs that objects refer to, so the server's size-limit clean-up never deletes them (a thread:
    a slow server must not stall the UI; a job the server no longer has is simply not pinned). With
    ``start_server=False`` a local server that is not running is left alone (it cleans up only while running)."""
    manager = server_process.current_manager()
    local_idle = prefs.server_mode == "LOCAL" and (manager is None or not manager.running())
    if not job_ids or (local_idle and not start_server):
        return
    connect, _ = addon_prefs.connector(prefs)

    def pin() -> None:
        try:  # best effort: the object still has its own copy of the mesh
            client = connect().client(timeout=10.0)
            for job_id in job_ids:
                with contextlib.suppress(ServerError):  # a job the server no longer has
                    client.pin(job_id)
        except ServerError as exc:  # no server to pin on: it cannot clean up either
            print(f"One2345: could not pin jobs {', '.join(job_ids)} on the server: {exc}")

    threading.Thread(target=pin, name="one2345-pin", daemon=True).start()


def report_outcome(operator: bpy.types.Operator, job: GenerateJob, obj: bpy.types.Object | None) -> set[str]:
    """Report notes and the outcome; return the operator's result set."""
    for note in job.notes:
        operator.report({"WARNING"}, note)
    if obj is not None:
        operator.report({"INFO"}, f"Imported {obj.name!r} ({len(obj.data.vertices)} vertices); job folder "
                                  f"{job.result.job_dir}")
        return {"FINISHED"}
    if job.state == "cancelled":
        operator.report({"WARNING"}, str(job.error))
    else:
        report_failure(operator, str(job.error))
    return {"CANCELLED"}


def weights_block_reason() -> str | None:
    """Why no job can run right now as far as the add-on knows (the last health/weights answer), or None."""
    health = server_state.STATE.health
    weights = (health or {}).get("weights") or {}
    if weights and not weights.get("ready", True):
        size = server_state.human_bytes(server_state.STATE.missing_bytes())
        return (f"Model weights are missing ({', '.join(weights.get('required_missing') or [])}; {size}): "
                "download them in Preferences > Add-ons > One2345")
    return None


class FollowJob:
    """What Generate, Re-mesh and Regenerate share: start a job, then follow it modally (interactive) or wait for
    it (background mode and scripts), then import the result. A job paused for review keeps the modal operator
    running; in background mode the operator returns and ``one2345.continue_job`` finishes the job.

    Each operator defines ``make_job(context) -> GenerateJob``, which prepares and starts its job (raising
    :class:`jobs.JobFailed` when it cannot start)."""

    _job = None
    _timer = None

    def _start(self, context: bpy.types.Context) -> bool:
        try:
            self._job = self.make_job(context)
        except jobs.JobFailed as exc:
            jobs.set_last(jobs.failed(self.bl_label.lower(), exc.error))
            report_failure(self, str(exc.error))
            return False
        return True

    def execute(self, context: bpy.types.Context) -> set[str]:
        """Run to completion (background mode and scripts), or until the job waits for review; Ctrl+C cancels."""
        if not self._start(context):
            return {"CANCELLED"}
        job = self._job
        job.wait(until=lambda: job.review is not None)
        if job.review is not None and not job.finished:
            self.report({"INFO"}, f"{len(job.review.views)} views are ready for review in {job.review.views[0].parent}"
                                  "; re-roll some (one2345.reroll_views) or continue (one2345.continue_job).")
            return {"FINISHED"}
        return self.finish(context, job)

    def finish(self, context: bpy.types.Context, job: GenerateJob) -> set[str]:
        """The job ended (main thread): import its result and report; Bake Views onto Selected overrides it."""
        return report_outcome(self, job, finish_generation(context, job))

    def invoke(self, context: bpy.types.Context, event: bpy.types.Event) -> set[str]:
        """Start the job and follow it with a timer, keeping the UI responsive."""
        if bpy.app.background or context.window is None:
            return self.execute(context)
        if not self._start(context):
            return {"CANCELLED"}
        self._job.followed = True
        self._timer = context.window_manager.event_timer_add(0.1, window=context.window)
        context.window_manager.modal_handler_add(self)
        return {"RUNNING_MODAL"}

    def modal(self, context: bpy.types.Context, event: bpy.types.Event) -> set[str]:
        """Drain the job's events on the main thread; Esc cancels (not while reviewing: Esc is for the panel)."""
        if event.type == "ESC" and event.value == "PRESS" and self._job.review is None:
            self._job.cancel()
            return {"RUNNING_MODAL"}
        if event.type != "TIMER":
            return {"PASS_THROUGH"}
        finished = self._job.drain()
        redraw(context)
        if not finished:
            return {"RUNNING_MODAL"}
        context.window_manager.event_timer_remove(self._timer)
        return self.finish(context, self._job)


class ONE2345_OT_generate_mesh(FollowJob, bpy.types.Operator):
    """Generate a coloured 3D mesh from the image with One-2-3-45 and import it"""

    bl_idname = "one2345.generate_mesh"
    bl_label = "Generate Mesh"
    # UNDO without REGISTER: one undo step, but no "Adjust Last Operation" panel, whose every change would run the
    # whole generation again, blocking Blender.
    bl_options = {"UNDO"}  # noqa: RUF012 - Blender reads a plain set; a ClassVar hint would be a property

    __annotations__ = {
        "filepath": StringProperty(name="Image File", subtype="FILE_PATH", options={"SKIP_SAVE"},
                                   description="Input image (default: the panel's image)"),
        "image_name": StringProperty(name="Image", options={"SKIP_SAVE"},
                                     description="Name of an image datablock to use instead of a file"),
        **properties.skip_save_options(),
    }

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        """Greyed out while a job runs, and (with the reason) while the server lacks weights it needs."""
        if jobs.active() is not None:
            cls.poll_message_set("A job is running; wait for it or cancel it")
            return False
        reason = weights_block_reason()
        if reason:
            cls.poll_message_set(reason)
            return False
        return True

    def make_job(self, context: bpy.types.Context) -> GenerateJob:
        return start_generation(context, self, self.filepath, self.image_name)


# -- review ---------------------------------------------------------------------------------------------------------

def reviewing_job() -> GenerateJob | None:
    """The active job if it waits for review."""
    job = jobs.active()
    return job if job is not None and job.review is not None else None


class _InReview:
    """Operators that answer a review."""

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        """Only while a job waits for review."""
        if reviewing_job() is None:
            cls.poll_message_set("No job is waiting for review")
            return False
        return True


class ONE2345_OT_reroll_views(_InReview, bpy.types.Operator):
    """Generate the ticked views again with a new seed (the others are kept as they are)"""

    bl_idname = "one2345.reroll_views"
    bl_label = "Re-roll Selected"

    views: StringProperty(name="Views", options={"SKIP_SAVE"},
                          description="View numbers, e.g. '1,5' (default: the ticked views in the panel)")
    seed: IntProperty(name="Seed", min=0, options={"SKIP_SAVE"},
                      description="Seed of the re-rolled views (default: the panel's, else a random one)")

    def execute(self, context: bpy.types.Context) -> set[str]:
        """Send the re-roll; in background mode wait for the new views."""
        job = reviewing_job()
        settings = context.scene.one2345
        review = job.review
        if self.views.strip():
            try:
                numbers = [int(part) for part in self.views.replace(" ", "").split(",") if part]
            except ValueError:
                report_failure(self, f"Views {self.views!r} are not numbers; give e.g. '1,5' (views "
                                     f"{', '.join(map(str, review.numbers))}).")
                return {"CANCELLED"}
        else:
            numbers = [n for i, n in enumerate(review.numbers) if settings.review_selected[i]]
        if not numbers:
            report_failure(self, "No view is ticked: tick the views to re-roll first.")
            return {"CANCELLED"}
        seed = self.seed if self.properties.is_property_set("seed") else (settings.review_seed or None)
        job.reroll(numbers, seed)
        if bpy.app.background:
            job.wait(until=lambda: job.review is not None and job.review.revision > review.revision)
        self.report({"INFO"}, f"Re-rolling views {', '.join(map(str, numbers))}.")
        return {"FINISHED"}


class ONE2345_OT_continue_job(_InReview, bpy.types.Operator):
    """Accept the views and make the mesh (with the elevation shown in the panel)"""

    bl_idname = "one2345.continue_job"
    bl_label = "Continue"
    bl_options = {"UNDO"}  # noqa: RUF012 - Blender reads a plain set; a ClassVar hint would be a property

    def execute(self, context: bpy.types.Context) -> set[str]:
        """Send Continue; when no modal operator follows the job (background mode), wait and import here."""
        job = reviewing_job()
        elevation = context.scene.one2345.review_elevation
        job.proceed(None if abs(elevation - job.review.elevation) < 1e-3 else elevation)
        if job.followed:
            return {"FINISHED"}
        job.wait()
        return report_outcome(self, job, finish_generation(context, job))


class ONE2345_OT_cancel_job(bpy.types.Operator):
    """Cancel the running generation (Esc does the same)"""

    bl_idname = "one2345.cancel_job"
    bl_label = "Cancel"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        """Only while a job runs."""
        return jobs.active() is not None

    def execute(self, context: bpy.types.Context) -> set[str]:
        """Ask the job to stop; it ends as cancelled within a second or two."""
        jobs.active().cancel()
        return {"FINISHED"}


CLASSES = (ONE2345_OT_generate_mesh, ONE2345_OT_reroll_views, ONE2345_OT_continue_job, ONE2345_OT_cancel_job)


@bpy.app.handlers.persistent
def _forget_job_on_load(*args: object) -> None:
    """Opening another file ends the modal operator; cancel its job so Generate does not stay greyed out."""
    jobs.cancel_all()
    jobs.set_active(None)


def register() -> None:
    """Register the operators and the file-load handler."""
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.app.handlers.load_pre.append(_forget_job_on_load)


def unregister() -> None:
    """Cancel a running job and unregister."""
    if _forget_job_on_load in bpy.app.handlers.load_pre:
        bpy.app.handlers.load_pre.remove(_forget_job_on_load)
    jobs.cancel_all()
    jobs.set_active(None)
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
