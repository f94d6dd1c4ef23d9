"""Add-on preferences: where the server comes from and how it runs. Environment only; job options live in the scene."""

# No `from __future__ import annotations`: Blender reads property annotations as objects, not strings.

import sys
from collections.abc import Callable
from pathlib import Path

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, StringProperty

from . import jobs, server_process
from .client import ServerError

PACKAGE = __package__
"""The add-on's module name (``bl_ext.<repository>.one2345`` when installed as an extension)."""


def user_dir() -> Path:
    """The extension's user folder (survives upgrades; the add-on's own folder may be read-only)."""
    try:
        return Path(bpy.utils.extension_path_user(PACKAGE, create=True))
    except ValueError:  # installed as a legacy add-on, not as an extension
        return Path(bpy.utils.user_resource("CONFIG", path="one2345", create=True))


def get(context: bpy.types.Context | None = None) -> "ONE2345_AP_preferences":
    """The add-on's preferences."""
    return (context or bpy.context).preferences.addons[PACKAGE].preferences


class ONE2345_AP_preferences(bpy.types.AddonPreferences):
    """Server interpreter or remote URL, weights, device and the import size."""

    bl_idname = PACKAGE

    server_mode: EnumProperty(
        name="Server", description="Where jobs run",
        items=(("LOCAL", "Start Locally", "Start the server with the Python below when first needed"),
               ("REMOTE", "Connect to URL", "Use a server that is already running (e.g. a GPU box via SSH tunnel)")),
        default="LOCAL")
    python_path: StringProperty(
        name="Server Python", subtype="FILE_PATH",
        description="Python of a virtual environment with the One2345 server installed (never Blender's own)")
    server_url: StringProperty(name="Server URL", description="Base URL of a running server",
                               default="http://127.0.0.1:8000")
    server_token: StringProperty(name="Token", subtype="PASSWORD",
                                 description="The server's ONE2345_TOKEN (bearer token)")
    weights_dir: StringProperty(name="Weights Folder", subtype="DIR_PATH",
                                description="Folder with the model weights (empty: the server's default)")
    device: EnumProperty(
        name="Device", description="Where the models run",
        items=(("auto", "Auto", "CUDA when available, else CPU"), ("cuda", "GPU (CUDA)", ""), ("cpu", "CPU", "")),
        default="auto")
    low_vram: BoolProperty(name="Low VRAM", default=False,
                           description="Keep the models in main memory and move each to the GPU only for its stage "
                                       "(for GPUs with little memory; slower, same result)")
    keep_warm: BoolProperty(name="Keep Server Warm", default=True,
                            description="Keep the server and its models loaded between jobs (faster next job)")
    import_size: FloatProperty(name="Import Size", default=1.0, min=0.0, soft_max=10.0, subtype="DISTANCE",
                               description="Largest dimension of an imported mesh (0 keeps the server's scale)")
    show_advanced: BoolProperty(name="Advanced", default=False)
    preset: EnumProperty(
        name="Model Preset", description="Models the server loads",
        items=(("paper", "Paper", "The official One-2-3-45 models"),
               ("tiny", "Tiny", "Small random models (testing the set-up, not real results)")),
        default="paper")
    extra_args: StringProperty(name="Extra Server Arguments", description="More `serve` flags, e.g. --max-queue 4")
    startup_timeout: FloatProperty(name="Start-up Timeout", default=180.0, min=5.0, soft_max=1200.0, unit="TIME",
                                   description="Seconds to wait for the server to report ready")
    server_package: StringProperty(
        name="Server Package", default="",
        description="Empty: the server bundled with this add-on (recommended: the versions match). Otherwise what "
                    "'Set Up Server Environment' installs with pip: a path, a wheel or a URL")
    status_text: StringProperty(name="Status", description="Result of the last check or set-up", options={"SKIP_SAVE"})

    def draw(self, context: bpy.types.Context) -> None:
        """Server settings, the check/set-up buttons and their last result."""
        layout = self.layout
        layout.use_property_split = True
        layout.prop(self, "server_mode", expand=True)
        if self.server_mode == "LOCAL":
            layout.prop(self, "python_path")
            layout.prop(self, "weights_dir")
            layout.prop(self, "device")
            layout.prop(self, "low_vram")
            layout.prop(self, "keep_warm")
        else:
            layout.prop(self, "server_url")
            layout.prop(self, "server_token")
        layout.prop(self, "import_size")
        row = layout.row(align=True)
        row.operator("one2345.check_server", icon="CHECKMARK")
        row.operator("one2345.stop_server", icon="CANCEL")
        row.operator("one2345.open_log", text="Server Log", icon="TEXT").which = "server"
        box = layout.box()
        row = box.row(align=True)
        row.enabled = bpy.app.online_access
        row.operator("one2345.setup_server_env", icon="IMPORT")
        row.operator("one2345.open_log", text="Set-up Log", icon="TEXT").which = "setup"
        if not bpy.app.online_access:
            box.label(text="Online access is off (Preferences > System): set-up needs it to download packages",
                      icon="INFO")
        task = jobs.last()
        if task is not None and task.state == "running":
            box.label(text=f"{task.name.capitalize()}: {task.progress.stage}", icon="TIME")
        elif self.status_text:
            for line in self.status_text.splitlines()[:8]:
                box.label(text=line)
        from .weights_ops import draw_weights  # imports operators, which import this module

        draw_weights(layout)
        layout.prop(self, "show_advanced")
        if self.show_advanced:
            layout.prop(self, "preset")
            layout.prop(self, "extra_args")
            layout.prop(self, "startup_timeout")
            layout.prop(self, "server_package")


def launch_settings(prefs: ONE2345_AP_preferences) -> server_process.LaunchSettings:
    """Snapshot the preferences (main thread) for starting the server on a worker thread."""
    return server_process.LaunchSettings(
        python=bpy.path.abspath(prefs.python_path) if prefs.python_path else "", state_dir=user_dir(),
        preset=prefs.preset, device=prefs.device, weights_dir=bpy.path.abspath(prefs.weights_dir),
        extra_args=tuple(server_process.split_args(prefs.extra_args)), startup_timeout=prefs.startup_timeout,
        offline=not bpy.app.online_access, low_vram=prefs.low_vram)


def connector(prefs: ONE2345_AP_preferences) -> tuple[Callable[[], server_process.Connection],
                                                       Callable[[], int | None]]:
    """A function (run on a worker thread) returning a live :class:`server_process.Connection`, plus a function
    returning the local server's exit code once it died (None otherwise)."""
    if prefs.server_mode == "REMOTE":
        url, token = prefs.server_url.strip(), prefs.server_token or None

        def connect_remote() -> server_process.Connection:
            connection = server_process.Connection(url=url, token=token, local=False)
            connection.client(timeout=10.0).health()
            return connection

        return connect_remote, lambda: None
    try:
        settings = launch_settings(prefs)
    except ServerError as exc:  # e.g. unbalanced quotes in the extra arguments: the job reports it, not the UI
        error = exc

        def refuse() -> server_process.Connection:
            raise error

        return refuse, lambda: None
    manager = server_process.manager(settings.state_dir)
    return (lambda: manager.ensure(settings)), manager.exit_code


def blender_python() -> str:
    """Blender's own interpreter (a base for the server environment's venv, never the server itself)."""
    return sys.executable


CLASSES = (ONE2345_AP_preferences,)


def register() -> None:
    """Register the preferences class."""
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister() -> None:
    """Unregister; forget finished tasks that refer to this module's state."""
    jobs.set_last(None)
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
