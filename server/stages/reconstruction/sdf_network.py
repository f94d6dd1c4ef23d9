"""The conditional SDF network (``SparseSdfNetwork``, key ``sdf_network_lod0``; spec §5.4–§5.6).

``conditional_volume`` turns the views' fused features into a 16-channel latent volume (compress → cost volume →
sparse 3D CNN → dense grid); ``sdf`` queries the weight-normalised MLP at points, conditioned on the trilinearly
sampled latent. SDF is positive outside; the mesh is the zero level set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from server.stages.reconstruction.cost_volume import build_cost_volume
from server.stages.reconstruction.feature_net import ConvBnReLU
from server.stages.reconstruction.sparse_conv import SparseCostRegNet


@dataclass
class ConditionalVolume:
    """The network's per-object state, computed once from the views and queried for every point."""

    latent: torch.Tensor
    """[1, C, D, D, D] latent features, indexed [x, y, z]; zero outside the active voxels."""
    mask: torch.Tensor
    """[1, 1, D, D, D] float, 1 at active voxels (seen by ≥ 2 views)."""


def positional_encoding(points: torch.Tensor, num_freqs: int) -> torch.Tensor:
    """NeRF-style encoding without π: [p, sin(p), cos(p), sin(2p), cos(2p), …, sin(2^(L−1) p), cos(2^(L−1) p)].

    Args:
        points: [N, 3].

    Returns:
        [N, 3 + 6·num_freqs] (39 for the paper's 6 frequencies).
    """
    parts = [points]
    for k in range(num_freqs):
        parts += [torch.sin(points * 2.0**k), torch.cos(points * 2.0**k)]
    return torch.cat(parts, dim=-1)


def sample_volume(volume: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of a [1, C, X, Y, Z] volume at normalised points (zeros outside, corners aligned).

    grid_sample reads its last coordinate along the volume's last axis, so (x, y, z) points are passed as (z, y, x).

    Returns:
        [N, C].
    """
    grid = points.flip(-1).view(1, 1, 1, -1, 3).to(volume.dtype)
    out = F.grid_sample(volume, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.view(volume.shape[1], -1).T


class WeightNormLinear(nn.Module):
    """Linear layer with weight normalisation, W = g · v / ‖v‖ (row norm), keys ``weight_g``, ``weight_v``, ``bias``.

    Written out rather than using ``torch.nn.utils.weight_norm`` (deprecated) or its parametrization (which stores
    different keys), so the reference's checkpoint keys load unchanged.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight_g = nn.Parameter(weight.norm(dim=1, keepdim=True))
        self.weight_v = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(bias.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))
        return F.linear(x, weight, self.bias)


class LatentSDFLayer(nn.Module):
    """The SDF MLP: lin0 (encoding → h), lin1 and lin2 (cat(h, latent) → h), softplus β=100 after lin0 and lin1.

    Output column 0 is the SDF, columns 1: are a feature vector. Initialised geometrically (IDR/NeuS style, with the
    latent columns zeroed) so that an untrained network is the sphere of radius ``sphere_radius``.

    Args:
        hidden: width h (128 in the paper).
        latent: latent channels (16).
        num_freqs: positional-encoding frequencies (6).
        sphere_radius: radius of the initial sphere (the reference's ``bias`` = 0.5).
    """

    def __init__(self, hidden: int = 128, latent: int = 16, num_freqs: int = 6, sphere_radius: float = 0.5) -> None:
        super().__init__()
        self.num_freqs = num_freqs
        encoded = 3 + 6 * num_freqs
        std = math.sqrt(2) / math.sqrt(hidden)

        w0 = torch.zeros(hidden, encoded)
        w0[:, :3] = torch.randn(hidden, 3) * std  # only raw xyz drives the initial sphere
        w1 = torch.randn(hidden, hidden + latent) * std
        w1[:, -latent:] = 0
        w2 = torch.randn(hidden, hidden + latent) * 1e-4 + math.sqrt(math.pi) / math.sqrt(hidden + latent)
        w2[:, -latent:] = 0
        b2 = torch.full((hidden,), -sphere_radius)
        b2[-latent:] = 0
        self.lin0 = WeightNormLinear(w0, torch.zeros(hidden))
        self.lin1 = WeightNormLinear(w1, torch.zeros(hidden))
        self.lin2 = WeightNormLinear(w2, b2)

    def forward(self, points: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """Args: points [N, 3] normalised, latent [N, C]. Returns [N, h] (SDF in column 0)."""
        x = F.softplus(self.lin0(positional_encoding(points, self.num_freqs)), beta=100)
        x = F.softplus(self.lin1(torch.cat([x, latent], dim=-1)), beta=100)
        return self.lin2(torch.cat([x, latent], dim=-1))


class SparseSdfNetwork(nn.Module):
    """Compression layer + sparse cost regularisation + latent SDF MLP.

    Args:
        fused_channels: channels of the fused feature maps (56).
        compress_channels: channels after ``compress_layer`` (16); the cost volume has twice as many.
        costreg_channels: widths of the sparse 3D CNN (16, 32, 64); its output (the latent) has the first width.
        volume_dims: voxels per axis (96).
        hidden: SDF MLP width (128).
        num_freqs: positional-encoding frequencies (6).
        sphere_radius: radius of the geometrically initialised sphere.
    """

    def __init__(
        self,
        fused_channels: int = 56,
        compress_channels: int = 16,
        costreg_channels: tuple[int, int, int] = (16, 32, 64),
        volume_dims: int = 96,
        hidden: int = 128,
        num_freqs: int = 6,
        sphere_radius: float = 0.5,
    ) -> None:
        super().__init__()
        self.volume_dims = volume_dims
        latent = costreg_channels[0]
        self.compress_layer = ConvBnReLU(fused_channels, compress_channels, 3, 1, 1)
        self.sparse_costreg_net = SparseCostRegNet(d_in=2 * compress_channels, d_out=latent,
                                                   channels=costreg_channels)
        self.sdf_layer = LatentSDFLayer(hidden, latent, num_freqs, sphere_radius)

    def conditional_volume(self, fused: torch.Tensor, proj: torch.Tensor) -> ConditionalVolume:
        """Args: fused [V, 56, H, W] source-view features; proj [V, 4, 4] K · w2c_norm. Returns the latent volume."""
        cost = build_cost_volume(self.compress_layer(fused), proj, self.volume_dims)
        regularised = self.sparse_costreg_net(cost)
        return ConditionalVolume(latent=regularised.features[None], mask=regularised.mask[None, None].float())

    def sdf_and_features(self, points: torch.Tensor, volume: ConditionalVolume) -> torch.Tensor:
        """Args: points [N, 3] normalised. Returns [N, h]: SDF then the MLP's feature vector."""
        return self.sdf_layer(points, sample_volume(volume.latent, points))

    def sdf(self, points: torch.Tensor, volume: ConditionalVolume) -> torch.Tensor:
        """Signed distance at points [N, 3] → [N] (positive outside)."""
        return self.sdf_and_features(points, volume)[:, 0]

    def gradient(self, points: torch.Tensor, volume: ConditionalVolume) -> torch.Tensor:
        """∂SDF/∂p at points [N, 3] → [N, 3] (autograd; works under ``torch.no_grad`` callers)."""
        with torch.enable_grad():
            points = points.detach().requires_grad_(True)
            sdf = self.sdf(points, volume)
            (grad,) = torch.autograd.grad(sdf.sum(), points)
        return grad
