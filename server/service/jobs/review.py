"""The review state machine: a job that stops after its 8 stage-1 views until a client re-rolls, continues, or lets
it expire.

::

    running ──(views ready)──► review ──reroll──► queued ──► running ──(views ready)──► review
                                  │  └─continue─► queued ──► running ──► done | failed | cancelled
                                  └──(timeout)──► expired            (a task the disk refused ──► review again)

Each step is a task of the worker's queue, run from the job's files alone, so a review survives a restart. The
functions here decide and record the transitions on a :class:`.records.Job` (the caller holds the manager's lock and
saves the status); they never touch the disk or the GPU.
"""

from __future__ import annotations

import json
import time
from typing import Any

from server.common.errors import BadInputError
from server.service.jobs.records import FINISHED, ApiError, Job, check_options, error_dict

RETRYABLE_KINDS = frozenset({"storage"})
"""Failures of a re-roll or continue after which the job goes back to review instead of failing: the disk refused a
write (full or read-only), which says nothing of the views, so once space is freed the client can go on."""


def require_review(job: Job) -> None:
    """Raises ApiError conflict unless ``job`` is in review."""
    if job.state != "review":
        raise ApiError("conflict", f"job {job.id} is {job.state}, not in review",
                       fix="submit with the option \"review\": true, and re-roll or continue while its state is "
                           "review" if job.state in FINISHED else "wait until its state is review")


def reroll_task(job: Job, body: Any) -> dict[str, Any]:
    """The worker's task for a re-roll request ``{"views": [1, 5], "seed": 7}`` (seed optional) of a job in review.

    Raises:
        BadInputError: a malformed body, a view that is not one of the job's stage-1 views, a bad seed.
    """
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
    return {"action": "reroll", "views": sorted(set(views)), "seed": seed}


def continue_options(job: Job, body: Any) -> dict[str, Any]:
    """The options the rest of the run uses, for a continue request ``{}`` or ``{"elevation": 20}``.

    Raises:
        BadInputError: a malformed body or an elevation out of range.
    """
    if not isinstance(body, dict) or set(body) - {"elevation"}:
        raise BadInputError(f"continue takes a JSON object with at most 'elevation', got "
                            f"{json.dumps(body)[:120]}", fix='send {} or e.g. {"elevation": 20}')
    if body.get("elevation") is not None:
        return check_options({**job.options, "elevation": body["elevation"]})
    return job.options


def requeue(job: Job, task: dict[str, Any], options: dict[str, Any] | None = None) -> dict[str, Any]:
    """review → queued for ``task`` (and ``options``, for a continue). Returns what :func:`undo` needs to put the
    job back as it was, should its status not be saved."""
    before = {"state": job.state, "pending": job.pending, "error": job.error, "options": job.options}
    job.state, job.pending, job.error = "queued", task, None
    if options is not None:
        job.options = options
    return before


def undo(job: Job, before: dict[str, Any]) -> None:
    """Put a job back as :func:`requeue` found it."""
    job.state, job.pending, job.error, job.options = (before["state"], before["pending"], before["error"],
                                                      before["options"])


def enter_review(job: Job, record: Any, timeout_s: float, views: list[int]) -> None:
    """running → review: record what the client needs of the views' ``record`` (a
    :class:`server.pipeline.ViewsRecord`; ``views`` its stage-1 view numbers) and start the review's clock."""
    estimate = record.estimate or {}
    job.review = {
        "views": views, "revision": record.revision,
        "elevation": round(90.0 - record.polar, 3), "elevation_source": record.elevation_source,
        "elevation_uncertain": bool(estimate.get("uncertain", False)) and record.elevation_source != "given",
        "elevation_confidence": estimate.get("confidence"), "seed": record.seed,
        "view_seeds": dict(record.view_seeds), "notes": list(record.notes),
        "deadline": time.time() + timeout_s, "timeout_s": timeout_s,
    }
    job.state = "review"


def retries_in_review(job: Job, error: dict[str, Any] | None) -> bool:
    """Whether a failed task of ``job`` sends it back to review: a re-roll or continue that the disk refused."""
    return (error is not None and error["kind"] in RETRYABLE_KINDS and job.review is not None
            and (job.pending or {}).get("action") in ("reroll", "continue"))


def back_to_review(job: Job, error: dict[str, Any], timeout_s: float) -> None:
    """running → review after a re-roll or continue the disk refused: every view file is still whole (the pipeline
    replaces each atomically, though a re-roll may have renewed some before it stopped), the error says why, and the
    review's clock starts again so that there is time to free space."""
    job.state, job.error = "review", error
    job.review["deadline"] = time.time() + timeout_s
    job.review["timeout_s"] = timeout_s


def due(jobs: list[Job], now: float) -> tuple[list[Job], float | None]:
    """The jobs in review whose deadline has passed, and seconds until the next deadline of the rest (None: none)."""
    expired, next_deadline = [], None
    for job in jobs:
        if job.state != "review":
            continue
        deadline = job.review["deadline"]
        if deadline <= now:
            expired.append(job)
        else:
            next_deadline = deadline if next_deadline is None else min(next_deadline, deadline)
    return expired, None if next_deadline is None else max(next_deadline - now, 0.01)


def expiry_error(job: Job, default_timeout_s: float) -> dict[str, Any]:
    """The error of an expired review, quoting the review time the job was given (a review started before a restart
    keeps the timeout it ran under; ``default_timeout_s`` for a record from before that was recorded)."""
    timeout = job.review.get("timeout_s", default_timeout_s)
    return error_dict("cancelled", f"no re-roll or continue within the review time ({timeout:g} s); the views are "
                                   "kept in the job's folder",
                      "submit the image again (with the same seed, the same views come back)")
