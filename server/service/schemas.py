"""The shapes of the HTTP API: the response models ``/openapi.json`` publishes (for the add-on's authors), the error
envelope and the status code of each error kind."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from server.service.jobs import error_dict

log = logging.getLogger(__name__)


STATUS_OF_KIND = {
    "bad_input": 400, "unauthorized": 401, "not_found": 404, "conflict": 409, "too_large": 413,
    "queue_full": 429, "internal": 500, "missing_weights": 503, "out_of_memory": 507, "storage": 507,
    "cancelled": 409, "offline": 503,
}
"""HTTP status of each error kind. ``cancelled`` and ``out_of_memory`` normally appear only inside a job's status
(the job failed, the request did not); the codes are used if such an error ever reaches a response directly."""
DOWNLOAD_TOKEN_PATTERN = r"^[!-~]+$"
"""A hub token in POST /v1/weights/download: printable ASCII without spaces (checked by the weights manager; stated in
the schema)."""
# -- response schemas (for /openapi.json and the add-on's authors) --------------------------------------------------


class ErrorDetail(BaseModel):
    kind: str = Field(description="bad_input | unauthorized | not_found | conflict | too_large | queue_full | "
                                  "missing_weights | offline | out_of_memory | storage | cancelled | internal")
    message: str = Field(description="what went wrong, naming the offending value and what is allowed")
    fix: str | None = Field(description="a short instruction that resolves the problem, if one exists")


class ErrorBody(BaseModel):
    error: ErrorDetail


class DeviceInfo(BaseModel):
    name: str = Field(description="e.g. NVIDIA H200, or the CPU's name")
    kind: str = Field(description="cuda or cpu")
    memory_free_bytes: int | None = Field(description="free device memory now (CUDA only)")
    memory_total_bytes: int | None


class WeightsHealth(BaseModel):
    ready: bool = Field(description="every file the server's preset needs is present: jobs can run")
    complete: bool = Field(description="every weight file is present (the optional ones too; the on-demand "
                           "text-to-image model is listed in files but not counted)")
    missing: list[str] = Field(description="names of the files that are not present (missing, partial or corrupt)")
    required_missing: list[str] = Field(description="those of them the preset cannot run without")
    downloading: bool = Field(description="a download is running (see GET /v1/weights/download)")


class Health(BaseModel):
    status: str = Field(description='"ok", or "degraded" when the worker thread has died (no job can run)')
    version: str
    device: str
    preset: str
    models_loaded: dict[str, str] = Field(description="model name → what was loaded; empty until the first job "
                                                      "(or --preload)")
    queue_length: int = Field(description="jobs waiting behind the running one")
    running: str | None = Field(description="id of the running job, or null")
    worker_alive: bool = Field(description="the thread that runs jobs is alive")
    quarantined: int = Field(description="job folders set aside at start-up (to .quarantine/ in the jobs folder) "
                                         "because their status.json was damaged; the server's log names each")
    recent_job_s: float | None = Field(None, description="median seconds of the last (up to 5) finished "
                                                         "generations: the add-on's time estimate; null before the "
                                                         "first")
    device_info: DeviceInfo | None = Field(None, description="the device's name and free memory")
    run_needs_bytes: int | None = Field(None, description="peak device memory of one run of this preset, as "
                                                          "measured; null when negligible or unknown")
    weights: WeightsHealth | None = Field(None, description="which weight files are missing (GET /v1/weights "
                                                            "for details); null when the server has no weights "
                                                            "manager")


class JobCreated(BaseModel):
    id: str = Field(description="32 lowercase hex digits")
    state: str
    url: str = Field(description="the job's status URL")


class Preview(BaseModel):
    name: str
    url: str


class JobResult(BaseModel):
    url: str
    format: str
    meta_url: str
    elevation: float = Field(description="degrees above the horizon of the input view")
    vertices: int
    faces: int
    elevation_uncertain: bool = Field(description="the elevation was estimated without confidence (or fell back to "
                                                  "0°): the mesh may be wrong; set the elevation by hand")
    elevation_confidence: float | None = Field(description="0–1 confidence of the estimate; null when given")
    textured: bool = Field(description="the GLB has a baked base-colour texture (and UVs) instead of vertex colours")
    texture_size: int | None = Field(description="side of the texture in texels; null without one")
    target_faces: int | None = Field(description="the polygon budget asked for; null: every marching-cubes face")
    uv_source: str | None = Field(None, description="a bake job's UVs: mesh (the uploaded mesh's own) or unwrap (a "
                                                    "fresh one); null for other jobs and vertex colours")


class ImagesResult(BaseModel):
    candidates: list[Preview] = Field(description="the candidate images 0.png…, in order")
    seed: int = Field(description="the set's seed: candidate i came from seed + i")


class ImagesRequest(BaseModel):
    prompt: str = Field(description="what to picture, as typed (the server's template adds the framing)")
    count: int = Field(4, description="how many candidates, 1…8")
    seed: int | None = Field(None, description="null (drawn) or 0…2³²−count")
    negative_prompt: str | None = Field(None, description="null for the server's default")


class ReviewView(BaseModel):
    name: str = Field(description="the stage-1 view's file name, e.g. 5.png")
    url: str


class Review(BaseModel):
    views: list[ReviewView] = Field(description="the 8 stage-1 views: 0–3 and 4–7 (or 8–11, by the elevation)")
    revision: int = Field(description="bumped by every re-roll: fetch the views again when it changes")
    elevation: float = Field(description="degrees above the horizon that the rest of the run will use")
    elevation_source: str = Field(description="estimated, fallback or given")
    elevation_uncertain: bool
    elevation_confidence: float | None
    seed: int = Field(description="the run's seed")
    view_seeds: dict[str, int] = Field(description="re-rolled views → the seed each was last generated with")
    notes: list[str]
    expires_in_s: float | None = Field(description="seconds until the review expires; null unless in review")


class JobStatus(BaseModel):
    id: str
    kind: str = Field("mesh", description="mesh (an image-to-3D, re-mesh or bake job) or images (POST /v1/images)")
    state: str = Field(description="queued | running | review | done | failed | cancelled | expired")
    stage: str | None = Field(description="prepare (the one-time set-up while models load), preprocess, stage1, "
                                          "stage2, elevation, stage1b, stage2b, reconstruct, asset or export; null "
                                          "while queued")
    step: int
    total: int
    fraction: float = Field(description="overall fraction done, 0…1")
    elapsed_s: float = Field(description="seconds spent running")
    eta_s: float | None = Field(description="estimated seconds left; null when unknown")
    created: str = Field(description="ISO 8601, UTC")
    options: dict[str, Any]
    previews: list[Preview]
    message: str | None = Field(default=None, description="a line for people about the current step while one is "
                                                          "given, e.g. during the one-time set-up (stage prepare): "
                                                          "\"One-time set-up: converting Zero123-XL …\"; else null")
    error: ErrorDetail | None
    result: JobResult | ImagesResult | None
    images: dict[str, Any] | None = Field(None, description="an images job's request: prompt, count, seed (the "
                                                           "drawn one when none was given), negative_prompt")
    remesh_of: str | None = Field(description="the job whose views this one re-meshes; null for a generation")
    bake_of: str | None = Field(None, description="the job whose views this one bakes onto an uploaded mesh; null "
                                                  "otherwise")
    pinned: bool = Field(description="kept by the jobs folder's size-limit clean-up")
    review: Review | None = Field(description="the views and elevation to review (option review: true); null "
                                              "otherwise")


class JobList(BaseModel):
    jobs: list[JobStatus]
    total: int = Field(description="jobs in all")
    next: str | None = Field(description="pass as ?after= for the next page; null on the last page")


ERROR_DESCRIPTIONS = {
    400: "bad input", 401: "missing or wrong bearer token", 404: "no such job or file", 409: "the job is not done",
    413: "the upload is too large", 429: "the queue is full (see Retry-After)",
    503: "model weights are missing (see Retry-After)", 507: "the server's disk refused the write (full or read-only)"}
"""What each error status means on the job routes (``/openapi.json``); a router with other reasons passes its own."""


def documented_errors(*codes: int,
                      descriptions: Mapping[int, str] = ERROR_DESCRIPTIONS) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of a route for the error statuses ``codes``: each the :class:`ErrorBody` envelope with its
    ``descriptions`` entry (every route's errors are that one envelope; only why a status happens differs)."""
    return {code: {"model": ErrorBody, "description": descriptions[code]} for code in codes}


def error_response(kind: str, message: str, fix: str | None = None, headers: dict[str, str] | None = None,
                   status: int | None = None) -> JSONResponse:
    """The JSON error envelope ``{"error": {"kind", "message", "fix"}}`` with the status code of ``kind``."""
    headers = dict(headers or {})
    if kind == "unauthorized":
        headers.setdefault("WWW-Authenticate", "Bearer")
    return JSONResponse({"error": error_dict(kind, message, fix)},
                        status_code=status or STATUS_OF_KIND.get(kind, 500), headers=headers)
