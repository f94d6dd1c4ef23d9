"""What the clean-up and the polygon budget did: records for logs, the bake report and a run's meta.json (their own
module so that :mod:`server.stages.asset.bake` can hold them without importing the clean-up)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CleanupReport:
    """Which connected components :func:`server.stages.asset.clean_mesh` kept and dropped."""

    components: int
    """Connected components after the broken faces went."""
    small: int
    """Components below ``min_component_fraction`` of the largest one's area."""
    kept_by_views: int
    """Small components kept because enough views show them."""
    dropped: int
    """Small components dropped (no views given, or too few views show them)."""
    supporting_views: list[int]
    """Views showing each small component, in order of decreasing area (empty without views)."""

    def as_dict(self) -> dict[str, object]:
        return {"components": self.components, "small": self.small, "kept_by_views": self.kept_by_views,
                "dropped": self.dropped, "supporting_views": list(self.supporting_views)}


@dataclass
class DecimateReport:
    """What :func:`server.stages.asset.decimate_with_report` reached and how."""

    target_faces: int
    input_faces: int
    faces: int
    """Faces of the result."""
    method: str
    """``"none"`` (already within budget), ``"quadric"``, or ``"quadric+shortest-edge"`` (the fallback ran)."""
    quadric_faces: int
    """Faces quadric collapse stopped at."""
    reached: bool
    """faces ≤ target × (1 + tolerance)."""
    reason: str | None = None
    """Why the target was missed (None when reached)."""

    def as_dict(self) -> dict[str, object]:
        return {"target_faces": self.target_faces, "input_faces": self.input_faces, "faces": self.faces,
                "method": self.method, "quadric_faces": self.quadric_faces, "reached": self.reached,
                "reason": self.reason}
