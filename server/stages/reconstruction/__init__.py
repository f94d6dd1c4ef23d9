"""The SparseNeuS-style reconstruction network of One-2-3-45 (spec §5): 32 posed views → SDF volume → mesh.

Modules, in the order data flows through them:

- ``feature_net``: 2D feature pyramid (56 fused channels per pixel).
- ``cost_volume``: projects voxel centres into every view and aggregates variance + mean.
- ``sparse_conv``: sparse 3D convolutions in torchsparse's parameter layout, on plain PyTorch.
- ``sdf_network``: compression layer, sparse cost regularisation, and the latent-conditioned SDF MLP.
- ``rendering_network``: the IBRNet-style blending network that colours vertices from the source views.
- ``model``: the whole network, its config and presets; ``checkpoint``: every way to load and save it.

A stage: imports :mod:`server.common` only.
"""
