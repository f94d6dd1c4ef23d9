"""Sparse 3D convolutions vs. a per-site re-statement of torchsparse 1.4.0 (spec §5.5).

The reference below works on site lists (tuples of torchsparse coordinates, multiples of the tensor stride), builds
neighbour maps with explicit loops over the 27 offsets and hash lookups, and applies them with numpy — the way
torchsparse's ``spdownsample`` / ``conv3d`` / transposed ``conv3d`` do — without any dense convolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from server.common.errors import BadInputError
from server.stages.reconstruction.sparse_conv import (
    SparseBatchNorm,
    SparseConv3d,
    SparseCostRegNet,
    SparseVolume,
    downsample_mask,
    strided_conv3d,
    submanifold_conv3d,
    transposed_conv3d,
)

Coord = tuple[int, int, int]

# ---------------------------------------------------------------------------------------------------------------------
# Per-site reference (torchsparse 1.4.0 semantics)


def ref_offsets(tensor_stride: int) -> list[Coord]:
    """torchsparse ``get_kernel_offsets(3, stride)``: x fastest, then y, then z."""
    r = (-1, 0, 1)
    return [(dx * tensor_stride, dy * tensor_stride, dz * tensor_stride) for dz in r for dy in r for dx in r]


@dataclass
class RefTensor:
    coords: list[Coord]  # torchsparse coordinates
    feats: np.ndarray  # [N, C] float64
    stride: int


def ref_downsample(coords: list[Coord], tensor_stride: int) -> list[Coord]:
    """``spdownsample`` (k3, s2): neighbours at multiples of 2·stride, ≥ the per-axis input minimum, unique."""
    lo = [min(c[a] for c in coords) for a in range(3)]
    step = 2 * tensor_stride
    out = set()
    for c in coords:
        for off in ref_offsets(tensor_stride):
            q = (c[0] + off[0], c[1] + off[1], c[2] + off[2])
            if all(q[a] % step == 0 and q[a] >= lo[a] for a in range(3)):
                out.add(q)
    return sorted(out)


def ref_kernel_map(in_coords: list[Coord], out_coords: list[Coord], tensor_stride: int) -> list[list[tuple[int, int]]]:
    """Per offset k: (input index, output index) pairs with input = output + offset_k (torchsparse's query)."""
    index = {c: i for i, c in enumerate(in_coords)}
    pairs: list[list[tuple[int, int]]] = []
    for off in ref_offsets(tensor_stride):
        pk = []
        for j, o in enumerate(out_coords):
            i = index.get((o[0] + off[0], o[1] + off[1], o[2] + off[2]))
            if i is not None:
                pk.append((i, j))
        pairs.append(pk)
    return pairs


def ref_apply(feats: np.ndarray, kernel: np.ndarray, pairs, n_out: int, transposed: bool) -> np.ndarray:
    """torchsparse's CPU ``ConvolutionFunction``: out[o] += in[i] @ kernel[k] per pair (swapped when transposed)."""
    out = np.zeros((n_out, kernel.shape[2]))
    for k, pk in enumerate(pairs):
        for i, o in pk:
            if transposed:
                i, o = o, i
            out[o] += feats[i] @ kernel[k]
    return out


def ref_conv(t: RefTensor, kernel: np.ndarray, stride: int, kmaps: dict) -> RefTensor:
    out_coords = ref_downsample(t.coords, t.stride) if stride == 2 else list(t.coords)
    pairs = ref_kernel_map(t.coords, out_coords, t.stride)
    if stride == 2:
        kmaps[t.stride] = (pairs, t.coords)  # kept for the transposed conv back to this level
    return RefTensor(out_coords, ref_apply(t.feats, kernel, pairs, len(out_coords), False), t.stride * stride)


def ref_deconv(t: RefTensor, kernel: np.ndarray, kmaps: dict) -> RefTensor:
    fine_stride = t.stride // 2
    pairs, fine_coords = kmaps[fine_stride]
    return RefTensor(fine_coords, ref_apply(t.feats, kernel, pairs, len(fine_coords), True), fine_stride)


def ref_bn(feats: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    mean = feats.mean(axis=0)
    var = feats.var(axis=0)  # biased, as BatchNorm1d normalises in training mode
    return (feats - mean) / np.sqrt(var + eps) * gamma + beta


def ref_block(t: RefTensor, block, kmaps: dict) -> RefTensor:
    conv, bn, _ = block.net
    kernel = conv.kernel.detach().double().numpy()
    y = ref_deconv(t, kernel, kmaps) if conv.transposed else ref_conv(t, kernel, conv.stride, kmaps)
    feats = ref_bn(y.feats, bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy())
    return RefTensor(y.coords, np.maximum(feats, 0.0), y.stride)


def ref_add(a: RefTensor, b: RefTensor) -> RefTensor:
    assert a.coords == b.coords
    return RefTensor(a.coords, a.feats + b.feats, a.stride)


def ref_cost_reg_net(t: RefTensor, net: SparseCostRegNet) -> RefTensor:
    """The reference ``SparseCostRegNet.forward``, chained by hand."""
    kmaps: dict = {}
    conv0 = ref_block(t, net.conv0, kmaps)
    conv2 = ref_block(ref_block(conv0, net.conv1, kmaps), net.conv2, kmaps)
    conv4 = ref_block(ref_block(conv2, net.conv3, kmaps), net.conv4, kmaps)
    y = ref_block(ref_block(conv4, net.conv5, kmaps), net.conv6, kmaps)
    y = ref_add(conv4, ref_block(y, net.conv7, kmaps))
    y = ref_add(conv2, ref_block(y, net.conv9, kmaps))
    return ref_add(conv0, ref_block(y, net.conv11, kmaps))


# ---------------------------------------------------------------------------------------------------------------------
# Helpers


def random_sites(rng: np.random.Generator, shape: tuple[int, int, int], fraction: float, channels: int):
    """Random active set (each cell with probability ``fraction``) and features; returns (RefTensor, SparseVolume)."""
    mask = rng.random(shape) < fraction
    coords = [tuple(int(v) for v in c) for c in np.argwhere(mask)]
    feats = rng.standard_normal((len(coords), channels))
    return RefTensor(coords, feats, 1), volume_from_ref(RefTensor(coords, feats, 1), shape)


def volume_from_ref(t: RefTensor, shape: tuple[int, int, int]) -> SparseVolume:
    coords = torch.tensor(t.coords, dtype=torch.long).view(-1, 3) // t.stride
    return SparseVolume.from_coords(coords, torch.from_numpy(t.feats), shape, t.stride)


def assert_matches(volume: SparseVolume, t: RefTensor, atol: float = 1e-9) -> None:
    """Same stride, same site set, same values per site, exact zeros elsewhere."""
    assert volume.stride == t.stride
    got_coords = [tuple(int(v) * volume.stride for v in c) for c in volume.coords()]
    assert sorted(got_coords) == sorted(t.coords)
    got = dict(zip(got_coords, volume.values().detach().double().numpy(), strict=True))
    expected = np.stack([got[c] for c in t.coords]) if t.coords else np.zeros((0, volume.num_channels))
    np.testing.assert_allclose(expected, t.feats, rtol=0, atol=atol)
    assert torch.count_nonzero(volume.features[:, ~volume.mask]) == 0


def random_kernel(rng: np.random.Generator, c_in: int, c_out: int) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal((27, c_in, c_out)))


# ---------------------------------------------------------------------------------------------------------------------
# Convolutions


def test_single_tap_moves_value_by_its_offset() -> None:
    # Tap k = (dz+1)·9 + (dy+1)·3 + (dx+1) for (dx, dy, dz) = (1, 0, −1) is k = 5; out[o] = in[o + (1, 0, −1)] · 2.
    kernel = torch.zeros(27, 1, 1, dtype=torch.float64)
    kernel[5] = 2.0
    coords = torch.tensor([[4, 4, 4], [3, 4, 5], [5, 4, 3]])
    feats = torch.tensor([[1.0], [0.0], [7.0]], dtype=torch.float64)
    out = submanifold_conv3d(SparseVolume.from_coords(coords, feats, (8, 8, 8)), kernel)
    assert out.features[0, 3, 4, 5] == 2.0  # from (4, 4, 4)
    assert out.features[0, 4, 4, 4] == 14.0  # from (5, 4, 3)
    assert out.features[0, 5, 4, 3] == 0.0  # (6, 4, 2) is inactive
    assert torch.count_nonzero(out.features) == 2


@pytest.mark.parametrize(
    ("seed", "shape", "fraction", "c_in", "c_out"),
    [(0, (9, 11, 13), 0.3, 3, 5), (1, (12, 10, 9), 0.6, 4, 2), (2, (10, 10, 10), 0.45, 1, 3)],
)
def test_submanifold_conv_matches_per_site_reference(seed, shape, fraction, c_in, c_out) -> None:
    rng = np.random.default_rng(seed)
    ref, vol = random_sites(rng, shape, fraction, c_in)
    kernel = random_kernel(rng, c_in, c_out)
    assert_matches(submanifold_conv3d(vol, kernel), ref_conv(ref, kernel.numpy(), 1, {}))


@pytest.mark.parametrize(
    ("seed", "shape", "fraction", "c_in", "c_out"),
    [(3, (9, 11, 13), 0.3, 3, 5), (4, (12, 10, 9), 0.6, 2, 4), (5, (10, 13, 12), 0.4, 3, 3)],
)
def test_strided_conv_matches_per_site_reference(seed, shape, fraction, c_in, c_out) -> None:
    rng = np.random.default_rng(seed)
    ref, vol = random_sites(rng, shape, fraction, c_in)
    kernel = random_kernel(rng, c_in, c_out)
    out = strided_conv3d(vol, kernel)
    assert out.shape == tuple(n // 2 + 1 for n in shape)
    assert_matches(out, ref_conv(ref, kernel.numpy(), 2, {}))


def test_strided_conv_at_a_coarser_level_matches_reference() -> None:
    # Input at tensor stride 2 (coordinates are even), output at stride 4.
    rng = np.random.default_rng(6)
    mask = rng.random((11, 9, 10)) < 0.5
    coords = [tuple(int(v) * 2 for v in c) for c in np.argwhere(mask)]
    ref = RefTensor(coords, rng.standard_normal((len(coords), 3)), 2)
    kernel = random_kernel(rng, 3, 2)
    assert_matches(strided_conv3d(volume_from_ref(ref, mask.shape), kernel), ref_conv(ref, kernel.numpy(), 2, {}))


def test_minimum_rule_removes_coarse_sites() -> None:
    # First active x is 3 (odd): coarse x = 2 has active neighbour x = 3 but lies below the minimum, so it is dropped.
    rng = np.random.default_rng(7)
    ref, vol = random_sites(rng, (11, 9, 10), 0.5, 2)
    keep = [i for i, c in enumerate(ref.coords) if c[0] >= 3 and c[1] >= 1]
    ref = RefTensor([ref.coords[i] for i in keep], ref.feats[keep], 1)
    vol = volume_from_ref(ref, (11, 9, 10))
    assert min(c[0] for c in ref.coords) == 3 and min(c[1] for c in ref.coords) == 1

    out = strided_conv3d(vol, random_kernel(rng, 2, 2))
    assert not out.mask[1].any()  # coarse index 1 ↔ x = 2
    assert not out.mask[:, 0].any()  # coarse index 0 ↔ y = 0 < 1
    neighbour_only = torch.nn.functional.max_pool3d(vol.mask[None, None, 1:4].double(), 3, 1, 0)[0, 0, 0] > 0
    assert neighbour_only.any()  # the ±1 neighbour rule alone would have kept x = 2
    kernel = random_kernel(rng, 2, 3)
    assert_matches(strided_conv3d(vol, kernel), ref_conv(ref, kernel.numpy(), 2, {}))


def test_coarse_sites_beyond_the_upper_end() -> None:
    # 10 cells (0…9): x = 9 reaches coarse coordinate 10, outside the fine grid, so the coarse grid has 6 cells.
    coords = torch.tensor([[9, 0, 4], [2, 9, 9]])
    feats = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    vol = SparseVolume.from_coords(coords, feats, (10, 10, 10))
    kernel = random_kernel(np.random.default_rng(8), 1, 1)
    out = strided_conv3d(vol, kernel)
    assert out.shape == (6, 6, 6)
    ref = ref_conv(RefTensor([(9, 0, 4), (2, 9, 9)], feats.numpy(), 1), kernel.numpy(), 2, {})
    assert (10, 0, 4) in ref.coords and (2, 10, 10) in ref.coords
    assert out.mask[5, 0, 2] and out.mask[1, 5, 5]
    assert_matches(out, ref)


@pytest.mark.parametrize(("seed", "shape", "fraction"), [(9, (9, 11, 13), 0.35), (10, (12, 10, 10), 0.55)])
def test_transposed_conv_matches_per_site_reference(seed, shape, fraction) -> None:
    rng = np.random.default_rng(seed)
    ref_fine, fine = random_sites(rng, shape, fraction, 2)
    down = random_kernel(rng, 2, 3)
    kmaps: dict = {}
    ref_coarse = ref_conv(ref_fine, down.numpy(), 2, kmaps)
    coarse = strided_conv3d(fine, down)
    assert_matches(coarse, ref_coarse)

    up = random_kernel(rng, 3, 4)
    assert_matches(transposed_conv3d(coarse, up, fine), ref_deconv(ref_coarse, up.numpy(), kmaps))


def test_transposed_conv_rejects_mismatched_levels() -> None:
    fine = SparseVolume.from_dense(torch.ones(1, 8, 8, 8), torch.ones(8, 8, 8, dtype=torch.bool))
    wrong = SparseVolume.from_dense(torch.ones(1, 4, 4, 4), torch.ones(4, 4, 4, dtype=torch.bool), stride=2)
    with pytest.raises(BadInputError, match="coarsening"):
        transposed_conv3d(wrong, torch.zeros(27, 1, 1), fine)


def test_downsample_chain_96_49_25_13() -> None:
    mask = torch.ones(96, 96, 96, dtype=torch.bool)
    sizes = []
    for _ in range(3):
        mask = downsample_mask(mask)
        sizes.append((tuple(mask.shape), int(mask.sum())))
    assert sizes == [((49,) * 3, 49**3), ((25,) * 3, 25**3), ((13,) * 3, 13**3)]


def test_sparse_conv3d_module_dispatch_and_init() -> None:
    torch.manual_seed(0)
    down = SparseConv3d(40, 8, stride=2)
    up = SparseConv3d(40, 8, stride=2, transposed=True)
    assert down.kernel.shape == (27, 40, 8)
    for module, fan in ((down, 40), (up, 8)):
        bound = 1 / np.sqrt(fan * 27)
        k = module.kernel.detach().abs()
        assert k.max() <= bound and k.max() > 0.95 * bound
    rng = np.random.default_rng(11)
    ref, vol = random_sites(rng, (9, 9, 9), 0.5, 40)
    vol = SparseVolume(vol.features.float(), vol.mask)
    coarse = down(vol)
    assert_matches(coarse, ref_conv(ref, down.kernel.detach().double().numpy(), 2, {}), atol=1e-4)
    with pytest.raises(BadInputError, match="out_like"):
        up(coarse.with_features(torch.zeros(40, *coarse.shape)))
    with pytest.raises(BadInputError, match="stride"):
        SparseConv3d(4, 4, stride=3)


# ---------------------------------------------------------------------------------------------------------------------
# Batch norm


def test_batch_norm_uses_active_sites_only() -> None:
    rng = np.random.default_rng(12)
    ref, vol = random_sites(rng, (9, 10, 11), 0.4, 5)
    vol = SparseVolume(vol.features + 0, vol.mask)
    bn = SparseBatchNorm(5).double()
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, 5)))
        bn.bias.copy_(torch.from_numpy(rng.standard_normal(5)))
    bn.eval()  # use_batch_stats defaults to True: batch statistics even in eval mode (§5.2)
    out = bn(vol)
    expected = ref_bn(ref.feats, bn.weight.detach().numpy(), bn.bias.detach().numpy())
    assert_matches(out, RefTensor(ref.coords, expected, 1))
    assert bn.num_batches_tracked == 0 and torch.all(bn.running_mean == 0)  # inference leaves the module as it was

    bn.use_batch_stats = False
    with torch.no_grad():
        bn.running_mean.copy_(torch.from_numpy(rng.standard_normal(5)))
        bn.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, 5)))
    running = bn(vol)
    rm, rv = bn.running_mean.numpy(), bn.running_var.numpy()
    expected = (ref.feats - rm) / np.sqrt(rv + 1e-5) * bn.weight.detach().numpy() + bn.bias.detach().numpy()
    assert_matches(running, RefTensor(ref.coords, expected, 1))


