"""Unit tests of the reconstruction network's parts against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from server.stages.reconstruction.cost_volume import build_cost_volume, voxel_centres
from server.stages.reconstruction.feature_net import FeatureNet
from server.stages.reconstruction.model import ReconstructionConfig, ReconstructionModel, build_model
from server.stages.reconstruction.norm import ActivatedBatchNorm2d, set_batch_statistics
from server.stages.reconstruction.rendering_network import GeneralRenderingNetwork, view_direction_features
from server.stages.reconstruction.sdf_network import (
    LatentSDFLayer,
    WeightNormLinear,
    positional_encoding,
    sample_volume,
)


def test_activated_batch_norm_matches_inplace_abn_formula():
    torch.manual_seed(0)
    bn = ActivatedBatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([-2.0, 0.5, 0.0]))  # negative and zero γ: InPlaceABN uses |γ| + eps
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        bn.running_mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
        bn.running_var.copy_(torch.tensor([4.0, 5.0, 6.0]))
    x = torch.randn(4, 3, 5, 6) * 3 + 1
    bn.eval()
    mean = x.mean(dim=(0, 2, 3)).view(1, 3, 1, 1)
    var = x.var(dim=(0, 2, 3), unbiased=False).view(1, 3, 1, 1)
    scale = (bn.weight.abs() + 1e-5).view(1, 3, 1, 1)
    expected = F.leaky_relu((x - mean) / torch.sqrt(var + 1e-5) * scale + bn.bias.view(1, 3, 1, 1), 0.01)
    assert torch.allclose(bn(x), expected, atol=1e-5)  # batch statistics, even in eval mode (reference quirk)

    bn.use_batch_stats = False
    rm, rv = bn.running_mean.view(1, 3, 1, 1), bn.running_var.view(1, 3, 1, 1)
    expected = F.leaky_relu((x - rm) / torch.sqrt(rv + 1e-5) * scale + bn.bias.view(1, 3, 1, 1), 0.01)
    assert torch.allclose(bn(x), expected, atol=1e-5)


def test_activated_batch_norm_updates_running_stats_in_training():
    bn = ActivatedBatchNorm2d(2).train()
    x = torch.randn(3, 2, 4, 4)
    bn(x)
    n = 3 * 4 * 4
    assert torch.allclose(bn.running_mean, 0.1 * x.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(bn.running_var, 0.9 + 0.1 * x.var(dim=(0, 2, 3), unbiased=False) * n / (n - 1), atol=1e-6)


def test_set_batch_statistics_switches_every_norm_layer():
    model = build_model("tiny")
    norms = [m for m in model.modules() if hasattr(m, "use_batch_stats")]
    assert len(norms) > 10 and all(m.use_batch_stats for m in norms)
    set_batch_statistics(model, False)
    assert not any(m.use_batch_stats for m in norms)
    assert not ReconstructionModel(ReconstructionConfig(batch_statistics=False)).pyramid_feature_network.conv0[0] \
        .bn.use_batch_stats


def test_feature_pyramid_fuses_56_channels_at_full_resolution():
    net = FeatureNet()
    fused = net.fused(torch.rand(2, 3, 32, 48))
    assert fused.shape == (2, 56, 32, 48)
    with pytest.raises(ValueError, match="divisible by 4"):
        net.fused(torch.rand(1, 3, 30, 32))


def test_positional_encoding_layout():
    p = torch.tensor([[0.1, -0.2, 0.3]])
    enc = positional_encoding(p, 6)
    assert enc.shape == (1, 39)
    assert torch.allclose(enc[0, :3], p[0])
    for k in range(6):  # per frequency a sin block then a cos block, frequencies 1, 2, 4, …, 32 (no π)
        assert torch.allclose(enc[0, 3 + 6 * k: 6 + 6 * k], torch.sin(p[0] * 2**k))
        assert torch.allclose(enc[0, 6 + 6 * k: 9 + 6 * k], torch.cos(p[0] * 2**k))


def test_weight_norm_linear_is_g_times_v_over_row_norm():
    layer = WeightNormLinear(torch.randn(4, 3), torch.randn(4))
    with torch.no_grad():
        layer.weight_g.copy_(torch.tensor([[1.0], [2.0], [3.0], [4.0]]))
    x = torch.randn(5, 3)
    v = layer.weight_v
    w = torch.stack([layer.weight_g[i, 0] * v[i] / v[i].norm() for i in range(4)])
    assert torch.allclose(layer(x), x @ w.T + layer.bias, atol=1e-6)


def test_geometric_init_is_a_sphere_that_ignores_the_latent():
    torch.manual_seed(0)
    layer = LatentSDFLayer(hidden=128, latent=16, num_freqs=6, sphere_radius=0.5)
    pts = torch.rand(2000, 3) * 1.6 - 0.8
    sdf = layer(pts, torch.randn(2000, 16))[:, 0]
    sdf_zero = layer(pts, torch.zeros(2000, 16))[:, 0]
    assert torch.allclose(sdf, sdf_zero)  # latent columns start at zero
    # IDR/NeuS initialisation approximates a·|p| − r (a ≈ 0.8–0.9 at this width): negative at the centre, positive
    # near the cube's boundary in every direction, and strongly correlated with |p|.
    assert layer(torch.zeros(1, 3), torch.zeros(1, 16))[0, 0] < -0.3
    shell = torch.nn.functional.normalize(torch.randn(2000, 3), dim=1) * 0.95
    assert (layer(shell, torch.zeros(2000, 16))[:, 0] > 0).all()
    radius = pts.norm(dim=1)
    assert torch.corrcoef(torch.stack([sdf.detach(), radius]))[0, 1] > 0.8


def test_sample_volume_reads_x_y_z_indexing_with_corners_aligned():
    volume = torch.zeros(1, 2, 5, 6, 7)
    volume[0, 0, 4, 0, 3] = 1.0  # x = +1, y = −1, z = 0
    volume[0, 1, 2, 5, 6] = 2.0  # x = 0, y = +1, z = +1
    pts = torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, 1.0], [2.0, 0.0, 0.0]])
    out = sample_volume(volume, pts)
    assert torch.allclose(out, torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]))


def _looking_at_origin(eye: torch.Tensor) -> torch.Tensor:
    """OpenCV w2c for a camera at `eye` looking at the origin (y down)."""
    f = -eye / eye.norm()
    up = torch.tensor([0.0, 0.0, 1.0]) if abs(f[2]) < 0.9 else torch.tensor([0.0, 1.0, 0.0])
    r = torch.linalg.cross(f, up)
    r = r / r.norm()
    d = torch.linalg.cross(f, r)
    rot = torch.stack([r, d, f])
    w2c = torch.eye(4)
    w2c[:3, :3] = rot
    w2c[:3, 3] = -rot @ eye
    return w2c


def _proj(eye, focal=45.0, size=32):
    k = torch.eye(4)
    k[0, 0] = k[1, 1] = focal
    k[0, 2] = k[1, 2] = size / 2
    return k @ _looking_at_origin(torch.as_tensor(eye, dtype=torch.float32))


def test_cost_volume_variance_mean_and_two_view_rule_against_brute_force():
    torch.manual_seed(0)
    proj = torch.stack([_proj([3.0, 0, 0]), _proj([0, 3.0, 0]), _proj([0, 0, -3.0])])
    feats = torch.rand(3, 2, 32, 32)
    dims = 7
    vol = build_cost_volume(feats, proj, dims)
    assert vol.features.shape == (4, dims, dims, dims) and vol.mask.shape == (dims, dims, dims)

    pts = voxel_centres(dims).reshape(-1, 3)
    for i in torch.randperm(pts.shape[0])[:60].tolist():
        x = pts[i]
        total, total_sq, count = torch.zeros(2), torch.zeros(2), 0
        for v in range(3):
            cam = proj[v] @ torch.cat([x, torch.ones(1)])
            z = cam[2].clamp(min=1e-6)
            u, w = cam[0] / z, cam[1] / z
            g = torch.tensor([2 * u / 31 - 1, 2 * w / 31 - 1])
            if (g.abs() <= 1).all() and cam[2] > 0:
                count += 1
            sample = F.grid_sample(feats[v: v + 1], g.view(1, 1, 1, 2), align_corners=True)[0, :, 0, 0]
            total, total_sq = total + sample, total_sq + sample**2
        idx = torch.unravel_index(torch.tensor(i), (dims,) * 3)
        assert bool(vol.mask[idx]) == (count >= 2)
        if count >= 2:
            mean = total / (count + 1e-5)
            var = total_sq / (count + 1e-5) - mean**2
            assert torch.allclose(vol.features[(slice(None), *idx)], torch.cat([var, mean]), atol=1e-5)
        else:
            assert (vol.features[(slice(None), *idx)] == 0).all()
    assert 0 < vol.mask.sum() < dims**3


def test_blending_output_is_a_convex_combination_of_seen_views():
    torch.manual_seed(0)
    net = GeneralRenderingNetwork(geometry_channels=4, feature_channels=5)
    n, v = 50, 6
    rgb_feat = torch.rand(n, v, 8)
    ray_diff = torch.cat([F.normalize(torch.randn(n, v, 3), dim=-1), torch.rand(n, v, 1) * 2 - 1], dim=-1)
    mask = torch.rand(n, v) > 0.4
    mask[:, 0] = True
    out = net(torch.randn(n, 4), rgb_feat, ray_diff, mask)
    colors = rgb_feat[..., :3]
    lo = torch.where(mask[..., None], colors, torch.inf).min(dim=1).values
    hi = torch.where(mask[..., None], colors, -torch.inf).max(dim=1).values
    assert ((out >= lo - 1e-5) & (out <= hi + 1e-5)).all()
    # An unseen view's colour has no influence at all.
    wild = rgb_feat.clone()
    wild[..., :3] = torch.where(mask[..., None], wild[..., :3], torch.full_like(wild[..., :3], 100.0))
    wild[..., 3:] = torch.where(mask[..., None], wild[..., 3:], torch.zeros_like(wild[..., 3:]))
    base = rgb_feat.clone()
    base[..., 3:] = wild[..., 3:]
    assert torch.allclose(net(torch.ones(n, 4), wild, ray_diff, mask), net(torch.ones(n, 4), base, ray_diff, mask),
                          atol=1e-5)


def test_view_direction_features_match_definition():
    normals = F.normalize(torch.tensor([[0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]), dim=-1)
    pts = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.0, 0.0]])
    centres = torch.tensor([[0.0, 0.0, 2.0], [2.0, 0.0, 0.0]])
    out = view_direction_features(normals, pts, centres)
    assert out.shape == (2, 2, 4)
    # Normal pointing straight at camera 0: dot = 1 (up to the 1e-6 guard).
    assert math.isclose(out[0, 0, 3].item(), 1.0, abs_tol=1e-5)
    d = F.normalize(centres[1] - pts[1], dim=0)
    diff = normals[1] - d
    assert torch.allclose(out[1, 1, :3], diff / diff.norm(), atol=1e-5)
    assert math.isclose(out[1, 1, 3].item(), float(normals[1] @ d), abs_tol=1e-5)


def _reference_blend(net: GeneralRenderingNetwork, geometry, rgb_feat, ray_diff, mask):
    """The reference's forward written out literally (spec §5.8): explicit [N, V, 193] concatenation."""
    mask = mask[..., None].float()
    rgb_in = rgb_feat[..., :3]
    rgb_feat = rgb_feat + net.ray_dir_fc(ray_diff)
    exp_dot = torch.exp(net.s.abs() * (ray_diff[..., 3:] - 1))
    weight = (exp_dot - exp_dot.min(dim=1, keepdim=True).values) * mask
    weight = weight / (weight.sum(dim=1, keepdim=True) + 1e-8)
    mean = (rgb_feat * weight).sum(dim=1, keepdim=True)
    var = (weight * (rgb_feat - mean) ** 2).sum(dim=1, keepdim=True)
    v = rgb_feat.shape[1]
    x = torch.cat([geometry[:, None].expand(-1, v, -1), torch.cat([mean, var], -1).expand(-1, v, -1), rgb_feat], -1)
    x = net.base_fc(x)
    x_vis = net.vis_fc(x * weight)
    x_res, vis = x_vis[..., :-1], x_vis[..., -1:]
    vis = torch.sigmoid(vis) * mask
    x = x + x_res
    vis = net.vis_fc2(x * vis) * mask
    logits = net.rgb_fc(torch.cat([x, vis, ray_diff], -1)).masked_fill(mask == 0, -1e9)
    return (rgb_in * torch.softmax(logits, dim=1)).sum(dim=1)


def test_blending_network_equals_the_literal_reference_forward():
    torch.manual_seed(1)
    net = GeneralRenderingNetwork()  # paper sizes: 16 geometry channels, 56 + 3 per view
    n, v = 40, 32
    geometry = torch.randn(n, 16)
    rgb_feat = torch.rand(n, v, 59)
    ray_diff = torch.cat([F.normalize(torch.randn(n, v, 3), dim=-1), torch.rand(n, v, 1) * 2 - 1], dim=-1)
    mask = torch.rand(n, v) > 0.3
    with torch.no_grad():
        assert torch.allclose(net(geometry, rgb_feat, ray_diff, mask),
                              _reference_blend(net, geometry, rgb_feat, ray_diff, mask), atol=1e-5)
