"""Future-like jobs: work on a background thread, results and callbacks on Blender's main thread.

The pattern is dream-textures' ``Future``: the worker thread never touches ``bpy``; it posts events (progress, a new
preview, a note, the end) into a queue, and :meth:`Task.drain`, called on the main thread (by a modal operator's
timer, a ``bpy.app.timers`` callback, or the synchronous :meth:`Task.wait` in background mode), applies them and runs
the callbacks. Cancellation is an :class:`threading.Event` the worker checks between requests. Every way a job ends
(done, failed, cancelled) goes through one code path: the ``finish`` event.
"""

from __future__ import annotations

import contextlib
import queue
import shutil
import threading
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import server_state
from .client import Client, ServerError
from .errors import JobError, JobFailed
from .recipes import parse_recipe, recipe_candidate, recipe_options
from .server_process import Connection

POLL_INTERVAL_S = 0.5
CANCEL_CONFIRM_S = 10.0
UNREACHABLE_GRACE_S = 15.0


@dataclass
class Progress:
    """What the panel shows while a job runs (the server's status fields)."""

    stage: str = "Waiting"
    """Human-readable stage, e.g. ``"Starting server"`` or the server's stage name."""
    step: int = 0
    """Step within the stage."""
    total: int = 0
    """Steps in the stage (0 when unknown)."""
    fraction: float = 0.0
    """Overall progress, 0…1."""
    elapsed_s: float = 0.0
    """Seconds since the server started the job."""
    eta_s: float | None = None
    """Estimated seconds left, or None."""
    message: str | None = None
    """The server's line for people about the current step (the one-time set-up says what it converts)."""
    setup: bool = False
    """The server's stage ``prepare``: a one-time set-up (converting Zero123-XL) inside the first job, during which
    :attr:`fraction` stays 0; the bar follows :attr:`step` of :attr:`total` instead (:func:`bar`)."""


SETUP_PREFIX = "One-time set-up: "
PREPARE_STAGE = "prepare"
"""The server's stage name for a one-time set-up while the models load (``server.pipeline.loading.PREPARE_STAGE``)."""


def bar(progress: Progress, cancelling: bool = False) -> tuple[float, str]:
    """The panel's progress bar: (factor 0…1, text). A one-time set-up shows its own steps and what it does
    ("One-time set-up: converting the UNet (3.4 GB) (3/6)") rather than a job stalled at 0 %."""
    if cancelling:
        return progress.fraction, "Cancelling…"
    if progress.setup:
        what = (progress.message or "converting Zero123-XL").removeprefix(SETUP_PREFIX)
        steps = f" ({progress.step}/{progress.total})" if progress.total else ""
        factor = min(max(progress.step / progress.total, 0.0), 1.0) if progress.total else 0.0
        return factor, f"{SETUP_PREFIX}{what}{steps}"
    steps = f" {progress.step}/{progress.total}" if progress.total > 1 else ""
    eta = f", {progress.eta_s:.0f} s left" if progress.eta_s else ""
    return progress.fraction, f"{progress.stage}{steps} ({progress.fraction:.0%}{eta})"


@dataclass(frozen=True)
class JobResult:
    """The files of a finished generation job."""

    job_id: str
    """The server's job id (32 hex characters)."""
    job_dir: Path
    """The add-on's folder for this job: the input image, the mesh, meta.json and views/."""
    mesh: Path
    """The mesh file."""
    meta: Path | None
    """meta.json (elevation, timings, options, versions), if the server provided it."""
    views: tuple[Path, ...]
    """The generated views (PNG)."""
    format: str
    """Mesh format: ``ply``, ``glb`` or ``obj``."""
    elevation: float | None
    """The elevation the server used, in degrees."""
    vertices: int
    faces: int
    elevation_uncertain: bool = False
    """The server estimated the elevation without confidence (or fell back to 0°): the artist should set it."""
    pose: Path | None = None
    """pose.json of the job, when the server's job folder is on this machine."""
    server_job_dir: Path | None = None
    """The server's own folder for this job, when it is on this machine."""
    input: Path | None = None
    """The input image as uploaded (None for a re-mesh, which reuses its source's views)."""
    textured: bool = False
    """The mesh carries a baked UV texture instead of vertex colours."""
    remesh_of: str | None = None
    """The server job whose views this result re-meshed."""
    candidate: tuple[str, int] | None = None
    """(images job id, index): the candidate of a prompt this result was made from (its ``image_of``)."""


