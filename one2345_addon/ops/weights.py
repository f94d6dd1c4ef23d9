"""Model weights from Blender: see which files the server has, download the missing ones or import them from a
folder (an official One-2-3-45 checkout), with progress and cancel.

The server does the work (``GET /v1/weights``, ``POST/GET/DELETE /v1/weights/download`` and ``…/import``: one task
at a time, shared by both); the add-on starts it and follows its progress on a worker thread; the preferences'
Weights box (``ui/preferences.py``) shows it. A cancelled download keeps its partial file, and the next Download
resumes it; a cancelled import leaves nothing half-imported.

The first Generate after Zero123-XL arrives converts it once (15.5 GB → 5 GB, about a minute). The server has no
HTTP endpoint to run that ahead, so the Weights box says so once the file is in, and offers the terminal command
``one2345 weights prepare`` (:func:`prepare_command`, with a Copy button) for those who want it done beforehand.
"""

# No `from __future__ import annotations`: Blender reads property annotations as objects, not strings.

import contextlib
import os
import shlex
import urllib.parse
from pathlib import Path
from typing import Any

import bpy
from bpy.props import StringProperty

from ..core import jobs, server_state
from ..core import settings as addon_prefs
from ..core.client import LOOPBACK_HOSTS, ServerError
from ..core.jobs import JobError, JobFailed, Progress
from .tasks import redraw, report_failure, run_task

STATE = server_state.STATE
ZERO123 = "zero123-xl"
"""The weight file the first model load converts (the one-time set-up)."""
_DOWNLOAD: list[jobs.Task] = []
"""The weights task (download or import) of this session, if one was started (a list: assigned from functions
without ``global``)."""


