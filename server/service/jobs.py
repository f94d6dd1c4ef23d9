"""Jobs of the inference server: a store that lives on disk and one worker thread that owns the GPU.

Every job is a folder under the jobs directory, named by its id (32 lowercase hex digits)::

    <jobs_dir>/<id>/input.<ext>    the uploaded image, byte for byte
    <jobs_dir>/<id>/status.json    the job's state (what GET /v1/jobs/<id> answers, plus internal fields)
    <jobs_dir>/<id>/log.txt        what happened: options, stages, the outcome, tracebacks
    <jobs_dir>/<id>/run/           the pipeline's run folder (input_256.png, views/, mesh.<fmt>, meta.json)

A re-mesh job (``POST /v1/jobs/<id>/remesh``) starts with a copy of its source's input, views and meta.json, and
runs only reconstruction, the asset stage and export; the source job is never changed.

Review (the option ``review``): the job stops after the 8 stage-1 views in the state ``review`` — nothing of it on
the GPU, the worker free for other jobs — until ``POST /v1/jobs/<id>/reroll`` (queued again, back in review after),
``POST /v1/jobs/<id>/continue`` (queued for the rest of the run) or the review timeout (state ``expired``). Each step
is a task of the same worker queue, run from the job's files alone, so a review survives a restart.

A new job's folder is filled under a hidden temporary name and renamed into place, and ``status.json`` is always
replaced atomically (temporary file + ``os.replace``), so a folder named like an id always holds a readable status.
The worker keeps the pipeline loaded between jobs and runs one job at a time from a bounded FIFO queue. A client that
disconnects loses nothing: the job runs on and its result stays on disk until the job is deleted. On start, the store
reads every job folder back; jobs that were queued or running when the previous server died come back as ``failed``
(kind ``internal``), because their run was cut short at an unknown point.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import re
import shutil
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, Protocol

import torch

from server.common.errors import CancelledError, One2345Error, storage_error
from server.common.fsutil import append_text_no_follow, open_regular_inside, write_json_atomic

log = logging.getLogger(__name__)

JOB_ID_RE = re.compile(r"[0-9a-f]{32}")
"""A job id: ``uuid4().hex``. Anything else is rejected before it can reach the filesystem."""
VIEW_NAME_RE = re.compile(r"(?:\d{1,2}(?:_\d{1,2})?|input_256)\.png")
"""Names of preview images: stage-1 views ``<i>.png``, nearby views ``<i>_<j>.png`` and ``input_256.png``."""
STATES = ("queued", "running", "review", "done", "failed", "cancelled", "expired")
FINISHED = frozenset({"done", "failed", "cancelled", "expired"})
MEDIA_TYPES = {"glb": "model/gltf-binary", "ply": "application/octet-stream", "obj": "text/plain"}
INPUT_FILE_RE = re.compile(r"input\.(?:png|jpg|webp|bmp|tif|gif)")
"""The uploaded image's name inside a job folder."""
RESULT_FILES_RE = {"mesh": re.compile(r"run/mesh\.(?:ply|glb|obj)"), "meta": re.compile(r"run/meta\.json")}
"""What a done job's ``result`` may name. status.json is read back from disk, so these are checked on load: a record
edited to point elsewhere (``/etc/passwd``, ``../other``) is refused rather than served."""
REMESH_OPTIONS = ("resolution", "target_faces", "texture_size", "format")
"""What a re-mesh may change: everything else (elevation, seed, steps…) shaped the views, which it reuses."""
_STATUS_WRITE_INTERVAL_S = 1.0
"""Progress reports arrive many times a second; status.json is rewritten at most this often (and at every stage
change), which keeps the disk quiet while a restarted server still sees recent progress."""
_ETA_MIN_FRACTION = 0.02
"""Below this overall fraction the rate estimate is mostly start-up cost, so no ETA is given."""


class ApiError(One2345Error):
    """An error of the HTTP layer with its own kind (``unauthorized``, ``not_found``, ``conflict``, ``too_large``,
    ``queue_full``, or any kind of :mod:`server.common.errors`), optional response headers (e.g. ``Retry-After``)."""

    def __init__(self, kind: str, message: str, *, fix: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message, fix=fix)
        self.kind = kind
        self.headers = headers or {}


class Pipeline(Protocol):
    """What the worker needs of :class:`server.pipeline.One2345Pipeline`."""

    device: str
    preset: str

    def models_loaded(self) -> dict[str, str]: ...

    def __call__(self, image: Any, run_dir: Any, options: Any = None, progress: Any = None,
                 should_cancel: Any = None) -> Any: ...

    def remesh(self, run_dir: Any, options: Any, progress: Any = None, should_cancel: Any = None) -> Any: ...


@dataclass(frozen=True)
class JobsConfig:
    """Limits of the job store and queue."""

    max_queue: int = 8
    """Jobs that may wait behind the running one; one more is answered 429 queue_full."""
    missing_weights_retry_s: float = 30.0
    """After loading the models failed for missing weights, new jobs are refused (503) for this long — time enough
    to fetch the weights — and then loading is tried again."""
    cancel_wait_s: float = 2.0
    """How long DELETE of a running job waits for the pipeline to stop, so the answer usually says "cancelled"."""
    review_timeout_s: float = 3600.0
    """How long a job waits in review for a re-roll or continue before it expires (its files stay)."""
    max_jobs_bytes: int | None = 20 * 2**30
    """Size limit of the jobs folder: beyond it the oldest finished jobs are deleted, never a pinned one, one that
    is queued, running or in review, nor the newest; None for no limit."""