@dataclass(frozen=True)
class ReviewState:
    """A job paused for review (option ``review``): the eight stage-1 views downloaded, and what the server said."""

    revision: int
    """Bumped by the server at every re-roll; the view files of each revision live in their own folder."""
    views: tuple[Path, ...]
    """The downloaded stage-1 views, in the server's order (``0.png`` … ``7.png`` or ``8.png`` … ``11.png``)."""
    numbers: tuple[int, ...]
    """The view numbers (file stems) of :attr:`views`, as the re-roll request names them."""
    elevation: float
    elevation_source: str
    elevation_uncertain: bool
    seed: int
    view_seeds: dict[str, int]
    notes: tuple[str, ...] = ()
    expires_in_s: float | None = None


class Task(ABC):
    """A unit of work on a background thread with main-thread callbacks.

    Subclasses implement :meth:`work`; it may call :meth:`post` and must return the result or raise
    :class:`JobFailed`. States: ``pending`` → ``running`` → ``done`` | ``failed`` | ``cancelled``.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.state = "pending"
        self.progress = Progress()
        self.notes: list[str] = []
        """Messages for the user (e.g. the server was restarted), in order."""
        self.previews: list[Path] = []
        self.error: JobError | None = None
        self.result: Any = None
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._callbacks: dict[str, list[Callable[..., None]]] = {"progress": [], "preview": [], "note": [],
                                                                 "review": [], "done": []}
        self.review: ReviewState | None = None
        """Set while a generation waits for the artist's review (drained from the worker's ``review`` event)."""

    # -- main thread ---------------------------------------------------------------------------------------------

    def start(self) -> Task:
        """Start the worker thread (once)."""
        if self._thread is None:
            self.state = "running"
            self._thread = threading.Thread(target=self._run, name=f"one2345-{self.name}", daemon=True)
            self._thread.start()
        return self

    def cancel(self) -> None:
        """Ask the worker to stop; it ends as ``cancelled`` as soon as it can."""
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        """True once :meth:`cancel` was called."""
        return self._cancel.is_set()

    @property
    def finished(self) -> bool:
        """True once the ``finish`` event has been drained."""
        return self.state in ("done", "failed", "cancelled")

    def on(self, event: str, callback: Callable[..., None]) -> Task:
        """Register a main-thread callback for ``progress`` (Progress), ``preview`` (Path), ``note`` (str) or
        ``done`` (this task)."""
        self._callbacks[event].append(callback)
        return self

    def drain(self) -> bool:
        """Apply queued events and run their callbacks (call on the main thread). Returns :attr:`finished`."""
        while True:
            try:
                kind, payload = self._events.get_nowait()
            except queue.Empty:
                return self.finished
            if kind == "progress":
                self.progress = payload
            elif kind == "preview":
                self.previews.append(payload)
            elif kind == "note":
                self.notes.append(payload)
            elif kind == "review":
                self.review = payload
            elif kind == "finish":
                self.state, self.result, self.error = payload
                kind, payload = "done", self
            for callback in self._callbacks[kind]:
                callback(payload)

    def wait(self, timeout: float | None = None, interval: float = 0.05,
             until: Callable[[], bool] | None = None) -> bool:
        """Drain until finished, or until ``until()`` holds (background mode); Ctrl+C cancels the task.
        Returns :attr:`finished` (True also when ``until`` ended the wait)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.drain() and not (until is not None and until()):
            if deadline is not None and time.monotonic() > deadline:
                return False
            try:
                time.sleep(interval)
            except KeyboardInterrupt:
                self.cancel()
        return True

    # -- worker thread -------------------------------------------------------------------------------------------

    def post(self, kind: str, payload: Any) -> None:
        """Queue an event for the main thread (worker side)."""
        self._events.put((kind, payload))

    def check_cancelled(self) -> None:
        """Raise the ``cancelled`` end if :meth:`cancel` was called (worker side)."""
        if self._cancel.is_set():
            raise JobFailed(JobError("cancelled", f"{self.name.capitalize()} was cancelled."))

    def sleep(self, seconds: float) -> None:
        """Sleep, waking early on cancel (worker side)."""
        self._cancel.wait(seconds)

    @abstractmethod
    def work(self) -> Any:
        """The job itself (worker side)."""

    def _run(self) -> None:
        try:
            result = self.work()
        except JobFailed as exc:
            state = "cancelled" if exc.error.kind == "cancelled" else "failed"
            self.post("finish", (state, None, exc.error))
        except ServerError as exc:
            self.post("finish", ("failed", None, JobError.from_exception(exc)))
        except Exception as exc:  # the UI must learn about every failure, including our own bugs
            traceback.print_exc()  # into Blender's system console, for the bug report
            self.post("finish", ("failed", None, JobError("internal", f"{type(exc).__name__}: {exc}",
                                                          "Report this problem with the system console's output")))
        else:
            self.post("finish", ("done", result, None))


