"""Shared ground of the server: what every stage, the pipeline and the service use.

- :mod:`.errors` — the error classes and their kinds (what a client sees); :mod:`.fsutil` — atomic writes, space
  checks; :mod:`.devices` — choosing the torch device; :mod:`.net` — whether a host is this machine.
- :mod:`.cameras` — the reference's camera conventions and ``pose.json``; :mod:`.views` — a views folder read and
  checked; :mod:`.mesh_io` — :class:`~.mesh_io.Mesh` and its PLY/GLB/OBJ files; :mod:`.synthetic` — a toy object
  rendered at the reference's cameras (the ``sample-views`` command and tests).
- :mod:`.weights` — the weights table, resolving and downloading the files.

Imports nothing of the server above it (only other modules of this package).
"""
