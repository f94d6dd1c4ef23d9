"""Text to 3D, the add-on's ground: the images job (``POST /v1/images``: a prompt → candidate pictures), the sets of
candidates this session made, and whether the server's text-to-image model is there.

The images job follows the server's job like a generation (progress, cancel, a server that died), then downloads
the candidates into the add-on's folder: ``<user dir>/candidates/<images job id>/<i>.png``. *Use This* then runs an
ordinary :class:`jobs.GenerateJob` whose input is the candidate by reference (``image_of``/``index``), so the mesh's
recipe records the prompt. Standard library only (no ``bpy``), tested without Blender.

The sets are kept, newest first, until the artist clears them: *More* adds a set rather than replacing the last, so
a picture seen earlier can still be picked after a few more tries (nothing made is lost; the files stay on disk).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import server_state
from .client import Client, ServerError
from .errors import JobError, JobFailed
from .jobs import POLL_INTERVAL_S, GenerateJob, Progress
from .server_process import Connection

TEXT_GROUP = "text-to-image"
"""The server's weights group of the text-to-image model: its files are listed as ``text-to-image/<part>``."""
MAX_COUNT = 8
"""Candidates per set (the server's limit)."""
MAX_SETS = 6
"""Sets the panel keeps; older ones drop out of the panel (their files stay in the candidates folder)."""


@dataclass(frozen=True)
class CandidateSet:
    """The candidates of one images job, downloaded."""

    job_id: str
    """The server's images job: *Use This* names it as ``image_of``."""
    prompt: str
    negative_prompt: str | None
    seed: int
    """The set's seed (candidate i comes from seed + i)."""
    paths: tuple[Path, ...]
    """The candidate PNGs, in the server's order (index = position)."""


def candidate_set(status: dict[str, Any], paths: list[Path]) -> CandidateSet:
    """The set of a done images job's status (its ``images`` request and ``result``) and its downloaded files."""
    request = status.get("images") or {}
    return CandidateSet(job_id=str(status["id"]), prompt=str(request.get("prompt") or ""),
                        negative_prompt=request.get("negative_prompt"),
                        seed=int((status.get("result") or {}).get("seed") or request.get("seed") or 0),
                        paths=tuple(paths))


def download_candidates(client: Client, status: dict[str, Any], folder: Path) -> CandidateSet:
    """Download a done images job's candidates into ``folder/<job id>/`` (worker thread)."""
    result = status.get("result") or {}
    if status.get("kind") != "images" or not result.get("candidates"):
        raise JobFailed(JobError("bad_input", f"Job {str(status.get('id'))[:8]} has no candidate images (it is a "
                                              f"{status.get('kind') or 'mesh'} job in state {status.get('state')})."))
    target = Path(folder) / str(status["id"])
    paths = [client.download(c["url"], target / c["name"]) for c in result["candidates"]]
    return candidate_set(status, paths)


class ImagesJob(GenerateJob):
    """A prompt → candidate pictures on the server: connect, ``POST /v1/images``, follow it (progress, cancel),
    download the candidates. Its result is a :class:`CandidateSet`.

    A server without the text model's weights answers ``missing_weights``; that becomes ``missing_text_weights``,
    whose fix-it button downloads just those files (not the image-to-3D weights).

    Args:
        request: ``{"prompt", "count", "seed" (None: the server draws one), "negative_prompt"}``.
        folder: the add-on's candidates folder (a sub-folder per images job).
        connect, server_exit_code, poll_interval: as for :class:`jobs.GenerateJob`.
    """

    def __init__(self, request: dict[str, Any], folder: Path, connect: Callable[[], Connection],
                 server_exit_code: Callable[[], int | None] = lambda: None,
                 poll_interval: float = POLL_INTERVAL_S) -> None:
        super().__init__(None, {}, folder, connect, server_exit_code, mesh_name="images",
                         poll_interval=poll_interval)
        self.name = "image generation"
        self.request = dict(request)

    def work(self) -> CandidateSet:
        """Run the images job on the worker thread."""
        _, client = self._open()
        self.post("progress", Progress(stage="Asking for images"))
        try:
            self.server_job_id = self._submit(client)["id"]
            status = self._follow(client, self.server_job_id)
        except ServerError as exc:
            raise JobFailed(_text_error(JobError.from_exception(exc))) from exc
        except JobFailed as exc:
            raise JobFailed(_text_error(exc.error)) from exc
        return download_candidates(client, status, self.job_dir)

    def _submit(self, client: Client) -> dict[str, Any]:
        while True:
            try:
                return client.submit_images(self.request["prompt"], self.request.get("count", 4),
                                            self.request.get("seed"), self.request.get("negative_prompt"))
            except ServerError as exc:
                if exc.kind != "queue_full":
                    raise
                self.post("progress", Progress(stage="Server busy, waiting in line"))
                self.sleep(min(exc.retry_after or 5.0, 30.0))
                self.check_cancelled()


def _text_error(error: JobError) -> JobError:
    """A missing-weights error of the text step gets its own kind (and fix-it button): the text model's files."""
    if error.kind != "missing_weights":
        return error
    return JobError("missing_text_weights", error.message,
                    "download the text-to-image model in Preferences > Add-ons > One2345 > Model Weights")


# -- the text model's weights ------------------------------------------------------------------------------------

def text_files(listing: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The text-to-image model's entries of a ``GET /v1/weights`` listing (optional, fetched on demand)."""
    return [f for f in (listing or {}).get("files") or [] if str(f.get("name", "")).startswith(f"{TEXT_GROUP}/")]


def text_missing(listing: dict[str, Any] | None) -> tuple[list[str], int]:
    """(names of the text model's files that are not present, bytes still to download for them)."""
    names, size = [], 0
    for f in text_files(listing):
        if f.get("state") == "present":
            continue
        names.append(str(f["name"]))
        left = int(f.get("expected_bytes") or 0) - (int(f.get("bytes_on_disk") or 0) if f.get("state") == "partial"
                                                    else 0)
        size += max(left, 0)
    return names, size


def text_block_reason(health: dict[str, Any] | None, listing: dict[str, Any] | None) -> str | None:
    """Why *Generate Images* cannot run as far as the add-on knows, or None. A ``tiny`` server's text model needs no
    weights; before the first weights listing nothing is known, and the server's own answer will say."""
    if (health or {}).get("preset") == "tiny" or listing is None:
        return None
    if not text_files(listing):
        return "This server has no text-to-image model (an older version): update the server"
    names, size = text_missing(listing)
    if not names:
        return None
    return (f"The text-to-image model is not downloaded ({len(names)} files, "
            f"{server_state.human_bytes(size)}): download it in Preferences > Add-ons > One2345 > Model Weights")


# -- this session's sets (main thread only) ------------------------------------------------------------------

_SETS: list[CandidateSet] = []


def sets() -> list[CandidateSet]:
    """The candidate sets shown in the panel, newest first."""
    return list(_SETS)


def add_set(candidates: CandidateSet) -> None:
    """Show a new set first (the same images job again replaces its old entry); the oldest beyond
    :data:`MAX_SETS` leave the panel."""
    _SETS[:] = [candidates, *(s for s in _SETS if s.job_id != candidates.job_id)][:MAX_SETS]


def find_set(job_id: str) -> CandidateSet | None:
    """The shown set of an images job, if any."""
    return next((s for s in _SETS if s.job_id == job_id), None)


def clear_sets() -> None:
    """Take every set off the panel (the files stay on disk, the jobs on the server)."""
    _SETS.clear()
