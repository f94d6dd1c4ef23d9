""":class:`JobManager`: the façade the HTTP app uses — the jobs in memory, the commands and queries on them, and the
transitions of a job's state, over the store (:mod:`.store`), the review rules (:mod:`.review`), the worker
(:mod:`.worker`) and the warm pipeline (:mod:`.warm`).

Every mutation happens under :attr:`JobManager.lock`. State a client is told is kept (a new job, a pin, a queued
re-roll or continue, a deletion) is written before the answer, or the answer is 507 ``storage`` and nothing changed;
state the worker records along the way (progress, a finished run) is written when the disk allows and logged when it
does not, so a full disk never stops the worker.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from server.common.errors import One2345Error
from server.service.jobs import review
from server.service.jobs.records import (
    REMESH_OPTIONS,
    VIEW_NAME_RE,
    ApiError,
    Job,
    check_bake_options,
    check_job_id,
    check_options,
    download_name,
    error_dict,
    now_iso,
)
from server.service.jobs.store import JobStore, copy_run, folder_bytes, run_previews
from server.service.jobs.warm import WarmPipeline
from server.service.jobs.worker import JobQueue, MakeImages, Pipeline, Worker, free_gpu_memory

log = logging.getLogger(__package__)


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


class JobManager:
    """The job store and the single worker thread that runs jobs through the pipeline.

    Args:
        jobs_dir: folder holding one sub-folder per job (created if absent).
        load_pipeline: builds the pipeline (loads the models); called once, in the worker thread unless
            :meth:`preload` was called first.
        config: queue and cancellation limits.
        make_images: makes an images job's candidates (:data:`server.service.jobs.worker.MakeImages`); None: images
            jobs are refused.
    """

    def __init__(self, jobs_dir: str | Path, load_pipeline: Callable[[], Pipeline],
                 config: JobsConfig | None = None, make_images: MakeImages | None = None) -> None:
        self.jobs_dir = Path(jobs_dir)
        self.config = config or JobsConfig()
        self.lock = threading.RLock()
        self.models = WarmPipeline(load_pipeline, self.lock, self.config.missing_weights_retry_s)
        """The pipeline, once loaded; its ``preflight`` and ``forget_failure`` are the weights manager's hooks."""
        self.store = JobStore(self.jobs_dir)
        self._queue = JobQueue(self.lock)
        self._worker = Worker(self.lock, self._queue, self.store, self.models.get, self._complete,
                              self._expire_reviews, make_images)
        self._durations: deque[float] = deque(maxlen=10)
        loaded = self.store.load()
        self._jobs: dict[str, Job] = {job.id: job for job in loaded.jobs}
        self.quarantined = len(loaded.quarantined)
        """Job folders set aside at start-up because their status.json was refused (``/v1/health``)."""

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def preload(self) -> Pipeline:
        """Load the models now (``--preload``) instead of on the first job. Errors propagate to the caller."""
        return self.models.preload()

    @property
    def pipeline(self) -> Pipeline | None:
        """The loaded pipeline; None until the first job (or :meth:`preload`) has loaded it."""
        return self.models.pipeline

    def start(self) -> None:
        """Start the worker thread."""
        with self.lock:
            if not self._worker.started:
                self._queue.stopping = False
                self._worker.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel the running job and every queued one, and wait (up to ``timeout`` s) for the worker to end."""
        with self.lock:
            self._queue.stopping = True
            for job in self._queue.drain():
                self._finish(job, "cancelled", error_dict("cancelled", "the server was stopped before the job ran",
                                                          "submit the image again"))
            if self._worker.running is not None:
                self._worker.running.cancel.set()
            self._queue.wake.notify_all()
        self._worker.join(timeout)

    # -- queries ----------------------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """What ``/v1/health`` says of the jobs: ``status`` (``ok``, or ``degraded`` when the worker thread has
        died and no job can run), the models, the queue, the running job, the recent run time, ``worker_alive`` and
        ``quarantined`` (job folders set aside at start-up)."""
        with self.lock:
            done = sorted((j for j in self._jobs.values() if j.state == "done" and j.remesh_of is None
                           and j.bake_of is None and j.images is None),
                          key=lambda j: j.created)[-5:]
            seconds = sorted(j.to_public()["elapsed_s"] for j in done)
            return {"status": "degraded" if self._worker_died() else "ok",
                    "models_loaded": self.pipeline.models_loaded() if self.pipeline is not None else {},
                    "queue_length": len(self._queue),
                    "running": self._worker.running.id if self._worker.running is not None else None,
                    "recent_job_s": seconds[len(seconds) // 2] if seconds else None,
                    "worker_alive": self._worker.alive, "quarantined": self.quarantined}

    def _worker_died(self) -> bool:
        """Whether the worker thread was started and has ended without being stopped: no job can run."""
        return self._worker.started and not self._worker.alive and not self._queue.stopping

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
    # come between the check and the open, and the open file stays readable while the folder is removed.

    def open_result(self, job_id: str) -> tuple[BinaryIO, str, str]:
        """(the open mesh file, its format, its download file name) of a done job; ApiError not_found / conflict
        otherwise. The caller closes the file. The name holds only ``[A-Za-z0-9._-]`` (a header carries it)."""
        with self.lock:
            job = self._mesh_done(job_id)
            fmt = job.result["format"]
            return self.store.open(job, job.result["mesh"]), fmt, download_name(job.download_stem, fmt)

    def open_meta(self, job_id: str) -> BinaryIO:
        """The open meta.json of a done job (the caller closes it)."""
        with self.lock:
            job = self._mesh_done(job_id)
            return self.store.open(job, job.result["meta"])

    def open_input(self, job_id: str) -> tuple[BinaryIO, str]:
        """The open uploaded image of a job, byte for byte, and its file name (the caller closes it)."""
        with self.lock:
            job = self._get(job_id)
            if job.images is not None:
                raise ApiError("not_found", f"job {job_id} is an images job: it has no input image",
                               fix=f"fetch its candidates: GET /v1/jobs/{job_id}/candidates/<i>.png")
            return self.store.open(job, job.input_file), job.input_file

    def open_candidate(self, job_id: str, name: str) -> BinaryIO:
        """An open candidate image ``<i>.png`` of a done images job (the caller closes it); ApiError not_found for
        another job kind or name, conflict while the job is not done."""
        with self.lock:
            job = self._done(job_id)
            if job.images is None or name not in job.result["candidates"]:
                raise ApiError("not_found", f"job {job_id} has no candidate {name[:80]!r}"
                               + (f": its candidates are {', '.join(job.result['candidates'])}"
                                  if job.images is not None else ": it is not an images job (POST /v1/images)"))
            return self.store.open(job, f"candidates/{name}")

    def open_view(self, job_id: str, name: str) -> BinaryIO:
        """An open preview image of the job (the caller closes it); ApiError not_found for other names or views not
        written yet."""
        with self.lock:
            job = self._get(job_id)
            if not VIEW_NAME_RE.fullmatch(name):
                raise ApiError("not_found", f"no view {name[:80]!r}: view names are <i>.png, <i>_<j>.png or "
                                            "input_256.png")
            return self.store.open(job, f"run/{name}" if name == "input_256.png" else f"run/views/{name}",
                                   missing=f"job {job_id} has no view {name} (yet)")

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
                missing weights, ``internal`` while the server is stopping or its worker has died.
            StorageError: the disk refused the new job's folder.
        """
        with self.lock:
            self._refuse_if_unavailable()
            job = self._new_job(options=options, input_file=f"input.{ext}", download_stem=download_stem)
            self._store(job, lambda incoming: (incoming / job.input_file).write_bytes(image))
            self.store.log(job, f"queued: input {job.input_file} ({len(image)} bytes), options {json.dumps(options)}")
            return job.to_public()

    def submit_images(self, request: dict[str, Any]) -> dict[str, Any]:
        """Queue an images job: ``request`` holds :data:`server.service.jobs.records.IMAGES_FIELDS`, already checked
        (:func:`server.stages.text_to_image.check_request`); a seed of None is drawn here, so the record holds the
        seed the candidates are made from. Returns its public status.

        Raises:
            BadInputError: the server has no text-to-image model.
            ApiError: as :meth:`submit` (``queue_full``, ``internal``); the image-to-3D weights are not needed.
            StorageError: the disk refused the new job's folder.
        """
        import random

        from server.common.errors import BadInputError
        from server.stages.text_to_image import MAX_COUNT

        if self._worker.make_images is None:
            raise BadInputError("this server makes no images from text (it was started without a text-to-image "
                                "model)", fix="submit an image with POST /v1/jobs")
        self._worker.make_images.check_prompt(request["prompt"], request["negative_prompt"])
        request = dict(request)
        if request["seed"] is None:
            request["seed"] = random.SystemRandom().randrange(2**32 - MAX_COUNT)
        with self.lock:
            self._refuse_if_unavailable(needs_models=False)
            job = self._new_job(options={}, input_file="input.png", download_stem="images", images=request)
            self._store(job, lambda incoming: None)
            self.store.log(job, f"queued: images {json.dumps(request)}")
            return job.to_public()

    def submit_from_candidate(self, source_id: str, index: Any, download_stem: str,
                              options: dict[str, Any]) -> dict[str, Any]:
        """Queue an image-to-3D job whose input is candidate ``index`` of the done images job ``source_id``: the
        candidate is copied as ``input.png`` and its record (:class:`server.stages.text_to_image.TextSource`) as
        ``text.json``, which the worker hands to the pipeline so that the run's recipe records the prompt, model,
        seed and index. Returns its public status.

        Raises:
            BadInputError: ``source_id`` is not an images job, or ``index`` is not one of its candidates.
            ApiError: ``not_found`` (no such job), ``conflict`` (not done yet), and as :meth:`submit`.
            StorageError: the disk refused the new job's folder.
        """
        from server.common.errors import BadInputError
        from server.stages.text_to_image import TextSource

        with self.lock:
            source = self._get(source_id)
            if source.images is None:
                raise BadInputError(f"job {source_id} is not an images job, so image_of cannot name it",
                                    fix="image_of takes the id of a job made with POST /v1/images")
            source = self._done(source_id)
            count = len(source.result["candidates"])
            if not (isinstance(index, int) and not isinstance(index, bool) and 0 <= index < count):
                raise BadInputError(f"candidate index={index!r} does not exist: job {source_id} has {count} "
                                    f"candidates, so index is an integer in [0, {count - 1}]")
            with self.store.open(source, "candidates/candidates.json") as f:
                try:
                    text = replace(TextSource(**json.loads(f.read())["sources"][index]), images_job=source_id)
                except (ValueError, TypeError, KeyError, IndexError) as e:
                    raise BadInputError(f"candidates.json of job {source_id} is damaged ({type(e).__name__})",
                                        fix="make the candidates again with POST /v1/images") from None
            with self.store.open(source, f"candidates/{index}.png") as f:
                image = f.read()
            self._refuse_if_unavailable()
            job = self._new_job(options=options, input_file="input.png", download_stem=download_stem)

            def fill(incoming: Path) -> None:
                (incoming / job.input_file).write_bytes(image)
                text.write(incoming)

            self._store(job, fill)
            self.store.log(job, f"queued: candidate {index} of images job {source_id}, options {json.dumps(options)}")
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
            source = self._mesh_done(source_id)
            options = check_options({**source.options, **overrides})
            self._refuse_if_unavailable()
            job = self._new_job(options=options, input_file=source.input_file, download_stem=source.download_stem,
                                remesh_of=source.id)

            def fill(incoming: Path) -> None:
                copy_run(source.folder, incoming, source.input_file)
                job.previews = run_previews(incoming / "run")  # the copied views are its previews from the start

            self._store(job, fill)
            self.store.log(job, f"queued: re-mesh of {source.id}, options {json.dumps(overrides)}")
            return job.to_public()

    def submit_bake(self, source_id: str, mesh: bytes, ext: str, body: Any) -> dict[str, Any]:
        """Queue a bake of a done job's views onto an uploaded mesh: a new job (``bake_of`` = the source) that starts
        from a copy of the source's input, views and meta.json, holds the mesh as ``bake_input.<ext>``, and needs no
        model. Returns the new job's public status.

        Args:
            source_id: the job whose views are baked.
            mesh: the uploaded mesh file, already read as a mesh by the HTTP layer.
            ext: ``glb``, ``obj`` or ``ply``.
            body: the bake options (:func:`server.service.jobs.records.check_bake_options`).

        Raises:
            BadInputError: invalid options.
            ApiError: ``not_found`` / ``conflict`` for a missing or unfinished source, ``queue_full``, ``internal``
                as :meth:`submit` (weights are not needed).
            StorageError: the disk refused the new job's folder.
        """
        with self.lock:
            source = self._mesh_done(source_id)
            options, keep_uvs = check_bake_options(source.options, body)
            self._refuse_if_unavailable(needs_models=False)
            bake = {"mesh": f"bake_input.{ext}", "keep_uvs": keep_uvs}
            job = self._new_job(options=options, input_file=source.input_file, download_stem=source.download_stem,
                                bake_of=source.id, bake=bake)

            def fill(incoming: Path) -> None:
                copy_run(source.folder, incoming, source.input_file)
                (incoming / bake["mesh"]).write_bytes(mesh)

            self._store(job, fill)
            self.store.log(job, f"queued: bake of {source.id} onto {bake['mesh']} ({len(mesh)} bytes), options "
                                f"{json.dumps(body)}")
            return job.to_public()

    def reroll(self, job_id: str, body: Any) -> dict[str, Any]:
        """Queue a re-roll of some stage-1 views of a job in review: ``{"views": [1, 5], "seed": 7}`` (seed
        optional). Only those views change; the job comes back to review. Returns its status.

        Raises:
            BadInputError: a malformed body, a view that is not one of the job's stage-1 views, a bad seed.
            ApiError: conflict unless the job is in review; queue_full as :meth:`submit`.
            StorageError: the queued state could not be saved (the job stays in review).
        """
        with self.lock:
            job = self._in_review(job_id)
            task = review.reroll_task(job, body)
            return self._requeue(job, task, None, f"re-roll of views {task['views']} queued (seed {task['seed']})")

    def continue_job(self, job_id: str, body: Any) -> dict[str, Any]:
        """Queue the rest of a reviewed job (stage 2b → mesh): ``{}`` or ``{"elevation": 20}`` to replace the
        estimate. Returns its status.

        Raises:
            BadInputError: a malformed body or an elevation out of range.
            ApiError: conflict unless the job is in review; queue_full as :meth:`submit`.
            StorageError: the queued state could not be saved (the job stays in review).
        """
        with self.lock:
            job = self._in_review(job_id)
            options = review.continue_options(job, body)
            return self._requeue(job, {"action": "continue"}, options,
                                 f"continue queued (elevation {options['elevation']})")

    def set_pinned(self, job_id: str, pinned: bool) -> dict[str, Any]:
        """Pin a job (the size limit's clean-up keeps it) or unpin it; returns its status.

        Raises:
            StorageError: the pin could not be saved (the job is as it was: a pin that a restart would forget is no
                pin).
        """
        with self.lock:
            job = self._get(job_id)
            before, job.pinned = job.pinned, pinned
            try:
                self.store.save(job, f"{'pin' if pinned else 'unpin'} job {job.id}")
            except One2345Error:
                job.pinned = before
                raise
            return job.to_public()

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
                self.store.log(job, "cancel requested")
            else:
                self.store.remove(job)  # a disk that refuses the rename keeps the job, in memory too
                del self._jobs[job.id]
                return None
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

    def _mesh_done(self, job_id: str) -> Job:
        """A done job that made a mesh; an images job is not_found here (it has candidates, no mesh)."""
        job = self._done(job_id)
        if job.images is not None:
            raise ApiError("not_found", f"job {job_id} is an images job: it made candidate images, not a mesh",
                           fix=f"fetch them with GET /v1/jobs/{job_id}/candidates/<i>.png, or make a mesh of one: "
                               'POST /v1/jobs with options {"image_of": "<id>", "index": <i>}')
        return job

    def _in_review(self, job_id: str) -> Job:
        job = self._get(job_id)
        review.require_review(job)
        return job

    def _refuse_if_unavailable(self, needs_models: bool = True) -> None:
        if self._queue.stopping:
            raise ApiError("internal", "the server is shutting down", fix="start the server again")
        if self._worker_died():
            raise ApiError("internal", "the server's worker thread has stopped, so no job can run",
                           fix="restart the server (its log says why the worker stopped)")
        if len(self._queue) >= self.config.max_queue:
            wait = self.retry_after_s()
            raise ApiError("queue_full", f"{len(self._queue)} jobs are already waiting (the limit is "
                                         f"{self.config.max_queue})", fix=f"retry in about {wait} s",
                           headers={"Retry-After": str(wait)})
        if needs_models:  # a bake or an images job needs neither the image-to-3D weights nor their models
            self.models.refuse_if_unloadable()

    def _new_job(self, **fields: Any) -> Job:
        """A new job's record: a fresh id, its folder under the jobs folder, created now, and ``fields``."""
        job_id = uuid.uuid4().hex
        return Job(id=job_id, folder=self.jobs_dir / job_id, created=now_iso(), **fields)

    def _store(self, job: Job, fill: Callable[[Path], object]) -> None:
        """Write a new job's folder and queue it (lock held)."""
        self.store.create(job, fill)
        self._jobs[job.id] = job
        self._queue.put(job)

    def _requeue(self, job: Job, task: dict[str, Any], options: dict[str, Any] | None,
                 note: str) -> dict[str, Any]:
        """Put a job in review back in the queue for ``task`` (lock held), once its queued state is saved."""
        self._refuse_if_unavailable()
        before = review.requeue(job, task, options)
        try:
            self.store.save(job, f"queue the {task['action']} of job {job.id}")
        except One2345Error:
            review.undo(job, before)
            raise
        self._queue.put(job)
        self.store.log(job, note)
        return job.to_public()

    def _expire_reviews(self) -> float | None:
        """Expire the jobs whose review outlived its deadline (lock held); seconds until the next deadline, or None.
        """
        expired, wait = review.due(list(self._jobs.values()), time.time())
        for job in expired:
            self._finish(job, "expired", review.expiry_error(job, self.config.review_timeout_s))
        return wait

    def _complete(self, job: Job, result: dict[str, Any] | None, error: dict[str, Any] | None) -> None:
        """Record the outcome of the worker's task (lock held): review, done, back to review, or a final state."""
        retry = review.retries_in_review(job, error)
        job.pending = None
        if error is None and "review" in result:
            self._pause(job, result["review"])
        elif error is None:
            job.result = result
            job.stage, job.fraction = "export" if job.images is None else "text_to_image", 1.0
            self._finish(job, "done", None)
        elif retry:
            self._end_task(job)
            review.back_to_review(job, error, self.config.review_timeout_s)
            self.store.save_quietly(job)
            self.store.log(job, f"back in review: {error['message']}")
        else:
            self._finish(job, "cancelled" if error["kind"] == "cancelled" else "failed", error)

    def _pause(self, job: Job, record: Any) -> None:
        """A job's views are ready for review (lock held): record what the client needs, start the timeout, and
        free the GPU memory of the step (the warm models stay)."""
        from server.stages.multiview.zero123 import Zero123Config

        self._end_task(job)
        review.enter_review(job, record, self.config.review_timeout_s, record.views(Zero123Config()))
        job.size_bytes = folder_bytes(job.folder)
        self.store.save_quietly(job)
        self.store.log(job, f"in review: views {job.review['views']}, revision {record.revision}, elevation "
                            f"{job.review['elevation']:.1f}° ({record.elevation_source})")
        self._queue.wake.notify_all()  # the worker's wait now has a deadline
        free_gpu_memory()

    @staticmethod
    def _end_task(job: Job) -> None:
        """Fix the seconds a task ran into ``elapsed_s`` (lock held)."""
        job.elapsed_s = job.elapsed()
        job.started_at = None

    def _finish(self, job: Job, state: str, error: dict[str, Any] | None) -> None:
        """Record a final state (lock held), then keep the jobs folder under its size limit. The clean-up is
        housekeeping: whatever goes wrong there is logged, never raised into the worker or a request."""
        if job.started_at is not None:
            self._end_task(job)
            if state == "done":
                self._durations.append(job.elapsed_s)
        job.state, job.error = state, error
        self.store.save_quietly(job)
        self.store.log(job, state if error is None else f"{state} ({error['kind']}): {error['message']}")
        job.finished.set()
        job.size_bytes = folder_bytes(job.folder)
        try:
            self.store.enforce_size_limit(self._jobs, self.config.max_jobs_bytes)
        except Exception:
            log.exception("the size limit's clean-up failed after job %s; the jobs are kept", job.id)

