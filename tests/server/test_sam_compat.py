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


# ---------------------------------------------------------------------------------------------------------------------
# ChunkedAttention: same outputs as segment-anything's Attention, a fraction of the memory (issue #25)


def _attention(dim: int, heads: int, size: tuple[int, int], seed: int):
    modeling = import_segment_anything().modeling
    torch.manual_seed(seed)
    attention = modeling.image_encoder.Attention(dim, num_heads=heads, use_rel_pos=True, input_size=size).eval()
    with torch.no_grad():  # the zero-initialised relative positions would hide a wrong rel-pos term
        attention.rel_pos_h.normal_()
        attention.rel_pos_w.normal_()
    return attention


def test_chunked_attention_equals_the_original_for_any_chunk_size():
    from server.stages.sam_compat import ChunkedAttention

    original = _attention(32, 4, (6, 5), seed=0)
    x = torch.randn(2, 6, 5, 32)
    with torch.inference_mode():
        expected = original(x)
        for chunk_bytes in (1, 2 * 4 * 5 * 30 * 4 * 2, 1 << 30):  # one row, two rows, everything at once
            chunked = ChunkedAttention(original, chunk_bytes)
            assert torch.allclose(chunked(x), expected, rtol=1e-5, atol=1e-6), chunk_bytes
    assert chunked.state_dict().keys() == original.state_dict().keys()


def test_chunked_sam_gives_the_same_masks():
    """A SAM with a windowed and a global block: masks equal and logits within float rounding, chunked or not."""
    from server.benchmarks.synthetic_weights import tiny_sam
    from server.stages.sam_compat import ChunkedAttention, use_chunked_attention

    sam = import_segment_anything()
    torch.manual_seed(3)
    plain_model = tiny_sam().eval()
    with torch.no_grad():
        for name, parameter in plain_model.named_parameters():
            if "rel_pos" in name:
                parameter.normal_()
    chunked_model = tiny_sam().eval()
    chunked_model.load_state_dict(plain_model.state_dict())
    keys = chunked_model.state_dict().keys()
    assert use_chunked_attention(chunked_model, chunk_bytes=64) == 2
    assert isinstance(chunked_model.image_encoder.blocks[1].attn, ChunkedAttention)
    assert chunked_model.state_dict().keys() == keys
    assert use_chunked_attention(chunked_model) == 0  # already replaced

    image = (np.random.default_rng(0).random((48, 40, 3)) * 255).astype(np.uint8)
    results = []
    for model in (plain_model, chunked_model):
        predictor = sam.SamPredictor(model)
        with torch.inference_mode():
            predictor.set_image(image)
            results.append(predictor.predict(box=np.array([5, 6, 30, 40]), multimask_output=True))
    (masks_a, scores_a, logits_a), (masks_b, scores_b, logits_b) = results
    assert np.allclose(logits_a, logits_b, rtol=1e-4, atol=1e-4)
    assert np.allclose(scores_a, scores_b, rtol=1e-4, atol=1e-5)
    assert np.array_equal(masks_a, masks_b)


def test_chunked_attention_needs_a_fraction_of_the_memory_at_vit_h_size():
    """One of ViT-H's global attention blocks at SAM's 64×64 tokens: the original holds ~3 GiB of scores at once
    (1 GiB per [16, 4096, 4096] copy); chunked, the whole forward stays under 0.5 GiB above what it started with."""
    from server.benchmarks.first_use import PeakMemory, read_memory
    from server.stages.sam_compat import ChunkedAttention

    chunked = ChunkedAttention(_attention(1280, 16, (64, 64), seed=0))
    x = torch.randn(1, 64, 64, 1280)
    with torch.inference_mode():
        before = read_memory()["heap"]
        with PeakMemory() as peak:
            out = chunked(x)
    assert out.shape == (1, 64, 64, 1280) and torch.isfinite(out).all()
    assert peak.heap - before < 0.5 * 2**30, f"{(peak.heap - before) / 2**30:.2f} GiB"
