"""NeuS-style volume rendering of the conditional SDF (training and validation only; spec §5.10).

Along each ray of the query camera: ``n_samples`` stratified samples between near and far, then ``up_sample_steps``
rounds of importance sampling (``n_importance / up_sample_steps`` samples each, inv-variance 64·2^i) on the SDF, then
``render_core``: alpha from the SDF with NeuS's "div" formula (cosine annealed from ½(1 − cos) to −cos over
``anneal_end`` iterations, sharpness inv_s = exp(10·variance)), colour from the blending network with the direction
to the *query* camera (IBRNet's ``compute_angle``), and a white background added as (1 − Σw).

Legend (NeuS paper → code): t_i sample distances ``z``; δ_i = t_{i+1} − t_i ``dists``; Φ_s sigmoid(s·x);
α_i = max((Φ_s(f(p_i⁻)) − Φ_s(f(p_i⁺))) / Φ_s(f(p_i⁻)), 0) ``alpha``; T_i = Π_{j<i}(1 − α_j); w_i = T_i α_i ``weights``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from server.stages.reconstruction.cost_volume import project_to_grid
from server.stages.reconstruction.model import ReconstructionModel
from server.stages.reconstruction.rendering_network import view_direction_features
from server.stages.reconstruction.sdf_network import ConditionalVolume, sample_volume


@dataclass(frozen=True)
class RendererConfig:
    """Volume rendering; defaults are the reference's (``one2345_lod0_val_demo.conf`` trainer block)."""

    n_samples: int = 64
    """Stratified samples per ray between near and far."""
    n_importance: int = 64
    """Importance samples per ray, added over ``up_sample_steps`` rounds."""
    up_sample_steps: int = 4
    """Rounds of importance sampling (16 samples each for the defaults), inv-variance 64·2^i in round i."""
    perturb: bool = True
    """Jitter the stratified samples within their bins during training."""
    anneal_end: int = 25_000
    """Iterations over which the cosine annealing ratio grows from 0 to 1 (0: always 1)."""
    min_views: int = 2
    """A sample is valid (counts towards a ray's validity, and the eikonal loss) when this many views see it."""
    min_valid_samples: int = 8
    """A ray is valid for the colour loss when more than this many of its samples are valid."""


def cos_anneal_ratio(step: int, anneal_end: int) -> float:
    """Cosine annealing ratio: step / anneal_end, capped at 1 (1 when annealing is off)."""
    return 1.0 if anneal_end <= 0 else min(1.0, step / anneal_end)


def sample_pdf(bins: torch.Tensor, weights: torch.Tensor, count: int) -> torch.Tensor:
    """Deterministic inverse-transform samples of the piecewise-constant pdf ``weights`` over ``bins`` (NeRF).

    Args:
        bins: [R, B + 1] bin edges; weights: [R, B].

    Returns:
        [R, count] sample positions, at the quantiles (k + ½) / count.
    """
    weights = weights + 1e-5
    cdf = torch.cumsum(weights / weights.sum(dim=-1, keepdim=True), dim=-1)
    cdf = torch.cat([torch.zeros_like(cdf[:, :1]), cdf], dim=-1)
    u = torch.linspace(0.5 / count, 1 - 0.5 / count, count, device=bins.device).expand(bins.shape[0], count)
    index = torch.searchsorted(cdf, u.contiguous(), right=True)
    below = (index - 1).clamp(min=0)
    above = index.clamp(max=cdf.shape[-1] - 1)
    cdf_lo, cdf_hi = torch.gather(cdf, 1, below), torch.gather(cdf, 1, above)
    bin_lo, bin_hi = torch.gather(bins, 1, below), torch.gather(bins, 1, above)
    denom = torch.where(cdf_hi - cdf_lo < 1e-5, torch.ones_like(cdf_lo), cdf_hi - cdf_lo)
    return bin_lo + (u - cdf_lo) / denom * (bin_hi - bin_lo)


def up_sample(origins: torch.Tensor, directions: torch.Tensor, z: torch.Tensor, sdf: torch.Tensor, count: int,
              inv_s: float) -> torch.Tensor:
    """NeuS's importance sampling: an SDF-derived pdf at fixed sharpness ``inv_s``, sampled deterministically.

    Args:
        origins, directions: [R, 3]; z: [R, N] sorted distances; sdf: [R, N] at the points of z.

    Returns:
        [R, count] new distances.
    """
    points = origins[:, None] + directions[:, None] * z[..., None]
    inside = (points.norm(dim=-1) < 1.0).float()
    inside = (inside[:, :-1] + inside[:, 1:]).clamp(max=1)  # either end inside the unit sphere
    prev_sdf, next_sdf = sdf[:, :-1], sdf[:, 1:]
    prev_z, next_z = z[:, :-1], z[:, 1:]
    mid_sdf = (prev_sdf + next_sdf) * 0.5
    cos = (next_sdf - prev_sdf) / (next_z - prev_z + 1e-5)
    # The slope estimate of an interval is the flatter of its own and the previous one's, never positive.
    prev_cos = torch.cat([torch.zeros_like(cos[:, :1]), cos[:, :-1]], dim=-1)
    cos = torch.minimum(prev_cos, cos).clamp(-1e3, 0.0) * inside
    dist = next_z - prev_z
    prev_cdf = torch.sigmoid((mid_sdf - cos * dist * 0.5) * inv_s)
    next_cdf = torch.sigmoid((mid_sdf + cos * dist * 0.5) * inv_s)
    alpha = (prev_cdf - next_cdf + 1e-5) / (prev_cdf + 1e-5)
    transmittance = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha + 1e-7], dim=-1), dim=-1)
    weights = alpha * transmittance[:, :-1]
    return sample_pdf(z, weights, count).detach()


