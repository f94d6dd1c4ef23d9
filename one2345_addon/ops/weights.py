"""Model weights from Blender: see which files the server has, download the missing ones with progress, cancel.

The server does the work (``GET /v1/weights``, ``POST/GET/DELETE /v1/weights/download``); the add-on starts it and
follows its progress on a worker thread; the preferences' Weights box (``ui/preferences.py``) shows it. A cancelled
download keeps its partial file, and the next Download resumes it.
"""

# No `from __future__ import annotations`: Blender reads property annotations as objects, not strings.

import contextlib
from typing import Any

import bpy

from ..core import jobs, server_state
from ..core import settings as addon_prefs
from ..core.client import ServerError
from ..core.jobs import JobError, JobFailed, Progress
from .tasks import redraw, report_failure, run_task

STATE = server_state.STATE
_DOWNLOAD: list[jobs.Task] = []
"""The download task of this session, if one was started (a list: assigned from functions without ``global``)."""


def current_download() -> jobs.Task | None:
    """The weights download that is running, if any."""
    return _DOWNLOAD[0] if _DOWNLOAD and not _DOWNLOAD[0].finished else None


def _remember(client: Any) -> None:
    """Store the server's health and weights listing for the panels (worker thread; whole values only)."""
    STATE.health = client.health()
    STATE.weights = client.weights()
    STATE.download = STATE.weights.get("download")


class WeightsDownload(jobs.Task):
    """``POST /v1/weights/download``, then follow ``GET /v1/weights/download`` until it ends; cancel sends DELETE.

    Args:
        connect: returns a live connection (starts the local server when needed).
        poll_interval: seconds between progress requests.
    """

    def __init__(self, connect: Any, poll_interval: float = 0.25) -> None:
        super().__init__("weights download")
        self._connect = connect
        self._poll_interval = poll_interval

    def work(self) -> dict[str, Any]:
        """Start (or join) the download and follow it; return the final listing."""
        self.post("progress", Progress(stage="Starting server"))
        client = self._connect().client()
        try:
            status = client.start_weights_download()
        except ServerError as exc:
            if exc.kind != "conflict":  # 409: one is already running, e.g. started by another Blender: follow it
                raise
            status = client.weights_download()
        cancel_sent = False
        while status["state"] == "running":
            STATE.download = status
            self.post("progress", download_progress(status))
            if self.cancel_requested and not cancel_sent:
                with contextlib.suppress(ServerError):
                    status = client.cancel_weights_download()
                cancel_sent = True
                continue
            self.sleep(self._poll_interval)
            status = client.weights_download()
        STATE.download = status
        _remember(client)
        if status["state"] == "done":
            return STATE.weights
        error = status.get("error") or {}
        kind = "cancelled" if status["state"] == "cancelled" else error.get("kind", "internal")
        raise JobFailed(JobError(kind, error.get("message") or f"The weights download ended {status['state']}.",
                                 error.get("fix")))


def download_progress(status: dict[str, Any]) -> Progress:
    """The panel's progress for a download status: file, bytes, rate and ETA."""
    done, total = int(status.get("bytes_done") or 0), int(status.get("bytes_total") or 0)
    rate = status.get("rate_bps")
    text = f"{status.get('current_file') or 'weights'}: {server_state.human_bytes(done)} of " \
           f"{server_state.human_bytes(total)}" + (f" at {server_state.human_bytes(rate)}/s" if rate else "")
    return Progress(stage=text, step=int(status.get("files_done") or 0), total=len(status.get("files") or []),
                    fraction=float(status.get("fraction") or 0.0), eta_s=status.get("eta_s"))


def start_download(context: bpy.types.Context) -> jobs.Task:
    """Start the download task (main thread); in background mode it runs to the end before this returns."""
    connect, _ = addon_prefs.connector(addon_prefs.get(context))
    task = WeightsDownload(connect)
    _DOWNLOAD[:] = [task]
    jobs.set_last(task)

    def done(task: jobs.Task) -> None:
        prefs = addon_prefs.get()
        prefs.status_text = ("Weights downloaded: every file is present." if task.state == "done"
                             else f"Weights download {task.state}: {task.error}")
        redraw(bpy.context)

    return run_task(task, done)


class ONE2345_OT_refresh_weights(bpy.types.Operator):
    """Ask the server which weight files it has (starts the local server if needed)"""

    bl_idname = "one2345.refresh_weights"
    bl_label = "Refresh Weights"

    def execute(self, context: bpy.types.Context) -> set[str]:
        """Fetch health and the weights listing on a worker thread."""
        connect, _ = addon_prefs.connector(addon_prefs.get(context))
        task = run_task(jobs.FunctionTask("weights check", lambda task: _remember(connect().client())),
                        lambda task: (jobs.set_last(task), redraw(bpy.context)))
        if task.finished and task.state == "failed":
            report_failure(self, str(task.error))
            return {"CANCELLED"}
        return {"FINISHED"}


class ONE2345_OT_download_weights(bpy.types.Operator):
    """Download the model weights the server is missing (resumes a partial download)"""

    bl_idname = "one2345.download_weights"
    bl_label = "Download Weights"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        """Needs online access, and no download already running."""
        if not bpy.app.online_access:
            cls.poll_message_set("Online access is off (Preferences > System > Network): the weights cannot be "
                                 "downloaded")
            return False
        if current_download() is not None:
            cls.poll_message_set("The download is running")
            return False
        return True

    def execute(self, context: bpy.types.Context) -> set[str]:
        """Start it; the Weights box shows the progress."""
        task = start_download(context)
        if task.finished and task.state != "done":
            report_failure(self, str(task.error))
            return {"CANCELLED"}
        return {"FINISHED"}


class ONE2345_OT_cancel_weights_download(bpy.types.Operator):
    """Stop the weights download (the part already fetched is kept; Download resumes it)"""

    bl_idname = "one2345.cancel_weights_download"
    bl_label = "Cancel Download"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        """Only while a download runs."""
        return current_download() is not None

    def execute(self, context: bpy.types.Context) -> set[str]:
        """Ask the worker to cancel; it tells the server."""
        current_download().cancel()
        return {"FINISHED"}


CLASSES = (ONE2345_OT_refresh_weights, ONE2345_OT_download_weights, ONE2345_OT_cancel_weights_download)


def register() -> None:
    """Register the weights operators."""
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister() -> None:
    """Cancel a running download (its partial file is kept for the next one) and unregister."""
    task = current_download()
    if task is not None:
        task.cancel()
    _DOWNLOAD.clear()
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
