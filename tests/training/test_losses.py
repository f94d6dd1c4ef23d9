"""Loss terms, schedules and the volume renderer on hand-made inputs with known answers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from server.stages.reconstruction.sdf_network import ConditionalVolume
from training.losses import (
    LossConfig,
    color_loss,
    depth_loss,
    eikonal_loss,
    fgbg_loss,
    fgbg_weight_at,
    sparse_weight_at,
    sparsity_loss,
    total_loss,
)
from training.renderer import RendererConfig, VolumeRenderer, cos_anneal_ratio, ray_to_query_features, sample_pdf
from training.train import lr_at


def test_color_loss_only_valid_rays():
    pred = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    target = torch.tensor([[0.5, 0.5, 0.5], [0.0, 0.0, 0.0]])
    assert color_loss(pred, target, torch.tensor([True, False])).item() == pytest.approx(0.5)
    assert color_loss(pred, target, torch.tensor([True, True])).item() == pytest.approx(0.75)
    assert color_loss(pred, target, torch.tensor([False, False])).item() == 0.0


def test_eikonal_sparsity_fgbg_depth():
    assert eikonal_loss(torch.tensor([1.0, 4.0, 9.0]), torch.tensor([True, True, False])).item() == pytest.approx(2.5)
    assert sparsity_loss(torch.tensor([0.0, 0.01, -0.01]), 100.0).item() == pytest.approx((1 + 2 * math.exp(-1)) / 3)
    assert fgbg_loss(torch.tensor([1.0, 0.2]), torch.tensor([1.0, 0.0])).item() == pytest.approx(0.1)
    depth = depth_loss(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.5, 2.0, 0.0]), torch.tensor([1.0, 1.0, 0.0]))
    assert depth.item() == pytest.approx(0.25)


def test_schedules():
    cfg = LossConfig()
    assert sparse_weight_at(0, cfg) == 0.0
    assert sparse_weight_at(25_000, cfg) == pytest.approx(0.01)
    assert sparse_weight_at(80_000, cfg) == pytest.approx(0.02)
    assert fgbg_weight_at(49_999, cfg) == 0.0 and fgbg_weight_at(50_000, cfg) == 0.1
    assert lr_at(0, 2e-4, 200_000) == pytest.approx(2e-4)
    assert lr_at(100_000, 2e-4, 200_000) == pytest.approx(2e-4 * 0.55)
    assert lr_at(200_000, 2e-4, 200_000) == pytest.approx(2e-5)
    assert lr_at(300_000, 2e-4, 200_000) == pytest.approx(2e-5)
    assert cos_anneal_ratio(12_500, 25_000) == 0.5 and cos_anneal_ratio(30_000, 25_000) == 1.0


def _total(step: int, mask: torch.Tensor) -> dict[str, float]:
    rays = len(mask)
    color = torch.full((rays, 3), 0.5)
    _, log = total_loss(step, LossConfig(), color, torch.zeros(rays, 3), torch.ones(rays, dtype=torch.bool),
                        torch.full((rays, 2), 4.0), torch.ones(rays, 2, dtype=torch.bool), torch.zeros(rays, 2),
                        torch.zeros(5), torch.zeros(rays), mask, torch.zeros(rays), torch.zeros(rays))
    return log


def test_total_weights_and_background_rule():
    # 100 rays, 1 background: 1 % ≤ 2 %, so no mask loss even after 50k iterations.
    log = _total(60_000, torch.tensor([1.0] * 99 + [0.0]))
    assert log["weight/fgbg"] == 0.0
    # colour 0.5 + 0.1·4 (eikonal) + 0.02·1 (sparsity at SDF 0) + 0 (depth weight 0)
    assert log["loss/total"] == pytest.approx(0.5 + 0.4 + 0.02)
    log = _total(60_000, torch.tensor([1.0] * 90 + [0.0] * 10))
    assert log["weight/fgbg"] == 0.1
    # fgbg = mean |0 − mask| = 0.9
    assert log["loss/total"] == pytest.approx(0.5 + 0.4 + 0.02 + 0.1 * 0.9)
    assert _total(0, torch.tensor([1.0, 0.0]))["loss/total"] == pytest.approx(0.9)  # ramps at 0


def test_sample_pdf_follows_weights():
    bins = torch.linspace(0, 1, 5)[None]  # 4 bins
    samples = sample_pdf(bins, torch.tensor([[0.0, 1.0, 0.0, 0.0]]), 8)
    assert ((samples > 0.25 - 1e-3) & (samples < 0.5 + 1e-3)).all()


def test_ray_to_query_features_known_angles():
    point = torch.zeros(1, 3)
    feats = ray_to_query_features(point, torch.tensor([0.0, 0.0, 2.0]), torch.tensor([[0.0, 0.0, 3.0],
                                                                                       [2.0, 0.0, 0.0]]))
    assert feats[0, 0, 3].item() == pytest.approx(1.0)  # same direction
    assert feats[0, 1, 3].item() == pytest.approx(0.0)  # perpendicular
    assert torch.allclose(feats[0, 1, :3], torch.tensor([-1.0, 0.0, 1.0]) / math.sqrt(2))


class _SphereSdf(nn.Module):
    radius = 0.5

    def sdf_and_features(self, points: torch.Tensor, volume: ConditionalVolume) -> torch.Tensor:
        return (points.norm(dim=-1) - self.radius)[:, None]

    def sdf(self, points: torch.Tensor, volume: ConditionalVolume) -> torch.Tensor:
        return self.sdf_and_features(points, volume)[:, 0]


def test_renderer_on_analytic_sphere():
    grey = torch.tensor([0.2, 0.4, 0.6])
    model = SimpleNamespace(
        sdf_network_lod0=_SphereSdf(),
        variance_network_lod0=SimpleNamespace(inv_s=lambda: torch.tensor(2000.0)),
        rendering_network_lod0=lambda geometry, rgb_feat, ray_diff, mask: grey.expand(len(geometry), 3),
    )
    renderer = VolumeRenderer(model, RendererConfig(perturb=False))
    # Rays from z = 2 towards −z at lateral offsets 0, 0.3 (hit) and 0.7 (miss).
    offsets = torch.tensor([0.0, 0.3, 0.7])
    origins = torch.stack([offsets, torch.zeros(3), torch.full((3,), 2.0)], dim=-1)
    directions = torch.tensor([[0.0, 0.0, -1.0]]).expand(3, 3)
    volume = ConditionalVolume(latent=torch.zeros(1, 1, 4, 4, 4), mask=torch.ones(1, 1, 4, 4, 4))
    proj = torch.eye(4)[None].repeat(2, 1, 1)
    out = renderer.render(origins, directions, 0.5, 3.5, volume, torch.zeros(2, 1, 8, 8), torch.zeros(2, 3, 8, 8),
                          proj, torch.zeros(2, 3), torch.tensor([0.0, 0.0, 2.0]), step=10**6)
    expected_depth = 2.0 - torch.sqrt(0.25 - offsets[:2] ** 2)
    assert out.weights_sum[:2].tolist() == pytest.approx([1.0, 1.0], abs=1e-3)
    # A miss: only the 1e-5 regulariser of the "div" alpha leaks (≈ 1e-5 per sample, 128 samples).
    assert out.weights_sum[2].item() < 2e-3
    assert out.depth[:2].tolist() == pytest.approx(expected_depth.tolist(), abs=5e-3)
    assert torch.allclose(out.color[0], grey, atol=1e-3)
    assert torch.allclose(out.color[2], torch.ones(3), atol=2e-3)  # white background
    # The analytic SDF has |∇| = 1 away from its centre (which ray 0 passes through): zero eikonal error.
    assert out.gradient_error[1:].max().item() < 1e-8
