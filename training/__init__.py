"""Training of the One-2-3-45 reconstruction network: ground-truth data rendering and (later) fitting and evaluation.

Subpackages:

* :mod:`training.render` — BlenderProc renders of Objaverse-LVIS (or local/procedural) objects in the reference's
  training layout (spec §6), driven by ``one2345-train render``.
* :mod:`training.benchmarks` — timing of ``fit`` (``python -m training.benchmarks.fit``), one JSON line per run.

The ``one2345-train`` command lives in :mod:`training.cli`.
"""
