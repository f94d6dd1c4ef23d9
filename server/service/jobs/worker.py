"""The worker: one thread that owns the GPU and runs queued jobs through the pipeline, one at a time, from a bounded
FIFO queue.

The pipeline stays loaded between jobs. A job's progress is written to its status.json at most once a second (and at
every stage change); cancellation is a flag the pipeline checks between denoising steps. The first job also sees the
model loading: a one-time Zero123-XL conversion reports as stage ``prepare`` with a ``message``, and its cancellation
cancels the conversion (:func:`server.pipeline.loading.loading_observer`). When a task ends, its previews are the
names whose file still exists (a moved ring 2 deletes its old views). Every outcome of a run — a
result, a cancellation, a full GPU or disk, a bug — is handed to the manager as an error dict, and whatever goes
wrong in one job's housekeeping is logged and the worker goes on to the next job: the thread ends only when it is
stopped. Which transition an outcome makes (done, review, failed…) is the manager's.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from server.common.errors import CancelledError, One2345Error, storage_error
from server.pipeline.loading import loading_observer
from server.service.jobs.records import VIEW_NAME_RE, Job, error_dict
from server.service.jobs.store import JobStore, existing_previews

log = logging.getLogger(__package__)

_STATUS_WRITE_INTERVAL_S = 1.0
"""Progress reports arrive many times a second; status.json is rewritten at most this often (and at every stage
change), which keeps the disk quiet while a restarted server still sees recent progress."""
_MESSAGE_MAX = 1000
"""A progress message longer than this is cut (status.json refuses longer ones when read back)."""
_HOUSEKEEPING_RETRY_S = 1.0
"""After the housekeeping between jobs failed, the worker looks again this much later."""


class Pipeline(Protocol):
    """What the worker needs of :class:`server.pipeline.One2345Pipeline`."""

    device: str
    preset: str

    def models_loaded(self) -> dict[str, str]: ...

    def __call__(self, image: Any, run_dir: Any, options: Any = None, progress: Any = None,
                 should_cancel: Any = None) -> Any: ...

    def remesh(self, run_dir: Any, options: Any, progress: Any = None, should_cancel: Any = None) -> Any: ...


class JobQueue:
    """The jobs waiting for the worker, in order, with the condition the worker waits on (sharing ``lock``)."""

    def __init__(self, lock: threading.RLock) -> None:
        self.wake = threading.Condition(lock)
        self._jobs: deque[Job] = deque()
        self.stopping = False

    def __len__(self) -> int:
        return len(self._jobs)

    def put(self, job: Job) -> None:
        self._jobs.append(job)
        self.wake.notify_all()

    def remove(self, job: Job) -> None:
        self._jobs.remove(job)

    def take(self, housekeeping: Callable[[], float | None]) -> Job | None:
        """The next job (lock held), waiting for one; None once stopping. ``housekeeping`` runs at every wake-up
        and says how long the wait may last (None: until woken)."""
        while True:
            try:
                wait = housekeeping()
            except Exception:
                log.exception("the worker's housekeeping failed; it goes on")
                wait = _HOUSEKEEPING_RETRY_S
            if self.stopping:
                return None
            if self._jobs:
                return self._jobs.popleft()
            self.wake.wait(wait)

    def drain(self) -> list[Job]:
        """Every waiting job, removed from the queue."""
        jobs = list(self._jobs)
        self._jobs.clear()
        return jobs


class TextToImage:
    """The server's text-to-image calls: :func:`server.stages.text_to_image.make_candidates` with its preset, device
    and weights bound, and the prompt's check against the text encoder's tokenizer before a job is queued (the
    tokenizer alone is loaded, once; the model is loaded by each job and released after it)."""

    def __init__(self, preset: str, device: str, weights_dir: str | Path | None = None,
                 low_vram: bool = False) -> None:
        self.preset, self.device, self.weights_dir, self.low_vram = preset, device, weights_dir, low_vram
        self._tokenizer: Any = None

    def __call__(self, prompt: str, **kwargs: Any) -> Any:
        """Candidates of ``prompt`` (``count``, ``seed``, ``negative_prompt``, ``progress``, ``should_cancel``)."""
        from server.stages.text_to_image import make_candidates

        return make_candidates(prompt, preset=self.preset, device=self.device, weights_dir=self.weights_dir,
                               low_vram=self.low_vram, **kwargs)

    def check_prompt(self, prompt: str, negative_prompt: str | None) -> None:
        """Raise BadInputError for a prompt (or negative prompt) the text encoder cannot take whole, naming the
        limit. Without the weights the check waits for the job (which then reports the missing weights)."""
        from server.stages import text_to_image as t2i

        if self._tokenizer is None:
            if self.preset == "tiny":
                self._tokenizer = t2i.tiny_tokenizer()
            else:
                from transformers import CLIPTokenizer

                from server.common.weights import default_weights_dir, group_folder

                root = Path(self.weights_dir).expanduser() if self.weights_dir else default_weights_dir()
                folder = group_folder(t2i.WEIGHTS_GROUP, root) / "tokenizer"
                if not all((folder / name).is_file() for name in t2i.COMPONENT_FILES["tokenizer"]):
                    return
                self._tokenizer = CLIPTokenizer.from_pretrained(folder)
        config = t2i.TINY_CONFIG if self.preset == "tiny" else t2i.TextToImageConfig()
        t2i.check_prompt(prompt, self._tokenizer, template=config.template)
        if negative_prompt is not None:
            t2i.check_prompt(negative_prompt, self._tokenizer, what="negative prompt")


MakeImages = TextToImage
"""What makes an images job's candidates (a stand-in in tests)."""

