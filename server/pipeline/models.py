"""The models a pipeline keeps warm (:class:`PipelineModels`), built for a preset: ``tiny`` (small random models of the
same classes) or ``paper`` (the official weights). In low-VRAM mode each is moved to the GPU for its stage only by
:func:`server.common.devices.resident`."""


from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from server.pipeline.loading import conversion_progress, observed
from server.pipeline.options import Progress
from server.stages.elevation import ElevationEstimator, FlowMatcher, SiftMatcher, available_matchers
from server.stages.multiview.checkpoint import tiny_zero123
from server.stages.multiview.zero123 import Zero123Model
from server.stages.reconstruction.model import ReconstructionModel, build_model

log = logging.getLogger(__name__)


@dataclass
class PipelineModels:
    """Everything loaded once and kept warm."""

    zero123: Zero123Model
    reconstruction: ReconstructionModel
    elevation: ElevationEstimator
    segmenter: Any | None = None
    """A :class:`server.stages.preprocess.SamSegmenter`, or None for the weight-free foreground estimate."""
    descriptions: dict[str, str] = field(default_factory=dict)


HOST_RAM_NEEDED_BYTES: dict[tuple[str, str], int] = {("paper", "cpu"): int(7.0 * 2**30)}
"""Host RAM (bytes) a run of a preset needs on a device kind, checked before loading (:func:`host_memory_warning`).
``paper`` on the CPU: the peak heap (RSS less file-backed pages, which the kernel can drop and re-read) of loading the
paper models and running SAM and the first DDIM steps, measured by ``python -m server.benchmarks.first_use`` on a
2-core, 24 GB machine (docs/benchmarks.md, issue #25), plus ~1 GiB of margin. Not yet measured for CUDA machines, so
nothing is claimed there."""


def available_host_memory() -> int | None:
    """Bytes of RAM that can be allocated without swapping: psutil's ``available`` when psutil is installed, else
    ``MemAvailable`` of ``/proc/meminfo``; None where neither exists (then nothing is checked)."""
    try:
        import psutil
    except ImportError:
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None
    return int(psutil.virtual_memory().available)


def host_memory_warning(preset: str, device: str, available: int | None = None) -> str | None:
    """A sentence when this machine has less free RAM than a ``preset`` run on ``device`` needs, else None.

    Args:
        available: free RAM in bytes; None reads it now (:func:`available_host_memory`).
    """
    needed = HOST_RAM_NEEDED_BYTES.get((preset, "cuda" if str(device).startswith("cuda") else "cpu"))
    available = available_host_memory() if available is None else available
    if needed is None or available is None or available >= needed:
        return None
    return (f"this machine has {available / 2**30:.1f} GiB of RAM available but a {preset}-preset run on the "
            f"{device} needs about {needed / 2**30:.1f} GiB (measured peak); it may swap heavily or be stopped by the "
            "out-of-memory killer: close other programs first")


def tiny_models() -> PipelineModels:
    return PipelineModels(
        zero123=tiny_zero123(seed=0), reconstruction=build_model("tiny", seed=0),
        elevation=ElevationEstimator([FlowMatcher(), SiftMatcher()]),
        descriptions={"zero123": "tiny random (no weights)", "reconstruction": "tiny random (no weights)",
                      "matcher": "flow+sift", "segmenter": "weight-free foreground estimate"})


def prepare_weights(weights_dir: str | Path | None = None, *, progress: Callable[[Progress], None] | None = None,
                    should_cancel: Callable[[], bool] | threading.Event | None = None) -> Path:
    """Convert Zero123-XL now if it has not been (or its converted folder is damaged); the converted folder.

    Args:
        weights_dir: the weights folder (default: ``$ONE2345_WEIGHTS`` or ``~/.cache/one2345/weights``).
        progress: receives :class:`Progress` reports of stage ``prepare`` (``message`` is a line for people).
        should_cancel: a callable or ``threading.Event``; the conversion stops between tensors, leaving nothing.

    Raises:
        MissingWeightsError: zero123-xl.ckpt is not downloaded.
        CheckpointError: it is damaged or not Zero123 (the fix re-fetches it).
        CancelledError: cancelled.
    """
    from server.common.weights import default_weights_dir, resolve
    from server.stages.multiview.convert import ensure_converted

    root = Path(weights_dir).expanduser() if weights_dir else default_weights_dir()
    return ensure_converted(resolve("zero123-xl", root), root / "converted", progress=conversion_progress(progress),
                            should_cancel=should_cancel)


def remove_interrupted_conversions(weights_dir: str | Path | None = None) -> list[Path]:
    """Delete what interrupted Zero123 conversions left in ``<weights dir>/converted`` (at start-up); never the
    temporary folder of a conversion another live process is running. Returns the folders removed."""
    from server.common.weights import default_weights_dir
    from server.stages.multiview.convert import remove_interrupted_conversions as remove

    root = Path(weights_dir).expanduser() if weights_dir else default_weights_dir()
    return remove(root / "converted")


def paper_models(device: str, weights_dir: str | Path | None, download_missing: bool,
                  load_device: str | None = None, progress: Callable[[Progress], None] | None = None,
                  should_cancel: Callable[[], bool] | None = None) -> PipelineModels:
    """The official models, loaded onto ``load_device`` (default ``device``; the CPU in low-VRAM mode) in the
    precision ``device`` computes in. A one-time conversion reports to ``progress`` and honours ``should_cancel``
    (default: those of the enclosing :func:`server.pipeline.loading.loading_observer`)."""
    load_device = load_device or device
    observed_progress, observed_cancel = observed()
    progress = progress or observed_progress
    should_cancel = should_cancel or observed_cancel
    from server.common.weights import default_weights_dir, download, require, resolve
    from server.stages.multiview.checkpoint import load_zero123
    from server.stages.preprocess import SamSegmenter
    from server.stages.reconstruction.checkpoint import load_reconstruction_model

    root = Path(weights_dir) if weights_dir else default_weights_dir()
    memory_warning = host_memory_warning("paper", device)
    if memory_warning:  # INFO: the CLI prints its own warning first; `serve` logs at INFO
        log.info("host memory: %s", memory_warning)
    if download_missing:
        download(["zero123-xl", "reconstruction", "loftr", "sam"], root)
    else:  # one error naming every file the run lacks, with one command for all (not the first file alone)
        require(["zero123-xl", "reconstruction"], root, optional=["sam", "loftr"], purpose="the paper preset")
    zero123_dir = prepare_weights(root, progress=progress, should_cancel=should_cancel)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    descriptions = {"zero123": f"zero123-xl ({zero123_dir.name})", "reconstruction": "ckpt_215000"}
    if memory_warning:  # surfaces in the health endpoint's models_loaded and the run's meta.json
        descriptions["host_memory"] = memory_warning
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