def ray_to_query_features(points: torch.Tensor, query_centre: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """IBRNet's ``compute_angle``: [N, V, 4] = normalise(d_q − d_v), d_q·d_v for unit directions d from each point to
    the query camera (d_q) and to source camera v (d_v).

    At training the query direction takes the place the surface normal has in vertex colouring, so this is
    :func:`~server.stages.reconstruction.rendering_network.view_direction_features` with d_q for the normal.
    """
    to_query = F.normalize(query_centre[None] - points, dim=-1, eps=1e-6)
    return view_direction_features(to_query, points, centres)


@dataclass
class RenderOutput:
    """Per-ray results and the per-sample values the losses need."""

    color: torch.Tensor
    """[R, 3] rendered colour, white background added."""
    weights_sum: torch.Tensor
    """[R] Σ w (opacity)."""
    depth: torch.Tensor
    """[R] Σ w·t (expected distance, normalised units)."""
    valid_rays: torch.Tensor
    """[R] bool: more than ``min_valid_samples`` samples seen by ≥ ``min_views`` views."""
    sdf: torch.Tensor
    """[R, N] SDF at the render samples."""
    gradient_error: torch.Tensor
    """[R, N] (‖∇SDF‖ − 1)² at the render samples."""
    valid_samples: torch.Tensor
    """[R, N] bool: the sample is seen by ≥ ``min_views`` views and lies in the active volume."""
    weights: torch.Tensor
    """[R, N] w_i."""


class VolumeRenderer:
    """Renders rays through the conditional SDF of :class:`ReconstructionModel`.

    Args:
        model: the network (its submodules are used as they are; nothing is copied).
        config: sampling settings.
    """

    def __init__(self, model: ReconstructionModel, config: RendererConfig = RendererConfig()) -> None:
        self.model = model
        self.config = config

    def sdf(self, points: torch.Tensor, volume: ConditionalVolume) -> torch.Tensor:
        return self.model.sdf_network_lod0.sdf(points, volume)

    def sdf_features_gradient(self, points: torch.Tensor, volume: ConditionalVolume,
                              create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """SDF [N] and its gradient [N, 3]; with ``create_graph`` the gradient is differentiable (eikonal loss)."""
        with torch.enable_grad():
            points = points.detach().requires_grad_(True)
            sdf = self.model.sdf_network_lod0.sdf_and_features(points, volume)[:, 0]
            (grad,) = torch.autograd.grad(sdf, points, torch.ones_like(sdf), create_graph=create_graph)
        return sdf, grad

    def sample_along(self, origins: torch.Tensor, directions: torch.Tensor, near: float, far: float,
                     volume: ConditionalVolume, generator: torch.Generator | None) -> torch.Tensor:
        """[R, n_samples + n_importance] sorted sample distances (stratified, then importance-sampled)."""
        cfg = self.config
        rays = origins.shape[0]
        device = origins.device
        z = near + (far - near) * torch.linspace(0.0, 1.0, cfg.n_samples, device=device).expand(rays, -1)
        if cfg.perturb and generator is not None:
            # Drawn on the host generator (checkpointed, device-independent); the copy does not wait for the GPU.
            jitter = torch.rand(rays, 1, generator=generator).to(device, non_blocking=True) - 0.5
            z = z + jitter * (far - near) / cfg.n_samples
        if cfg.n_importance <= 0:
            return z
        with torch.no_grad():
            points = origins[:, None] + directions[:, None] * z[..., None]
            sdf = self.sdf(points.reshape(-1, 3), volume).reshape(rays, -1)
            per_step = cfg.n_importance // cfg.up_sample_steps
            for i in range(cfg.up_sample_steps):
                new_z = up_sample(origins, directions, z, sdf, per_step, 64.0 * 2**i)
                z, order = torch.sort(torch.cat([z, new_z], dim=-1), dim=-1)
                if i + 1 < cfg.up_sample_steps:
                    new_points = origins[:, None] + directions[:, None] * new_z[..., None]
                    new_sdf = self.sdf(new_points.reshape(-1, 3), volume).reshape(rays, -1)
                    sdf = torch.gather(torch.cat([sdf, new_sdf], dim=-1), 1, order)
        return z

    def render(self, origins: torch.Tensor, directions: torch.Tensor, near: float, far: float,
               volume: ConditionalVolume, fused: torch.Tensor, images: torch.Tensor, proj: torch.Tensor,
               centres: torch.Tensor, query_centre: torch.Tensor, step: int,
               generator: torch.Generator | None = None, create_graph: bool = True) -> RenderOutput:
        """Render rays (spec §5.10).

        Args:
            origins, directions: [R, 3] query rays (unit directions), normalised frame.
            near, far: distance range along the rays.
            volume: the conditional volume of the sources; fused: [V, F, H, W] their fused features; images:
                [V, 3, H, W] their colours; proj: [V, 4, 4]; centres: [V, 3].
            query_centre: [3] the query camera's centre (direction input of the blending network).
            step: training iteration (cosine annealing).
            generator: random source of the stratified jitter; None (or ``perturb`` off) samples deterministically.
            create_graph: keep the SDF gradient differentiable (training).

        Returns:
            RenderOutput.
        """
        cfg = self.config
        z = self.sample_along(origins, directions, near, far, volume, generator)
        rays, n = z.shape
        dists = torch.cat([z[:, 1:] - z[:, :-1], torch.full_like(z[:, :1], (far - near) / cfg.n_samples)], dim=-1)
        mid_z = z + dists * 0.5
        points = (origins[:, None] + directions[:, None] * mid_z[..., None]).reshape(-1, 3)

        sdf, gradient = self.sdf_features_gradient(points, volume, create_graph)
        inv_s = self.model.variance_network_lod0.inv_s().clamp(1e-6, 1e6)
        ratio = cos_anneal_ratio(step, cfg.anneal_end)
        true_cos = (directions[:, None].expand(rays, n, 3).reshape(-1, 3) * gradient).sum(dim=-1)
        # Annealed slope: ½(1 − cos) early (gradients everywhere along the ray), −cos (unbiased NeuS) at the end.
        iter_cos = -(F.relu(-true_cos * 0.5 + 0.5) * (1.0 - ratio) + F.relu(-true_cos) * ratio)
        half = iter_cos * dists.reshape(-1) * 0.5
        prev_cdf = torch.sigmoid((sdf - half) * inv_s)
        next_cdf = torch.sigmoid((sdf + half) * inv_s)
        alpha = ((prev_cdf - next_cdf + 1e-5) / (prev_cdf + 1e-5)).reshape(rays, n).clamp(0.0, 1.0)

        color, valid = self._sample_colors(points, gradient, volume, fused, images, proj, centres, query_centre)
        color, valid = color.reshape(rays, n, 3), valid.reshape(rays, n)
        transmittance = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha + 1e-7], dim=-1), dim=-1)
        weights = alpha * transmittance[:, :-1]
        weights_sum = weights.sum(dim=-1)
        rendered = (weights[..., None] * color).sum(dim=1) + (1.0 - weights_sum)[:, None]  # white background
        gradient_error = (gradient.norm(dim=-1) - 1.0) ** 2
        return RenderOutput(
            color=rendered,
            weights_sum=weights_sum,
            depth=(weights * mid_z).sum(dim=-1),
            valid_rays=valid.sum(dim=-1) > cfg.min_valid_samples,
            sdf=sdf.reshape(rays, n),
            gradient_error=gradient_error.reshape(rays, n),
            valid_samples=valid,
            weights=weights,
        )

    def _sample_colors(self, points: torch.Tensor, gradient: torch.Tensor, volume: ConditionalVolume,
                       fused: torch.Tensor, images: torch.Tensor, proj: torch.Tensor, centres: torch.Tensor,
                       query_centre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Blended colour [N, 3] and validity [N] of every sample (the per-view sampling of spec §5.8)."""
        height, width = images.shape[-2:]
        maps = torch.cat([images, fused], dim=1)
        geometry = sample_volume(volume.latent, points)
        geometry_ok = (points.abs() < 1).all(dim=-1) & (sample_volume(volume.mask, points)[:, 0] > 0)
        grid, z = project_to_grid(proj, points, (height, width))  # [V, N, 2], [V, N]
        inside = ((grid.abs() < 1).all(dim=-1) & (z > 0)).T  # [N, V]
        grid = torch.where(inside.T[..., None], grid, torch.full_like(grid, 2.0))
        rgb_feat = F.grid_sample(maps, grid[:, None], mode="bilinear", padding_mode="zeros", align_corners=True)
        rgb_feat = rgb_feat[:, :, 0].permute(2, 0, 1)  # [N, V, 3 + F]
        mask = inside & geometry_ok[:, None]
        ray_diff = ray_to_query_features(points, query_centre, centres)
        color = self.model.rendering_network_lod0(geometry, rgb_feat, ray_diff, mask)
        valid = mask.sum(dim=-1) >= self.config.min_views
        return color, valid


def render_chunks(render: Callable[[torch.Tensor, torch.Tensor], RenderOutput], origins: torch.Tensor,
                  directions: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Render many rays in chunks without gradients (validation images).

    Returns:
        colour [R, 3], opacity [R], depth [R].
    """
    colors, opacity, depth = [], [], []
    for o, d in zip(origins.split(chunk), directions.split(chunk), strict=True):
        out = render(o, d)
        colors.append(out.color.detach())
        opacity.append(out.weights_sum.detach())
        depth.append(out.depth.detach())
    return torch.cat(colors), torch.cat(opacity), torch.cat(depth)