def failed(name: str, error: JobError) -> Task:
    """A task that failed before it could start (e.g. no input image), for the panel's error box."""
    task = FunctionTask(name, lambda _task: None)  # never started: it only carries the error
    task.state, task.error = "failed", error
    return task


class FunctionTask(Task):
    """A task running ``function(task)`` (server checks, environment set-up)."""

    def __init__(self, name: str, function: Callable[[Task], Any]) -> None:
        super().__init__(name)
        self._function = function

    def work(self) -> Any:
        """Run the function."""
        return self._function(self)


class GenerateJob(Task):
    """Image → mesh on the server: connect, submit, poll progress and previews, download the result.

    With the option ``review`` the server pauses after the eight stage-1 views; the worker downloads them, posts a
    ``review`` event and keeps polling, sending the artist's :meth:`reroll` and :meth:`proceed` requests (queued on
    the main thread) until the job goes on to its mesh.

    Args:
        image: the input image file (already inside ``job_dir``); None for a re-mesh.
        options: request options, from :func:`properties.to_request` (or a recipe's options).
        job_dir: the add-on's folder for this job (created if missing).
        connect: returns a live :class:`Connection` (starts the local server when needed); runs on the worker.
        server_exit_code: returns the local server's exit code once it has died, else None; tells a crash apart
            from a network hiccup.
        mesh_name: the mesh file's stem (default: the image's stem); also the imported object's name.
        poll_interval: seconds between status requests.
        remesh_of: a done server job to re-mesh (``POST /v1/jobs/{id}/remesh`` with ``options`` as the overrides)
            instead of submitting ``image``.
        existing: a server job to follow and import instead of submitting one (History's Import).
        recipe_of: a done server job whose input and recipe to run again (History's Regenerate); ``variation``
            takes a new seed.
        candidate: (images job id, index): submit that candidate of a prompt by reference (``image_of``) instead of
            uploading ``image`` (then the add-on's copy of it); when the server no longer has that images job,
            ``image`` is uploaded instead, with a note.
    """

    def __init__(self, image: Path | None, options: dict[str, Any], job_dir: Path, connect: Callable[[], Connection],
                 server_exit_code: Callable[[], int | None] = lambda: None, mesh_name: str | None = None,
                 poll_interval: float = POLL_INTERVAL_S, remesh_of: str | None = None, existing: str | None = None,
                 recipe_of: str | None = None, variation: bool = False,
                 candidate: tuple[str, int] | None = None) -> None:
        super().__init__("re-mesh" if remesh_of else "import" if existing else "generation")
        self.existing, self.recipe_of, self.variation = existing, recipe_of, variation
        self.image = Path(image) if image is not None else None
        self.options = dict(options)
        self.job_dir = Path(job_dir)
        self.mesh_name = mesh_name or (self.image.stem if self.image else "mesh")
        self.remesh_of = remesh_of
        self.candidate = candidate
        self.server_job_id: str | None = None
        self._connect = connect
        self._server_exit_code = server_exit_code
        self._poll_interval = poll_interval
        self._requests: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.followed = False
        """A modal operator follows this job and imports its result (else whoever continues a review does)."""

    # -- main thread: the artist's answers to a review ----------------------------------------------------------

    def reroll(self, views: list[int], seed: int | None = None) -> None:
        """Ask for new versions of some stage-1 views (their numbers as in :attr:`ReviewState.numbers`)."""
        self._requests.put(("reroll", {"views": list(views), "seed": seed}))
        self.review = None  # until the server shows the next revision

    def proceed(self, elevation: float | None = None) -> None:
        """Accept the views and go on to the mesh, with ``elevation`` (degrees) replacing the estimate if given."""
        self._requests.put(("continue", {"elevation": elevation}))
        self.review = None

    # -- worker thread -------------------------------------------------------------------------------------------

    def work(self) -> JobResult:
        """Run the job on the worker thread."""
        self.job_dir.mkdir(parents=True, exist_ok=True)
        connection, client = self._open()
        server_state.STATE.jobs_dir = connection.jobs_dir if connection.local else None
        if self.existing or self.recipe_of:
            self._fetch_source(client, self.existing or self.recipe_of)
        if self.existing:
            self.server_job_id = self.existing
        else:
            self.post("progress", Progress(stage="Uploading image" if self.image else "Asking for a re-mesh"))
            self.server_job_id = self._submit(client)["id"]
        status = self._follow(client, self.server_job_id)
        return self._collect(client, connection, status)

    def _open(self) -> tuple[Connection, Client]:
        """Start (or reach) the server, pass on its note, and refresh the health the panel's pre-flight line and
        Generate's poll() read (worker thread)."""
        self.post("progress", Progress(stage="Starting server"))
        connection = self._connect()
        if connection.note:
            self.post("note", connection.note)
        self.check_cancelled()
        client = connection.client()
        with contextlib.suppress(ServerError):
            server_state.STATE.health = client.health()
        return connection, client

    def _fetch_source(self, client: Client, job_id: str) -> None:
        """Download a server job's input image (and, to run it again, its recipe's options) into the job folder."""
        self.post("progress", Progress(stage="Fetching the job's image"))
        status = client.status(job_id)
        self.image = client.download(f"/v1/jobs/{job_id}/input", self.job_dir / "input.png")
        if status.get("state") == "done" and not self.existing:
            recipe = parse_recipe(client.meta(job_id).get("recipe") or {})
            self.options = recipe_options(recipe, variation=self.variation)
            # Made from a prompt's candidate: name it again so the new recipe keeps the prompt (the image just
            # fetched is the fallback when the images job is gone).
            self.candidate = recipe_candidate(recipe) or self.candidate

    def _submit(self, client: Client) -> dict[str, Any]:
        while True:
            try:
                if self.remesh_of is not None:
                    return client.remesh(self.remesh_of, self.options)
                if self.candidate is not None:
                    return client.submit_candidate(*self.candidate, self.options)
                return client.submit(self.image, self.options)
            except ServerError as exc:
                if exc.kind == "not_found" and self.candidate is not None and self.image is not None:
                    self.post("note", f"The server no longer has images job {self.candidate[0][:8]}: uploaded the "
                                      "kept copy of the picture (the new recipe does not record the prompt).")
                    self.candidate = None
                    continue
                if exc.kind != "queue_full":
                    raise
                self.post("progress", Progress(stage="Server busy, waiting in line"))
                self.sleep(min(exc.retry_after or 5.0, 30.0))
                self.check_cancelled()

    def _follow(self, client: Client, job_id: str) -> dict[str, Any]:
        """Poll until the job ends; forward progress, previews and reviews; cancel on request."""
        cancel_deadline = None
        unreachable_since = None
        seen: set[str] = set()
        revision = shown = None
        while True:
            try:
                status = client.status(job_id)
                unreachable_since = None
            except ServerError as exc:
                if exc.kind != "unreachable":
                    raise
                code = self._server_exit_code()
                if code is not None:
                    raise JobFailed(JobError(
                        "server_died", f"The One2345 server stopped while working on this job (exit code {code}).",
                        "Generate again: the server is restarted automatically; open the server log if it keeps "
                        "stopping")) from exc
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > UNREACHABLE_GRACE_S:
                    raise
                self.sleep(1.0)
                continue
            self.post("progress", _progress(status))
            for preview in status.get("previews") or []:
                if preview["name"] not in seen:
                    seen.add(preview["name"])
                    self._fetch_preview(client, preview)
            state = status["state"]
            if state == "done":
                return status
            if state in ("failed", "expired"):
                error = status.get("error") or {}
                raise JobFailed(JobError(error.get("kind", "internal"), error.get("message", "The job failed."),
                                         error.get("fix")))
            if state == "cancelled":
                raise JobFailed(JobError("cancelled", "Generation was cancelled."))
            if state == "review" and cancel_deadline is None:
                review = status.get("review") or {}
                if review.get("revision") != revision:
                    revision = review.get("revision")
                    shown = self._fetch_review(client, review)
                    self.post("review", shown)
                self._send_request(client, job_id, shown)
            if self.cancel_requested and cancel_deadline is None:
                self.post("progress", Progress(stage="Cancelling", fraction=status.get("fraction") or 0.0))
                with contextlib.suppress(ServerError):
                    client.cancel(job_id)
                cancel_deadline = time.monotonic() + CANCEL_CONFIRM_S
            elif cancel_deadline is not None and time.monotonic() > cancel_deadline:
                raise JobFailed(JobError("cancelled", "Generation was cancelled (the server did not confirm it)."))
            self.sleep(self._poll_interval if cancel_deadline is None else 0.2)

    def _fetch_review(self, client: Client, review: dict[str, Any]) -> ReviewState:
        """Download one revision's views into ``review/r<revision>/`` (a new path per revision, so the panel's
        previews, cached by path, show the new pictures)."""
        folder = self.job_dir / "review" / f"r{int(review.get('revision') or 0)}"
        views = []
        for view in review.get("views") or []:
            views.append(client.download(view["url"], folder / view["name"]))
        return ReviewState(
            revision=int(review.get("revision") or 0), views=tuple(views),
            numbers=tuple(int(Path(v["name"]).stem) for v in review.get("views") or []),
            elevation=float(review.get("elevation") or 0.0),
            elevation_source=str(review.get("elevation_source") or ""),
            elevation_uncertain=bool(review.get("elevation_uncertain")), seed=int(review.get("seed") or 0),
            view_seeds={str(k): int(v) for k, v in (review.get("view_seeds") or {}).items()},
            notes=tuple(review.get("notes") or ()), expires_in_s=review.get("expires_in_s"))

    def _send_request(self, client: Client, job_id: str, shown: ReviewState | None) -> None:
        """Send the artist's next queued answer, if any. A refused one (a bad view number, a job that expired in
        between) becomes a note; the job stays as the server says."""
        try:
            kind, args = self._requests.get_nowait()
        except queue.Empty:
            return
        try:
            if kind == "reroll":
                client.reroll(job_id, args["views"], args["seed"])
            else:
                client.continue_job(job_id, args["elevation"])
        except ServerError as exc:
            if exc.kind not in ("bad_input", "conflict"):
                raise
            self.post("note", f"The server refused the {kind}: {exc.message}")
            self.post("review", shown)  # the views on screen are still the job's

    def _fetch_preview(self, client: Client, preview: dict[str, str]) -> None:
        path = self.job_dir / "views" / preview["name"]
        try:
            client.download(preview["url"], path)
        except ServerError:
            return  # a preview is a nicety; the result download reports real problems
        self.post("preview", path)

    def _collect(self, client: Client, connection: Connection, status: dict[str, Any]) -> JobResult:
        result = status["result"]
        fmt = result.get("format") or self.options.get("format", "ply")
        mesh = client.download(result["url"], self.job_dir / f"{self.mesh_name}.{fmt}")
        meta = None
        if result.get("meta_url"):
            with contextlib.suppress(ServerError):
                meta = client.download(result["meta_url"], self.job_dir / "meta.json")
        server_dir = None
        pose = None
        if connection.local and connection.jobs_dir and self.server_job_id:
            candidate = Path(connection.jobs_dir) / self.server_job_id
            server_dir = candidate if candidate.is_dir() else None
            found = sorted(candidate.rglob("pose.json")) if server_dir else []
            if found:
                pose = Path(shutil.copyfile(found[0], self.job_dir / "pose.json"))
        views = tuple(sorted((self.job_dir / "views").glob("*.png")))
        uncertain = bool(result.get("elevation_uncertain"))
        if uncertain and result.get("elevation") is not None:
            self.post("note", f"Elevation uncertain — set it by hand (Elevation: Manual); used "
                              f"{float(result['elevation']):.0f}°.")
        return JobResult(job_id=status["id"], job_dir=self.job_dir, mesh=mesh, meta=meta, views=views, format=fmt,
                         elevation=result.get("elevation"), vertices=int(result.get("vertices") or 0),
                         faces=int(result.get("faces") or 0), pose=pose, server_job_dir=server_dir,
                         elevation_uncertain=uncertain, input=self.image, textured=bool(result.get("textured")),
                         remesh_of=status.get("remesh_of"), candidate=self.candidate)