def check_options(data: Any) -> dict[str, Any]:
    """Job options from JSON-like data → every field, validated (:meth:`server.pipeline.GenerateOptions.from_dict`),
    plus the rule of the HTTP API that a textured result is a GLB: a job's result is one file.

    Raises:
        BadInputError: an unknown field, a value out of range, or a texture in another format.
    """
    from dataclasses import asdict

    from server.common.errors import BadInputError
    from server.pipeline import GenerateOptions

    options = GenerateOptions.from_dict(data)
    if options.texture_size is not None and options.format != "glb":
        raise BadInputError(f"option format={options.format!r} cannot carry a texture over HTTP: a job's result is "
                            "one file, and a textured OBJ is three (OBJ, MTL, PNG)",
                            fix='use "format": "glb", or `one2345 generate --texture SIZE -o OUT.obj` on the command '
                                "line")
    return asdict(options)


def now_iso() -> str:
    """The current UTC time in ISO 8601 with microseconds (sortable as a string)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def error_dict(kind: str, message: str, fix: str | None = None) -> dict[str, Any]:
    """A job's ``error`` field, shaped like the HTTP error body's ``error`` object."""
    return {"kind": kind, "message": message, "fix": fix}


@dataclass
class Job:
    """One job. Mutated only under :attr:`JobManager.lock`; ``to_record`` is what status.json holds."""

    id: str
    folder: Path
    created: str
    options: dict[str, Any]
    input_file: str
    """Name of the uploaded image inside the job folder."""
    download_stem: str
    """Stem of the result's download name (the upload's file name, sanitised)."""
    state: str = "queued"
    stage: str | None = None
    step: int = 0
    total: int = 0
    fraction: float = 0.0
    elapsed_s: float = 0.0
    """Seconds the job ran, fixed when it finishes (while it runs, :meth:`elapsed` counts live); 0 while queued."""
    previews: list[str] = field(default_factory=list)
    error: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    """``format``, ``elevation``, ``vertices``, ``faces``, ``textured``, and the files ``mesh`` and ``meta``
    relative to the job folder."""
    remesh_of: str | None = None
    """The id of the job whose views this one re-meshes, or None for a generation."""
    review: dict[str, Any] | None = None
    """While paused for review (and after): the views, the elevation and its source, the re-roll seeds, the
    revision (bumped by each re-roll) and ``deadline`` (Unix time it expires)."""
    pinned: bool = False
    """Kept by the size limit's clean-up (a client has an object made from it)."""
    pending: dict[str, Any] | None = field(default=None, repr=False)
    """The task the worker runs next for this queued job: ``{"action": "reroll", "views", "seed"}`` or
    ``{"action": "continue"}``; None for the job's first task (not persisted: a queued job fails on restart)."""
    size_bytes: int = field(default=0, repr=False)
    """Bytes of the job's folder, as of its last finished task (not persisted)."""
    elapsed_before: float = field(default=0.0, repr=False)
    """Seconds the job ran in its earlier tasks (review), when the current one started (not persisted)."""
    cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    finished: threading.Event = field(default_factory=threading.Event, repr=False)
    started_at: float | None = None
    """``time.monotonic()`` when the worker started it (not persisted)."""

    _RECORD_FIELDS: ClassVar[tuple[str, ...]] = (
        "id", "created", "options", "input_file", "download_stem", "state", "stage", "step", "total", "fraction",
        "elapsed_s", "previews", "error", "result", "remesh_of", "review", "pinned")
    _OPTIONAL_FIELDS: ClassVar[tuple[str, ...]] = ("remesh_of", "review", "pinned")
    """Fields added after the first release: a status.json from before them reads back with their default."""

    def to_record(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._RECORD_FIELDS}

    @classmethod
    def from_record(cls, folder: Path, record: dict[str, Any]) -> Job:
        """A job read back from its status.json; ValueError for a record that is not one this server wrote."""
        job = cls(**{name: record[name] for name in cls._RECORD_FIELDS
                     if name in record or name not in cls._OPTIONAL_FIELDS}, folder=folder)
        if job.id != folder.name or job.state not in STATES:
            raise ValueError(f"it names job {job.id!r} in state {job.state!r}")
        if job.remesh_of is not None and not (isinstance(job.remesh_of, str) and JOB_ID_RE.fullmatch(job.remesh_of)):
            raise ValueError(f"it re-meshes {job.remesh_of!r}, which is not a job id")
        if not isinstance(job.pinned, bool) or not (job.review is None or (
                isinstance(job.review, dict) and isinstance(job.review.get("views"), list)
                and isinstance(job.review.get("deadline"), float | int))):
            raise ValueError("its review or pinned field is malformed")
        if not (isinstance(job.input_file, str) and INPUT_FILE_RE.fullmatch(job.input_file)):
            raise ValueError(f"its input file {job.input_file!r} is not input.<ext>")
        if not isinstance(job.previews, list) or not all(isinstance(n, str) and VIEW_NAME_RE.fullmatch(n)
                                                          for n in job.previews):
            raise ValueError("its previews are not view names")
        if job.result is not None:
            files_ok = isinstance(job.result, dict) and all(
                isinstance(job.result.get(key), str) and pattern.fullmatch(job.result[key])
                for key, pattern in RESULT_FILES_RE.items())
            if not files_ok or job.result.get("format") not in MEDIA_TYPES:
                raise ValueError("its result names files other than run/mesh.<format> and run/meta.json")
        return job

    def elapsed(self) -> float:
        """Seconds spent running, over all its tasks: live while running, fixed between tasks and once finished."""
        if self.state == "running" and self.started_at is not None:
            return self.elapsed_before + time.monotonic() - self.started_at
        return self.elapsed_s

    def eta(self, elapsed: float) -> float | None:
        """Seconds left, extrapolating the average rate so far: elapsed · (1 − f) / f; None while unknown."""
        if self.state == "done":
            return 0.0
        if self.state != "running" or self.fraction <= _ETA_MIN_FRACTION:
            return None
        return elapsed * (1.0 - self.fraction) / self.fraction

    def to_public(self) -> dict[str, Any]:
        """The JSON answered by ``GET /v1/jobs/<id>``."""
        base = f"/v1/jobs/{self.id}"
        elapsed = self.elapsed()
        eta = self.eta(elapsed)
        result = None
        if self.result is not None:
            result = {"url": f"{base}/result", "format": self.result["format"], "meta_url": f"{base}/meta",
                      "elevation": self.result["elevation"], "vertices": self.result["vertices"],
                      "faces": self.result["faces"],
                      "elevation_uncertain": bool(self.result.get("elevation_uncertain", False)),
                      "elevation_confidence": self.result.get("elevation_confidence"),
                      "textured": bool(self.result.get("textured", False)),
                      "texture_size": self.result.get("texture_size"),
                      "target_faces": self.result.get("target_faces")}
        return {
            "id": self.id, "state": self.state, "stage": self.stage, "step": self.step, "total": self.total,
            "fraction": self.fraction, "elapsed_s": round(elapsed, 3),
            "eta_s": None if eta is None else round(eta, 1), "created": self.created,
            "options": self.options,
            "previews": [{"name": name, "url": f"{base}/views/{name}"} for name in self.previews],
            "error": self.error, "result": result, "remesh_of": self.remesh_of, "pinned": self.pinned,
            "review": self._public_review(),
        }

    def _public_review(self) -> dict[str, Any] | None:
        if self.review is None:
            return None
        base = f"/v1/jobs/{self.id}/views"
        review = {k: v for k, v in self.review.items() if k != "deadline"}
        review["views"] = [{"name": f"{v}.png", "url": f"{base}/{v}.png"} for v in self.review["views"]]
        review["expires_in_s"] = (round(max(self.review["deadline"] - time.time(), 0.0), 1)
                                  if self.state == "review" else None)
        return review


