"""Batch normalisation as the reference runs it.

The reference's export runner never calls ``.eval()`` (spec §5.2), so every batch-norm layer normalises with the
statistics of the current batch — the 32 source images in 2D, the active voxels in 3D — and ignores its running
statistics. Reproducing official meshes needs the same, so each of our norm layers has a ``use_batch_stats`` switch
(default True, the reference's behaviour); :func:`set_batch_statistics` flips it for a whole network.

The 2D layers are InPlaceABN in the reference: batch norm whose scale is ``|γ| + eps`` (not ``γ``), fused with a
leaky ReLU of slope 0.01. :class:`ActivatedBatchNorm2d` reproduces that in plain PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def set_batch_statistics(module: nn.Module, enabled: bool) -> None:
    """Choose batch statistics (reference behaviour) or running statistics for every norm layer in ``module``."""
    for m in module.modules():
        if hasattr(m, "use_batch_stats"):
            m.use_batch_stats = enabled


def activated_batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float = 1e-5,
    slope: float = 0.01,
) -> torch.Tensor:
    """InPlaceABN's forward: ``leaky_relu((x − μ) / sqrt(σ² + eps) · (|γ| + eps) + β, slope)``.

    Args:
        x: [N, C, ...] input.
        weight, bias, mean, var: [C] affine parameters (γ, β) and the statistics to normalise with.
    """
    scale = (weight.abs() + eps) * torch.rsqrt(var + eps)
    shift = bias - mean * scale
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return F.leaky_relu(x * scale.view(shape) + shift.view(shape), slope)


class ActivatedBatchNorm2d(nn.BatchNorm2d):
    """InPlaceABN (leaky ReLU 0.01) with the state-dict keys of ``nn.BatchNorm2d``.

    Attributes:
        use_batch_stats: normalise with the batch's statistics even outside training (the reference's quirk).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, slope: float = 0.01) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.slope = slope
        self.use_batch_stats = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training or self.use_batch_stats):
            return activated_batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var, self.eps,
                                        self.slope)
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dim=dims)
        var = x.var(dim=dims, unbiased=False)
        if self.training:
            # InPlaceABN updates the running variance with the unbiased estimate, like BatchNorm.
            n = x.numel() // x.shape[1]
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * n / max(n - 1, 1), self.momentum)
                self.num_batches_tracked += 1
        return activated_batch_norm(x, self.weight, self.bias, mean, var, self.eps, self.slope)
