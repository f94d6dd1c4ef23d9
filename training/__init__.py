"""Training of the One-2-3-45 reconstruction network: ground-truth data rendering and fitting and evaluation.

Subpackages:

* :mod:`training.render` — BlenderProc renders of Objaverse-LVIS (or local/procedural) objects in the reference's
  training layout (spec §6), driven by ``one2345-train render``.
* :mod:`training.benchmarks` — timing of ``fit`` (``python -m training.benchmarks.fit``), one JSON line per run.

The ``one2345-train`` command lives in :mod:`training.cli`.

Modules: :mod:`.data` (the rendered objects as samples), :mod:`.rays`, :mod:`.synthetic` (Blender-free objects),
:mod:`.losses`, :mod:`.amp`, :mod:`.train` (``fit``), :mod:`.predict`, :mod:`.evaluate` with :mod:`.elevation_eval`,
:mod:`.texture_eval` and :mod:`.mesh_render`, :mod:`.renderer`.

May import :mod:`server` (its network classes and camera conventions, so a trained checkpoint loads in the server
unchanged); nothing in :mod:`server` imports this package.
"""