Outcome = Callable[[Job, "dict[str, Any] | None", "dict[str, Any] | None"], None]
"""``(job, result, error)``: exactly one of result (a done job's result, or ``{"review": record}``) and error."""


class Worker:
    """The thread that runs jobs. ``ensure_pipeline`` gives the loaded pipeline (loading it the first time),
    ``complete`` records a run's outcome, ``housekeeping`` runs between jobs (review expiry; returns the seconds until
    it is next due), all three called with ``lock`` held except ``ensure_pipeline``."""

    def __init__(self, lock: threading.RLock, queue: JobQueue, store: JobStore,
                 ensure_pipeline: Callable[[], Pipeline], complete: Outcome,
                 housekeeping: Callable[[], float | None], make_images: MakeImages | None = None) -> None:
        self.lock, self.queue, self.store = lock, queue, store
        self.make_images = make_images
        self._ensure_pipeline, self._complete, self._housekeeping = ensure_pipeline, complete, housekeeping
        self.running: Job | None = None
        self._thread: threading.Thread | None = None

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="one2345-worker", daemon=True)
            self._thread.start()

    def join(self, timeout: float) -> None:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("the running job did not stop within %.0f s; exiting anyway", timeout)
        self._thread = None

    def _work(self) -> None:
        while True:
            with self.lock:
                job = self.queue.take(self._housekeeping)
                if job is None:
                    return
                job.state, job.started_at, job.elapsed_before = "running", time.monotonic(), job.elapsed_s
                self.running = job
                self.store.save_quietly(job)
            try:
                self.run(job)
            except Exception as e:  # the housekeeping of this job failed (its status, the size limit): not the worker
                log.exception("job %s: its outcome could not be recorded; the worker goes on", job.id)
                with self.lock:
                    if job.state == "running":
                        job.state, job.started_at = "failed", None
                        job.error = error_dict("internal", f"the job's outcome could not be recorded: "
                                                           f"{type(e).__name__}", "see the server's log")
                        job.finished.set()
                        try:
                            self.store.save_quietly(job)
                        except Exception:
                            log.exception("job %s: cannot save its status", job.id)
            finally:
                with self.lock:
                    self.running = None

    def run(self, job: Job) -> None:
        """Run one job's task to its end and hand its outcome to ``complete``; every failure of the run becomes the
        job's error."""
        handler = self.store.log_handler(job)
        if handler is not None:
            logging.getLogger().addHandler(handler)
        result: dict[str, Any] | None = None
        error: dict[str, Any] | None = None
        try:
            self.store.log(job, "running")
            on_progress = self._progress_callback(job)
            if job.bake_of is not None:  # a bake needs no model: nothing is loaded for it
                result = self._bake(job, on_progress)
            elif job.images is not None:  # the text-to-image model is loaded and released by the call itself
                result = self._images(job, on_progress)
            else:
                with loading_observer(on_progress, job.cancel.is_set):  # a first load may convert Zero123-XL
                    pipe = self._ensure_pipeline()
                result = self._generate(job, pipe, on_progress)
        except CancelledError:
            why = "the server was stopped while the job ran" if self.queue.stopping else "the job was cancelled"
            error = error_dict("cancelled", why)
        except torch.cuda.OutOfMemoryError as e:
            self.store.file_log(job, traceback.format_exc())
            first_line = str(e).splitlines()[0] if str(e) else repr(e)
            error = error_dict("out_of_memory", f"the GPU ran out of memory: {first_line}",
                               "lower the mesh resolution, close other programs that use the GPU, or run the "
                               "server with --device cpu")
        except One2345Error as e:
            self.store.file_log(job, traceback.format_exc())
            error = error_dict(e.kind, self.store.public(e.message), e.fix and self.store.public(e.fix))
        except OSError as e:
            # The disk failed under the run (full, read-only, gone): the job's own kind, with no server path.
            self.store.file_log(job, traceback.format_exc())
            failure = storage_error(e, "write the job's files", self.store.jobs_dir)
            error = error_dict(failure.kind, failure.message, failure.fix)
        except Exception as e:
            # A bug or an unexpected library failure: the job fails, the worker and the server live on.
            self.store.file_log(job, traceback.format_exc())
            log.exception("job %s failed", job.id)
            error = error_dict("internal", self.store.public(f"{type(e).__name__}: {e}"),
                               f"see log.txt in the job's folder ({job.id}/log.txt in the server's jobs folder)")
        finally:
            if handler is not None:
                logging.getLogger().removeHandler(handler)
                handler.close()
        if error is not None and error["kind"] == "out_of_memory":
            # Only now, with the exception and its frames gone, can the failed run's tensors be released; the job
            # is reported failed after that, so the next job finds the memory free.
            free_gpu_memory()
        with self.lock:
            job.message = None  # it described a step of this task
            job.previews = existing_previews(job.folder / "run", job.previews)
            self._complete(job, result, error)

    def _progress_callback(self, job: Job) -> Callable[[Any], None]:
        """The ``progress`` of one task of ``job``: each :class:`server.pipeline.Progress` report updates the job's
        stage, step, total, fraction, message and previews, and status.json is rewritten at every stage change and at
        most once a second otherwise."""
        last: dict[str, Any] = {"stage": None, "write": 0.0}

        def on_progress(p: Any) -> None:
            now = time.monotonic()
            with self.lock:
                job.stage, job.step, job.total = p.stage, int(p.step), int(p.total)
                job.fraction = min(max(float(p.fraction), 0.0), 1.0)
                message = getattr(p, "message", "") or ""  # a line for people; no server path reaches a client
                job.message = self.store.public(message)[:_MESSAGE_MAX] if message else None
                job.elapsed_s = job.elapsed()
                preview = getattr(p, "preview", None)
                if preview is not None and VIEW_NAME_RE.fullmatch(Path(preview).name):
                    name = Path(preview).name
                    if name not in job.previews:
                        job.previews.append(name)
                if p.stage != last["stage"] or now - last["write"] >= _STATUS_WRITE_INTERVAL_S:
                    if p.stage != last["stage"]:
                        self.store.log(job, f"stage {p.stage} (overall {job.fraction:.0%})"
                                            + (f": {job.message}" if job.message else ""))
                    last["stage"], last["write"] = p.stage, now
                    self.store.save_quietly(job)

        return on_progress

    def _generate_with(self, job: Job, pipe: Pipeline, on_progress: Callable[[Any], None],
                       extra: dict[str, Any]) -> dict[str, Any]:
        from server.pipeline import GenerateOptions

        options = GenerateOptions.from_dict(job.options)
        run_dir = job.folder / "run"
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
                                                  progress=on_progress, should_cancel=job.cancel.is_set, **extra)}
        else:
            out = pipe(job.folder / job.input_file, run_dir, options, progress=on_progress,
                       should_cancel=job.cancel.is_set, **extra)
        self.store.log(job, f"done: {out.vertices} vertices, {out.faces} faces, elevation {out.elevation:.1f}° "
                            f"({out.elevation_source}{', uncertain' if out.elevation_uncertain else ''}), "
                            f"timings {json.dumps(out.timings)}")
        return {"format": options.format, "elevation": float(out.elevation), "vertices": int(out.vertices),
                "elevation_uncertain": bool(out.elevation_uncertain),
                "elevation_confidence": out.elevation_confidence,
                "faces": int(out.faces), "textured": options.texture_size is not None,
                "texture_size": options.texture_size, "target_faces": options.target_faces,
                "mesh": Path(out.mesh_path).relative_to(job.folder).as_posix(),
                "meta": Path(out.meta_path).relative_to(job.folder).as_posix()}

    def _images(self, job: Job, on_progress: Callable[[Any], None]) -> dict[str, Any]:
        """An images job: ``count`` candidates written to ``candidates/`` (``<i>.png`` and ``candidates.json``)."""
        from server.pipeline import Progress

        if self.make_images is None:
            raise One2345Error("this server was started without a text-to-image model")
        request = job.images

        def progress(step: int, total: int) -> None:
            on_progress(Progress("text_to_image", step, total, step / max(total, 1)))

        candidates = self.make_images(request["prompt"], count=request["count"], seed=request["seed"],
                                      negative_prompt=request["negative_prompt"], progress=progress,
                                      should_cancel=job.cancel.is_set)
        paths = candidates.write(job.folder / "candidates")
        self.store.log(job, f"done: {len(paths)} candidates of {candidates.model}, seed {candidates.seed}, "
                            f"timings {json.dumps(candidates.timings)}")
        return {"candidates": [p.name for p in paths], "seed": int(candidates.seed)}

    def _generate(self, job: Job, pipe: Pipeline, on_progress: Callable[[Any], None]) -> dict[str, Any]:
        from server.stages.text_to_image import TextSource

        text = TextSource.read(job.folder)  # a job made from an images job's candidate: its recipe records the prompt
        extra = {} if text is None else {"text": text}
        return self._generate_with(job, pipe, on_progress, extra)

    def _bake(self, job: Job, on_progress: Callable[[Any], None]) -> dict[str, Any]:
        """A bake job: the copied views onto the uploaded mesh (:func:`server.pipeline.bake.bake_run`), written as
        ``run/mesh.<format>`` with the record in ``run/meta.json``."""
        from server.pipeline.bake import bake_run

        options, run_dir = job.options, job.folder / "run"
        out = bake_run(run_dir, job.folder / job.bake["mesh"], run_dir / f"mesh.{options['format']}",
                       texture_size=options["texture_size"], keep_uvs=job.bake["keep_uvs"],
                       vertex_colors=options["texture_size"] is None, progress=on_progress,
                       should_cancel=job.cancel.is_set, meta_path=run_dir / "meta.json")
        self.store.log(job, f"done: baked onto {job.bake['mesh']}, {out.vertices} vertices, {out.faces} faces; "
                            f"{out.uv_reason}; timings {json.dumps({k: round(v, 3) for k, v in out.timings.items()})}")
        # The source run's elevation, from the copied meta.json (read, not trusted: a number or 0).
        elevation, estimate = out.meta.get("elevation"), out.meta.get("elevation_estimate")
        finite = isinstance(elevation, int | float) and not isinstance(elevation, bool) and math.isfinite(elevation)
        return {"format": options["format"], "vertices": out.vertices, "faces": out.faces,
                "elevation": float(elevation) if finite else 0.0,
                "elevation_uncertain": isinstance(estimate, dict) and estimate.get("uncertain") is True,
                "textured": out.texture_size is not None, "texture_size": out.texture_size, "target_faces": None,
                "uv_source": out.uv_source, "mesh": out.files[0].relative_to(job.folder).as_posix(),
                "meta": out.meta_path.relative_to(job.folder).as_posix()}


def free_gpu_memory() -> None:
    """Release what a failed run left on the GPU so that the next job starts from a clean slate."""
    gc.collect()
    torch.cuda.empty_cache()  # a no-op when CUDA was never initialised
