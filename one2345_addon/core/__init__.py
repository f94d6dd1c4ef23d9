"""The add-on's ground: the HTTP client, job polling (``jobs``, its errors in ``errors``, recipes in ``recipes``), text
to 3D's images jobs and candidate sets (``images``), the local server process and its slots, the platform layer, the
server environment set-up, what the add-on knows of the server, the add-on settings (read from the preferences), the
scene properties and the mesh import.

Imports only ``core`` modules, the standard library, ``bpy``/``mathutils`` and numpy — never ``ops`` or ``ui``.
``client``, ``errors``, ``recipes``, ``jobs``, ``images``, ``server_process``, ``server_slots``, ``server_state``,
``platform_compat`` and ``setup_env`` need no Blender at all (they are tested without it); ``settings``,
``properties`` and ``mesh_import`` need ``bpy``.
"""
