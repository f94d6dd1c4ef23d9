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
