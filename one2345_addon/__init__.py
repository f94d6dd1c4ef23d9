"""One2345 for Blender: image to coloured 3D mesh with One-2-3-45, through a local inference server.

Only ``register`` and ``unregister`` live here. The add-on has three layers, each importing only downwards:
``core`` (the ground: HTTP client, job polling, the server process, settings, scene properties, mesh import),
``ops`` (the operators) and ``ui`` (panels, preferences, lists). The modules that need ``bpy`` are imported inside
``register``/``unregister`` — not to break a cycle (there is none), but so that the standard-library modules
(``core.client``, ``core.server_process``, ``core.jobs``) can be imported and tested without Blender.
"""

from __future__ import annotations

import atexit


def register() -> None:
    """Register properties, preferences, operators, the panels and the ``one2345`` command-line command."""
    from .core import properties, server_process
    from .ops import asset, cli_command, generate, history, server, text, weights
    from .ui import history as history_list
    from .ui import panels, preferences, previews

    for module in (properties, preferences, generate, asset, server, weights, text, history, previews, history_list,
                   panels, cli_command):
        module.register()
    atexit.register(server_process.shutdown)


def unregister() -> None:
    """Cancel the running job, stop the server this session started, and unregister everything."""
    from .core import properties, server_process
    from .ops import asset, cli_command, generate, history, server, text, weights
    from .ui import history as history_list
    from .ui import panels, preferences, previews

    atexit.unregister(server_process.shutdown)
    for module in (cli_command, panels, history_list, previews, history, text, weights, server, asset, generate,
                   preferences, properties):
        module.unregister()
    server_process.shutdown()
