"""Sparse 3D convolutions with torchsparse 1.4.0 semantics, run as masked dense ops, and ``SparseCostRegNet`` (§5.5).

The reference regularises the cost volume with torchsparse 1.4.0, which ships no wheels. A 96³ grid is small enough
to hold densely, so each sparse op here is a dense ``conv3d`` / ``conv_transpose3d`` whose output is masked with the
active-site set that torchsparse would produce. The results equal torchsparse's because
(1) features are exactly zero at inactive sites, so a dense convolution sums over active neighbours only, and
(2) the output site sets follow torchsparse's rules exactly:

* stride-1 convolutions are submanifold: output sites = input sites;
* stride-2 convolutions (``spdownsample``) output at coarse sites with at least one active input within ±1 input cell
  per axis, whose coordinate is ≥ the per-axis minimum of the input coordinates; there is no upper bound, so a grid of
  n cells maps to n // 2 + 1 coarse cells (96 → 49 → 25 → 13);
* transposed convolutions reuse the down-sampling neighbour map and output exactly on the finer level's sites.

Parameters keep torchsparse's layout (``kernel`` [27, C_in, C_out], offsets x fastest, then y, then z) so the official
checkpoint loads as is. Volumes are single (batch size 1): batch norm statistics are over the active sites of one
volume, as in the reference, which regularises one object at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from server.common.errors import BadInputError

KERNEL_VOLUME = 27
"""Taps of a 3×3×3 kernel; ``kernel[k]`` is the tap at offset (dx, dy, dz) with k = (dz+1)·9 + (dy+1)·3 + (dx+1)."""

Backend = Literal["dense", "torchsparse"]


@dataclass
class SparseVolume:
    """A sparse feature volume stored densely.

    Grid cell (i, j, k) of a volume with tensor stride s stands for torchsparse coordinate (i·s, j·s, k·s) in finest
    voxels; the finest level (s = 1) is the voxel grid itself.
    """

    features: Tensor
    """[C, X, Y, Z] float; exactly zero at inactive sites (every function here relies on it and keeps it)."""
    mask: Tensor
    """[X, Y, Z] bool; the active sites."""
    stride: int = 1
    """Tensor stride in finest voxels: 1, 2, 4, 8, …"""

    def __post_init__(self) -> None:
        if self.features.dim() != 4:
            raise BadInputError(f"SparseVolume features must be [C, X, Y, Z], got shape {tuple(self.features.shape)}")
        if self.mask.dtype != torch.bool or tuple(self.mask.shape) != tuple(self.features.shape[1:]):
            raise BadInputError(
                f"SparseVolume mask must be bool {tuple(self.features.shape[1:])}, got {self.mask.dtype} "
                f"{tuple(self.mask.shape)}"
            )
        if self.mask.device != self.features.device:
            raise BadInputError(f"SparseVolume mask is on {self.mask.device}, features on {self.features.device}")
        if not isinstance(self.stride, int) or self.stride < 1:
            raise BadInputError(f"SparseVolume stride must be a positive int, got {self.stride!r}")

    @classmethod
    def from_coords(cls, coords: Tensor, feats: Tensor, shape: tuple[int, int, int], stride: int = 1) -> SparseVolume:
        """Build a volume from a site list.

        Args:
            coords: [N, 3] integer grid indices (torchsparse coordinates divided by ``stride``), unique, in range.
            feats: [N, C] features of those sites.
            shape: (X, Y, Z) grid size.
            stride: tensor stride of the volume.
        """
        if coords.dim() != 2 or coords.shape[1] != 3 or coords.dtype.is_floating_point:
            raise BadInputError(f"coords must be an integer [N, 3] tensor, got {coords.dtype} {tuple(coords.shape)}")
        if feats.dim() != 2 or feats.shape[0] != coords.shape[0]:
            raise BadInputError(f"feats must be [N={coords.shape[0]}, C], got {tuple(feats.shape)}")
        if len(shape) != 3 or min(shape) < 1:
            raise BadInputError(f"shape must be three positive sizes, got {shape}")
        coords = coords.long().to(feats.device)
        upper = torch.tensor(shape, device=coords.device)
        if coords.numel() and ((coords < 0).any() or (coords >= upper).any()):
            raise BadInputError(
                f"coords must lie in [0, {list(shape)}) per axis, got min {coords.min(0).values.tolist()} "
                f"max {coords.max(0).values.tolist()}"
            )
        flat = (coords[:, 0] * shape[1] + coords[:, 1]) * shape[2] + coords[:, 2]
        duplicates = flat.numel() - flat.unique().numel()
        if duplicates:
            raise BadInputError(f"coords hold {duplicates} duplicate sites; each site must appear once")
        dense = feats.new_zeros(feats.shape[1], shape[0] * shape[1] * shape[2])
        dense[:, flat] = feats.T
        mask = torch.zeros(shape[0] * shape[1] * shape[2], dtype=torch.bool, device=feats.device)
        mask[flat] = True
        return cls(dense.view(feats.shape[1], *shape), mask.view(*shape), stride)

    @classmethod
    def from_dense(cls, features: Tensor, mask: Tensor, stride: int = 1) -> SparseVolume:
        """Build a volume from any dense [C, X, Y, Z] tensor, zeroing it at the inactive sites of mask [X, Y, Z]."""
        return cls(features.masked_fill(~mask, 0), mask, stride)

    @property
    def num_channels(self) -> int:
        return self.features.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid size (X, Y, Z)."""
        return tuple(self.mask.shape)

    @property
    def num_sites(self) -> int:
        return int(self.mask.sum())

    def coords(self) -> Tensor:
        """[N, 3] long grid indices of the active sites, in row-major (x, then y, then z) order."""
        return self.mask.nonzero()

    def values(self) -> Tensor:
        """[N, C] features of the active sites, in the order of :meth:`coords`."""
        return self.features[:, self.mask].T

    def with_features(self, features: Tensor) -> SparseVolume:
        """Same sites and stride, new features [C', X, Y, Z] (zeroed at inactive sites)."""
        return SparseVolume.from_dense(features, self.mask, self.stride)


