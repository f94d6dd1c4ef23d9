"""What the operator modules share: running a background task from the main thread, reporting a failure, redrawing
the add-on's areas, and the buttons that fix each kind of error."""

from collections.abc import Callable

import bpy

from ..core import jobs

_OPEN_PREFS = ("one2345.open_preferences", "Open Preferences", "PREFERENCES")
_SETUP = ("one2345.setup_server_env", "Set Up Server Environment", "IMPORT")
_SERVER_LOG = ("one2345.open_log", "Open Server Log", "TEXT")
_START = ("one2345.start_server", "Start Server", "PLAY")

FIXES: dict[str, tuple[tuple[str, str, str], ...]] = {
    "server_not_configured": (_OPEN_PREFS, _SETUP),
    "server_python_missing": (_OPEN_PREFS, _SETUP),
    "server_start_failed": (_SERVER_LOG, _OPEN_PREFS),
    "server_died": (("one2345.start_server", "Restart Server", "FILE_REFRESH"), _SERVER_LOG),
    "unreachable": (_START, _OPEN_PREFS),
    "unauthorized": (_OPEN_PREFS,),
    "missing_weights": (("one2345.download_weights", "Download Weights", "IMPORT"), _OPEN_PREFS),
    "missing_text_weights": (("one2345.download_text_weights", "Download Text Model", "IMPORT"), _OPEN_PREFS),
    "out_of_memory": (("one2345.use_low_vram", "Use Low-VRAM Mode", "MEMORY"),
                      ("one2345.lower_resolution", "Lower Mesh Resolution", "MOD_DECIM")),
    "queue_full": (("one2345.generate_mesh", "Try Again", "FILE_REFRESH"),),
    "internal": (_SERVER_LOG,),
    "setup_failed": (("one2345.open_log", "Open Set-up Log", "TEXT"),),
    "offline": (_OPEN_PREFS,),
}
"""Error kind → the buttons that fix it: (operator id, button text, icon)."""


def run_task(task: jobs.Task, on_done: Callable[[jobs.Task], None]) -> jobs.Task:
    """Run a background task: synchronously in background mode, else drained by a ``bpy.app.timers`` callback."""
    task.on("done", on_done).on("progress", lambda progress: redraw(bpy.context)).start()
    if bpy.app.background:
        task.wait()
    else:
        bpy.app.timers.register(lambda: None if task.drain() else 0.2, first_interval=0.2)
    return task


def report_failure(operator: bpy.types.Operator, message: str) -> None:
    """Report a failure: an error in the UI; a warning in background mode, so that a script calling the operator
    gets ``{'CANCELLED'}`` back (details in :func:`jobs.last`) instead of an exception that would end it."""
    operator.report({"WARNING"} if bpy.app.background else {"ERROR"}, message)


def redraw(context: bpy.types.Context) -> None:
    """Redraw the 3D Viewports (the panel) and the Preferences (the Weights box)."""
    for window in context.window_manager.windows:
        for area in window.screen.areas:
            if area.type in ("VIEW_3D", "PREFERENCES"):
                area.tag_redraw()