def check_job_id(job_id: str) -> str:
    """``job_id`` if it is 32 lowercase hex digits, else ApiError not_found (an id that is not an id names no job)."""
    if not JOB_ID_RE.fullmatch(job_id):
        raise ApiError("not_found", f"no job {job_id[:80]!r}: job ids are 32 lowercase hex digits")
    return job_id


class JobManager:
    """The job store and the single worker thread that runs jobs through the pipeline.

    Args:
        jobs_dir: folder holding one sub-folder per job (created if absent).
        load_pipeline: builds the pipeline (loads the models); called once, in the worker thread unless
            :meth:`preload` was called first.
        config: queue and cancellation limits.
    """

    def __init__(self, jobs_dir: str | Path, load_pipeline: Callable[[], Pipeline],
                 config: JobsConfig | None = None) -> None:
        self.jobs_dir = Path(jobs_dir)
        self.config = config or JobsConfig()
        self._load_pipeline = load_pipeline
        self.pipeline: Pipeline | None = None
        self.lock = threading.RLock()
        self._wake = threading.Condition(self.lock)
        self._jobs: dict[str, Job] = {}
        self._queue: deque[Job] = deque()
        self._running: Job | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._load_failure: tuple[float, One2345Error] | None = None
        self._durations: deque[float] = deque(maxlen=10)
        self.preflight: Callable[[], None] | None = None
        """Run before a job is accepted while the models are not loaded; raises to refuse it (the weights
        manager's ``require_ready``: 503 missing_weights naming the download endpoint)."""
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._load_from_disk()

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def preload(self) -> Pipeline:
        """Load the models now (``--preload``) instead of on the first job. Errors propagate to the caller."""
        with self.lock:
            if self.pipeline is None:
                self.pipeline = self._load_pipeline()
            return self.pipeline

    def start(self) -> None:
        """Start the worker thread."""
        with self.lock:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._work, name="one2345-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel the running job and every queued one, and wait (up to ``timeout`` s) for the worker to end."""
        with self.lock:
            self._stopping = True
            while self._queue:
                job = self._queue.popleft()
                self._finish(job, "cancelled", error_dict("cancelled", "the server was stopped before the job ran",
                                                          "submit the image again"))
            if self._running is not None:
                self._running.cancel.set()
            self._wake.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("the running job did not stop within %.0f s; exiting anyway", timeout)
        with self.lock:
            self._thread = None

    # -- queries ----------------------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        with self.lock:
            done = sorted((j for j in self._jobs.values() if j.state == "done" and j.remesh_of is None),
                          key=lambda j: j.created)[-5:]
            seconds = sorted(j.to_public()["elapsed_s"] for j in done)
            return {"models_loaded": self.pipeline.models_loaded() if self.pipeline is not None else {},
                    "queue_length": len(self._queue),
                    "running": self._running.id if self._running is not None else None,
                    "recent_job_s": seconds[len(seconds) // 2] if seconds else None}

    def status(self, job_id: str) -> dict[str, Any]:
        with self.lock:
            return self._get(job_id).to_public()

    def list_jobs(self, limit: int | None = None, after: str | None = None) -> dict[str, Any]:
        """A page of jobs, newest first: ``{"jobs", "next", "total"}``; ``next`` is the ``after`` of the next page
        (the last id of this one), or None on the last page.

        Raises:
            BadInputError: a limit outside 1…1000.
            ApiError: not_found for an ``after`` that names no job.
        """
        from server.common.errors import BadInputError

        if limit is not None and not 1 <= limit <= 1000:
            raise BadInputError(f"limit {limit} is not allowed: an integer in [1, 1000]")
        with self.lock:
            jobs = sorted(self._jobs.values(), key=lambda j: (j.created, j.id), reverse=True)
            start = 0
            if after is not None:
                start = next((i + 1 for i, j in enumerate(jobs) if j.id == after), None)
                if start is None:
                    raise ApiError("not_found", f"no job {after[:80]!r} to page after (it may have been deleted)",
                                   fix="start again from the first page")
            end = len(jobs) if limit is None else start + limit
            page = jobs[start:end]
            return {"jobs": [job.to_public() for job in page], "total": len(jobs),
                    "next": page[-1].id if page and end < len(jobs) else None}

    # Files are opened while the lock is held: a DELETE (which takes the lock to move the folder away) then cannot
    # come between the check and the open, and the open file stays readable while the folder is removed. Nothing in
    # a job folder is trusted: links are never followed (:func:`server.common.fsutil.open_regular_inside`).

    def open_result(self, job_id: str) -> tuple[BinaryIO, str, str]:
        """(the open mesh file, its format, its download file name) of a done job; ApiError not_found / conflict
        otherwise. The caller closes the file."""
        with self.lock:
            job = self._done(job_id)
            fmt = job.result["format"]
            return self._open(job, job.result["mesh"]), fmt, f"{job.download_stem}.{fmt}"

    def open_meta(self, job_id: str) -> BinaryIO:
        """The open meta.json of a done job (the caller closes it)."""
        with self.lock:
            job = self._done(job_id)
            return self._open(job, job.result["meta"])

    def open_input(self, job_id: str) -> tuple[BinaryIO, str]:
        """The open uploaded image of a job, byte for byte, and its file name (the caller closes it)."""
        with self.lock:
            job = self._get(job_id)
            return self._open(job, job.input_file), job.input_file

    def open_view(self, job_id: str, name: str) -> BinaryIO:
        """An open preview image of the job (the caller closes it); ApiError not_found for other names or views not
        written yet."""
        with self.lock:
            job = self._get(job_id)
            if not VIEW_NAME_RE.fullmatch(name):
                raise ApiError("not_found", f"no view {name[:80]!r}: view names are <i>.png, <i>_<j>.png or "
                                            "input_256.png")
            return self._open(job, f"run/{name}" if name == "input_256.png" else f"run/views/{name}",
                              missing=f"job {job_id} has no view {name} (yet)")

    def _open(self, job: Job, relative: str, missing: str | None = None) -> BinaryIO:
        try:
            return open_regular_inside(job.folder, relative)
        except FileNotFoundError:
            raise ApiError("not_found", missing or f"the file {relative} of job {job.id} is missing from its "
                                                   "folder (or is not a plain file)") from None
        except OSError as e:
            raise storage_error(e, f"read {relative} of job {job.id}", self.jobs_dir) from None

    def retry_after_s(self) -> int:
        """Seconds a client should wait before submitting again: the expected time until a queue slot frees."""
        with self.lock:
            typical = sum(self._durations) / len(self._durations) if self._durations else 30.0
            return max(1, round(typical))

    # -- commands ---------------------------------------------------------------------------------------------------

    def submit(self, image: bytes, ext: str, download_stem: str, options: dict[str, Any]) -> dict[str, Any]:
        """Create a queued job from validated inputs; returns its public status.

        Args:
            image: the uploaded image file, byte for byte.
            ext: its file extension (``png``, ``jpg``, …) as detected from its content.
            download_stem: stem of the result's download name.
            options: validated options (``dataclasses.asdict`` of :class:`server.pipeline.GenerateOptions`).

        Raises:
            ApiError: ``queue_full`` (with Retry-After), ``missing_weights`` while a recent model load failed for
                missing weights, ``internal`` while the server is stopping.
        """
        with self.lock:
            self._refuse_if_unavailable()
            job_id = uuid.uuid4().hex
            job = Job(id=job_id, folder=self.jobs_dir / job_id, created=now_iso(), options=options,
                      input_file=f"input.{ext}", download_stem=download_stem)
            self._store(job, lambda incoming: (incoming / job.input_file).write_bytes(image))
            self._job_log(job, f"queued: input {job.input_file} ({len(image)} bytes), options {json.dumps(options)}")
            return job.to_public()

    def submit_remesh(self, source_id: str, overrides: dict[str, Any]) -> dict[str, Any]:
        """Queue a re-mesh of a done job: a new job with the source's options, ``overrides`` applied, that starts
        from a copy of the source's input, views and meta.json. Returns the new job's public status.

        Raises:
            BadInputError: an override other than :data:`REMESH_OPTIONS`, or an invalid value.
            ApiError: ``not_found`` / ``conflict`` for a missing or unfinished source, and as :meth:`submit`.
        """
        from server.common.errors import BadInputError

        if not isinstance(overrides, dict):
            raise BadInputError(f"the re-mesh options must be a JSON object, got {type(overrides).__name__}")
        unknown = sorted(set(overrides) - set(REMESH_OPTIONS))
        if unknown:
            raise BadInputError(f"option(s) {unknown} cannot be changed by a re-mesh; allowed: "
                                f"{list(REMESH_OPTIONS)}", fix="the others shaped the views; submit the image again "
                                                               "to change them")
        with self.lock:
            source = self._done(source_id)
            options = check_options({**source.options, **overrides})
            self._refuse_if_unavailable()
            job_id = uuid.uuid4().hex
            job = Job(id=job_id, folder=self.jobs_dir / job_id, created=now_iso(), options=options,
                      input_file=source.input_file, download_stem=source.download_stem, remesh_of=source.id)
            self._store(job, lambda incoming: _copy_run(source.folder, incoming, source.input_file))
            self._job_log(job, f"queued: re-mesh of {source.id}, options {json.dumps(overrides)}")
            return job.to_public()

    def reroll(self, job_id: str, body: Any) -> dict[str, Any]:
        """Queue a re-roll of some stage-1 views of a job in review: ``{"views": [1, 5], "seed": 7}`` (seed
        optional). Only those views change; the job comes back to review. Returns its status.

        Raises:
            BadInputError: a malformed body, a view that is not one of the job's stage-1 views, a bad seed.
            ApiError: conflict unless the job is in review; queue_full as :meth:`submit`.
        """
        from server.common.errors import BadInputError

        with self.lock:
            job = self._in_review(job_id)
            allowed = job.review["views"]
            if not isinstance(body, dict) or set(body) - {"views", "seed"} or "views" not in body:
                raise BadInputError(f"a re-roll is a JSON object {{\"views\": [...], \"seed\": N}}, got "
                                    f"{json.dumps(body)[:120]}", fix='e.g. {"views": [1, 5], "seed": 7}')
            views, seed = body["views"], body.get("seed")
            if not (isinstance(views, list) and views and all(
                    isinstance(v, int) and not isinstance(v, bool) and v in allowed for v in views)):
                raise BadInputError(f"views {json.dumps(views)[:120]} cannot be re-rolled; allowed: a non-empty list "
                                    f"of this job's stage-1 view numbers {allowed} (as in their file names)")
            if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32):
                raise BadInputError(f"seed {json.dumps(seed)[:40]} is not allowed: null (draw one) or an integer in "
                                    "[0, 2**32)")
            return self._requeue(job, {"action": "reroll", "views": sorted(set(views)), "seed": seed},
                                 f"re-roll of views {sorted(set(views))} queued (seed {seed})")

    def continue_job(self, job_id: str, body: Any) -> dict[str, Any]:
        """Queue the rest of a reviewed job (stage 2b → mesh): ``{}`` or ``{"elevation": 20}`` to replace the
        estimate. Returns its status.

        Raises:
            BadInputError: a malformed body or an elevation out of range.
            ApiError: conflict unless the job is in review; queue_full as :meth:`submit`.
        """
        from server.common.errors import BadInputError

        with self.lock:
            job = self._in_review(job_id)
            if not isinstance(body, dict) or set(body) - {"elevation"}:
                raise BadInputError(f"continue takes a JSON object with at most 'elevation', got "
                                    f"{json.dumps(body)[:120]}", fix='send {} or e.g. {"elevation": 20}')
            options = job.options
            if body.get("elevation") is not None:
                options = check_options({**job.options, "elevation": body["elevation"]})
            status = self._requeue(job, {"action": "continue"}, f"continue queued (elevation "
                                                                 f"{options['elevation']})")
            del status
            job.options = options
            self._write_status(job)
            return job.to_public()

    def set_pinned(self, job_id: str, pinned: bool) -> dict[str, Any]:
        """Pin a job (the size limit's clean-up keeps it) or unpin it; returns its status."""
        with self.lock:
            job = self._get(job_id)
            job.pinned = pinned
            self._write_status(job)
            return job.to_public()

    def _in_review(self, job_id: str) -> Job:
        job = self._get(job_id)
        if job.state != "review":
            raise ApiError("conflict", f"job {job_id} is {job.state}, not in review",
                           fix="submit with the option \"review\": true, and re-roll or continue while its state is "
                               "review" if job.state in FINISHED else "wait until its state is review")
        return job

    def _requeue(self, job: Job, task: dict[str, Any], note: str) -> dict[str, Any]:
        """Put a job in review back in the queue for ``task`` (lock held)."""
        self._refuse_if_unavailable()
        job.state, job.pending, job.error = "queued", task, None
        self._queue.append(job)
        self._write_status(job)
        self._job_log(job, note)
        self._wake.notify_all()
        return job.to_public()

    def _store(self, job: Job, fill: Callable[[Path], object]) -> None:
        """Write a new job's folder under a hidden name (``fill`` adds its files), rename it into place, queue it
        (lock held)."""
        incoming = self.jobs_dir / f".incoming-{job.id}"
        try:
            incoming.mkdir()
            fill(incoming)
            write_json_atomic(incoming / "status.json", job.to_record())
            os.replace(incoming, job.folder)
        except OSError as e:
            shutil.rmtree(incoming, ignore_errors=True)
            raise storage_error(e, "store the new job", self.jobs_dir) from None
        except BaseException:
            shutil.rmtree(incoming, ignore_errors=True)
            raise
        self._jobs[job.id] = job
        self._queue.append(job)
        self._wake.notify_all()

    def cancel_or_delete(self, job_id: str) -> dict[str, Any] | None:
        """Cancel a queued or running job (returns its status) or delete a finished one's folder (returns None)."""
        with self.lock:
            job = self._get(job_id)
            if job.state == "queued":
                self._queue.remove(job)
                self._finish(job, "cancelled", error_dict("cancelled", "the job was cancelled before it ran"))
                return job.to_public()
            if job.state == "review":
                self._finish(job, "cancelled", error_dict("cancelled", "the job was cancelled during its review"))
                return job.to_public()
            if job.state == "running":
                job.cancel.set()
                self._job_log(job, "cancel requested")
            else:
                trash = self.jobs_dir / f".deleted-{job.id}"
                try:
                    # One rename makes the deletion durable at once (a restart drops .deleted-* folders); only
                    # then does the job leave memory, so a disk that refuses the rename loses nothing.
                    os.replace(job.folder, trash)
                except OSError as e:
                    raise storage_error(e, f"delete job {job.id}", self.jobs_dir) from None
                del self._jobs[job.id]
                shutil.rmtree(trash, ignore_errors=True)  # removing the files may take a while; a leftover is
                return None                               # removed at the next start
        job.finished.wait(self.config.cancel_wait_s)
        with self.lock:
            return job.to_public()

    # -- internals --------------------------------------------------------------------------------------------------

    def _get(self, job_id: str) -> Job:
        job = self._jobs.get(check_job_id(job_id))
        if job is None:
            raise ApiError("not_found", f"no job {job_id} (it may have been deleted)")
        return job

    def _done(self, job_id: str) -> Job:
        job = self._get(job_id)
        if job.state != "done" or job.result is None:
            raise ApiError("conflict", f"job {job_id} is {job.state}, so it has no result",
                           fix="poll GET /v1/jobs/<id> until its state is done" if job.state in ("queued", "running")
                           else None)
        return job

    def _refuse_if_unavailable(self) -> None:
        if self._stopping:
            raise ApiError("internal", "the server is shutting down", fix="start the server again")
        if len(self._queue) >= self.config.max_queue:
            wait = self.retry_after_s()
            raise ApiError("queue_full", f"{len(self._queue)} jobs are already waiting (the limit is "
                                         f"{self.config.max_queue})", fix=f"retry in about {wait} s",
                           headers={"Retry-After": str(wait)})
        if self.pipeline is None and self.preflight is not None:
            self.preflight()
        if self._load_failure is not None:
            when, error = self._load_failure
            left = self.config.missing_weights_retry_s - (time.monotonic() - when)
            if left > 0:
                raise ApiError(error.kind, error.message, fix=error.fix,
                               headers={"Retry-After": str(max(1, round(left)))})
            self._load_failure = None

    def weights_changed(self) -> None:
        """Weight files were just completed: forget a model load that failed for missing weights, so the next job
        loads the models at once rather than after the refusal's Retry-After."""
        with self.lock:
            self._load_failure = None

    def _load_from_disk(self) -> None:
        for folder in sorted(self.jobs_dir.iterdir()):
            if folder.name.startswith((".incoming-", ".deleted-")):
                shutil.rmtree(folder, ignore_errors=True)  # left over from a crash mid-submit or mid-delete
                continue
            if not JOB_ID_RE.fullmatch(folder.name) or folder.is_symlink() or not folder.is_dir():
                continue  # a link named like a job is not followed: it could lead anywhere
            try:
                with open_regular_inside(folder, "status.json") as f:
                    job = Job.from_record(folder, json.loads(f.read().decode("utf-8")))
            except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
                log.warning("ignoring job folder %s: unusable status.json (%s)", folder, e)
                continue
            if job.state not in FINISHED and job.state != "review":  # a review waits on disk; the rest was cut short
                was = job.state
                job.state = "failed"
                job.error = error_dict("internal", f"the server stopped while this job was {was}; its run did not "
                                                   "finish", "submit the image again")
                write_json_atomic(folder / "status.json", job.to_record())
                self._job_log(job, f"found {was} after a restart: marked failed")
            if job.state in FINISHED:
                job.finished.set()
            job.size_bytes = _folder_bytes(folder)
            self._jobs[job.id] = job
        if self._jobs:
            log.info("%d job(s) found in %s", len(self._jobs), self.jobs_dir)

    def _work(self) -> None:
        while True:
            with self.lock:
                while True:
                    wait = self._expire_reviews()  # also while the queue is busy: a review's clock runs on
                    if self._queue or self._stopping:
                        break
                    self._wake.wait(wait)
                if self._stopping:
                    return
                job = self._queue.popleft()
                job.state, job.started_at, job.elapsed_before = "running", time.monotonic(), job.elapsed_s
                self._running = job
                self._write_status(job)
            try:
                self._run(job)
            finally:
                with self.lock:
                    self._running = None

    def _expire_reviews(self) -> float | None:
        """Expire the jobs whose review outlived its deadline (lock held); seconds until the next deadline, or None.
        """
        now, next_deadline = time.time(), None
        for job in self._jobs.values():
            if job.state == "review":
                deadline = job.review["deadline"]
                if deadline <= now:
                    self._finish(job, "expired", error_dict(
                        "cancelled", f"no re-roll or continue within the review time "
                                     f"({self.config.review_timeout_s:g} s); the views are kept in the job's folder",
                        "submit the image again (with the same seed, the same views come back)"))
                else:
                    next_deadline = deadline if next_deadline is None else min(next_deadline, deadline)
        return None if next_deadline is None else max(next_deadline - now, 0.01)

    def _run(self, job: Job) -> None:
        """Run one job to its end; every outcome is recorded in its status, nothing escapes."""
        handler = _thread_file_handler(job.folder / "log.txt")
        if handler is not None:
            logging.getLogger().addHandler(handler)
        result: dict[str, Any] | None = None
        error: dict[str, Any] | None = None
        try:
            self._job_log(job, "running")
            pipe = self._ensure_pipeline()
            result = self._generate(job, pipe)
        except CancelledError:
            why = "the server was stopped while the job ran" if self._stopping else "the job was cancelled"
            error = error_dict("cancelled", why)
        except torch.cuda.OutOfMemoryError as e:
            self._job_file_log(job, traceback.format_exc())
            first_line = str(e).splitlines()[0] if str(e) else repr(e)
            error = error_dict("out_of_memory", f"the GPU ran out of memory: {first_line}",
                               "lower the mesh resolution, close other programs that use the GPU, or run the "
                               "server with --device cpu")
        except One2345Error as e:
            self._job_file_log(job, traceback.format_exc())
            error = error_dict(e.kind, self._public(e.message), e.fix and self._public(e.fix))
        except OSError as e:
            # The disk failed under the run (full, read-only, gone): the job's own kind, with no server path.
            self._job_file_log(job, traceback.format_exc())
            failure = storage_error(e, "write the job's files", self.jobs_dir)
            error = error_dict(failure.kind, failure.message, failure.fix)
        except Exception as e:
            # A bug or an unexpected library failure: the job fails, the worker and the server live on.
            self._job_file_log(job, traceback.format_exc())
            log.exception("job %s failed", job.id)
            error = error_dict("internal", self._public(f"{type(e).__name__}: {e}"),
                               f"see log.txt in the job's folder ({job.id}/log.txt in the server's jobs folder)")
        finally:
            if handler is not None:
                logging.getLogger().removeHandler(handler)
                handler.close()
        if error is not None and error["kind"] == "out_of_memory":
            # Only now, with the exception and its frames gone, can the failed run's tensors be released; the job
            # is reported failed after that, so the next job finds the memory free.
            _free_gpu_memory()
        with self.lock:
            job.pending = None
            if error is None and "review" in result:
                self._pause(job, result["review"])
            elif error is None:
                job.result = result
                job.stage, job.fraction = "export", 1.0
                self._finish(job, "done", None)
            else:
                self._finish(job, "cancelled" if error["kind"] == "cancelled" else "failed", error)

    def _ensure_pipeline(self) -> Pipeline:
        if self.pipeline is not None:
            return self.pipeline
        try:
            pipe = self._load_pipeline()
        except One2345Error as e:
            if e.kind == "missing_weights":  # MissingWeightsError or CheckpointError: the same remedy
                with self.lock:
                    self._load_failure = (time.monotonic(), e)
            raise
        with self.lock:
            self.pipeline = pipe
        log.info("models loaded: %s", pipe.models_loaded())
        return pipe

    def _generate(self, job: Job, pipe: Pipeline) -> dict[str, Any]:
        from server.pipeline import GenerateOptions

        options = GenerateOptions.from_dict(job.options)
        run_dir = job.folder / "run"
        last = {"stage": None, "write": 0.0}

        def on_progress(p: Any) -> None:
            now = time.monotonic()
            with self.lock:
                job.stage, job.step, job.total = p.stage, int(p.step), int(p.total)
                job.fraction = min(max(float(p.fraction), 0.0), 1.0)
                job.elapsed_s = job.elapsed()
                preview = getattr(p, "preview", None)
                if preview is not None and VIEW_NAME_RE.fullmatch(Path(preview).name):
                    name = Path(preview).name
                    if name not in job.previews:
                        job.previews.append(name)
                if p.stage != last["stage"] or now - last["write"] >= _STATUS_WRITE_INTERVAL_S:
                    if p.stage != last["stage"]:
                        self._job_log(job, f"stage {p.stage} (overall {job.fraction:.0%})")
                    last["stage"], last["write"] = p.stage, now
                    self._write_status(job)

        action = (job.pending or {}).get("action")
        if job.remesh_of is not None:
            out = pipe.remesh(run_dir, options, progress=on_progress, should_cancel=job.cancel.is_set)
        elif action == "reroll":
            record = pipe.reroll(run_dir, options, job.pending["views"], job.pending["seed"], progress=on_progress,
                                 should_cancel=job.cancel.is_set)
            return {"review": record}
        elif action == "continue":
            out = pipe.finish(run_dir, options, progress=on_progress, should_cancel=job.cancel.is_set)
        elif options.review:
            return {"review": pipe.generate_views(job.folder / job.input_file, run_dir, options,
                                                  progress=on_progress, should_cancel=job.cancel.is_set)}
        else:
            out = pipe(job.folder / job.input_file, run_dir, options, progress=on_progress,
                       should_cancel=job.cancel.is_set)
        self._job_log(job, f"done: {out.vertices} vertices, {out.faces} faces, elevation {out.elevation:.1f}° "
                           f"({out.elevation_source}{', uncertain' if out.elevation_uncertain else ''}), "
                           f"timings {json.dumps(out.timings)}")
        return {"format": options.format, "elevation": float(out.elevation), "vertices": int(out.vertices),
                "elevation_uncertain": bool(out.elevation_uncertain),
                "elevation_confidence": out.elevation_confidence,
                "faces": int(out.faces), "textured": options.texture_size is not None,
                "texture_size": options.texture_size, "target_faces": options.target_faces,
                "mesh": Path(out.mesh_path).relative_to(job.folder).as_posix(),
                "meta": Path(out.meta_path).relative_to(job.folder).as_posix()}

    def _public(self, text: str) -> str:
        """``text`` fit for a client: the jobs folder's absolute path removed (paths become ``<id>/…``) and the home
        folder shown as ``~``."""
        for root, shown in ((self.jobs_dir, ""), (Path.home(), "~/")):
            text = text.replace(f"{root}{os.sep}", shown)
        return text

    def _pause(self, job: Job, record: Any) -> None:
        """A job's views are ready for review (lock held): record what the client needs, start the timeout, and
        free the GPU memory of the step (the warm models stay)."""
        from server.stages.multiview.zero123 import Zero123Config

        estimate = record.estimate or {}
        job.review = {
            "views": record.views(Zero123Config()), "revision": record.revision,
            "elevation": round(90.0 - record.polar, 3), "elevation_source": record.elevation_source,
            "elevation_uncertain": bool(estimate.get("uncertain", False)) and record.elevation_source != "given",
            "elevation_confidence": estimate.get("confidence"), "seed": record.seed,
            "view_seeds": dict(record.view_seeds), "notes": list(record.notes),
            "deadline": time.time() + self.config.review_timeout_s,
        }
        job.elapsed_s = job.elapsed()
        job.started_at = None
        job.state = "review"
        job.size_bytes = _folder_bytes(job.folder)
        self._write_status(job)
        self._job_log(job, f"in review: views {job.review['views']}, revision {record.revision}, elevation "
                           f"{job.review['elevation']:.1f}° ({record.elevation_source})")
        self._wake.notify_all()  # the worker's wait now has a deadline
        _free_gpu_memory()

    def _finish(self, job: Job, state: str, error: dict[str, Any] | None) -> None:
        """Record a final state (lock held)."""
        if job.started_at is not None:
            job.elapsed_s = job.elapsed()
            job.started_at = None
            if state == "done":
                self._durations.append(job.elapsed_s)
        job.state, job.error = state, error
        self._write_status(job)
        self._job_log(job, state if error is None else f"{state} ({error['kind']}): {error['message']}")
        job.finished.set()
        job.size_bytes = _folder_bytes(job.folder)
        self._enforce_size_limit()

    def _enforce_size_limit(self) -> None:
        """Delete the oldest finished, unpinned jobs while the jobs folder is over its limit (lock held). The newest
        job is always kept, so a single large result never deletes itself."""
        limit = self.config.max_jobs_bytes
        if limit is None:
            return
        total = sum(j.size_bytes for j in self._jobs.values())
        newest = max(self._jobs.values(), key=lambda j: (j.created, j.id), default=None)
        for job in sorted(self._jobs.values(), key=lambda j: (j.created, j.id)):
            if total <= limit:
                break
            if job.state not in FINISHED or job.pinned or job is newest:
                continue
            trash = self.jobs_dir / f".deleted-{job.id}"
            try:
                os.replace(job.folder, trash)
            except OSError as e:
                log.warning("size limit: cannot delete job %s: %s", job.id, e)
                continue
            del self._jobs[job.id]
            total -= job.size_bytes
            log.info("size limit (%d MB): deleted the oldest finished job %s (%d MB)", limit // 2**20, job.id,
                     job.size_bytes // 2**20)
            shutil.rmtree(trash, ignore_errors=True)

    def _write_status(self, job: Job) -> None:
        try:
            write_json_atomic(job.folder / "status.json", job.to_record())
        except OSError as e:
            # The in-memory status stays right; only a restart would see the older file.
            log.error("cannot write the status of job %s: %s", job.id, e)

    @classmethod
    def _job_log(cls, job: Job, line: str) -> None:
        """One event of the job, to its log.txt and to the server's log."""
        log.info("job %s: %s", job.id, line.rstrip())
        cls._job_file_log(job, line)

    @staticmethod
    def _job_file_log(job: Job, text: str) -> None:
        """Append to the job's log.txt only (tracebacks: the server's log gets the one-line outcome)."""
        try:
            append_text_no_follow(job.folder / "log.txt", f"{now_iso()} {text.rstrip()}\n")
        except OSError as e:
            log.error("cannot write the log of job %s: %s", job.id, e)


def _folder_bytes(folder: Path) -> int:
    """Bytes of the plain files under ``folder`` (links not followed; 0 for what cannot be read)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _copy_run(source: Path, dest: Path, input_file: str) -> None:
    """Copy what a re-mesh needs from a job folder: the input, and of ``run/`` the preprocessed input, meta.json and
    the views with pose.json. Only plain files with the pipeline's names are read, never through a link (the source
    folder is not trusted more than any other)."""
    names = [input_file, "run/input.png", "run/input_256.png", "run/meta.json", "run/views/pose.json"]
    with contextlib.suppress(OSError):  # no views folder: pose.json is then missing too, which is reported below
        names += [f"run/views/{n}" for n in sorted(os.listdir(source / "run" / "views")) if VIEW_NAME_RE.fullmatch(n)]
    for name in names:
        try:
            with open_regular_inside(source, name) as f:
                data = f.read()
        except FileNotFoundError:
            if name in ("run/meta.json", "run/views/pose.json"):
                raise ApiError("conflict", f"job {source.name} has no {name}, so it cannot be re-meshed",
                               fix="submit the image again") from None
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def _thread_file_handler(path: Path) -> logging.Handler | None:
    """A handler appending the records of the calling thread (the worker, running one job) to ``path``, so the
    pipeline's own log lines land in the job's log.txt; None when the file cannot be opened (a full or read-only disk
    must fail the job, not the worker)."""
    try:
        append_text_no_follow(path, "")  # creates it, refusing a link planted in its place
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError as e:
        log.error("cannot open the job log %s: %s", path.name, e.strerror)
        return None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    ident = threading.get_ident()
    handler.addFilter(lambda record: record.thread == ident and record.name != __name__)
    return handler


def _free_gpu_memory() -> None:
    """Release what a failed run left on the GPU so that the next job starts from a clean slate."""
    gc.collect()
    torch.cuda.empty_cache()  # a no-op when CUDA was never initialised

