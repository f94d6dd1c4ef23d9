"""The 2D feature pyramid (``FeatureNet``, key ``pyramid_feature_network``; spec §5.3).

An MVSNet-style FPN: three conv stages at full, half and quarter resolution, lateral 1×1 convs, and 3×3 smoothing.
The three levels are upsampled to the input size and concatenated into one fused map per view
(32 + 16 + 8 = 56 channels in the paper configuration), which both the cost volume and the colour blending sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server.stages.reconstruction.norm import ActivatedBatchNorm2d


class ConvBnReLU(nn.Module):
    """Conv2d without bias followed by InPlaceABN (keys ``conv.weight``, ``bn.*``)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1, pad: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=pad, bias=False)
        self.bn = ActivatedBatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def _up(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class FeatureNet(nn.Module):
    """Three-level FPN over RGB images.

    Args:
        channels: widths (c0, c1, c2) of the full-, half- and quarter-resolution stages; the paper uses (8, 16, 32).
    """

    def __init__(self, channels: tuple[int, int, int] = (8, 16, 32)) -> None:
        super().__init__()
        c0, c1, c2 = channels
        self.conv0 = nn.Sequential(ConvBnReLU(3, c0), ConvBnReLU(c0, c0))
        self.conv1 = nn.Sequential(ConvBnReLU(c0, c1, 5, 2, 2), ConvBnReLU(c1, c1), ConvBnReLU(c1, c1))
        self.conv2 = nn.Sequential(ConvBnReLU(c1, c2, 5, 2, 2), ConvBnReLU(c2, c2), ConvBnReLU(c2, c2))
        self.toplayer = nn.Conv2d(c2, c2, 1)
        self.lat1 = nn.Conv2d(c1, c2, 1)
        self.lat0 = nn.Conv2d(c0, c2, 1)
        self.smooth1 = nn.Conv2d(c2, c1, 3, padding=1)
        self.smooth0 = nn.Conv2d(c2, c0, 3, padding=1)
        self.fused_channels = c0 + c1 + c2

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Pyramid levels, coarse to fine.

        Args:
            images: [V, 3, H, W] RGB in [0, 1] (no mean/std normalisation, as in the reference); H, W divisible by 4.

        Returns:
            [feat2 [V, c2, H/4, W/4], feat1 [V, c1, H/2, W/2], feat0 [V, c0, H, W]].
        """
        conv0 = self.conv0(images)
        conv1 = self.conv1(conv0)
        conv2 = self.conv2(conv1)
        feat2 = self.toplayer(conv2)
        feat1 = _up(feat2, conv1.shape[-2:]) + self.lat1(conv1)
        feat0 = _up(feat1, conv0.shape[-2:]) + self.lat0(conv0)
        return [feat2, self.smooth1(feat1), self.smooth0(feat0)]

    def fused(self, images: torch.Tensor) -> torch.Tensor:
        """The fused per-pixel feature map: [V, c0 + c1 + c2, H, W] (coarse levels upsampled, bilinear, corners
        aligned)."""
        if images.shape[-1] % 4 or images.shape[-2] % 4:
            raise ValueError(f"image size {tuple(images.shape[-2:])} must be divisible by 4 for the feature pyramid")
        feat2, feat1, feat0 = self(images)
        size = images.shape[-2:]
        return torch.cat([_up(feat2, size), _up(feat1, size), feat0], dim=1)
