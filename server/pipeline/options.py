"""What a run is asked for and what it gives back: :class:`GenerateOptions` (the paper's defaults), :class:`Progress`,
:class:`GenerateResult` and :class:`ViewsRecord` (the stage-1 views kept between a review and its continuation)."""


from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from server.common.errors import BadInputError
from server.common.fsutil import write_json_atomic
from server.pipeline.remesh import MeshSettings

if TYPE_CHECKING:  # diffusers is imported where used: options are checked before any model library loads
    from server.stages.multiview.zero123 import Zero123Config

PRESETS = ("paper", "tiny")
STAGE1_VIEWS = tuple(str(i) for i in range(12))
"""Names of stage-1 views: 0–3 (ring 1) and 4–7 or 8–11 (ring 2, lower or higher by the elevation)."""
FORMATS = ("ply", "glb", "obj")
ELEVATION_RANGE = (-60.0, 70.0)
"""Allowed user elevations (degrees above the horizon). Polar = 90 − elevation must leave room for the ±30° second
ring and ±10° nearby views inside (0°, 180°); the reference's estimator searches polar 20…149."""


@dataclass(frozen=True)
class GenerateOptions:
    """What a user may choose per run. Defaults are the paper's settings."""

    elevation: float | None = None
    """Degrees above the horizon of the input view (90 − polar); None estimates it from the nearby views."""
    seed: int | None = None
    """Seed of all diffusion noise; None draws one (recorded in meta.json, so any run can be repeated)."""
    steps_stage1: int = 75
    """DDIM steps setting of the 8 stage-1 views (the reference's sampler runs 76)."""
    steps_stage2: int = 50
    """DDIM steps setting of the 32 nearby views (49 run)."""
    guidance: float = 3.0
    """Classifier-free guidance scale."""
    resolution: int = 256
    """Marching-cubes grid per axis."""
    format: str = "glb"
    """Mesh file format: ply (z-up, as pose.json), glb or obj (y-up)."""
    remove_background: bool = True
    """Segment the object (SAM, or a weight-free estimate for plain backgrounds); False uses the whole image. An
    image with a meaningful alpha channel is always used as is."""
    target_faces: int | None = None
    """Polygon budget of the asset stage (clean-up, then quadric decimation); None keeps the raw marching-cubes
    surface, as the paper."""
    texture_size: int | None = None
    """Side of a UV texture baked from the views (glb or obj); None gives vertex colours only, as the paper."""
    view_seeds: dict[str, int] | None = None
    """Stage-1 views re-rolled after the first pass, by view number ("5") → the seed each was last generated with
    (alone). A run's recipe carries them, so Regenerate repeats a reviewed run exactly."""
    review: bool = False
    """Pause after the 8 stage-1 views for review (server jobs only; the CLI and batches never wait)."""

    @property
    def mesh_settings(self) -> MeshSettings:
        """The options that shape the mesh file (all a re-mesh may change, with the format)."""
        return MeshSettings(resolution=self.resolution, target_faces=self.target_faces,
                            texture_size=self.texture_size)

    def check(self) -> GenerateOptions:
        """Validate every field; raise BadInputError naming the field, the value and what is allowed."""

        def bad(name: str, allowed: str) -> BadInputError:
            return BadInputError(f"option {name}={getattr(self, name)!r} is not allowed: {allowed}")

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: object) -> bool:  # an int is always finite (and may be too large for a float)
            return is_int(v) or (isinstance(v, float) and math.isfinite(v))

        lo, hi = ELEVATION_RANGE
        if self.elevation is not None and not (is_num(self.elevation) and lo <= self.elevation <= hi):
            raise bad("elevation", f"null (estimate it) or a number of degrees in [{lo:g}, {hi:g}]")
        if self.seed is not None and not (is_int(self.seed) and 0 <= self.seed < 2**32):
            raise bad("seed", "null or an integer in [0, 2**32)")
        for name in ("steps_stage1", "steps_stage2"):
            # The reference's DDIM drops the last of its S timesteps, so S = 1 would run no step at all.
            if not (is_int(getattr(self, name)) and 2 <= getattr(self, name) <= 200):
                raise bad(name, "an integer in [2, 200]")
        if not (is_num(self.guidance) and 1.0 <= self.guidance <= 20.0):
            raise bad("guidance", "a number in [1, 20] (the paper uses 3)")
        if not (is_int(self.resolution) and 32 <= self.resolution <= 512):
            raise bad("resolution", "an integer in [32, 512] (the paper uses 256)")
        if self.format not in FORMATS:
            raise bad("format", f"one of {', '.join(FORMATS)}")
        if not isinstance(self.remove_background, bool):
            raise bad("remove_background", "true or false")
        self.mesh_settings.check(f".{self.format}")
        if not isinstance(self.review, bool):
            raise bad("review", "true or false")
        if self.view_seeds is not None and not (
                isinstance(self.view_seeds, dict) and len(self.view_seeds) <= 8
                and all(isinstance(k, str) and k in STAGE1_VIEWS and is_int(v) and 0 <= v < 2**32
                        for k, v in self.view_seeds.items())):
            raise bad("view_seeds", 'null or an object of at most 8 stage-1 view numbers ("0"…"11") → seeds in '
                                    "[0, 2**32), e.g. {\"5\": 7}")
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerateOptions:
        """Options from JSON-like data; unknown fields are an error (a typo must not be silently ignored)."""
        if not isinstance(data, dict):
            raise BadInputError(f"options must be a JSON object, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise BadInputError(f"unknown option(s) {unknown}; allowed: {known}")
        return cls(**data).check()


@dataclass(frozen=True)
class Progress:
    """One progress report."""

    stage: str
    """preprocess, stage1, stage2, elevation, stage1b, stage2b, reconstruct, asset or export."""
    step: int
    total: int
    fraction: float
    """Overall fraction of the run's work done, in [0, 1]."""
    message: str = ""
    preview: Path | None = None
    """A view image written just now, for previews."""


@dataclass
class GenerateResult:
    mesh_path: Path
    views_dir: Path
    elevation: float
    """Degrees above the horizon of the input view."""
    polar: float
    elevation_source: str
    """"given", "estimated" (see ``elevation_uncertain``) or "fallback" (no fit was possible; polar 90 as the
    reference)."""
    background: str
    """How the object was separated: alpha, sam, foreground-estimate or none."""
    timings: dict[str, float]
    meta_path: Path
    vertices: int
    faces: int
    seed: int
    mesh_files: list[Path] = field(default_factory=list)
    """Every file of the mesh in the run folder: ``mesh_path`` first, then an OBJ's material and texture."""
    elevation_uncertain: bool = False
    """True when the elevation was estimated (or fell back) without confidence: the user should set it by hand."""
    elevation_confidence: float | None = None
    """The estimate's confidence (0–1); None when the elevation was given."""


@dataclass
class ViewsRecord:
    """What stages 1–5 of a run decided, kept in ``run_dir/stage1.json``: a run can pause there for review, re-roll
    views and be finished later (by another process, after a restart) from its files alone."""

    FILE: ClassVar[str] = "stage1.json"

    seed: int
    """The run's seed: stage 1a uses it, stage 2 +1, stage 1b +2, stage 2b +3."""
    polar: float
    elevation_source: str
    estimate: dict[str, Any] | None
    """:meth:`server.stages.elevation.ElevationResult.to_json` of the latest estimate; None when the elevation was
    given."""
    background: str
    input_sha256: str
    """SHA-256 of the run's input.png."""
    timings: dict[str, float]
    view_seeds: dict[str, int] = field(default_factory=dict)
    """Re-rolled stage-1 views → the seed each was last generated with, alone."""
    notes: list[str] = field(default_factory=list)
    revision: int = 0
    """Counts re-rolls, so a client knows when to fetch the views again."""

    def views(self, config: Zero123Config) -> list[int]:
        """This run's stage-1 view numbers: 0–3 and the ring-2 side its polar angle chose."""
        from server.stages.multiview.zero123 import stage1b_deltas

        return [0, 1, 2, 3, *stage1b_deltas(self.polar, config)[0]]

    def write(self, run_dir: Path) -> Path:
        return write_json_atomic(run_dir / self.FILE, asdict(self))

    @classmethod
    def read(cls, run_dir: Path) -> ViewsRecord:
        """The record of a run folder; BadInputError when it has none or it is damaged."""
        path = Path(run_dir) / cls.FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            record = cls(**data)
            if not (isinstance(record.seed, int) and isinstance(record.polar, float | int)
                    and isinstance(record.view_seeds, dict)):
                raise TypeError("seed, polar or view_seeds has the wrong type")
        except (OSError, ValueError, TypeError, RecursionError) as e:  # RecursionError: absurdly nested JSON
            raise BadInputError(f"{path.name} of run {Path(run_dir).name} is missing or damaged ({e})",
                                fix="generate the views again") from None
        record.polar = float(record.polar)
        return record
