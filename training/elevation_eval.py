"""How often the elevation estimate is wrong, and whether it says so: the evaluation behind ``one2345-train evaluate
--elevation``.

Trials are the four ground-truth nearby views of view 0 at a known polar angle — rendered by ``one2345-train render``
(``--views elevation`` renders just those, 8× faster than the full layout) or made analytically
(:func:`training.evaluate.textured_render`). Each trial is estimated as rendered and, with ``degrade``, again after
the differences between a Zero123 output and a render (:func:`degrade`). The report gives per setting the median,
90th percentile and maximum absolute error, and the share of estimates off by more than 10°, for all estimates and
split into flagged (``uncertain``) and unflagged ones: a flagged estimate asks the artist for the elevation, so what
must never happen is a large unflagged error.

    one2345-train render --source procedural --count 100 --views elevation --surface textured --polar 45:120 \\
        --out data/elev-tex256
    one2345-train evaluate --elevation data --elevation-data data/elev-tex256 --degrade --out report/elevation
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from server.common.cameras import PoseFile
from server.common.errors import BadInputError

WRONG_DEG = 10.0
"""An estimate off by more than this wrecks the mesh (the wrong second ring, every camera off)."""


@dataclass(frozen=True)
class Trial:
    """One elevation problem with its answer."""

    name: str
    polar: float
    """True polar angle of the input view, degrees."""
    images: list[np.ndarray]
    """The four nearby views of view 0, [S, S, 3] uint8 RGB on white, in the order of spec §4."""


def trials_from_renders(root: str | Path) -> list[Trial]:
    """Every rendered object under ``root`` (full or ``--views elevation`` layout) as a trial: its pose.json gives the
    true polar of view 0, its ``view_0_{j}_10.png`` composited on white are the images."""
    from server.common.views import read_rgb

    root = Path(root)
    folders = sorted(p.parent for p in root.glob("*/*/pose.json"))
    if not folders:
        raise BadInputError(f"{root} holds no rendered objects (<folder_id>/<uid>/pose.json); render some with "
                            "one2345-train render --views elevation")
    trials = []
    for folder in folders:
        poses = PoseFile.read(folder / "pose.json", require=["0.png"])
        centre = poses.c2ws["0.png"][:3, 3]
        polar = math.degrees(math.acos(centre[2] / np.linalg.norm(centre)))
        trials.append(Trial(folder.name, round(polar, 3), [read_rgb(folder / f"view_0_{j}_10.png") for j in range(4)]))
    return trials


def degrade(images: Sequence[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """The four views as Zero123 might have made them: each independently a little blurred (Gaussian σ 0.4–1.2 px
    at 256²), colour-shifted (per-channel gain ±6 %, offset ±6 levels, on the object only: Zero123's backgrounds
    are white) and jittered (shift ±1.5 px, rotation ±0.6°, scale ±1.2 % about the centre), with sensor-like noise
    (σ 2 levels). Sizes scale with the image."""
    out = []
    for image in images:
        size = image.shape[0]
        scale = size / 256.0
        object_mask = ~(image > 245).all(axis=-1)
        sigma = rng.uniform(0.4, 1.2) * scale
        blurred = cv2.GaussianBlur(image.astype(np.float32), (0, 0), sigma)
        gain = 1.0 + rng.uniform(-0.06, 0.06, 3)
        offset = rng.uniform(-6.0, 6.0, 3)
        shifted = np.where(object_mask[..., None], blurred * gain + offset, blurred)
        noisy = shifted + rng.normal(0.0, 2.0, shifted.shape) * object_mask[..., None]
        angle, zoom = rng.uniform(-0.6, 0.6), 1.0 + rng.uniform(-0.012, 0.012)
        matrix = cv2.getRotationMatrix2D((size / 2.0, size / 2.0), angle, zoom)
        matrix[:, 2] += rng.uniform(-1.5, 1.5, 2) * scale
        warped = cv2.warpAffine(np.clip(noisy, 0, 255).astype(np.float32), matrix, (size, size),
                                flags=cv2.INTER_LINEAR, borderValue=(255.0, 255.0, 255.0))
        out.append(np.clip(warped, 0, 255).round().astype(np.uint8))
    return out


def run_trials(trials: Sequence[Trial], estimator, degraded: bool = False, seed: int = 0) -> list[dict]:
    """Estimate every trial (after :func:`degrade` when ``degraded``, seeded per trial); one row per trial."""
    rows = []
    for n, trial in enumerate(trials):
        images = degrade(trial.images, np.random.default_rng([seed, n])) if degraded else trial.images
        result = estimator(images)
        rows.append({"name": trial.name, "polar": trial.polar, "estimate": result.polar,
                     "abs_error": round(abs(result.polar - trial.polar), 3), "confidence": result.confidence,
                     "uncertain": result.uncertain, "source": result.source, "matcher": result.matcher,
                     "inliers": result.inliers})
    return rows


def _stats(errors: Sequence[float]) -> dict:
    if not errors:
        return {"count": 0, "median": None, "p90": None, "max": None, "over_10": 0, "share_over_10": None}
    e = np.asarray(errors, dtype=np.float64)
    over = int((e > WRONG_DEG).sum())
    return {"count": len(e), "median": round(float(np.median(e)), 2), "p90": round(float(np.percentile(e, 90)), 2),
            "max": round(float(e.max()), 2), "over_10": over, "share_over_10": round(over / len(e), 3)}


def summarise(rows: Sequence[dict]) -> dict:
    """Error statistics of all, unflagged and flagged rows (count, median, p90, max, how many off by > 10°)."""
    return {"all": _stats([r["abs_error"] for r in rows]),
            "unflagged": _stats([r["abs_error"] for r in rows if not r["uncertain"]]),
            "flagged": _stats([r["abs_error"] for r in rows if r["uncertain"]])}


def markdown_table(settings: dict[str, dict]) -> str:
    """One row per setting: the statistics of :func:`summarise`."""
    lines = ["| setting | n | median ° | p90 ° | max ° | > 10° | unflagged n | unflagged max ° | unflagged > 10° | "
             "flagged n | flagged > 10° |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(value: object) -> str:
        return "–" if value is None else str(value)

    for name, s in settings.items():
        a, u, f = s["all"], s["unflagged"], s["flagged"]
        lines.append(f"| {name} | {a['count']} | {fmt(a['median'])} | {fmt(a['p90'])} | {fmt(a['max'])} | "
                     f"{a['over_10']} | {u['count']} | {fmt(u['max'])} | {u['over_10']} | {f['count']} | "
                     f"{f['over_10']} |")
    return "\n".join(lines)
