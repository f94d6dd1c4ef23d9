"""The weights seen from the HTTP API: list them, fetch them as one download job with progress, cancel it.

    GET    /v1/weights                 every file: state, sizes, checksum status, source, licence (?verify=true hashes
                                       the files not hashed yet, about a minute for 15 GB)
    POST   /v1/weights/download        JSON {"files": [names]?, "token": "..."?} → 202 the new download's progress
    GET    /v1/weights/download        progress of the running (or last) download: bytes, rate, ETA, current file
    DELETE /v1/weights/download        cancel it; the partial file is kept and the next POST resumes with HTTP Range
    POST   /v1/weights/import          JSON {"path": "..."} → 202: take the files of a One-2-3-45 checkout (or a folder
                                       of them) on the server's own disk: verify, then hard-link/reflink/copy them in;
                                       only from the server's own machine (a loopback client)
    GET    /v1/weights/import          progress of the running (or last) task, with each file's outcome
    DELETE /v1/weights/import          cancel it (nothing half-imported stays)

The server starts without weights. :class:`WeightsManager` tells ``/v1/health`` what is missing, refuses jobs while
a file the preset needs is absent (503 ``missing_weights`` whose fix is the download endpoint), and when a download
completes it tells the job manager, whose next job then loads the models. One task (a download or an import) runs at
a time (a second POST of either is 409 ``conflict``), and ``GET`` of either route shows it (``operation`` says which).
An import runs as a task rather than a request because hashing 18 GB takes minutes. Before a download starts, the
free space of the weights folder's disk is checked against what is left to fetch (507 ``storage`` naming both).
``HF_ENDPOINT`` (a mirror), ``HF_TOKEN`` (or the request's token, sent as ``Authorization: Bearer`` and never stored
or echoed) and ``HF_HUB_OFFLINE=1`` (503 ``offline``) are read at each request, so a server started before they were
set honours them without a restart. The bytes themselves go through
:func:`server.common.weights.download`, the one way this project fetches a file.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from server.common import weights
from server.common.errors import BadInputError, CancelledError, One2345Error, only_query
from server.common.net import is_loopback
from server.service.jobs import ApiError, error_dict, now_iso
from server.service.schemas import documented_errors

log = logging.getLogger(__name__)

DOWNLOAD_ENDPOINT = "POST /v1/weights/download"
PRESET_REQUIRES: dict[str, tuple[str, ...]] = {"paper": tuple(w.name for w in weights.WEIGHT_FILES if w.required)}
"""Weight files each preset cannot load without; a preset not listed (``tiny``) needs none."""


@dataclass(frozen=True)
class WeightsConfig:
    """Where the weights live and what the server's preset needs of them."""

    weights_dir: Path | None = None
    """The weights folder; None: ``$ONE2345_WEIGHTS`` or ``~/.cache/one2345/weights``."""
    required: tuple[str, ...] = PRESET_REQUIRES["paper"]
    """Files without which no job can run (:data:`PRESET_REQUIRES` of the preset)."""
    endpoint: str | None = None
    """Hub base URL; None: ``HF_ENDPOINT`` read at each download, else https://huggingface.co."""
    rate_window_s: float = 5.0
    """The transfer rate is the average over this many seconds (a stalled transfer drops to 0 within it)."""
    cancel_wait_s: float = 5.0
    """How long DELETE waits for the transfer to stop, so the answer usually says "cancelled"."""

    @classmethod
    def for_preset(cls, preset: str, weights_dir: Path | None = None) -> WeightsConfig:
        return cls(weights_dir=weights_dir, required=PRESET_REQUIRES.get(preset, ()))


@dataclass
class _Download:
    """The single download job; mutated under :attr:`WeightsManager.lock`."""

    state: str = "idle"
    operation: str = "download"
    """download | import"""
    files: list[str] = field(default_factory=list)
    current_file: str | None = None
    phase: str | None = None
    bytes_done: int = 0
    bytes_total: int = 0
    resumed_bytes: int = 0
    """Bytes already on disk (partial files) when it started."""
    transferred: int = 0
    files_done: int = 0
    started: str | None = None
    finished: str | None = None
    error: dict[str, Any] | None = None
    hashed: int = 0
    """Bytes of the current file hashed so far (phases checking and verifying)."""
    imported: list[dict[str, Any]] | None = None
    """An import's outcome per file, once it has finished."""
    started_at: float = 0.0
    samples: deque[tuple[float, int]] = field(default_factory=deque)
    """(monotonic time, bytes transferred) of recent progress reports, for the rate."""
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


