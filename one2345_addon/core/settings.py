"""The add-on preferences as the rest of the add-on reads them: the preferences themselves, the user folder, and the
server they describe (launch settings, a connector). Nothing here draws: the preferences class and its UI live in
``ui/preferences.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import bpy

from . import server_process
from .client import ServerError

PACKAGE = __package__.rpartition(".")[0]
"""The add-on's module name, the parent of ``core`` (``bl_ext.<repository>.one2345`` when installed as an extension,
``one2345_addon`` in a source checkout): the preferences' ``bl_idname``."""


def user_dir() -> Path:
    """The extension's user folder (survives upgrades; the add-on's own folder may be read-only)."""
    try:
        return Path(bpy.utils.extension_path_user(PACKAGE, create=True))
    except ValueError:  # installed as a legacy add-on, not as an extension
        return Path(bpy.utils.user_resource("CONFIG", path="one2345", create=True))


def get(context: bpy.types.Context | None = None) -> bpy.types.AddonPreferences:
    """The add-on's preferences (the ``ONE2345_AP_preferences`` instance)."""
    return (context or bpy.context).preferences.addons[PACKAGE].preferences


def launch_settings(prefs: bpy.types.AddonPreferences) -> server_process.LaunchSettings:
    """Snapshot the preferences (main thread) for starting the server on a worker thread."""
    return server_process.LaunchSettings(
        python=bpy.path.abspath(prefs.python_path) if prefs.python_path else "", state_dir=user_dir(),
        preset=prefs.preset, device=prefs.device, weights_dir=bpy.path.abspath(prefs.weights_dir),
        extra_args=tuple(server_process.split_args(prefs.extra_args)), startup_timeout=prefs.startup_timeout,
        offline=not bpy.app.online_access, low_vram=prefs.low_vram)


def connector(prefs: bpy.types.AddonPreferences) -> tuple[Callable[[], server_process.Connection],
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
