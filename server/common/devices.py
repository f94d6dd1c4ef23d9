"""Device selection, shared by the CLI, the pipeline and the server."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from server.common.errors import BadInputError


def resolve_device(name: str) -> str:
    """``auto`` → ``cuda`` when available, else ``cpu``; an unavailable ``cuda`` is a clear error."""
    if name not in ("auto", "cpu") and not name.startswith("cuda"):  # refused before torch takes seconds to import
        raise BadInputError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N")
    import torch  # imported here so `one2345 --help` stays fast

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BadInputError(f"device {name!r} was asked for, but this PyTorch build sees no CUDA device",
                            fix="use --device cpu, or install a CUDA build of torch")
    if name != "cpu" and not name.startswith("cuda"):
        raise BadInputError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N")
    return name


@contextlib.contextmanager
def resident(module: Any, device: str, low_vram: bool) -> Iterator[Any]:
    """``module`` (an ``nn.Module``) on ``device`` for the block. In low-VRAM mode on CUDA it is moved there for the
    block only and back to the CPU afterwards, with the allocator's cache freed, so only the model in use holds GPU
    memory; otherwise the models stay where they are (on the device). Shared by the pipeline and the text-to-image
    stage, which is loaded beside it."""
    if not (low_vram and str(device).startswith("cuda")):
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to("cpu")
        import torch  # only reached on CUDA, where torch is long imported

        torch.cuda.empty_cache()


PEAK_MEMORY_BYTES: dict[str, int] = {"paper": int(5.9 * 2**30)}
"""Peak CUDA memory of one whole run per preset: 5.9 GiB for the paper preset, measured on an H200 by
``python -m server.benchmarks.pipeline --preset paper --device cuda`` (issue #11's table). The tiny preset needs
next to nothing."""


def describe_device(name: str) -> dict[str, object]:
    """What the device is, for the add-on's pre-flight line: ``{"name", "kind", "memory_free_bytes",
    "memory_total_bytes"}`` (memory only for CUDA; the CPU's name is the machine's processor)."""
    import platform

    import torch

    if name.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(name).index or 0
        free, total = torch.cuda.mem_get_info(index)
        return {"name": torch.cuda.get_device_name(index), "kind": "cuda", "memory_free_bytes": int(free),
                "memory_total_bytes": int(total)}
    return {"name": platform.processor() or platform.machine() or "CPU", "kind": "cpu", "memory_free_bytes": None,
            "memory_total_bytes": None}