def test_batch_norm_training_updates_running_stats_like_batchnorm1d() -> None:
    rng = np.random.default_rng(13)
    ref, vol = random_sites(rng, (10, 9, 9), 0.5, 4)
    bn = SparseBatchNorm(4).double().train()
    plain = torch.nn.BatchNorm1d(4).double().train()
    plain.load_state_dict(bn.state_dict())
    rows = torch.from_numpy(ref.feats)
    for _ in range(2):
        out = bn(vol)
        expected = plain(rows)
    assert_matches(out, RefTensor(ref.coords, expected.detach().numpy(), 1))
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(bn.state_dict()[key], value, rtol=0, atol=1e-12)
    assert bn.num_batches_tracked == 2
    # Unbiased variance of the active rows, blended twice with momentum 0.1: 1 → 0.9 + 0.1·v → 0.81 + 0.19·v.
    np.testing.assert_allclose(bn.running_var.numpy(), 0.81 + 0.19 * ref.feats.var(axis=0, ddof=1), rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# The network


PAPER_SHAPES = {
    "conv0": (32, 16),
    "conv1": (16, 16),
    "conv2": (16, 16),
    "conv3": (16, 32),
    "conv4": (32, 32),
    "conv5": (32, 64),
    "conv6": (64, 64),
    "conv7": (64, 32),
    "conv9": (32, 16),
    "conv11": (16, 16),
}


def test_paper_config_state_dict_matches_checkpoint_layout() -> None:
    expected = {}
    for name, (c_in, c_out) in PAPER_SHAPES.items():
        expected[f"{name}.net.0.kernel"] = (27, c_in, c_out)
        for buffer in ("weight", "bias", "running_mean", "running_var"):
            expected[f"{name}.net.1.{buffer}"] = (c_out,)
        expected[f"{name}.net.1.num_batches_tracked"] = ()
    net = SparseCostRegNet(d_in=32, d_out=16, channels=(16, 32, 64))
    got = {key: tuple(value.shape) for key, value in net.state_dict().items()}
    assert got == expected


def tiny_net(seed: int, d_in: int = 3, d_out: int = 4, channels=(5, 3, 6)) -> SparseCostRegNet:
    torch.manual_seed(seed)
    net = SparseCostRegNet(d_in=d_in, d_out=d_out, channels=channels).double()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, SparseBatchNorm):  # non-trivial affine so that a γ/β mix-up shows
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return net


