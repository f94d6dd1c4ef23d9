"""Jobs of the inference server: a store that lives on disk and one worker thread that owns the GPU.

- :mod:`.records` — :class:`Job` (what status.json holds, checked field by field when read back), its states, and
  the words of the HTTP layer (:class:`ApiError`, :func:`error_dict`, :func:`check_options`).
- :mod:`.store` — the jobs folder: one folder per job, atomic status writes, files opened without following links,
  the size limit's clean-up, and reading the jobs back at start-up (refused records set aside in ``.quarantine/``).
- :mod:`.review` — the review state machine: review → re-roll / continue → review or done, expiry.
- :mod:`.worker` — the queue and the thread that runs each job through the pipeline (progress, cancellation).
- :mod:`.warm` — the pipeline kept loaded, and the wait after a load that failed for missing weights.
- :mod:`.manager` — :class:`JobManager`, the façade the HTTP app uses: commands, queries and state transitions.

A new job's folder is filled under a hidden temporary name and renamed into place; a client that disconnects loses
nothing (the job runs on and its result stays on disk until the job is deleted); a review survives a restart; jobs
that were queued or running when the previous server died come back as ``failed``. A re-mesh job
(``POST /v1/jobs/<id>/remesh``) starts with a copy of its source's input, views and meta.json and runs only
reconstruction, the asset stage and export.

Inside the package each module imports only those listed before it (records ← store ← review ← worker ← warm ← manager);
from outside it imports :mod:`server.common` and :mod:`server.pipeline` (and a stage's config), never the HTTP app.
"""

from server.common.fsutil import write_json_atomic
from server.service.jobs.manager import JobManager, JobsConfig
from server.service.jobs.records import (
    BAKE_OPTIONS,
    FINISHED,
    JOB_ID_RE,
    MEDIA_TYPES,
    REMESH_OPTIONS,
    STATES,
    VIEW_NAME_RE,
    ApiError,
    Job,
    RecordError,
    check_job_id,
    check_options,
    error_dict,
    now_iso,
)
from server.service.jobs.worker import Pipeline, TextToImage

__all__ = [
    "BAKE_OPTIONS",
    "FINISHED",
    "JOB_ID_RE",
    "MEDIA_TYPES",
    "REMESH_OPTIONS",
    "STATES",
    "VIEW_NAME_RE",
    "ApiError",
    "Job",
    "JobManager",
    "JobsConfig",
    "Pipeline",
    "RecordError",
    "TextToImage",
    "check_job_id",
    "check_options",
    "error_dict",
    "now_iso",
    "write_json_atomic",
]
