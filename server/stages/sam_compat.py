"""Import segment-anything where torchvision is not installed.

segment-anything 1.0 imports four helpers from torchvision without declaring it: ``resize`` and ``to_pil_image``
(its predictor's image transform) and ``batched_nms`` and ``box_area`` (the automatic mask generator, which we do not
use). torchvision has no CPU-only wheel for every torch build, and pulling it in can replace a CPU torch with a CUDA
one. So when torchvision is importable it is used; when it is not, :func:`import_segment_anything` lends
segment-anything a stand-in with exactly those four names for the duration of the import and then removes it from
``sys.modules``, so no other library ever sees a fake torchvision.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

import numpy as np
import torch
from PIL import Image


def _to_pil_image(pic: np.ndarray) -> Image.Image:
    return Image.fromarray(np.asarray(pic))


def _resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    # torchvision's functional resize on a PIL image with a (h, w) size: PIL bilinear to (w, h).
    return img.resize((int(size[1]), int(size[0])), Image.BILINEAR)


def _box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy per-category NMS (torchvision's semantics: boxes of different ``idxs`` never suppress each other)."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    offset = idxs.to(boxes) * (boxes.max() + 1)
    shifted = boxes + offset[:, None]
    order = scores.argsort(descending=True)
    area = _box_area(shifted)
    keep = []
    suppressed = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        lt = torch.maximum(shifted[i, :2], shifted[:, :2])
        rb = torch.minimum(shifted[i, 2:], shifted[:, 2:])
        inter = (rb - lt).clamp(min=0).prod(dim=1)
        suppressed |= inter / (area[i] + area - inter) > iou_threshold
    return torch.tensor(keep, dtype=torch.long, device=boxes.device)


def _stand_in() -> dict[str, types.ModuleType]:
    modules = {name: types.ModuleType(name) for name in (
        "torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.ops",
        "torchvision.ops.boxes")}
    modules["torchvision.transforms.functional"].resize = _resize
    modules["torchvision.transforms.functional"].to_pil_image = _to_pil_image
    modules["torchvision.ops.boxes"].batched_nms = _batched_nms
    modules["torchvision.ops.boxes"].box_area = _box_area
    return modules


def import_segment_anything() -> Any:
    """``import segment_anything``, lending it the torchvision helpers it needs if torchvision is absent."""
    if "segment_anything" in sys.modules:
        return sys.modules["segment_anything"]
    try:
        importlib.import_module("torchvision")
    except ImportError:
        lent = _stand_in()
        sys.modules.update(lent)
        try:
            return importlib.import_module("segment_anything")
        finally:
            for name, module in lent.items():
                if sys.modules.get(name) is module:
                    del sys.modules[name]
    return importlib.import_module("segment_anything")


# ---------------------------------------------------------------------------------------------------------------------
# Memory-lean attention for SAM's image encoder

ATTENTION_CHUNK_BYTES = 64 * 2**20
"""Largest attention-score block (float32 bytes) one chunk of :class:`ChunkedAttention` holds. ViT-H's four global
attention blocks otherwise hold a [16, 4096, 4096] score tensor (1 GiB) and up to three such temporaries at once."""


class ChunkedAttention(torch.nn.Module):
    """segment-anything's ``image_encoder.Attention``, computed a few query rows at a time.

    Same parameters under the same names (``qkv``, ``proj``, ``rel_pos_h``, ``rel_pos_w``), so the state dict is
    unchanged, and the same arithmetic per query row — scores ``(q·scale) @ kᵀ``, plus the decomposed relative
    position terms (height, then width), softmax, ``@ v`` — so the output equals the original's within float rounding
    of the matrix products. Only the peak memory differs: one block of at most ``chunk_bytes`` of scores (and its
    softmax) lives at a time instead of the whole [B·heads, H·W, H·W] matrix and its copies.
    """

    def __init__(self, attention: torch.nn.Module, chunk_bytes: int = ATTENTION_CHUNK_BYTES) -> None:
        """Take over the modules and parameters of ``attention`` (a segment-anything ``Attention``); ``chunk_bytes``
        must be positive."""
        super().__init__()
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be a positive number of bytes, got {chunk_bytes}")
        self.num_heads: int = attention.num_heads
        self.scale: float = attention.scale
        self.use_rel_pos: bool = attention.use_rel_pos
        self.qkv = attention.qkv
        self.proj = attention.proj
        if self.use_rel_pos:
            self.rel_pos_h = attention.rel_pos_h
            self.rel_pos_w = attention.rel_pos_w
        self.chunk_bytes = chunk_bytes
        self._get_rel_pos = import_segment_anything().modeling.image_encoder.get_rel_pos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, H, W, dim] → [B, H, W, dim]."""
        batch, height, width, _ = x.shape
        tokens = height * width
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, batch * self.num_heads, tokens, -1).unbind(0)
        del qkv
        k_t = k.transpose(-2, -1)
        if self.use_rel_pos:
            rel_h_table = self._get_rel_pos(height, height, self.rel_pos_h)  # [H, H, C]
            rel_w_table = self._get_rel_pos(width, width, self.rel_pos_w)  # [W, W, C]
        bh, head_dim = q.shape[0], q.shape[-1]
        row_bytes = bh * width * tokens * q.element_size()
        rows = max(1, min(height, self.chunk_bytes // max(row_bytes, 1)))
        out = q.new_empty(bh, tokens, head_dim)
        for top in range(0, height, rows):
            bottom = min(height, top + rows)
            q_rows = q[:, top * width : bottom * width]
            scores = (q_rows * self.scale) @ k_t  # [BH, n, H·W]
            if self.use_rel_pos:
                r_q = q_rows.reshape(bh, bottom - top, width, head_dim)
                rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rel_h_table[top:bottom])
                rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rel_w_table)
                grid = scores.view(bh, bottom - top, width, height, width)
                grid += rel_h[:, :, :, :, None]  # in place: the original adds into fresh copies of the whole matrix
                grid += rel_w[:, :, :, None, :]
                del rel_h, rel_w, grid
            scores = scores.softmax(dim=-1)
            out[:, top * width : bottom * width] = scores @ v
            del scores
        del q, k, v, k_t
        y = out.view(batch, self.num_heads, height, width, -1).permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1)
        return self.proj(y)


def use_chunked_attention(model: torch.nn.Module, chunk_bytes: int = ATTENTION_CHUNK_BYTES) -> int:
    """Replace every ``Attention`` of ``model.image_encoder``'s blocks by a :class:`ChunkedAttention` (in place).

    Returns:
        How many were replaced (ViT-H: 32); 0 when the model has no such blocks (already replaced, or not SAM).
    """
    attention_cls = import_segment_anything().modeling.image_encoder.Attention
    replaced = 0
    for block in getattr(getattr(model, "image_encoder", None), "blocks", ()):
        if isinstance(getattr(block, "attn", None), attention_cls):
            block.attn = ChunkedAttention(block.attn, chunk_bytes)
            replaced += 1
    return replaced
