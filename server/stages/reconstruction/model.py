"""The whole reconstruction network, its config and its presets.

Submodule names are the top-level keys of the official checkpoint (spec §5.9), so one state dict per submodule loads
from ``ckpt_215000.pth`` unchanged and our own checkpoints use the same flat keys (``pyramid_feature_network.conv0…``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import nn

from server.common.errors import BadInputError
from server.stages.reconstruction.feature_net import FeatureNet
from server.stages.reconstruction.norm import set_batch_statistics
from server.stages.reconstruction.rendering_network import GeneralRenderingNetwork
from server.stages.reconstruction.sdf_network import SparseSdfNetwork


@dataclass(frozen=True)
class ReconstructionConfig:
    """Architecture of the reconstruction network; the defaults are the paper's (``one2345_lod0_val_demo.conf``)."""

    feature_channels: tuple[int, int, int] = (8, 16, 32)
    """Widths of the 2D pyramid's full-, half- and quarter-resolution stages; their sum is the fused width (56)."""
    compress_channels: int = 16
    """Per-view channels after the compression layer; the cost volume holds variance + mean, twice as many."""
    costreg_channels: tuple[int, int, int] = (16, 32, 64)
    """Widths of the sparse 3D CNN's three levels; the first is also the latent width seen by the SDF MLP."""
    volume_dims: int = 96
    """Voxels per axis of the cost volume over [−1, 1]³ (voxel size 2/95)."""
    sdf_hidden: int = 128
    """Width of the SDF MLP; its output is the SDF plus a (hidden − 1)-d feature."""
    num_freqs: int = 6
    """Positional-encoding frequencies of the SDF MLP (39 input dims)."""
    sphere_radius: float = 0.5
    """Radius of the sphere an untrained SDF MLP represents (geometric initialisation)."""
    variance_init: float = 0.2
    """Initial value of the NeuS variance (inv_s = exp(10·variance)); used by training, not by meshing."""
    anti_alias_pooling: bool = True
    """Direction-weighted pooling in the blending network."""
    batch_statistics: bool = True
    """Normalise with batch statistics at inference, as the reference does (spec §5.2)."""

    @property
    def fused_channels(self) -> int:
        return sum(self.feature_channels)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> ReconstructionConfig:
        """A config from JSON data (a checkpoint's config.json), every field checked before any network is built:
        a config is read from files that may be damaged, and a width of 10⁹ would allocate before any check."""
        if not isinstance(data, dict):
            raise BadInputError(f"a reconstruction config is a JSON object, not {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            raise BadInputError(f"unknown reconstruction config fields {unknown}; known fields: {sorted(known)}")
        config = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
        for name, (lo, hi) in _INT_RANGES.items():
            value = getattr(config, name)
            values = value if isinstance(value, tuple) else (value,)
            width = len(getattr(cls(), name)) if isinstance(getattr(cls(), name), tuple) else 1
            if len(values) != width or not all(type(v) is int and lo <= v <= hi for v in values):
                raise BadInputError(f"reconstruction config {name}={value!r}: expected "
                                    f"{f'{width} integers' if width > 1 else 'an integer'} in [{lo}, {hi}]")
        for name in ("sphere_radius", "variance_init"):
            value = getattr(config, name)
            if type(value) not in (int, float) or not math.isfinite(value):
                raise BadInputError(f"reconstruction config {name}={value!r}: expected a finite number")
        for name in ("anti_alias_pooling", "batch_statistics"):
            if not isinstance(getattr(config, name), bool):
                raise BadInputError(f"reconstruction config {name}={getattr(config, name)!r}: expected true or false")
        return config


_INT_RANGES = {"feature_channels": (1, 1024), "compress_channels": (1, 1024), "costreg_channels": (1, 1024),
               "volume_dims": (8, 256), "sdf_hidden": (2, 4096), "num_freqs": (0, 16)}
"""Bounds far outside any sensible network, checked so that a damaged config cannot ask for absurd allocations."""


PRESETS: dict[str, ReconstructionConfig] = {
    "paper": ReconstructionConfig(),
    # Small real networks with random weights: the whole path runs in seconds on a CPU, with no weight files.
    "tiny": ReconstructionConfig(feature_channels=(4, 8, 8), compress_channels=4, costreg_channels=(8, 8, 16),
                                 volume_dims=48, sdf_hidden=32, sphere_radius=0.35),
}


class SingleVarianceNetwork(nn.Module):
    """NeuS's learnt sharpness: one scalar ``variance``, inv_s = exp(10·variance)."""

    def __init__(self, init_val: float) -> None:
        super().__init__()
        self.variance = nn.Parameter(torch.tensor(init_val))

    def inv_s(self) -> torch.Tensor:
        return torch.exp(self.variance * 10.0)


class ReconstructionModel(nn.Module):
    """The SparseNeuS-style network of One-2-3-45 (lod 0 only, as the released model)."""

    def __init__(self, config: ReconstructionConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ReconstructionConfig()
        self.pyramid_feature_network = FeatureNet(config.feature_channels)
        self.sdf_network_lod0 = SparseSdfNetwork(
            fused_channels=config.fused_channels,
            compress_channels=config.compress_channels,
            costreg_channels=config.costreg_channels,
            volume_dims=config.volume_dims,
            hidden=config.sdf_hidden,
            num_freqs=config.num_freqs,
            sphere_radius=config.sphere_radius,
        )
        self.variance_network_lod0 = SingleVarianceNetwork(config.variance_init)
        self.rendering_network_lod0 = GeneralRenderingNetwork(
            geometry_channels=config.costreg_channels[0],
            feature_channels=config.fused_channels,
            anti_alias_pooling=config.anti_alias_pooling,
        )
        set_batch_statistics(self, config.batch_statistics)


def build_model(preset: str | ReconstructionConfig = "paper", seed: int | None = 0) -> ReconstructionModel:
    """A randomly initialised network (seeded, so the ``tiny`` preset is reproducible)."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise BadInputError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        preset = PRESETS[preset]
    if seed is None:
        return ReconstructionModel(preset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ReconstructionModel(preset)
