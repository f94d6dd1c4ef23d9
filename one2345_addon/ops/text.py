"""Text to 3D: *Generate Images* (a prompt → candidate pictures), *More* (another set, a new seed), *Use This* (the
normal Generate from one candidate, *Review Views* included), *Clear*, *Show Candidates* of a History item, and
*Download Text Model* (only the text-to-image files).

The images job runs like a generation (modal with progress and Cancel, synchronous in background mode) and greys
Generate out while it runs; its candidates land in :func:`core.images.sets`, drawn large by the panel.
"""

# No `from __future__ import annotations`: Blender reads property annotations as objects, not strings.

import re
import secrets
import shutil
from pathlib import Path

import bpy
from bpy.props import IntProperty, StringProperty

from ..core import images, jobs, properties, server_state
from ..core import settings as addon_prefs
from ..core.jobs import GenerateJob, JobError
from .generate import FollowJob, begin, new_job_dir, weights_block_reason
from .tasks import redraw, report_failure, run_task
from .weights import start_download

STATE = server_state.STATE


def candidates_dir() -> Path:
    """Where the candidates are kept: ``<user dir>/candidates/<images job id>/<i>.png``."""
    return addon_prefs.user_dir() / "candidates"


def _busy(cls: type) -> bool:
    """Grey out (with the reason) while a job runs."""
    if jobs.active() is not None:
        cls.poll_message_set("A job is running; wait for it or cancel it")
        return True
    return False


class ONE2345_OT_generate_images(FollowJob, bpy.types.Operator):
    """Make candidate pictures of the prompt; pick one with Use This to make its mesh"""

    bl_idname = "one2345.generate_images"
    bl_label = "Generate Images"

    prompt: StringProperty(name="Prompt", options={"SKIP_SAVE"}, description="Default: the panel's prompt")
    count: IntProperty(name="Images", min=1, max=8, options={"SKIP_SAVE"},
                       description="Candidates (default: the panel's)")
    seed: IntProperty(name="Seed", min=0, options={"SKIP_SAVE"},
                      description="Seed of the set (default: the panel's, or a random one)")
    more: bpy.props.BoolProperty(name="More", options={"SKIP_SAVE"},
                                 description="Another set of the newest set's prompt with a new seed")

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        """Greyed out while a job runs, and (with the reason) while the server lacks the text model's weights."""
        if _busy(cls):
            return False
        reason = images.text_block_reason(STATE.health, STATE.weights)
        if reason:
            cls.poll_message_set(reason)
            return False
        return True

    def make_job(self, context: bpy.types.Context) -> GenerateJob:
        settings = context.scene.one2345
        shown = images.sets()
        if self.more and not shown:
            raise jobs.JobFailed(JobError("bad_input", "There is no set of pictures to make more of.",
                                          "Generate Images first"))
        if self.more:  # the newest set's prompt, any seed but the ones already shown for it
            newest = shown[0]
            prompt, negative = newest.prompt, newest.negative_prompt
            used = {s.seed for s in shown if s.prompt == prompt}
            seed = self.seed if self.properties.is_property_set("seed") else None
            while seed is None or seed in used:
                seed = secrets.randbelow(2**31)
        else:
            prompt = self.prompt if self.properties.is_property_set("prompt") else settings.prompt
            negative = settings.negative_prompt.strip() or None
            seed = (self.seed if self.properties.is_property_set("seed") else
                    None if settings.use_random_image_seed else int(settings.image_seed))
        count = self.count if self.properties.is_property_set("count") else settings.image_count
        request = {"prompt": prompt, "count": int(count), "seed": seed, "negative_prompt": negative}
        connect, exit_code = addon_prefs.connector(addon_prefs.get(context))
        return begin(images.ImagesJob(request, candidates_dir(), connect, exit_code))

    def finish(self, context: bpy.types.Context, job: GenerateJob) -> set[str]:
        """Show the new set first; earlier sets stay (files and panel) so any of them can still be used."""
        jobs.set_active(None)
        for note in job.notes:
            self.report({"WARNING"}, note)
        redraw(context)
        if job.state != "done":
            if job.state == "cancelled":
                self.report({"WARNING"}, str(job.error))
            else:
                report_failure(self, str(job.error))
            return {"CANCELLED"}
        images.add_set(job.result)
        self.report({"INFO"}, f"{len(job.result.paths)} pictures of {job.result.prompt!r} (seed {job.result.seed}) "
                              f"in {job.result.paths[0].parent}")
        return {"FINISHED"}


def _safe_name(prompt: str) -> str:
    words = re.sub(r"[^\w]+", "_", prompt.lower()).strip("_")
    return words[:40].rstrip("_") or "prompt"


