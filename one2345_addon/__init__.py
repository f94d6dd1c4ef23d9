"""One2345 for Blender: image to coloured 3D mesh with One-2-3-45, through a local inference server.

Only ``register`` and ``unregister`` live here. The modules that need ``bpy`` are imported inside them, so the
standard-library modules (``client``, ``server_process``, ``jobs``) can be imported and tested without Blender.
"""

from __future__ import annotations

import atexit


def register() -> None:
    """Register properties, preferences, operators, the panel and the ``one2345`` command-line command."""
    from . import cli_command, history, operators, panels, preferences, properties, server_process, weights_ops

    for module in (properties, preferences, operators, weights_ops, history, panels, cli_command):
        module.register()
    atexit.register(server_process.shutdown)


def unregister() -> None:
    """Cancel the running job, stop the server this session started, and unregister everything."""
    from . import cli_command, history, operators, panels, preferences, properties, server_process, weights_ops

    atexit.unregister(server_process.shutdown)
    for module in (cli_command, panels, history, weights_ops, operators, preferences, properties):
        module.unregister()
    server_process.shutdown()
