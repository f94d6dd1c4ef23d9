"""Losses of the reconstruction network and their schedules (spec §6).

total = L1 colour (valid rays) + 0.1·eikonal + w_sparse(it)·sparsity + w_fgbg(it)·mask L1 + w_depth·depth L1, with
w_sparse ramping linearly 0 → 0.02 over 50 000 iterations and w_fgbg switching on (0.1) after 50 000 iterations, only
for batches whose rays are more than 2 % background.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LossConfig:
    """Loss weights and schedules; defaults are the reference's training config (``one2345_lod_train.conf``)."""

    color_weight: float = 1.0
    """Weight of the L1 colour loss on valid rays."""
    eikonal_weight: float = 0.1
    """Weight of mean (‖∇SDF‖ − 1)² over valid samples."""
    sparse_weight: float = 0.02
    """Final weight of the sparsity term mean(exp(−decay·|SDF|))."""
    sparse_ramp: int = 50_000
    """Iterations over which the sparsity weight grows linearly from 0 (0: full weight from the start)."""
    sparse_decay: float = 100.0
    """Decay of the sparsity term (``sdf_decay_param``)."""
    sparse_points: int = 1024
    """Uniform random points in [−1, 1]³ added to the sparsity term each step."""
    fgbg_weight: float = 0.1
    """Weight of the L1 between opacity Σw and the mask."""
    fgbg_start: int = 50_000
    """Iteration from which the mask loss is applied."""
    fgbg_min_background: float = 0.02
    """The mask loss applies only when more than this fraction of the batch's rays are background."""
    depth_weight: float = 0.0
    """Weight of the L1 between rendered and GT ray distance on foreground rays (reference's train conf: 0)."""


def sparse_weight_at(step: int, config: LossConfig) -> float:
    """Linear ramp 0 → ``sparse_weight`` over ``sparse_ramp`` iterations, then constant."""
    if config.sparse_ramp <= 0:
        return config.sparse_weight
    return config.sparse_weight * min(1.0, step / config.sparse_ramp)


def fgbg_weight_at(step: int, config: LossConfig) -> float:
    """``fgbg_weight`` from ``fgbg_start`` on, 0 before."""
    return config.fgbg_weight if step >= config.fgbg_start else 0.0


def color_loss(color: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean L1 over the valid rays' channels; 0 when no ray is valid.

    Args:
        color, target: [R, 3]; valid: [R] bool.
    """
    weight = valid.to(color.dtype)[:, None]
    return ((color - target).abs() * weight).sum() / (3.0 * weight.sum()).clamp(min=1.0)


def eikonal_loss(gradient_error: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of (‖∇SDF‖ − 1)² over valid samples; 0 when none is valid.

    Args:
        gradient_error: [...] per-sample (‖∇SDF‖ − 1)²; valid: [...] bool, same shape.
    """
    weight = valid.to(gradient_error.dtype)
    return (gradient_error * weight).sum() / weight.sum().clamp(min=1.0)


def sparsity_loss(sdf: torch.Tensor, decay: float) -> torch.Tensor:
    """mean(exp(−decay·|SDF|)): penalises surfaces where nothing supports them. sdf: any shape."""
    return torch.exp(-decay * sdf.abs()).mean()


def fgbg_loss(weights_sum: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean L1 between opacity [R] and the mask [R] (1 foreground, 0 background)."""
    return (weights_sum - mask).abs().mean()


def depth_loss(depth: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean L1 between rendered and GT ray distance [R] on foreground rays (mask [R] > 0); 0 when there are none."""
    weight = (mask > 0).to(depth.dtype)
    return ((depth - target).abs() * weight).sum() / weight.sum().clamp(min=1.0)


def total_loss(step: int, config: LossConfig, color: torch.Tensor, target: torch.Tensor, valid_rays: torch.Tensor,
               gradient_error: torch.Tensor, valid_samples: torch.Tensor, sdf_samples: torch.Tensor,
               sdf_random: torch.Tensor, weights_sum: torch.Tensor, mask: torch.Tensor, depth: torch.Tensor,
               target_depth: torch.Tensor, background: float | None = None,
               tensor_logs: bool = False) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
    """The weighted sum and its parts (for logging).

    Args:
        step: training iteration (schedules).
        color, target: [R, 3]; valid_rays: [R] bool.
        gradient_error, valid_samples, sdf_samples: [R, N] per render sample.
        sdf_random: [P] SDF at uniform random points of the volume.
        weights_sum, mask, depth, target_depth: [R].
        background: share of background rays if already known (counted on the host, :class:`training.rays.RayBatch`);
            None counts it from ``mask``, which waits for a GPU.
        tensor_logs: log the terms as detached 0-d tensors instead of floats, so that nothing waits for a GPU (the
            loop converts them when it logs).

    Returns:
        (loss, {name: value}) with every term unweighted plus the weights in use.
    """
    terms = {
        "color": color_loss(color, target, valid_rays),
        "eikonal": eikonal_loss(gradient_error, valid_samples),
        # The reference averages the term over the ray samples and over the random points.
        "sparse": 0.5 * (sparsity_loss(sdf_samples, config.sparse_decay) + sparsity_loss(sdf_random,
                                                                                       config.sparse_decay)),
        "fgbg": fgbg_loss(weights_sum, mask),
        "depth": depth_loss(depth, target_depth, mask),
    }
    if background is None:
        background = 1.0 - float((mask > 0).float().mean())
    weights = {
        "color": config.color_weight,
        "eikonal": config.eikonal_weight,
        "sparse": sparse_weight_at(step, config),
        "fgbg": fgbg_weight_at(step, config) if background > config.fgbg_min_background else 0.0,
        "depth": config.depth_weight,
    }
    loss = sum(weights[k] * v for k, v in terms.items())
    value = (lambda t: t.detach()) if tensor_logs else (lambda t: float(t.detach()))
    log = {f"loss/{k}": value(v) for k, v in terms.items()}
    log.update({f"weight/{k}": w for k, w in weights.items()})
    log["loss/total"] = value(loss)
    return loss, log
