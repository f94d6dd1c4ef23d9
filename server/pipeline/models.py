"""The models a pipeline keeps warm (:class:`PipelineModels`), built for a preset: ``tiny`` (small random models of the
same classes) or ``paper`` (the official weights), and :func:`resident`, which moves one to the GPU for its stage in
low-VRAM mode."""


from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from server.stages.elevation import ElevationEstimator, FlowMatcher, SiftMatcher, available_matchers
from server.stages.multiview.zero123 import (
    Zero123Model,
    tiny_zero123,
)
from server.stages.reconstruction.model import ReconstructionModel, build_model


@dataclass
class PipelineModels:
    """Everything loaded once and kept warm."""

    zero123: Zero123Model
    reconstruction: ReconstructionModel
    elevation: ElevationEstimator
    segmenter: Any | None = None
    """A :class:`server.stages.preprocess.SamSegmenter`, or None for the weight-free foreground estimate."""
    descriptions: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def resident(module: Any, device: str, low_vram: bool) -> Iterator[Any]:
    """``module`` (an ``nn.Module``) on ``device`` for the block. In low-VRAM mode on CUDA it is moved there for the
    block only and back to the CPU afterwards, with the allocator's cache freed, so only the model in use holds GPU
    memory; otherwise the models stay where they are (on the device)."""
    if not (low_vram and str(device).startswith("cuda")):
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to("cpu")
        torch.cuda.empty_cache()


def _tiny_models() -> PipelineModels:
    return PipelineModels(
        zero123=tiny_zero123(seed=0), reconstruction=build_model("tiny", seed=0),
        elevation=ElevationEstimator([FlowMatcher(), SiftMatcher()]),
        descriptions={"zero123": "tiny random (no weights)", "reconstruction": "tiny random (no weights)",
                      "matcher": "flow+sift", "segmenter": "weight-free foreground estimate"})


def _paper_models(device: str, weights_dir: str | Path | None, download_missing: bool,
                  load_device: str | None = None) -> PipelineModels:
    """The official models, loaded onto ``load_device`` (default ``device``; the CPU in low-VRAM mode) in the
    precision ``device`` computes in."""
    load_device = load_device or device
    from server.common.weights import default_weights_dir, download, resolve
    from server.stages.multiview.convert import ensure_converted
    from server.stages.multiview.zero123 import load_zero123
    from server.stages.preprocess import SamSegmenter
    from server.stages.reconstruction.checkpoint import load_reconstruction_model

    root = Path(weights_dir) if weights_dir else default_weights_dir()
    if download_missing:
        download(["zero123-xl", "reconstruction", "loftr", "sam"], root)
    zero123_dir = ensure_converted(resolve("zero123-xl", root), root / "converted")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    descriptions = {"zero123": f"zero123-xl ({zero123_dir.name})", "reconstruction": "ckpt_215000"}
    elevation = ElevationEstimator(available_matchers(root))
    descriptions["matcher"] = elevation.name
    try:
        segmenter = SamSegmenter.from_checkpoint(resolve("sam", root), load_device)
        descriptions["segmenter"] = "sam vit_h"
    except FileNotFoundError:
        segmenter = None
        descriptions["segmenter"] = "weight-free foreground estimate (SAM weights absent)"
    return PipelineModels(zero123=load_zero123(zero123_dir, load_device, dtype),
                          reconstruction=load_reconstruction_model(resolve("reconstruction", root)),
                          elevation=elevation, segmenter=segmenter, descriptions=descriptions)
