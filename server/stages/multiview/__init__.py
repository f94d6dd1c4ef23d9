"""Zero123 multi-view generation (spec §2).

* :mod:`server.stages.multiview.ddim` — the reference's DDIM schedule, update step and loop (pure torch).
* :mod:`server.stages.multiview.zero123` — the Zero123 parts, conditioning and ``generate_views``.
* :mod:`server.stages.multiview.checkpoint` — load/save of the diffusers-format folder, and a tiny random model for
  tests.
* :mod:`server.stages.multiview.graphs` — the UNet replayed from CUDA graphs, one per batch shape (a drop-in for the
  model's forward on CUDA).

Nothing is imported here so that ``import server.stages.multiview`` stays cheap (diffusers/transformers load on use).

A stage: imports :mod:`server.common` only.
"""