def _progress(status: dict[str, Any]) -> Progress:
    if status.get("state") == "review":
        return Progress(stage="Waiting for your review", fraction=float(status.get("fraction") or 0.0),
                        elapsed_s=float(status.get("elapsed_s") or 0.0))
    stage = str(status.get("stage") or status.get("state") or "")
    message = status.get("message") if isinstance(status.get("message"), str) else None
    setup = stage == PREPARE_STAGE and status.get("state") == "running"
    return Progress(stage="One-time set-up" if setup else stage.replace("_", " ").capitalize(),
                    step=int(status.get("step") or 0), total=int(status.get("total") or 0),
                    fraction=float(status.get("fraction") or 0.0), elapsed_s=float(status.get("elapsed_s") or 0.0),
                    eta_s=status.get("eta_s"), message=message or None, setup=setup)


# -- the session's jobs (main thread only) ---------------------------------------------------------------------

_ACTIVE: GenerateJob | None = None
_LAST: Task | None = None


def active() -> GenerateJob | None:
    """The generation job that is running, if any (``poll()`` greys Generate out while there is one)."""
    return _ACTIVE


def last() -> Task | None:
    """The most recently finished task (its error or notes are shown in the panel)."""
    return _LAST


def set_active(job: GenerateJob | None) -> None:
    """Make ``job`` the running job (None when it ended: it becomes :func:`last`)."""
    global _ACTIVE, _LAST
    if job is None and _ACTIVE is not None:
        _LAST = _ACTIVE
    _ACTIVE = job


def set_last(task: Task | None) -> None:
    """Record a finished task for the panel (server check, set-up, a failure before a job could start)."""
    global _LAST
    _LAST = task


def cancel_all() -> None:
    """Cancel the running job (add-on disable, quit)."""
    if _ACTIVE is not None:
        _ACTIVE.cancel()