# -- response schemas -------------------------------------------------------------------------------------------------


class WeightFileInfo(BaseModel):
    name: str = Field(description="short name (sam, zero123-xl, loftr, reconstruction)")
    filename: str = Field(description="path inside the hub repo and under the weights folder")
    purpose: str
    required: bool = Field(description="the preset cannot run without it (others have weight-free fallbacks)")
    licence: str = Field(description="licence of the project the file comes from, as far as it is known")
    source: str = Field(description="the URL it is fetched from (HF_ENDPOINT honoured)")
    state: str = Field(description="present | partial | missing | corrupt (damaged: wrong size or SHA-256; a "
                                   "download fetches it again)")
    bytes_on_disk: int = Field(description="size of the file, or of its partial download")
    expected_bytes: int
    size_exact: bool = Field(description="expected_bytes is the exact size (else a rough one)")
    checksum: str | None = Field(description="verified | mismatch | unchecked | unavailable; null when absent")
    problem: str | None = Field(description="why the file is corrupt")


class ImportOutcome(BaseModel):
    name: str
    outcome: str = Field(description="imported | already present | damaged (refused) | not found")
    how: str | None = Field(description="for imported: hard link | reflink | copy")
    source: str | None = Field(description="the file used, relative to the folder imported from")
    checksum: str | None = Field(description="verified | unavailable (no reference SHA-256 known) | mismatch")
    detail: str | None = Field(description="why it was refused, or where it was looked for")


class DownloadStatus(BaseModel):
    state: str = Field(description="idle (none yet) | running | done | failed | cancelled")
    operation: str = Field("download", description="download | import: the weights folder's one task")
    files: list[str] = Field(description="the files this download fetches (an import: every file it looks for)")
    current_file: str | None
    phase: str | None = Field(description="checking (hashing a file already there) | downloading | verifying "
                                          "(hashing a finished file) | copying (an import) | done")
    hashed_bytes: int = Field(0, description="bytes of the current file hashed so far (checking, verifying)")
    imported: list[ImportOutcome] | None = Field(None, description="an import's outcome per file, once finished")
    bytes_done: int = Field(description="bytes on disk of the files being fetched (resumed bytes included)")
    bytes_total: int
    fraction: float = Field(description="bytes_done / bytes_total, 0…1")
    resumed_bytes: int = Field(description="bytes that were already on disk when it started")
    rate_bps: float | None = Field(description="bytes per second over the last seconds; null at the start")
    eta_s: float | None = Field(description="estimated seconds left; null when unknown")
    files_done: int
    started: str | None = Field(description="ISO 8601, UTC")
    finished: str | None
    error: dict[str, Any] | None = Field(description='{"kind", "message", "fix"} when failed or cancelled')


class WeightsListing(BaseModel):
    folder: str = Field(description="the server's weights folder (the home folder shown as ~)")
    ready: bool
    complete: bool
    required: list[str]
    missing: list[str]
    download_bytes: int = Field(description="bytes still to fetch for every file that is not present")
    disk_needed_bytes: int = Field(description="disk space still needed: download_bytes plus what the first model "
                                               "load writes and keeps (Zero123's 5 GB conversion)")
    disk_free_bytes: int = Field(description="free space on the weights folder's disk")
    offline: bool = Field(description="HF_HUB_OFFLINE is set: the server will not download")
    files: list[WeightFileInfo]
    download: DownloadStatus


class DownloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    files: list[str] | None = Field(None, description="names to fetch; default: every file that is not present")
    token: str | None = Field(None, description="hub token for this download (default: the server's HF_TOKEN); "
                                                "never stored or echoed")


class ImportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="a folder on the server's disk: an official One-2-3-45 checkout, or a folder "
                                  "holding the weight files", min_length=1, max_length=4096)


