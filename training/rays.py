"""Rays through the pixels of a training sample: the random batch a step trains on (¼ uniform, ¾ inside the mask,
spec §6) and every ray of an image for validation, in the pixel convention of :mod:`training.data`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from training.data import Sample


@dataclass
class RayBatch:
    """Rays of the query camera with their supervision, normalised frame."""

    origins: torch.Tensor
    """[R, 3]."""
    directions: torch.Tensor
    """[R, 3] unit vectors."""
    rgb: torch.Tensor
    """[R, 3] GT colours."""
    mask: torch.Tensor
    """[R] float, 1 on the object."""
    depth: torch.Tensor
    """[R] GT distance along the ray (0 on the background)."""
    background: float | None = None
    """Share of the rays off the mask, counted where the rays were drawn (on the host), so that the loss schedule
    never reads it back from a GPU; None: the loss counts it."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> RayBatch:
        tensors = (t.to(device, non_blocking=non_blocking)
                   for t in (self.origins, self.directions, self.rgb, self.mask, self.depth))
        return RayBatch(*tensors, background=self.background)


def pixel_rays(c2w: torch.Tensor, K: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                    torch.Tensor]:
    """Rays through pixel positions (u = column, v = row, the network's pixel convention).

    Args:
        c2w: [4, 4] OpenCV camera-to-world; K: [3, 3]; rows, cols: [R] pixel indices.

    Returns:
        origins [R, 3], unit directions [R, 3].
    """
    cam = torch.stack([(cols.float() - K[0, 2]) / K[0, 0], (rows.float() - K[1, 2]) / K[1, 1],
                       torch.ones_like(cols, dtype=torch.float32)], dim=-1)
    directions = torch.nn.functional.normalize(cam @ c2w[:3, :3].T, dim=-1)
    return c2w[:3, 3].expand_as(directions), directions


def sample_rays(sample: Sample, count: int, generator: torch.Generator, inside_fraction: float = 0.75) -> RayBatch:
    """``count`` rays: ``inside_fraction`` of them at random mask pixels, the rest uniform over the image (spec §6).

    An empty mask gives uniform rays only.
    """
    height, width = sample.query_mask.shape
    n_inside = round(count * inside_fraction)
    flat_mask = sample.query_mask.reshape(-1) > 0
    inside = torch.nonzero(flat_mask).squeeze(1)
    uniform = torch.randint(0, height * width, (count,), generator=generator)
    if len(inside) and n_inside:
        chosen = inside[torch.randint(0, len(inside), (n_inside,), generator=generator)]
        pixels = torch.cat([chosen, uniform[n_inside:]])
    else:
        pixels = uniform
    rows, cols = pixels // width, pixels % width
    origins, directions = pixel_rays(sample.query_c2w, sample.query_K, rows, cols)
    mask = sample.query_mask[rows, cols]
    return RayBatch(origins, directions, sample.query_rgb[rows, cols], mask, sample.query_depth[rows, cols],
                    background=1.0 - float((mask > 0).float().mean()))


def image_rays(sample: Sample, level: int = 1) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Rays of every ``level``-th pixel of the query image (validation renders).

    Returns:
        origins [R, 3], directions [R, 3], (rows, cols) of the render.
    """
    height, width = sample.query_mask.shape
    rows, cols = torch.meshgrid(torch.arange(0, height, level), torch.arange(0, width, level), indexing="ij")
    origins, directions = pixel_rays(sample.query_c2w, sample.query_K, rows.reshape(-1), cols.reshape(-1))
    return origins, directions, tuple(rows.shape)
