"""The pipeline's stages, each usable alone, in the order a run uses them.

- :mod:`.preprocess` (with :mod:`.sam_compat`) — background removal, centring, 256² model input.
- :mod:`.multiview` — Zero123: the 8 stage-1 views and 4 nearby views of each (DDIM, CUDA graphs, checkpoint
  conversion).
- :mod:`.elevation` — the input's polar angle from its nearby views (matchers, the robust fit, the estimator).
- :mod:`.reconstruction` — the SparseNeuS-style cost-volume SDF network and its checkpoints.
- :mod:`.meshing` (with :mod:`.marching`) — SDF grid → marching cubes → triangle mesh.
- :mod:`.asset` — clean-up, decimation, UV unwrap and texture bake from the posed views.

May import :mod:`server.common` and other stages (no cycles), never :mod:`server.pipeline` or :mod:`server.service`.
"""
