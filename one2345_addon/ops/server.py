"""Server actions (Check, Start, Stop, Set Up Server Environment) and the fix-it actions an error offers (Open Log,
Open Preferences, Lower Mesh Resolution, Use Low-VRAM Mode)."""

# No `from __future__ import annotations`: Blender reads property annotations as objects, not strings.

import contextlib
from pathlib import Path

import bpy
from bpy.props import EnumProperty

from ..core import jobs, platform_compat, server_process, server_state
from ..core import settings as addon_prefs
from ..core.client import ServerError
from ..core.jobs import JobError
from .tasks import redraw, report_failure, run_task


def _show_status(task: jobs.Task, success: str | None = None) -> None:
    """Put a task's outcome into the preferences' status line and the panel."""
    prefs = addon_prefs.get()
    prefs.status_text = (success or str(task.result)) if task.state == "done" else f"Problem: {task.error}"
    jobs.set_last(task)
    redraw(bpy.context)


class ONE2345_OT_check_server(bpy.types.Operator):
    """Check the server set-up and say what is wrong, if anything"""

    bl_idname = "one2345.check_server"
    bl_label = "Check Server"

    def execute(self, context: bpy.types.Context) -> set[str]:
        """Probe the interpreter (or the remote server) on a worker thread."""
        prefs = addon_prefs.get(context)
        if prefs.server_mode == "REMOTE":
            connect, _ = addon_prefs.connector(prefs)

            def check(task: jobs.Task) -> str:
                connection = connect()
                with contextlib.suppress(ServerError):
                    server_state.STATE.health = connection.client(timeout=10.0).health()
                return server_process.describe_health(connection)
        else:
            try:
                settings = addon_prefs.launch_settings(prefs)
            except ServerError as exc:
                prefs.status_text = f"Problem: {exc}"
                report_failure(self, str(exc))
                return {"CANCELLED"}
            manager = server_process.manager(settings.state_dir)

            def check(task: jobs.Task) -> str:
                verdict = server_process.diagnose_python(settings.python)
                if manager.running():
                    connection = manager.ensure(settings)
                    with contextlib.suppress(ServerError):
                        server_state.STATE.health = connection.client(timeout=10.0).health()
                    verdict += " " + server_process.describe_health(connection)
                else:
                    verdict += " The server is not running; it starts with the first job."
                return verdict

        prefs.status_text = "Checking…"
        task = run_task(jobs.FunctionTask("server check", check), _show_status)
        if task.finished and task.state == "done":
            self.report({"INFO"}, prefs.status_text)
        elif task.finished:
            report_failure(self, prefs.status_text)
        return {"FINISHED"}


class ONE2345_OT_start_server(bpy.types.Operator):
    """Start (or restart) the One2345 server now, so the next job does not wait for it"""

    bl_idname = "one2345.start_server"
    bl_label = "Start Server"

    def execute(self, context: bpy.types.Context) -> set[str]:
        """Start it on a worker thread; the outcome shows in the panel."""
        connect, _ = addon_prefs.connector(addon_prefs.get(context))

        def start(task: jobs.Task) -> str:
            connection = connect()
            return " ".join(filter(None, [connection.note, f"Server ready at {connection.url}."]))

        task = run_task(jobs.FunctionTask("server start", start), _show_status)
        if task.finished and task.state == "done":
            self.report({"INFO"}, str(task.result))
        elif task.finished:
            report_failure(self, str(task.error))
        return {"FINISHED"}


class ONE2345_OT_stop_server(bpy.types.Operator):
    """Stop the server this Blender started (frees its memory; the next job starts it again)"""

    bl_idname = "one2345.stop_server"
    bl_label = "Stop Server"

    def execute(self, context: bpy.types.Context) -> set[str]:
        """Stop it (a job that is running is cancelled first)."""
        jobs.cancel_all()
        manager = server_process.current_manager()
        if manager is not None:
            manager.stop()
        addon_prefs.get(context).status_text = "Server stopped."
        return {"FINISHED"}