@pytest.mark.parametrize(
    ("seed", "shape", "fraction", "first"),
    [(14, (10, 9, 11), 0.5, (0, 0, 0)), (15, (12, 13, 9), 0.35, (0, 0, 0)), (19, (13, 12, 10), 0.5, (3, 1, 5))],
)
def test_cost_reg_net_matches_per_site_reference(seed, shape, fraction, first) -> None:
    rng = np.random.default_rng(seed)
    ref, _ = random_sites(rng, shape, fraction, 3)
    # Odd first coordinates make the per-axis minimum rule drop coarse sites at several levels.
    keep = [i for i, c in enumerate(ref.coords) if all(c[a] >= first[a] for a in range(3))]
    ref = RefTensor([ref.coords[i] for i in keep], ref.feats[keep], 1)
    vol = volume_from_ref(ref, shape)
    net = tiny_net(seed).eval()  # eval + use_batch_stats: the reference's inference behaviour
    with torch.no_grad():
        out = net(vol)
    expected = ref_cost_reg_net(ref, net)
    assert out.shape == shape and out.num_channels == 4
    assert_matches(out, expected, atol=1e-8)
    assert torch.equal(out.mask, vol.mask)


def test_cost_reg_net_keeps_inactive_sites_zero_and_trains() -> None:
    rng = np.random.default_rng(16)
    _, vol = random_sites(rng, (9, 9, 9), 0.4, 3)
    net = tiny_net(16).train()
    out = net(vol)
    assert torch.count_nonzero(out.features[:, ~out.mask]) == 0
    (out.features**2).sum().backward()
    for name, param in net.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert net.conv5.net[1].num_batches_tracked == 1