def current_download() -> jobs.Task | None:
    """The weights task (a download or an import) that is running, if any: the server runs one at a time."""
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
        files: the names to fetch (the optional text-to-image model's); None: every missing file the server needs.
    """

    operation = "download"

    def __init__(self, connect: Any, poll_interval: float = 0.25, files: list[str] | None = None) -> None:
        super().__init__(f"weights {self.operation}")
        self._connect = connect
        self._poll_interval = poll_interval
        self.files = list(files) if files is not None else None

    # -- the endpoints of this operation (an import overrides them) --------------------------------------------

    def begin(self, client: Any) -> dict[str, Any]:
        """Start it; a download already running (e.g. started by another Blender) is followed instead."""
        try:
            return client.start_weights_download(self.files)
        except ServerError as exc:
            if exc.kind != "conflict":  # 409: one is already running: follow it
                raise
            return client.weights_download()

    def fetch_status(self, client: Any) -> dict[str, Any]:
        return client.weights_download()

    def send_cancel(self, client: Any) -> dict[str, Any]:
        return client.cancel_weights_download()

    # -- the worker ------------------------------------------------------------------------------------------------

    def work(self) -> dict[str, Any]:
        """Start (or join) the task and follow it; return the final listing."""
        self.post("progress", Progress(stage="Starting server"))
        client = self._connect().client()
        status = self.begin(client)
        cancel_sent = False
        while status["state"] == "running":
            STATE.download = status
            self.post("progress", download_progress(status))
            if self.cancel_requested and not cancel_sent:
                with contextlib.suppress(ServerError):
                    status = self.send_cancel(client)
                cancel_sent = True
                continue
            self.sleep(self._poll_interval)
            status = self.fetch_status(client)
        _remember(client)
        STATE.download = status  # this task's own end (the listing's copy may already be another task's)
        if status["state"] == "done":
            return STATE.weights
        error = status.get("error") or {}
        kind = "cancelled" if status["state"] == "cancelled" else error.get("kind", "internal")
        raise JobFailed(JobError(kind, error.get("message") or f"The weights {self.operation} ended "
                                                                 f"{status['state']}.", error.get("fix")))


class WeightsImport(WeightsDownload):
    """``POST /v1/weights/import {"path"}``, then follow ``GET /v1/weights/import``; cancel sends DELETE. The server
    verifies each file and hard-links, reflinks or copies it in; the final status lists each file's outcome.

    Args:
        connect: returns a live connection (starts the local server when needed).
        path: the folder on the server's machine (an official One-2-3-45 checkout, or a folder of the files).
        poll_interval: seconds between progress requests.
    """

    operation = "import"

    def __init__(self, connect: Any, path: str, poll_interval: float = 0.25) -> None:
        super().__init__(connect, poll_interval)
        self.path = path

    def begin(self, client: Any) -> dict[str, Any]:
        """Start it; a download or import already running is an error (the server runs one at a time)."""
        return client.start_weights_import(self.path)

    def fetch_status(self, client: Any) -> dict[str, Any]:
        return client.weights_import()

    def send_cancel(self, client: Any) -> dict[str, Any]:
        return client.cancel_weights_import()


def download_progress(status: dict[str, Any]) -> Progress:
    """The Weights box's progress for a download or import status: file, phase, bytes, rate and ETA."""
    done, total = int(status.get("bytes_done") or 0), int(status.get("bytes_total") or 0)
    rate = status.get("rate_bps")
    phase = status.get("phase")
    what = status.get("current_file") or "weights"
    if status.get("operation") == "import" or phase in ("checking", "verifying"):
        what = f"{str(phase or 'importing').capitalize()} {what}"
    text = f"{what}: {server_state.human_bytes(done)} of {server_state.human_bytes(total)}" + (
        f" at {server_state.human_bytes(rate)}/s" if rate and status.get("operation") != "import" else "")
    return Progress(stage=text, step=int(status.get("files_done") or 0), total=len(status.get("files") or []),
                    fraction=float(status.get("fraction") or 0.0), eta_s=status.get("eta_s"))


_CHECKSUM_WORDS = {"mismatch": "checksum mismatch", "unavailable": "no reference checksum"}


def import_outcomes(status: dict[str, Any] | None) -> list[tuple[bool, str]]:
    """The finished import's report, one line per file: (ok, text), e.g. ``(True, "zero123-xl: imported (hard
    link, verified) from zero123-xl.ckpt")`` or ``(False, "sam: not found (looked for …)")``; [] for a download."""
    if not status or status.get("operation") != "import" or not status.get("imported"):
        return []
    lines = []
    for item in status["imported"]:
        outcome = str(item.get("outcome") or "?")
        checksum = _CHECKSUM_WORDS.get(item.get("checksum"), item.get("checksum"))
        how = ", ".join(str(v) for v in (item.get("how"), checksum) if v)
        text = f"{item.get('name')}: {outcome}" + (f" ({how})" if how else "")
        if item.get("source"):
            text += f" from {item['source']}"
        if item.get("detail"):
            text += f": {item['detail']}"
        lines.append((outcome in ("imported", "already present"), text))
    return lines


def summary(status: dict[str, Any] | None) -> str:
    """One sentence for the status line once an import ended: counts per outcome."""
    counts: dict[str, list[str]] = {}
    for item in (status or {}).get("imported") or []:
        counts.setdefault(str(item.get("outcome")), []).append(str(item.get("name")))
    if not counts:
        return "Weights import done."
    parts = [f"{outcome}: {', '.join(names)}" for outcome, names in counts.items()]
    return "Weights import done — " + "; ".join(parts) + "."


def conversion_ahead() -> bool:
    """Whether to tell the artist that the first Generate converts Zero123-XL: this session's last weights task
    brought zero123-xl in (downloaded or imported), the server runs the paper models, and it has not loaded them
    since (health's ``models_loaded`` is empty)."""
    task = _DOWNLOAD[0] if _DOWNLOAD else None
    status = STATE.download or {}
    if task is None or task.state != "done" or status.get("state") != "done":
        return False
    if status.get("operation") == "import":
        brought = any(i.get("name") == ZERO123 and i.get("outcome") == "imported" for i in status.get("imported") or [])
    else:
        brought = ZERO123 in (status.get("files") or [])
    health = STATE.health or {}
    return brought and health.get("preset", "paper") == "paper" and not health.get("models_loaded")


def prepare_command(prefs: Any) -> str:
    """The terminal command that converts Zero123-XL ahead of the first Generate: the server environment's
    ``one2345 weights prepare`` (with the preferences' weights folder)."""
    python = bpy.path.abspath(prefs.python_path) if prefs.python_path.strip() else ""
    program = "one2345"
    if python:
        folder = Path(python).parent
        program = str(folder / ("one2345.exe" if os.name == "nt" else "one2345"))
    words = [program, "weights", "prepare"]
    if prefs.weights_dir.strip():
        words += ["--weights-dir", os.path.abspath(bpy.path.abspath(prefs.weights_dir.strip()))]
    if os.name == "nt":
        return " ".join(f'"{w}"' if " " in w else w for w in words)
    return shlex.join(words)


def _finished(task: jobs.Task) -> None:
    prefs = addon_prefs.get()
    if task.state == "done" and isinstance(task, WeightsImport):
        prefs.status_text = summary(STATE.download)
    elif task.state == "done" and getattr(task, "files", None):
        prefs.status_text = "The text-to-image model is downloaded: Prompt input is ready."
    elif task.state == "done":
        prefs.status_text = "Weights downloaded: every file is present."
    else:
        prefs.status_text = f"Weights {task.operation} {task.state}: {task.error}"
    if conversion_ahead():
        prefs.status_text += " The first Generate converts Zero123-XL once (about a minute)."
    redraw(bpy.context)


def start_download(context: bpy.types.Context, files: list[str] | None = None) -> jobs.Task:
    """Start the download task (main thread) of ``files`` (default: every missing file the server needs); in
    background mode it runs to the end before this returns."""
    connect, _ = addon_prefs.connector(addon_prefs.get(context))
    task = WeightsDownload(connect, files=files)
    _DOWNLOAD[:] = [task]
    jobs.set_last(task)
    return run_task(task, _finished)


def start_import(context: bpy.types.Context, folder: str) -> jobs.Task:
    """Start importing the weight files under ``folder`` (main thread); in background mode it runs to the end."""
    connect, _ = addon_prefs.connector(addon_prefs.get(context))
    task = WeightsImport(connect, folder)
    _DOWNLOAD[:] = [task]
    jobs.set_last(task)
    return run_task(task, _finished)


def _import_refusal(prefs: Any) -> str | None:
    """Why an import cannot run with these preferences (the server reads the folder on its own disk and accepts an
    import only from its own machine), or None."""
    if prefs.server_mode != "REMOTE":
        return None
    host = urllib.parse.urlsplit(prefs.server_url.strip()).hostname or ""
    if host in LOOPBACK_HOSTS:
        return None
    return ("Import reads a folder on the server's own disk: run `one2345 weights import PATH` on the server's "
            "machine, or Download")


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
        """Needs online access, and no download or import already running."""
        if not bpy.app.online_access:
            cls.poll_message_set("Online access is off (Preferences > System > Network): the weights cannot be "
                                 "downloaded")
            return False
        if current_download() is not None:
            cls.poll_message_set(f"The {current_download().operation} is running")
            return False
        return True

    def execute(self, context: bpy.types.Context) -> set[str]:
        """Start it; the Weights box shows the progress."""
        task = start_download(context)
        if task.finished and task.state != "done":
            report_failure(self, str(task.error))
            return {"CANCELLED"}
        return {"FINISHED"}


class ONE2345_OT_import_weights(bpy.types.Operator):
    """Take the weight files from a folder on this machine (an official One-2-3-45 checkout, or a folder holding
    them): each is checked, then linked or copied into the weights folder, without downloading"""

    bl_idname = "one2345.import_weights"
    bl_label = "Import from Folder…"

    directory: StringProperty(name="Folder", subtype="DIR_PATH", options={"SKIP_SAVE"},
                              description="An official One-2-3-45 checkout, or a folder holding the weight files")
    filter_folder: bpy.props.BoolProperty(default=True, options={"HIDDEN", "SKIP_SAVE"})

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        """Needs a server on this machine, and no download or import already running (no online access needed)."""
        refusal = _import_refusal(addon_prefs.get(context))
        if refusal:
            cls.poll_message_set(refusal)
            return False
        if current_download() is not None:
            cls.poll_message_set(f"The {current_download().operation} is running")
            return False
        return True

    def invoke(self, context: bpy.types.Context, event: bpy.types.Event) -> set[str]:
        """Open the folder picker."""
        context.window_manager.fileselect_add(self)
        return {"RUNNING_MODAL"}

    def execute(self, context: bpy.types.Context) -> set[str]:
        """Start the import; the Weights box shows the progress and then each file's outcome."""
        folder = bpy.path.abspath(self.directory.strip()) if self.directory.strip() else ""
        if not folder or not os.path.isdir(folder):
            report_failure(self, f"{folder or 'No folder'!r} is not a folder: choose the folder of a One-2-3-45 "
                                 "checkout, or one holding the weight files")
            return {"CANCELLED"}
        task = start_import(context, os.path.abspath(folder))
        if task.finished and task.state != "done":
            report_failure(self, str(task.error))
            return {"CANCELLED"}
        return {"FINISHED"}


class ONE2345_OT_cancel_weights_download(bpy.types.Operator):
    """Stop the weights download or import (a download's fetched part is kept and Download resumes it; an import
    leaves nothing half-imported)"""

    bl_idname = "one2345.cancel_weights_download"
    bl_label = "Cancel"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        """Only while a download or import runs."""
        return current_download() is not None

    def execute(self, context: bpy.types.Context) -> set[str]:
        """Ask the worker to cancel; it tells the server."""
        current_download().cancel()
        return {"FINISHED"}


class ONE2345_OT_copy_prepare_command(bpy.types.Operator):
    """Copy the terminal command that converts Zero123-XL now, so that the first Generate starts at once"""

    bl_idname = "one2345.copy_prepare_command"
    bl_label = "Copy Command"

    def execute(self, context: bpy.types.Context) -> set[str]:
        """Put :func:`prepare_command` on the clipboard."""
        command = prepare_command(addon_prefs.get(context))
        context.window_manager.clipboard = command
        self.report({"INFO"}, f"Copied: {command}")
        return {"FINISHED"}


CLASSES = (ONE2345_OT_refresh_weights, ONE2345_OT_download_weights, ONE2345_OT_import_weights,
           ONE2345_OT_cancel_weights_download, ONE2345_OT_copy_prepare_command)


def register() -> None:
    """Register the weights operators."""
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister() -> None:
    """Cancel a running download or import (a download's partial file is kept for the next one) and unregister."""
    task = current_download()
    if task is not None:
        task.cancel()
    _DOWNLOAD.clear()
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