# ---------------------------------------------------------------------------------------------------------------------
# Pure functions


def kernel_to_conv3d_weight(kernel: Tensor) -> Tensor:
    """torchsparse kernel [27, C_in, C_out] → ``conv3d`` weight [C_out, C_in, 3, 3, 3] indexed (dx+1, dy+1, dz+1).

    torchsparse computes out[o] = Σ_k in[o + offset_k] @ kernel[k], a cross-correlation like ``conv3d``; k runs
    x fastest, so the kernel viewed as [3(z), 3(y), 3(x), C_in, C_out] only needs its axes reversed.
    """
    _check_kernel(kernel)
    return kernel.view(3, 3, 3, *kernel.shape[1:]).permute(4, 3, 2, 1, 0)


def kernel_to_conv_transpose3d_weight(kernel: Tensor) -> Tensor:
    """torchsparse kernel [27, C_in, C_out] → ``conv_transpose3d`` weight [C_in, C_out, 3, 3, 3] (dx+1, dy+1, dz+1).

    A transposed torchsparse conv scatters out[c + offset_k] += in[c] @ kernel[k], which is exactly what
    ``conv_transpose3d`` (stride 2, padding 1) does with the tap of offset d stored at index d + 1.
    """
    _check_kernel(kernel)
    return kernel.view(3, 3, 3, *kernel.shape[1:]).permute(3, 4, 2, 1, 0)


def _check_kernel(kernel: Tensor) -> None:
    if kernel.dim() != 3 or kernel.shape[0] != KERNEL_VOLUME:
        raise BadInputError(f"kernel must be [27, C_in, C_out], got {tuple(kernel.shape)}")


def _check_channels(x: SparseVolume, kernel: Tensor) -> None:
    if x.num_channels != kernel.shape[1]:
        raise BadInputError(f"volume has {x.num_channels} channels, kernel expects C_in = {kernel.shape[1]}")


