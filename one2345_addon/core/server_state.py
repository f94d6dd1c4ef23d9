"""What the add-on last heard from the server: health, the weights listing, the weights download, the history page.

The panels draw from here and ``poll()`` decides from here (neither may wait for the network); tasks on worker
threads replace whole values, never mutate them, so a draw on the main thread sees either the old or the new answer.
Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PAPER_DOWNLOAD_BYTES = 18_130_550_879
"""What the paper preset's weights add up to (the server's table), for the button before the first listing."""


@dataclass
class ServerState:
    """The last answers (None until asked)."""

    health: dict[str, Any] | None = None
    """``GET /v1/health``."""
    weights: dict[str, Any] | None = None
    """``GET /v1/weights``: the folder and every file's state."""
    download: dict[str, Any] | None = None
    """``GET /v1/weights/download``: the running or last download."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """``GET /v1/jobs`` pages fetched so far, newest first (job statuses)."""
    history_next: str | None = None
    """The ``after`` of the next history page, or None when the last one is loaded."""
    history_total: int = 0
    jobs_dir: str | None = None
    """The local server's jobs folder (from its ready line), for "Open Folder" in History."""

    def missing_bytes(self) -> int:
        """Bytes still to download: from the listing when there is one, else the paper preset's total."""
        if self.weights is None:
            return PAPER_DOWNLOAD_BYTES
        return int(self.weights.get("download_bytes") or 0)

    def device_line(self) -> str | None:
        """"NVIDIA H200 · 131.2 GB free", "CPU — very slow", or None before the first health answer."""
        info = (self.health or {}).get("device_info")
        if not info:
            return None
        if info.get("kind") != "cuda":
            return f"CPU ({info.get('name') or 'unknown'}) — very slow"
        free = info.get("memory_free_bytes")
        return f"{info.get('name')} · {human_bytes(free)} free" if free is not None else str(info.get("name"))

    def preflight(self) -> list[tuple[bool, str]]:
        """The pre-flight checks before Generate, as (ok, text): reachable, weights, device memory, time."""
        health = self.health
        if health is None:
            return [(True, "Server not asked yet: it starts with the first job (or Check Server)")]
        checks = [(True, f"Server {health.get('version', '?')} reachable ({health.get('preset')} models)")]
        weights = health.get("weights") or {}
        if weights and not weights.get("ready", True):
            checks.append((False, f"Weights missing: {', '.join(weights.get('required_missing') or [])} "
                                  f"({human_bytes(self.missing_bytes())} to download)"))
        elif weights:
            checks.append((True, "Weights complete" if weights.get("complete") else "Weights: what this preset "
                                                                                     "needs is present"))
        device = self.device_line()
        if device:
            info, needs = health.get("device_info") or {}, health.get("run_needs_bytes")
            free = info.get("memory_free_bytes")
            enough = free is None or needs is None or free >= needs or bool(health.get("models_loaded"))
            need_text = f", a run needs ≈ {human_bytes(needs)}" if needs and info.get("kind") == "cuda" else ""
            checks.append((enough and info.get("kind") == "cuda", f"{device}{need_text}"))
        recent = health.get("recent_job_s")
        checks.append((True, f"≈ {format_seconds(recent)} per mesh (recent runs)" if recent else
                       "Time: unknown until the first run (the first also loads the models)"))
        return checks


STATE = ServerState()


def human_bytes(n: float | None) -> str:
    """``18130550879`` → ``"18.1 GB"`` (decimal units, as disks are sold)."""
    if n is None:
        return "?"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def format_seconds(s: float | None) -> str:
    """``75`` → ``"1 min 15 s"``; ``None`` → ``"?"``."""
    if s is None:
        return "?"
    if s < 90:
        return f"{s:.0f} s"
    minutes, seconds = divmod(round(s), 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min {seconds} s"