class ONE2345_OT_setup_server_env(bpy.types.Operator):
    """Create a Python environment in the extension's user folder and install the One2345 server into it
    (downloads PyTorch: several GB)"""

    bl_idname = "one2345.setup_server_env"
    bl_label = "Set Up Server Environment"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        """Not while another set-up runs."""
        task = jobs.last()
        return not (task is not None and task.name == "server set-up" and not task.finished)

    def execute(self, context: bpy.types.Context) -> set[str]:
        """Refuse without online access; otherwise run venv + pip on a worker thread, logging to setup.log."""
        if not bpy.app.online_access:
            error = JobError("offline", "Online access is disabled, so the server environment cannot be downloaded.",
                             "Allow online access in Preferences > System > Network, or set up the environment "
                             "yourself and choose its Python")
            jobs.set_last(jobs.failed("server set-up", error))
            report_failure(self, str(error))
            return {"CANCELLED"}
        prefs = addon_prefs.get(context)
        # On Windows a short folder outside the user folder: torch's deepest file would pass MAX_PATH under it.
        venv_dir = Path(platform_compat.default_venv_dir(addon_prefs.user_dir()))
        log_path = addon_prefs.user_dir() / "logs" / "setup.log"
        base, package = addon_prefs.blender_python(), prefs.server_package
        notes: list[str] = []

        def setup(task: jobs.Task) -> Path:
            return server_process.setup_environment(
                venv_dir, base, package, log_path,
                progress=lambda line, n: task.post("progress", jobs.Progress(stage=line[:80], step=n)),
                cancelled=lambda: task.cancel_requested, notes=notes)

        def done(task: jobs.Task) -> None:
            if task.state == "done":
                addon_prefs.get().python_path = str(task.result)
            _show_status(task, " ".join([f"Server environment ready: {task.result}.", *notes]))

        task = jobs.FunctionTask("server set-up", setup)
        jobs.set_last(task)
        run_task(task, done)
        prefs.status_text = "Setting up the server environment… (see the set-up log)"
        return {"FINISHED"}


# -- fix-it actions -----------------------------------------------------------------------------------------------

class ONE2345_OT_open_log(bpy.types.Operator):
    """Open a One2345 log file"""

    bl_idname = "one2345.open_log"
    bl_label = "Open Log"

    which: EnumProperty(items=(("server", "Server", "The server's log"), ("setup", "Set-up", "The set-up log")),
                        default="server")

    def execute(self, context: bpy.types.Context) -> set[str]:
        """Open the log with the system's viewer (its path is reported in background mode)."""
        manager = server_process.current_manager()  # a second Blender's server has its own log
        path = (manager.log_path if self.which == "server" and manager is not None
                else addon_prefs.user_dir() / "logs" / f"{self.which}.log")
        if not path.is_file():
            self.report({"WARNING"}, f"No {self.which} log yet ({path}).")
            return {"CANCELLED"}
        if bpy.app.background:
            self.report({"INFO"}, str(path))
        else:
            bpy.ops.wm.path_open(filepath=str(path))
        return {"FINISHED"}


class ONE2345_OT_open_preferences(bpy.types.Operator):
    """Open the One2345 add-on preferences"""

    bl_idname = "one2345.open_preferences"
    bl_label = "Open Preferences"

    def execute(self, context: bpy.types.Context) -> set[str]:
        """Show the preferences window at this add-on."""
        if bpy.app.background:
            self.report({"INFO"}, "Preferences > Add-ons > One2345")
            return {"FINISHED"}
        bpy.ops.screen.userpref_show(section="ADDONS")
        bpy.ops.preferences.addon_show(module=addon_prefs.PACKAGE)
        return {"FINISHED"}


class ONE2345_OT_lower_resolution(bpy.types.Operator):
    """Halve the mesh resolution (uses less memory)"""

    bl_idname = "one2345.lower_resolution"
    bl_label = "Lower Mesh Resolution"
    bl_options = {"REGISTER", "UNDO"}  # noqa: RUF012 - Blender reads a plain set; a ClassVar hint would be a property

    def execute(self, context: bpy.types.Context) -> set[str]:
        """Halve ``scene.one2345.resolution`` (not below 32)."""
        settings = context.scene.one2345
        settings.resolution = max(32, settings.resolution // 2)
        self.report({"INFO"}, f"Mesh resolution is now {settings.resolution}.")
        return {"FINISHED"}


class ONE2345_OT_use_low_vram(bpy.types.Operator):
    """Run the server in low-VRAM mode: only the model in use sits on the GPU (slower; the server restarts with
    the next job)"""

    bl_idname = "one2345.use_low_vram"
    bl_label = "Use Low-VRAM Mode"

    def execute(self, context: bpy.types.Context) -> set[str]:
        """Turn the preference on; the changed launch settings restart the server at the next job."""
        addon_prefs.get(context).low_vram = True
        self.report({"INFO"}, "Low-VRAM mode is on: the server restarts with it at the next job.")
        return {"FINISHED"}


CLASSES = (ONE2345_OT_check_server, ONE2345_OT_start_server, ONE2345_OT_stop_server, ONE2345_OT_setup_server_env,
           ONE2345_OT_open_log, ONE2345_OT_open_preferences, ONE2345_OT_lower_resolution, ONE2345_OT_use_low_vram)


# Blender's own helper: CLASSES registered in order, unregistered in reverse.
register, unregister = bpy.utils.register_classes_factory(CLASSES)
