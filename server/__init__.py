"""One-2-3-45 inference: a service on top of a pipeline on top of stages on top of shared ground.

- :mod:`server.service` — what users and the add-on talk to: the ``one2345`` command, the HTTP app and its server
  process, the job store and worker, the weights API.
- :mod:`server.pipeline` — the orchestrator: one image → a coloured mesh as numbered stages; re-meshing a run.
- :mod:`server.stages` — one subpackage or module per stage (preprocess, elevation, multiview, reconstruction,
  meshing, asset), each usable alone.
- :mod:`server.common` — shared ground: cameras, devices, errors, files, mesh and view formats, the weights table.
- :mod:`server.benchmarks` — scripts that print stage times and peak memory.

Each layer imports only the layers below it (``tests/test_import_rules.py`` checks). Heavy dependencies (torch,
diffusers, …) are imported by the modules that need them, so ``import server`` stays cheap and
``server.common.errors`` can be used anywhere.
"""

__version__ = "0.1.0"
