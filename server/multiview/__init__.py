"""Zero123 multi-view generation (spec §2).

* :mod:`server.multiview.ddim` — the reference's DDIM schedule, update step and loop (pure torch).
* :mod:`server.multiview.zero123` — the Zero123 parts, conditioning, ``generate_views``, load/save of the
  diffusers-format folder, and a tiny random model for tests.

Nothing is imported here so that ``import server.multiview`` stays cheap (diffusers/transformers load on use).
"""
