"""Vertex colours: the IBRNet-style blending network (``GeneralRenderingNetwork``, key ``rendering_network_lod0``;
spec §5.8).

For each vertex the network sees every source view's sampled colour and feature, plus how that view's direction
relates to the surface normal, and predicts softmax blending weights. The output colour is therefore always a convex
combination of colours actually sampled from the source images — whatever the weights are.

Pixel convention: as in the reference code, the views are sampled with ``grid_sample(align_corners=True)`` of
K · w2c projections, i.e. with pixel centres at integer coordinates — half a pixel up and left of the asset stage's
geometric bake, which centres pixel (i, j) at (j + 0.5, i + 0.5) (:mod:`server.common.views`); kept for fidelity to
the trained weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from server.stages.reconstruction.cost_volume import project_to_grid
from server.stages.reconstruction.sdf_network import ConditionalVolume, sample_volume


def _kaiming(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.kaiming_normal_(module.weight)
        nn.init.zeros_(module.bias)


class GeneralRenderingNetwork(nn.Module):
    """Blends per-view colours with learnt, visibility-aware weights.

    Args:
        geometry_channels: latent-volume channels sampled at the point (16).
        feature_channels: fused 2D feature channels (56); each view contributes colour + features = 59.
        anti_alias_pooling: weight the mean/variance pooling by view direction (the paper's setting).
    """

    def __init__(
        self, geometry_channels: int = 16, feature_channels: int = 56, anti_alias_pooling: bool = True
    ) -> None:
        super().__init__()
        per_view = feature_channels + 3
        self.geometry_channels = geometry_channels
        self.anti_alias_pooling = anti_alias_pooling
        if anti_alias_pooling:
            self.s = nn.Parameter(torch.tensor(0.2))
        self.ray_dir_fc = nn.Sequential(nn.Linear(4, 16), nn.ELU(), nn.Linear(16, per_view), nn.ELU())
        self.base_fc = nn.Sequential(nn.Linear(3 * per_view + geometry_channels, 64), nn.ELU(), nn.Linear(64, 32),
                                     nn.ELU())
        self.vis_fc = nn.Sequential(nn.Linear(32, 32), nn.ELU(), nn.Linear(32, 33), nn.ELU())
        self.vis_fc2 = nn.Sequential(nn.Linear(32, 32), nn.ELU(), nn.Linear(32, 1), nn.Sigmoid())
        self.rgb_fc = nn.Sequential(nn.Linear(32 + 1 + 4, 16), nn.ELU(), nn.Linear(16, 8), nn.ELU(), nn.Linear(8, 1))
        for block in (self.base_fc, self.vis_fc, self.vis_fc2, self.rgb_fc):
            block.apply(_kaiming)

    def forward(self, geometry: torch.Tensor, rgb_feat: torch.Tensor, ray_diff: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """Blend colours.

        Args:
            geometry: [N, G] latent sampled at each point.
            rgb_feat: [N, V, 3 + F] sampled colour (first 3) and features per view.
            ray_diff: [N, V, 4] normalised (n − d_v) and n·d_v per view.
            mask: [N, V] bool, the view sees the point.

        Returns:
            [N, 3] colours: softmax-weighted sums of the sampled colours (unseen views get weight ≈ 0).
        """
        mask = mask[..., None].to(rgb_feat.dtype)
        rgb_in = rgb_feat[..., :3]
        rgb_feat = rgb_feat + self.ray_dir_fc(ray_diff)

        if self.anti_alias_pooling:
            exp_dot = torch.exp(self.s.abs() * (ray_diff[..., 3:] - 1))
            weight = (exp_dot - exp_dot.min(dim=1, keepdim=True).values) * mask
        else:
            weight = mask
        weight = weight / (weight.sum(dim=1, keepdim=True) + 1e-8)

        mean = (rgb_feat * weight).sum(dim=1)
        var = (weight * (rgb_feat - mean[:, None]) ** 2).sum(dim=1)
        # base_fc[0] acts on cat(geometry, mean, var, rgb_feat_v). Splitting its weight computes the per-point part
        # once instead of once per view, and never materialises the [N, V, 193] concatenation (same result).
        first = self.base_fc[0]
        per_view = rgb_feat.shape[-1]
        w_geo, w_mean, w_var, w_view = first.weight.split([self.geometry_channels, per_view, per_view, per_view], 1)
        per_point = F.linear(geometry, w_geo) + F.linear(mean, w_mean) + F.linear(var, w_var) + first.bias
        x = self.base_fc[1:](F.linear(rgb_feat, w_view) + per_point[:, None])

        x_res, vis = self.vis_fc(x * weight).split([x.shape[-1], 1], dim=-1)
        vis = torch.sigmoid(vis) * mask
        x = x + x_res
        vis = self.vis_fc2(x * vis) * mask

        logits = self.rgb_fc(torch.cat([x, vis, ray_diff], dim=-1)).masked_fill(mask == 0, -1e9)
        return (rgb_in * torch.softmax(logits, dim=1)).sum(dim=1)


def view_direction_features(normals: torch.Tensor, points: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """The reference's "view-independent" ray difference: the normal stands in for the target view direction.

    Args:
        normals: [N, 3] unit surface normals; points: [N, 3]; centres: [V, 3] source camera centres (same space).

    Returns:
        [N, V, 4]: normalise(n − d_v) and n·d_v, with d_v the unit direction from the point to camera v.
    """
    to_cam = centres[None] - points[:, None]
    to_cam = to_cam / (to_cam.norm(dim=-1, keepdim=True) + 1e-6)
    diff = normals[:, None] - to_cam
    direction = diff / diff.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    dot = (normals[:, None] * to_cam).sum(dim=-1, keepdim=True)
    return torch.cat([direction, dot], dim=-1)


@torch.no_grad()
def blend_vertex_colors(
    network: GeneralRenderingNetwork,
    gradient_fn: Callable[[torch.Tensor], torch.Tensor],
    volume: ConditionalVolume,
    fused: torch.Tensor,
    images: torch.Tensor,
    proj: torch.Tensor,
    centres: torch.Tensor,
    vertices: torch.Tensor,
    chunk: int = 8192,
) -> torch.Tensor:
    """Colour every vertex from the source views (spec §5.8).

    Args:
        network: the blending network.
        gradient_fn: points [n, 3] → ∂SDF/∂p [n, 3] (normals).
        volume: the conditional volume (latent and valid mask).
        fused: [V, F, H, W] fused feature maps; images: [V, 3, H, W] source colours in [0, 1].
        proj: [V, 4, 4] K · w2c_norm; centres: [V, 3] camera centres, normalised space.
        vertices: [N, 3] normalised space.

    Returns:
        [N, 3] float colours in [0, 1]. A vertex that no view sees validly (outside the active volume, say) gets the
        mean colour of the views it projects into, or mid grey if none — the reference would give it an arbitrary
        average of zero-padded samples.
    """
    height, width = images.shape[-2:]
    maps = torch.cat([images, fused], dim=1)  # [V, 3 + F, H, W]: colour and features sampled in one pass
    out = []
    for x in vertices.split(chunk):
        geometry = sample_volume(volume.latent, x)
        geometry_ok = (x.abs() < 1).all(dim=-1) & (sample_volume(volume.mask, x)[:, 0] > 0)
        normals = F.normalize(gradient_fn(x), dim=-1, eps=1e-6)

        grid, z = project_to_grid(proj, x, (height, width))  # [V, n, 2], [V, n]
        inside = ((grid.abs() < 1).all(dim=-1) & (z > 0)).T  # [n, V]
        grid = torch.where(inside.T[..., None], grid, torch.full_like(grid, 2.0))  # 2 → zero padding
        rgb_feat = F.grid_sample(maps, grid[:, None], mode="bilinear", padding_mode="zeros", align_corners=True)
        rgb_feat = rgb_feat[:, :, 0].permute(2, 0, 1)  # [n, V, 3 + F]
        mask = inside & geometry_ok[:, None]

        colors = network(geometry, rgb_feat, view_direction_features(normals, x, centres), mask)
        unseen = ~mask.any(dim=1)
        if unseen.any():
            w = inside[unseen].to(colors.dtype)[..., None]
            fallback = (rgb_feat[unseen, :, :3] * w).sum(dim=1) / w.sum(dim=1).clamp(min=1)
            colors[unseen] = torch.where(w.sum(dim=1) > 0, fallback, torch.full_like(fallback, 0.5))
        out.append(colors)
    return torch.cat(out).clamp(0, 1)
