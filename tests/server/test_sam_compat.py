"""The torchvision stand-in lent to segment-anything matches torchvision's semantics for the four names it uses."""

from __future__ import annotations

import sys

import numpy as np
import torch
from PIL import Image

from server.stages.sam_compat import _batched_nms, _box_area, _resize, _to_pil_image, import_segment_anything


def test_import_leaves_no_fake_torchvision_behind():
    sam = import_segment_anything()
    assert hasattr(sam, "SamPredictor") and hasattr(sam, "sam_model_registry")
    module = sys.modules.get("torchvision")
    assert module is None or getattr(module, "__file__", None) is not None  # absent, or the real package


def test_resize_is_pil_bilinear_to_height_width():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    out = np.asarray(_resize(_to_pil_image(image), (12, 20)))
    assert out.shape == (12, 20, 3)
    assert np.array_equal(out, np.asarray(Image.fromarray(image).resize((20, 12), Image.BILINEAR)))


def test_batched_nms_suppresses_within_a_category_only():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    idxs = torch.tensor([0, 0, 1, 0])
    keep = _batched_nms(boxes, scores, idxs, iou_threshold=0.5)
    assert keep.tolist() == [0, 2, 3]  # box 1 overlaps box 0 (IoU 0.81); box 2 is another category
    assert _box_area(boxes).tolist() == [100, 81, 100, 100]