def coarse_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Grid size after a stride-2 conv: n // 2 + 1 per axis (no upper bound on output sites, so 96 → 49)."""
    return tuple(n // 2 + 1 for n in shape)


def downsample_mask(mask: Tensor) -> Tensor:
    """Output sites of a k3 s2 torchsparse conv (``spdownsample``) on active sites mask [X, Y, Z] → [X', Y', Z'].

    Coarse cell c (fine cell 2c) is active when some active fine cell lies within ±1 of 2c in each axis and
    2c ≥ the per-axis minimum of the active fine cells. The minimum rule can drop a cell the neighbour rule keeps
    (first active x = 3 drops x = 2 although x = 3 neighbours it); there is no matching maximum rule, hence the
    extra coarse cell.
    """
    pad = _upper_pad(mask.shape)
    m = F.pad(mask[None, None].float(), (0, pad[2], 0, pad[1], 0, pad[0]))
    coarse = F.max_pool3d(m, kernel_size=3, stride=2, padding=1)[0, 0] > 0
    for axis in range(3):
        present = mask.any(dim=tuple(a for a in range(3) if a != axis))
        if not bool(present.any()):
            return coarse  # no active site: the neighbour rule already left every cell empty
        first_fine = int(present.int().argmax())
        index = [slice(None)] * 3
        index[axis] = slice(0, (first_fine + 1) // 2)  # coarse cells with 2c < first_fine
        coarse[tuple(index)] = False
    return coarse


def _upper_pad(shape: tuple[int, ...]) -> list[int]:
    """Extra zero cells at the upper end per axis (1 for even n) so that a k3 s2 p1 window gives n // 2 + 1 cells."""
    return [2 * (n // 2) + 1 - n for n in shape]


def submanifold_conv3d(x: SparseVolume, kernel: Tensor) -> SparseVolume:
    """Stride-1 (submanifold) sparse conv: output sites = input sites.

    Args:
        x: volume with features [C_in, X, Y, Z].
        kernel: [27, C_in, C_out] torchsparse layout.

    Returns:
        Volume with features [C_out, X, Y, Z], same mask and stride.
    """
    _check_channels(x, kernel)
    out = F.conv3d(x.features[None], kernel_to_conv3d_weight(kernel), padding=1)[0]
    return SparseVolume(out.masked_fill(~x.mask, 0), x.mask, x.stride)


def strided_conv3d(x: SparseVolume, kernel: Tensor) -> SparseVolume:
    """Stride-2 sparse conv: out[c] = Σ_k in[2c + offset_k] @ kernel[k] at the sites of :func:`downsample_mask`.

    Args:
        x: volume with features [C_in, X, Y, Z], tensor stride s.
        kernel: [27, C_in, C_out] torchsparse layout.

    Returns:
        Volume with features [C_out, X // 2 + 1, Y // 2 + 1, Z // 2 + 1], tensor stride 2s.
    """
    _check_channels(x, kernel)
    pad = _upper_pad(x.shape)
    features = F.pad(x.features[None], (1, 1 + pad[2], 1, 1 + pad[1], 1, 1 + pad[0]))
    out = F.conv3d(features, kernel_to_conv3d_weight(kernel), stride=2)[0]
    mask = downsample_mask(x.mask)
    return SparseVolume(out.masked_fill(~mask, 0), mask, 2 * x.stride)


def transposed_conv3d(x: SparseVolume, kernel: Tensor, out_like: SparseVolume) -> SparseVolume:
    """Stride-2 transposed sparse conv onto the sites of the finer volume ``out_like``.

    torchsparse reuses the neighbour map of the stride-2 conv that produced ``x`` from ``out_like``'s sites:
    out[f] = Σ in[c] @ kernel[k] over pairs with f = 2c + offset_k. This equals a dense ``conv_transpose3d`` masked
    with the fine sites, provided ``x``'s sites are those :func:`downsample_mask` gives for ``out_like`` (the
    network guarantees it; coarse sites outside that set would wrongly contribute).

    Args:
        x: coarse volume, features [C_in, X', Y', Z'], tensor stride 2s.
        kernel: [27, C_in, C_out] torchsparse layout.
        out_like: fine volume (tensor stride s, grid [X, Y, Z] with X' = X // 2 + 1 …) whose sites the output takes.

    Returns:
        Volume with features [C_out, X, Y, Z] on ``out_like``'s mask, tensor stride s.
    """
    _check_channels(x, kernel)
    if x.shape != coarse_shape(out_like.shape) or x.stride != 2 * out_like.stride:
        raise BadInputError(
            f"transposed conv input (grid {x.shape}, stride {x.stride}) is not the stride-2 coarsening of the target "
            f"(grid {out_like.shape}, stride {out_like.stride}); expected grid {coarse_shape(out_like.shape)}, "
            f"stride {2 * out_like.stride}"
        )
    out = F.conv_transpose3d(x.features[None], kernel_to_conv_transpose3d_weight(kernel), stride=2, padding=1)[0]
    nx, ny, nz = out_like.shape
    out = out[:, :nx, :ny, :nz]  # the dense output has 2·(n // 2) + 1 ≥ n cells per axis
    return SparseVolume(out.masked_fill(~out_like.mask, 0), out_like.mask, out_like.stride)


# ---------------------------------------------------------------------------------------------------------------------
# Modules


class SparseConv3d(nn.Module):
    """torchsparse ``spnn.Conv3d`` (kernel 3, no bias) on :class:`SparseVolume`; state-dict key ``kernel``.

    Args:
        in_channels, out_channels: C_in, C_out.
        stride: 1 (submanifold) or 2 (down-sampling, or up-sampling when ``transposed``).
        transposed: up-sample onto the sites of the finer volume passed as ``out_like`` (needs stride 2).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, transposed: bool = False) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise BadInputError(f"SparseConv3d stride must be 1 or 2, got {stride}")
        if transposed and stride != 2:
            raise BadInputError(f"a transposed SparseConv3d up-samples by 2, so stride must be 2, got {stride}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.transposed = transposed
        self.kernel = nn.Parameter(torch.zeros(KERNEL_VOLUME, in_channels, out_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchsparse's init: uniform ±1/sqrt(fan · 27), fan = C_out when transposed, else C_in."""
        bound = 1.0 / math.sqrt((self.out_channels if self.transposed else self.in_channels) * KERNEL_VOLUME)
        with torch.no_grad():
            self.kernel.uniform_(-bound, bound)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}, transposed={self.transposed}"

    def forward(self, x: SparseVolume, out_like: SparseVolume | None = None) -> SparseVolume:
        """x: [C_in, …] volume; out_like: the finer volume (transposed only). Returns the [C_out, …] volume."""
        if self.transposed:
            if out_like is None:
                raise BadInputError("a transposed SparseConv3d needs out_like, the finer volume whose sites it fills")
            return transposed_conv3d(x, self.kernel, out_like)
        if out_like is not None:
            raise BadInputError("out_like is only used by transposed convs; this SparseConv3d is not transposed")
        return strided_conv3d(x, self.kernel) if self.stride == 2 else submanifold_conv3d(x, self.kernel)


class SparseBatchNorm(nn.BatchNorm1d):
    """``spnn.BatchNorm`` (BatchNorm1d over the [N_sites, C] active rows) on :class:`SparseVolume`.

    Attributes:
        use_batch_stats: outside training, still normalise with the active sites' statistics (default True: the
            reference never calls ``.eval()``, §5.2). Running statistics are updated only in training mode, so
            inference leaves the module unchanged. False: eval mode uses the running statistics.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.use_batch_stats = True

    def normalize_rows(self, rows: Tensor) -> Tensor:
        """Batch-norm rows [N, C] (one per active site) → [N, C], with BatchNorm1d's running-statistics updates."""
        use_batch = self.training or self.use_batch_stats or self.running_mean is None
        if use_batch and rows.shape[0] < 2:
            raise BadInputError(f"batch statistics need at least 2 active sites, got {rows.shape[0]}")
        update = self.training and self.track_running_stats
        factor = 0.0 if self.momentum is None else self.momentum
        if update and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        # F.batch_norm updates the buffers it is given when training=True; pass them only when they must be updated
        # (training) or read (running statistics).
        buffers = update or not use_batch
        return F.batch_norm(
            rows,
            self.running_mean if buffers else None,
            self.running_var if buffers else None,
            self.weight,
            self.bias,
            use_batch,
            factor,
            self.eps,
        )

    def forward(self, x: SparseVolume) -> SparseVolume:  # type: ignore[override]
        """x: [C, X, Y, Z] volume → normalised volume, zero at inactive sites."""
        if x.num_channels != self.num_features:
            raise BadInputError(f"volume has {x.num_channels} channels, SparseBatchNorm expects {self.num_features}")
        out = x.features.new_zeros(x.features.shape)
        out[:, x.mask] = self.normalize_rows(x.values()).T
        return SparseVolume(out, x.mask, x.stride)


class SparseReLU(nn.Module):
    """ReLU on the active sites (inactive sites are zero and stay zero)."""

    def forward(self, x: SparseVolume) -> SparseVolume:
        return SparseVolume(F.relu(x.features), x.mask, x.stride)


class SparseConvBlock(nn.Module):
    """``BasicSparseConvolutionBlock`` / ``BasicSparseDeconvolutionBlock``: conv → BN → ReLU in ``net``.

    State-dict keys: ``net.0.kernel``, ``net.1.{weight, bias, running_mean, running_var, num_batches_tracked}``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, transposed: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(
            SparseConv3d(in_channels, out_channels, stride=stride, transposed=transposed),
            SparseBatchNorm(out_channels),
            SparseReLU(),
        )

    def forward(self, x: SparseVolume, out_like: SparseVolume | None = None) -> SparseVolume:
        conv, norm, relu = self.net
        return relu(norm(conv(x, out_like)))


class SparseCostRegNet(nn.Module):
    """The sparse 3D U-Net that regularises the cost volume (reference ``SparseCostRegNet``).

    Levels at tensor strides 1, 2, 4, 8; with channels (c0, c1, c2):
    conv0 d_in→d_out; conv1 (s2) d_out→c0, conv2 c0→c0; conv3 (s2) c0→c1, conv4 c1→c1; conv5 (s2) c1→c2,
    conv6 c2→c2; conv7 (up) c2→c1 + conv4; conv9 (up) c1→c0 + conv2; conv11 (up) c0→d_out + conv0 (no ReLU after
    the adds). conv0's output width is d_out, as in the reference, which hard-codes c = (16, 32, 64); the paper uses
    d_in 32, d_out 16.

    Args:
        d_in: channels of the cost volume (2 × compressed width = 32).
        d_out: channels of the output (the latent, 16).
        channels: widths (c0, c1, c2) of the stride-2, -4 and -8 levels.
        backend: "dense" (masked dense ops, any device) or "torchsparse" (needs torchsparse 1.4 installed; for
            cross-checking against the original library, whole network only).
    """

    def __init__(
        self,
        d_in: int = 32,
        d_out: int = 16,
        channels: tuple[int, int, int] = (16, 32, 64),
        backend: Backend = "dense",
    ) -> None:
        super().__init__()
        if len(channels) != 3:
            raise BadInputError(f"channels must give three widths (c0, c1, c2), got {channels}")
        if backend not in ("dense", "torchsparse"):
            raise BadInputError(f"backend must be 'dense' or 'torchsparse', got {backend!r}")
        if backend == "torchsparse":
            _import_torchsparse()
        c0, c1, c2 = channels
        self.d_in = d_in
        self.d_out = d_out
        self.backend = backend
        self.conv0 = SparseConvBlock(d_in, d_out)
        self.conv1 = SparseConvBlock(d_out, c0, stride=2)
        self.conv2 = SparseConvBlock(c0, c0)
        self.conv3 = SparseConvBlock(c0, c1, stride=2)
        self.conv4 = SparseConvBlock(c1, c1)
        self.conv5 = SparseConvBlock(c1, c2, stride=2)
        self.conv6 = SparseConvBlock(c2, c2)
        self.conv7 = SparseConvBlock(c2, c1, stride=2, transposed=True)
        self.conv9 = SparseConvBlock(c1, c0, stride=2, transposed=True)
        self.conv11 = SparseConvBlock(c0, d_out, stride=2, transposed=True)

    def forward(self, x: SparseVolume) -> SparseVolume:
        """x: cost volume [d_in, X, Y, Z] (any tensor stride). Returns [d_out, X, Y, Z] on the same sites."""
        if x.num_channels != self.d_in:
            raise BadInputError(f"cost volume has {x.num_channels} channels, SparseCostRegNet expects {self.d_in}")
        if self.backend == "torchsparse":
            return _forward_torchsparse(self, x)
        conv0 = self.conv0(x)
        conv2 = self.conv2(self.conv1(conv0))
        conv4 = self.conv4(self.conv3(conv2))
        y = self.conv6(self.conv5(conv4))
        y = _add(conv4, self.conv7(y, out_like=conv4))
        y = _add(conv2, self.conv9(y, out_like=conv2))
        return _add(conv0, self.conv11(y, out_like=conv0))


def _add(a: SparseVolume, b: SparseVolume) -> SparseVolume:
    """Skip connection: both volumes hold the same sites, so the sum stays zero at inactive sites."""
    return SparseVolume(a.features + b.features, a.mask, a.stride)


# ---------------------------------------------------------------------------------------------------------------------
# Optional torchsparse backend (cross-checking only)


def _import_torchsparse() -> ModuleType:
    try:
        import torchsparse
    except ImportError as exc:
        raise BadInputError(
            "backend 'torchsparse' needs the torchsparse package (1.4.x), which is not importable here; "
            "use backend='dense', which computes the same results",
        ) from exc
    version = str(getattr(torchsparse, "__version__", "unknown"))
    if not version.startswith("1.4"):
        # 2.x changed the coordinate order (batch first) and the down-sampling rule.
        raise BadInputError(f"backend 'torchsparse' needs torchsparse 1.4.x, found {version}; use backend='dense'")
    return torchsparse


def _forward_torchsparse(net: SparseCostRegNet, x: SparseVolume) -> SparseVolume:
    """Run ``net`` with torchsparse 1.4 convolutions (same parameters, same BN), back to a dense volume."""
    torchsparse = _import_torchsparse()
    from torchsparse.nn import functional as tsf

    coords = torch.cat([x.coords() * x.stride, torch.zeros_like(x.coords()[:, :1])], dim=1).int()  # (x, y, z, batch)
    tensor = torchsparse.SparseTensor(feats=x.values().contiguous(), coords=coords, stride=x.stride)

    def block(blk: SparseConvBlock, t: torchsparse.SparseTensor) -> torchsparse.SparseTensor:
        conv, norm, _ = blk.net
        out = tsf.conv3d(t, conv.kernel, kernel_size=3, stride=conv.stride, transposed=conv.transposed)
        out.feats = F.relu(norm.normalize_rows(out.feats))
        return out

    conv0 = block(net.conv0, tensor)
    conv2 = block(net.conv2, block(net.conv1, conv0))
    conv4 = block(net.conv4, block(net.conv3, conv2))
    y = block(net.conv6, block(net.conv5, conv4))
    y = conv4 + block(net.conv7, y)
    y = conv2 + block(net.conv9, y)
    y = conv0 + block(net.conv11, y)
    return SparseVolume.from_coords(y.coords[:, :3].long() // x.stride, y.feats, x.shape, x.stride)
