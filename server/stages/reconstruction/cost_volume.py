"""Cost volume: every voxel centre projected into every view, aggregated as variance and mean (spec §5.4).

Legend (spec §5.4 → code):
    X_i        voxel centre i in normalised space            ``points[i]``
    P_v        K · w2c_norm of view v (4×4, pixel units)       ``proj[v]``
    f_v(X)     compressed feature of view v sampled at X       ``sample``
    n(X)       number of views that see X                      ``count``
    μ, σ²      Σ_v f_v / (n + 1e-5), Σ_v f_v² / (n + 1e-5) − μ²
The sums run over *all* views — a view that does not see X contributes its zero-padded sample — and n only counts
views that see X. This is the reference's behaviour and the checkpoint was trained with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from server.stages.reconstruction.sparse_conv import SparseVolume


def voxel_centres(dims: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Centres of a dims³ grid covering [−1, 1]³ exactly (index i ↔ −1 + 2i/(dims − 1)).

    Returns:
        [dims, dims, dims, 3] float32, indexed [x, y, z].
    """
    axis = torch.linspace(-1.0, 1.0, dims, device=device)
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)


def project_to_grid(proj: torch.Tensor, points: torch.Tensor, image_size: tuple[int, int]) -> tuple[torch.Tensor,
                                                                                                      torch.Tensor]:
    """Project points into one or several views, as ``grid_sample`` coordinates.

    Args:
        proj: [4, 4] or [V, 4, 4] K · w2c (pixel units).
        points: [N, 3] normalised space.
        image_size: (H, W).

    Returns:
        grid [..., N, 2] with (2u/(W−1) − 1, 2v/(H−1) − 1), and depth z [..., N] (leading V if ``proj`` has it). As in
        the reference, z ≥ 0 is clamped to ≥ 1e-6 before the divide, and negative z is kept (callers treat such
        points as unseen).
    """
    cam = points @ proj[..., :3, :3].transpose(-1, -2) + proj[..., None, :3, 3]
    z = cam[..., 2]
    z_safe = torch.where(z >= 0, z.clamp(min=1e-6), z)
    h, w = image_size
    u = cam[..., 0] / z_safe
    v = cam[..., 1] / z_safe
    grid = torch.stack([2 * u / (w - 1) - 1, 2 * v / (h - 1) - 1], dim=-1)
    return grid, z


def sees(grid: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """[N] bool: the point lies inside the image (|coords| ≤ 1 on both axes) and in front of the camera."""
    return (grid.abs() <= 1).all(dim=-1) & (z > 0)


def sample_maps(maps: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of one view's maps at grid coordinates (zeros outside, corners aligned).

    Args:
        maps: [C, H, W]; grid: [N, 2].

    Returns:
        [N, C].
    """
    out = F.grid_sample(maps[None], grid.view(1, 1, -1, 2), mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0, :, 0].T


def build_cost_volume(features: torch.Tensor, proj: torch.Tensor, dims: int) -> SparseVolume:
    """Aggregate per-view features into a sparse variance+mean volume.

    Args:
        features: [V, C, H, W] compressed feature maps of the source views.
        proj: [V, 4, 4] K · w2c_norm for the same views.
        dims: voxels per axis (96 in the paper).

    Returns:
        SparseVolume with features [2C, dims, dims, dims] = cat(variance, mean) and the active sites: voxels seen by
        at least two views (``count > min(1, V − 1)``, the reference's rule).
    """
    num_views, channels, height, width = features.shape
    points = voxel_centres(dims, features.device).reshape(-1, 3)
    count = torch.zeros(points.shape[0], device=features.device)
    for v in range(num_views):
        grid, z = project_to_grid(proj[v], points, (height, width))
        count += sees(grid, z)
    keep = count > min(1, num_views - 1)
    points, count = points[keep], count[keep]

    total = features.new_zeros(points.shape[0], channels)
    total_sq = features.new_zeros(points.shape[0], channels)
    for v in range(num_views):
        grid, _ = project_to_grid(proj[v], points, (height, width))
        sample = sample_maps(features[v], grid)
        total += sample
        total_sq += sample * sample
    inv = 1.0 / (count + 1e-5)[:, None]
    mean = total * inv
    var = total_sq * inv - mean * mean

    dense = features.new_zeros(2 * channels, dims**3)
    dense[:, keep] = torch.cat([var, mean], dim=1).T
    return SparseVolume(features=dense.view(2 * channels, dims, dims, dims), mask=keep.view(dims, dims, dims),
                        stride=1)
