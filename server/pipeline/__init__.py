"""The pipeline: the orchestrator that runs the stages in order, and the two ways to mesh views again.

- :mod:`.one2345` — :class:`One2345Pipeline`, one image → a coloured 360° mesh as numbered stages.
- :mod:`.options` — what a run is asked for (:class:`GenerateOptions`) and gives back; :mod:`.models` — the models a
  preset keeps warm; :mod:`.loading` — watching and stopping their load (the one-time conversion's progress),
  without torch.
- :mod:`.reconstruct` — 32 posed views → a vertex-coloured mesh; :mod:`.remesh` — a finished run meshed again
  (resolution, clean-up, decimation, texture) without Zero123.

May import :mod:`server.stages` and :mod:`server.common`, never :mod:`server.service`.
"""

from typing import TYPE_CHECKING, Any

from server.pipeline.options import (
    ELEVATION_RANGE,
    FORMATS,
    PRESETS,
    GenerateOptions,
    GenerateResult,
    Progress,
    ViewsRecord,
)

if TYPE_CHECKING:
    from server.common.devices import resident
    from server.pipeline.models import PipelineModels
    from server.pipeline.one2345 import One2345Pipeline

_LAZY = {"One2345Pipeline": "server.pipeline.one2345", "PipelineModels": "server.pipeline.models",
         "resident": "server.common.devices"}
"""Names imported on first use: they bring torch and diffusers, which checking options must not wait for."""


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ELEVATION_RANGE",
    "FORMATS",
    "PRESETS",
    "GenerateOptions",
    "GenerateResult",
    "One2345Pipeline",
    "PipelineModels",
    "Progress",
    "ViewsRecord",
    "resident",
]
