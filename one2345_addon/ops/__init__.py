"""The operators, a module per family: ``generate`` (Generate Mesh, the review, Cancel, and the job-following base the
others share), ``asset`` (Re-mesh, Regenerate and Variation of an object a job made), ``text`` (text to 3D: Generate
Images, More, Use This), ``server`` (server and fix-it actions), ``weights`` (weights check, download and import),
``history`` (past jobs), ``cli_command`` (``blender -c one2345``); ``tasks`` holds what they share (running a task,
reporting a failure, redrawing, the fix-it buttons).

Imports ``core`` and ``ops`` modules (and ``bpy``), never ``ui``.
"""