def test_cost_reg_net_rejects_bad_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    net = tiny_net(17)
    vol = SparseVolume.from_dense(torch.ones(2, 5, 5, 5, dtype=torch.float64), torch.ones(5, 5, 5, dtype=torch.bool))
    with pytest.raises(BadInputError, match="expects 3"):
        net(vol)
    monkeypatch.setitem(__import__("sys").modules, "torchsparse", None)  # makes `import torchsparse` fail
    with pytest.raises(BadInputError, match="torchsparse"):
        SparseCostRegNet(backend="torchsparse")


def test_sparse_volume_round_trip_and_validation() -> None:
    coords = torch.tensor([[0, 1, 2], [3, 0, 1], [1, 1, 1]])
    feats = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    vol = SparseVolume.from_coords(coords, feats, (4, 2, 3), stride=2)
    order = [0, 2, 1]  # row-major order of the three sites
    assert torch.equal(vol.coords(), coords[order]) and torch.equal(vol.values(), feats[order])
    assert vol.num_sites == 3 and vol.stride == 2 and vol.features.sum() == feats.sum()
    with pytest.raises(BadInputError, match="duplicate"):
        SparseVolume.from_coords(coords[[0, 0]], feats[:2], (4, 2, 3))
    with pytest.raises(BadInputError, match="lie in"):
        SparseVolume.from_coords(torch.tensor([[4, 0, 0]]), feats[:1], (4, 2, 3))
    with pytest.raises(BadInputError, match="mask"):
        SparseVolume(torch.zeros(1, 2, 2, 2), torch.zeros(2, 2, 3, dtype=torch.bool))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_cuda_matches_cpu() -> None:
    rng = np.random.default_rng(18)
    _, vol = random_sites(rng, (20, 18, 22), 0.4, 3)
    net = tiny_net(18).eval()
    with torch.no_grad():
        cpu = net(vol)
        gpu_vol = SparseVolume(vol.features.cuda(), vol.mask.cuda())
        gpu = net.cuda()(gpu_vol)  # float64: no TF32 shortcuts in cuDNN
        net32 = net.float()
        gpu32 = net32(SparseVolume(gpu_vol.features.float(), gpu_vol.mask))
    assert torch.equal(gpu.mask.cpu(), cpu.mask)
    torch.testing.assert_close(gpu.features.cpu(), cpu.features, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gpu32.features.cpu().double(), cpu.features, rtol=0, atol=2e-2)