class ONE2345_OT_use_candidate(FollowJob, bpy.types.Operator):
    """Make the mesh of this picture (with the panel's options; Review Views pauses after the views as usual)"""

    bl_idname = "one2345.use_candidate"
    bl_label = "Use This"
    bl_options = {"UNDO"}  # noqa: RUF012 - Blender reads a plain set; a ClassVar hint would be a property

    __annotations__ = {
        "job_id": StringProperty(name="Images Job", options={"SKIP_SAVE"},
                                 description="The images job (default: the newest set)"),
        "index": IntProperty(name="Candidate", min=0, max=7, options={"SKIP_SAVE"},
                             description="Which picture of the set (0 is the first)"),
        **properties.skip_save_options(),
    }

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        """Greyed out while a job runs and while the server lacks the image-to-3D weights."""
        if _busy(cls):
            return False
        reason = weights_block_reason()
        if reason:
            cls.poll_message_set(reason)
            return False
        return True

    def make_job(self, context: bpy.types.Context) -> GenerateJob:
        shown = images.sets()
        chosen = images.find_set(self.job_id) if self.job_id else (shown[0] if shown else None)
        if chosen is None:
            raise jobs.JobFailed(JobError("bad_input", f"No set of pictures {self.job_id[:8] or 'is shown'}.",
                                          "Generate Images first (or Show Candidates in History)"))
        if not 0 <= self.index < len(chosen.paths):
            raise jobs.JobFailed(JobError("bad_input", f"Picture {self.index} does not exist: the set has "
                                                       f"{len(chosen.paths)} (0…{len(chosen.paths) - 1})."))
        job_dir = new_job_dir("text")
        # The job keeps its picture (the input of Regenerate) and the whole set it was picked from.
        kept = job_dir / "candidates"
        kept.mkdir(parents=True, exist_ok=True)
        for path in chosen.paths:
            shutil.copyfile(path, kept / path.name)
        image = Path(shutil.copyfile(chosen.paths[self.index], job_dir / "input.png"))
        options = properties.to_request(context.scene.one2345, self)
        connect, exit_code = addon_prefs.connector(addon_prefs.get(context))
        return begin(GenerateJob(image, options, job_dir, connect, exit_code, mesh_name=_safe_name(chosen.prompt),
                                 candidate=(chosen.job_id, self.index)))


class ONE2345_OT_clear_candidates(bpy.types.Operator):
    """Take the pictures off the panel (their files stay in the candidates folder, the jobs on the server)"""

    bl_idname = "one2345.clear_candidates"
    bl_label = "Clear"

    def execute(self, context: bpy.types.Context) -> set[str]:
        """Forget the shown sets."""
        images.clear_sets()
        redraw(context)
        return {"FINISHED"}


class ONE2345_OT_show_candidates(bpy.types.Operator):
    """Show this images job's pictures in the panel, to use one"""

    bl_idname = "one2345.show_candidates"
    bl_label = "Show Candidates"

    job_id: StringProperty(name="Images Job", options={"SKIP_SAVE"})

    def execute(self, context: bpy.types.Context) -> set[str]:
        """Download the pictures (once) on a worker thread and show them first."""
        connect, _ = addon_prefs.connector(addon_prefs.get(context))
        job_id, folder = self.job_id, candidates_dir()

        def fetch(task: jobs.Task) -> images.CandidateSet:
            client = connect().client()
            return images.download_candidates(client, client.status(job_id), folder)

        def done(task: jobs.Task) -> None:
            if task.state == "done":
                images.add_set(task.result)
                context.scene.one2345.input_mode = "PROMPT"
            else:
                jobs.set_last(task)
            redraw(bpy.context)

        task = run_task(jobs.FunctionTask("candidates", fetch), done)
        if task.finished and task.state != "done":
            report_failure(self, str(task.error))
            return {"CANCELLED"}
        return {"FINISHED"}


class ONE2345_OT_download_text_weights(bpy.types.Operator):
    """Download only the text-to-image model's files (optional: needed for Prompt input)"""

    bl_idname = "one2345.download_text_weights"
    bl_label = "Download Text Model"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        """As Download Weights: online access, no other download or import running."""
        return bpy.types.ONE2345_OT_download_weights.poll(context)

    def execute(self, context: bpy.types.Context) -> set[str]:
        """Start it with the text model's names (from the last listing; the group's name if none yet)."""
        names, _ = images.text_missing(STATE.weights)
        task = start_download(context, files=names or [images.TEXT_GROUP])
        if task.finished and task.state != "done":
            report_failure(self, str(task.error))
            return {"CANCELLED"}
        return {"FINISHED"}


CLASSES = (ONE2345_OT_generate_images, ONE2345_OT_use_candidate, ONE2345_OT_clear_candidates,
           ONE2345_OT_show_candidates, ONE2345_OT_download_text_weights)


def register() -> None:
    """Register the text-to-3D operators."""
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister() -> None:
    """Forget the shown sets and unregister."""
    images.clear_sets()
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