# -- the manager ------------------------------------------------------------------------------------------------------


def _missing(states: list[weights.FileState]) -> list[str]:
    """Names of the files not present, leaving out the on-demand ones (the text-to-image model is fetched on first
    text use, so its absence neither blocks nor makes the image pipeline incomplete; ``files`` still lists it)."""
    return [s.name for s in states if s.state != "present" and not weights.weight_file(s.name).on_demand]


class WeightsManager:
    """The weights folder of a server and its one download job."""

    def __init__(self, config: WeightsConfig | None = None) -> None:
        self.config = config or WeightsConfig()
        for name in self.config.required:
            weights.weight_file(name)
        self.lock = threading.Lock()
        self._download = _Download()
        self._listeners: list[Callable[[], None]] = []

    @property
    def root(self) -> Path:
        configured = self.config.weights_dir
        return Path(configured).expanduser() if configured is not None else weights.default_weights_dir()

    def on_complete(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (from the download's thread) each time a download finishes with every file in place."""
        self._listeners.append(listener)

    # -- queries ---------------------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """What ``/v1/health`` says of the weights: a few ``stat`` calls, never a hash."""
        missing = _missing(weights.inspect_weights(self.root))
        required_missing = [n for n in missing if n in self.config.required]
        with self.lock:
            downloading = self._download.state == "running"
        return {"ready": not required_missing, "complete": not missing, "missing": missing,
                "required_missing": required_missing, "downloading": downloading}

    def listing(self, verify: bool = False) -> dict[str, Any]:
        """What ``GET /v1/weights`` answers. ``verify`` hashes the present files not hashed yet (slow)."""
        root = self.root
        states = weights.inspect_weights(root, verify=verify, endpoint=self.config.endpoint)
        missing = _missing(states)
        return {"folder": _home_as_tilde(root), "ready": not any(n in self.config.required for n in missing),
                "complete": not missing, "required": list(self.config.required), "missing": missing,
                "download_bytes": weights.missing_bytes(states),
                "disk_needed_bytes": weights.disk_needed_bytes(states), "disk_free_bytes": _free_bytes(root),
                "offline": weights.env_offline(), "files": [s.to_json() for s in states],
                "download": self.progress()}

    def progress(self) -> dict[str, Any]:
        """The running (or last) download's progress."""
        with self.lock:
            d = self._download
            rate = self._rate(d, time.monotonic()) if d.state == "running" else None
            left = d.bytes_total - d.bytes_done
            eta: float | None = None
            if d.state == "done":
                eta = 0.0
            elif rate:
                eta = round(left / rate, 1)
            return {"state": d.state, "operation": d.operation, "files": list(d.files),
                    "current_file": d.current_file, "phase": d.phase, "hashed_bytes": d.hashed,
                    "imported": d.imported, "bytes_done": d.bytes_done, "bytes_total": d.bytes_total,
                    "fraction": round(d.bytes_done / d.bytes_total, 4) if d.bytes_total else float(d.state == "done"),
                    "resumed_bytes": d.resumed_bytes, "rate_bps": None if rate is None else round(rate, 1),
                    "eta_s": eta, "files_done": d.files_done, "started": d.started, "finished": d.finished,
                    "error": d.error}

    def require_ready(self) -> None:
        """Raise ApiError ``missing_weights`` (503) when a file the preset needs is not present: the message names
        them, the fix is the download endpoint; while a download runs, Retry-After is its ETA."""
        if not self.config.required:
            return
        states = weights.inspect_weights(self.root, names=self.config.required)
        absent = [s for s in states if s.state != "present"]
        if not absent:
            return
        listing = weights.describe_states(absent)
        status = self.progress()
        headers: dict[str, str] = {}
        if status["state"] == "running":
            headers["Retry-After"] = str(max(1, round(status["eta_s"] or 30)))
            fix = "a download is running: wait for it (GET /v1/weights/download shows its progress)"
        else:
            command = weights.download_command([s.name for s in absent], self.config.weights_dir)
            fix = (f"download them: {DOWNLOAD_ENDPOINT} (in Blender: Preferences → Add-ons → One2345 → Weights → "
                   f"Download), or run `{self._public(command)}` where the server runs")
        raise ApiError("missing_weights", f"the model weights are not all present: {listing}", fix=fix,
                       headers=headers)

    # -- commands --------------------------------------------------------------------------------------------------

    def start(self, files: list[str] | None = None, token: str | None = None) -> dict[str, Any]:
        """Start the download of ``files`` (default: every file not present); returns its progress.

        Raises:
            BadInputError: an unknown file name or a token an HTTP header cannot carry.
            ApiError: ``conflict`` while another download runs; ``offline`` under HF_HUB_OFFLINE.
            StorageError: the disk lacks the space still needed (nothing is started).
        """
        names = list(dict.fromkeys(weights.expand_names(files))) if files else None
        if token is not None and (not token or not all("!" <= c <= "~" for c in token)):
            raise BadInputError("the token must be printable ASCII without spaces (it is sent in an HTTP header)")
        root = self.root
        with self.lock:
            if self._download.state == "running":
                raise ApiError("conflict", f"a download of {', '.join(self._download.files)} is already running",
                               fix="watch it with GET /v1/weights/download, or cancel it with DELETE "
                                   "/v1/weights/download")
            states = weights.inspect_weights(root, names=names)
            todo = [s for s in states if s.state != "present"]
            if todo and weights.env_offline():
                raise ApiError("offline", "the server runs offline (HF_HUB_OFFLINE=1), so it cannot download "
                                          f"{', '.join(s.name for s in todo)}",
                               fix="restart the server without HF_HUB_OFFLINE, or copy the files into its weights "
                                   "folder under the names GET /v1/weights lists")
            # A first estimate from the table, so that a full disk is refused now; the download checks again with
            # the hub's exact sizes before any byte moves.
            weights.check_free_space(root, weights.missing_bytes(todo)
                                     + sum(weights.weight_file(s.name).derived_bytes for s in todo))
            d = self._download = _Download(
                state="running", files=[s.name for s in todo], phase="checking",
                bytes_total=sum(s.expected_bytes for s in todo),
                bytes_done=sum(s.bytes_on_disk for s in todo if s.state == "partial"), started=now_iso(),
                started_at=time.monotonic())
            d.resumed_bytes = d.bytes_done
            if not todo:
                self._finish(d, "done", None)
            else:
                d.thread = threading.Thread(target=self._run, args=(d, token), name="one2345-weights", daemon=True)
                d.thread.start()
        if not todo:
            self._notify()
        log.info("weights download of %s started", ", ".join(d.files) or "nothing (all present)")
        return self.progress()

    def start_import(self, path: str) -> dict[str, Any]:
        """Start importing the weight files under ``path`` (a folder on this machine); returns the task's progress.

        Raises:
            BadInputError: ``path`` is not a folder.
            ApiError: ``conflict`` while another download or import runs.
        """
        source = Path(path).expanduser()
        if not source.is_dir():
            raise BadInputError(f"{path!r} is not a folder on the server's machine; give the folder of an official "
                                "One-2-3-45 checkout, or a folder holding the weight files")
        names = [w.name for w in weights.WEIGHT_FILES]
        with self.lock:
            if self._download.state == "running":
                raise ApiError("conflict", f"a weights {self._download.operation} is already running",
                               fix="watch it with GET /v1/weights/import, or cancel it with DELETE "
                                   "/v1/weights/import")
            d = self._download = _Download(state="running", operation="import", files=names, phase="checking",
                                           started=now_iso(), started_at=time.monotonic())
            d.thread = threading.Thread(target=self._run_import, args=(d, source), name="one2345-weights-import",
                                        daemon=True)
            d.thread.start()
        log.info("weights import started")
        return self.progress()

    def cancel(self) -> dict[str, Any]:
        """Cancel the running download (its partial file stays for a resume); ApiError ``conflict`` when none
        runs."""
        with self.lock:
            d = self._download
            if d.state != "running":
                raise ApiError("conflict", f"no download or import is running (the last one is {d.state})",
                               fix=f"start one with {DOWNLOAD_ENDPOINT}")
            d.cancel.set()
            thread = d.thread
        if thread is not None:
            thread.join(self.config.cancel_wait_s)
        return self.progress()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel a running download and wait for its thread (server shutdown)."""
        with self.lock:
            d = self._download
            d.cancel.set()
            thread = d.thread
        if thread is not None:
            thread.join(timeout)

    # -- internals -------------------------------------------------------------------------------------------------

    def _run(self, d: _Download, token: str | None) -> None:
        error: dict[str, Any] | None = None
        try:
            weights.download(d.files, self.root, endpoint=self.config.endpoint, progress=False, token=token,
                             on_progress=lambda p: self._on_progress(d, p), should_cancel=d.cancel.is_set)
        except CancelledError:
            error = error_dict("cancelled", "the download was cancelled; the partial file is kept",
                               f"{DOWNLOAD_ENDPOINT} again resumes where it stopped")
        except One2345Error as e:
            error = error_dict(e.kind, self._public(e.message), e.fix and self._public(e.fix))
        except Exception as e:  # a bug: the download fails, the server lives on
            log.exception("weights download failed")
            error = error_dict("internal", self._public(f"{type(e).__name__}: {e}"), "see the server's log (stderr)")
        with self.lock:
            state = "done" if error is None else "cancelled" if error["kind"] == "cancelled" else "failed"
            self._finish(d, state, error)
        log.info("weights download %s%s", d.state, f": {error['message']}" if error else "")
        if error is None:
            self._notify()

    def _run_import(self, d: _Download, source: Path) -> None:
        error: dict[str, Any] | None = None
        results: list[weights.ImportResult] = []
        try:
            results = weights.import_weights(source, self.root, on_progress=lambda p: self._on_progress(d, p),
                                             should_cancel=d.cancel.is_set)
        except CancelledError:
            error = error_dict("cancelled", "the import was cancelled; nothing half-imported was kept",
                               "POST /v1/weights/import again")
        except One2345Error as e:
            error = error_dict(e.kind, self._public(e.message), e.fix and self._public(e.fix))
        except OSError as e:  # the folder imported from, or the weights folder's disk
            error = error_dict("storage", self._public(f"{e.strerror or e}: {e.filename or ''}"),
                               "check the folder's permissions and the disk")
        except Exception as e:  # a bug: the import fails, the server lives on
            log.exception("weights import failed")
            error = error_dict("internal", self._public(f"{type(e).__name__}: {e}"), "see the server's log (stderr)")
        with self.lock:
            d.imported = [r.to_json() for r in results] if error is None else None
            state = "done" if error is None else "cancelled" if error["kind"] == "cancelled" else "failed"
            self._finish(d, state, error)
        log.info("weights import %s%s", d.state, f": {error['message']}" if error else
                 ": " + ", ".join(f"{r.name} {r.outcome}" for r in results))
        if any(r.outcome == "imported" for r in results):
            self._notify()

    def _on_progress(self, d: _Download, p: weights.DownloadProgress) -> None:
        now = time.monotonic()
        with self.lock:
            d.hashed = p.hashed
            if p.phase == "checking" and d.operation == "download":  # hashing a file already there: no bytes move
                d.current_file, d.phase = p.file, p.phase
                return
            if p.phase == "downloading" and d.phase == "checking":
                d.resumed_bytes = p.done - p.transferred  # the hub's exact sizes are known now
            d.current_file, d.phase = p.file, p.phase
            d.bytes_done, d.bytes_total, d.transferred, d.files_done = p.done, p.total, p.transferred, p.files_done
            d.samples.append((now, p.transferred))
            horizon = now - 2 * self.config.rate_window_s
            while len(d.samples) > 2 and d.samples[1][0] < horizon:
                d.samples.popleft()

    def _rate(self, d: _Download, now: float) -> float | None:
        """Bytes per second over the last :attr:`WeightsConfig.rate_window_s` (lock held); None in the first
        second."""
        elapsed = now - d.started_at
        if elapsed < 1.0:
            return None
        since = max(d.started_at, now - self.config.rate_window_s)
        before = [n for t, n in d.samples if t <= since]
        base = before[-1] if before else 0
        return max(d.transferred - base, 0) / (now - since)

    def _finish(self, d: _Download, state: str, error: dict[str, Any] | None) -> None:
        d.state, d.error, d.finished = state, error, now_iso()
        if state == "done":
            d.phase, d.current_file, d.bytes_done = "done", None, max(d.bytes_done, d.bytes_total)
            d.files_done = len(d.files)

    def _notify(self) -> None:
        for listener in self._listeners:
            try:
                listener()
            except Exception:
                log.exception("a weights listener failed")

    def _public(self, text: str) -> str:
        """``text`` with the weights folder's path removed (files are named inside it) and home shown as ``~``."""
        for root, inside, itself in ((self.root, "", "the weights folder"), (Path.home(), "~/", "~")):
            text = text.replace(f"{root}{os.sep}", inside).replace(str(root), itself)
        return text


def _home_as_tilde(path: Path) -> str:
    try:
        return "~/" + path.absolute().relative_to(Path.home()).as_posix()
    except ValueError:
        return str(path)


def _free_bytes(root: Path) -> int:
    probe = root.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _is_loopback_client(request: Request) -> bool:
    """Whether the request comes from this machine (an import names a path on the server's disk)."""
    return is_loopback(request.client.host if request.client is not None else "")


_ERROR_DESCRIPTIONS = {
    400: "an unknown file name, a token an HTTP header cannot carry, an import path that is not a folder, or an "
         "import from another machine",
    401: "missing or wrong bearer token",
    409: "a download or import is already running (POST), or none is (DELETE)",
    503: "offline: the server runs with HF_HUB_OFFLINE=1",
    507: "storage: the weights folder's disk lacks the space still needed (the message names both sizes)",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return documented_errors(*codes, descriptions=_ERROR_DESCRIPTIONS)


def weights_router(manager: WeightsManager) -> APIRouter:
    """The ``/weights`` routes (mount under ``/v1``, behind the token)."""
    from starlette.concurrency import run_in_threadpool

    router = APIRouter(prefix="/weights", tags=["weights"])

    @router.get("", response_model=WeightsListing, summary="Every weight file: state, size, checksum, licence",
                responses=_errors(401))
    async def list_weights(request: Request, verify: bool = False) -> dict[str, Any]:
        only_query(request.query_params, "verify")
        return await run_in_threadpool(manager.listing, verify)

    @router.post("/download", status_code=202, response_model=DownloadStatus,
                 summary="Download the weight files that are not present (one download at a time)",
                 responses=_errors(400, 401, 409, 503, 507))
    async def start_download(body: DownloadRequest | None = None) -> dict[str, Any]:
        body = body or DownloadRequest()
        return await run_in_threadpool(manager.start, body.files, body.token)

    @router.get("/download", response_model=DownloadStatus, summary="Progress of the running or last download",
                responses=_errors(401))
    def download_progress() -> dict[str, Any]:
        return manager.progress()

    @router.delete("/download", response_model=DownloadStatus,
                   summary="Cancel the running download (the partial file is kept; the next start resumes)",
                   responses=_errors(401, 409))
    async def cancel_download() -> dict[str, Any]:
        return await run_in_threadpool(manager.cancel)

    @router.post("/import", status_code=202, response_model=DownloadStatus,
                 summary="Import the weight files of a One-2-3-45 checkout on the server's disk (verify, then link "
                         "or copy them); from the server's own machine only",
                 responses=_errors(400, 401, 409))
    async def start_import(request: Request, body: ImportRequest) -> dict[str, Any]:
        if not _is_loopback_client(request):
            raise BadInputError("an import reads a folder on the server's disk, so it is accepted only from the "
                                "server's own machine", fix="run `one2345 weights import PATH` where the server runs, "
                                                            "or download the weights (POST /v1/weights/download)")
        return await run_in_threadpool(manager.start_import, body.path)

    @router.get("/import", response_model=DownloadStatus,
                summary="Progress of the running or last task (an import: each file's outcome when done)",
                responses=_errors(401))
    def import_progress() -> dict[str, Any]:
        return manager.progress()

    @router.delete("/import", response_model=DownloadStatus,
                   summary="Cancel the running import (nothing half-imported stays)", responses=_errors(401, 409))
    async def cancel_import() -> dict[str, Any]:
        return await run_in_threadpool(manager.cancel)

    return router
