"""The HTTP API of the inference server (FastAPI): submit, watch, fetch, cancel and delete jobs.

The contract, shared with the Blender add-on, is versioned under ``/v1`` and described at ``/openapi.json``:

    GET    /v1/health                      no token; status, version, device, models loaded, queue length
    POST   /v1/jobs                        multipart: image (+ options JSON) → 202 {"id", "state", "url"}; or
                                           no image and options {"image_of": <images job id>, "index": i, …}: the
                                           input is that job's candidate i, its prompt recorded in the recipe
    POST   /v1/images                      JSON {prompt, count 1–8, seed?, negative_prompt?} → 202: a job of kind
                                           images whose result is count candidate PNGs (text to image)
    GET    /v1/jobs/{id}/candidates/{i}.png  a candidate of a done images job (PNG)
    GET    /v1/jobs?limit=N&after=ID       a page of jobs, newest first (including those found on disk at start)
    GET    /v1/jobs/{id}                   state, stage, step/total, fraction, elapsed, ETA, previews, error, result
    GET    /v1/jobs/{id}/result            the mesh (glb, ply or obj) as an attachment
    GET    /v1/jobs/{id}/meta              meta.json of the run (elevation, timings, options, versions)
    GET    /v1/jobs/{id}/views/{name}      a generated view (PNG)
    POST   /v1/jobs/{id}/remesh            JSON {resolution, target_faces, texture_size, format} → 202: a new job
                                           meshing the done job's views again (no Zero123; the source is kept)
    POST   /v1/jobs/{id}/bake              multipart: mesh (GLB/OBJ/PLY) (+ options JSON {texture_size, keep_uvs,
                                           format}) → 202: a new job baking the done job's views onto that mesh
    POST   /v1/jobs/{id}/reroll            JSON {views: [1, 5], seed?} → a job in review re-rolls those views
    POST   /v1/jobs/{id}/continue          JSON {elevation?} → a job in review goes on to the mesh
    PUT    /v1/jobs/{id}/pin               keep the job when the jobs folder is over its size limit (DELETE: unpin)
    DELETE /v1/jobs/{id}                   cancel (queued/running/review, 200) or remove (finished, 204)
    GET    /v1/weights                     the weight files (state, size, checksum, licence); POST/GET/DELETE
                                           /v1/weights/download: the download job (server/weights_api.py)

Every error is ``{"error": {"kind", "message", "fix"}}`` with the status code of its kind
(:data:`server.service.schemas.STATUS_OF_KIND`; the guard and the whole-form parser are :mod:`server.service.guard`);
no message names a server path (files are named relative to their job). The only 5xx answers by design are 503
``missing_weights`` (and ``offline``: a weights download under HF_HUB_OFFLINE) and 507 ``storage`` (the disk refused
a write, or lacks the space a weights download needs); a 500 ``internal`` is a bug, and even then the
connection is kept and the message shows no internals. Everything under ``/v1`` except the health check needs
``Authorization: Bearer <token>``; the schema and the docs pages (``/openapi.json``, ``/docs``, ``/redoc``) are public
because they hold no data. Authentication and the body size limit are enforced by an ASGI middleware in front of the
app, so an unauthenticated or oversized upload is refused before any of it is read. Files are streamed from a handle
opened when the request is checked, so a DELETE at the same moment can neither break the download nor turn it into
an error.
"""

from __future__ import annotations

import io
import json
import logging
import mimetypes
import os
import re
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import PurePath
from typing import Annotated, Any, BinaryIO

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRouter
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from server import __version__
from server.common.devices import PEAK_MEMORY_BYTES, describe_device
from server.common.errors import BadInputError, One2345Error, only_query
from server.common.images import check_image_size
from server.service.guard import FORM_SLACK_BYTES, MIB, Guard, Receive, Scope, Send, WholeFormRoute
from server.service.jobs import (
    BAKE_OPTIONS,
    MEDIA_TYPES,
    REMESH_OPTIONS,
    ApiError,
    JobManager,
    check_options,
)
from server.service.schemas import (
    DOWNLOAD_TOKEN_PATTERN,
    Health,
    ImagesRequest,
    JobCreated,
    JobList,
    JobStatus,
    documented_errors,
    error_response,
)
from server.service.weights_api import WeightsManager, weights_router

log = logging.getLogger(__name__)

IMAGE_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif", "GIF": "gif"}
"""Image formats accepted for upload (Pillow format name → file extension). Other decoders are never invoked on
uploaded bytes."""
_FILE_CHUNK = 256 * 1024


@dataclass(frozen=True)
class AppConfig:
    """What the HTTP layer needs to know besides the job manager."""

    token: str
    """The bearer token every request under /v1 (except /v1/health) must carry."""
    device: str = "cpu"
    """Device reported by /v1/health until the pipeline is loaded (then the pipeline's own)."""
    preset: str = "paper"
    """Model preset reported by /v1/health."""
    max_upload_bytes: int = 20 * MIB
    """Largest accepted image file (20 MiB by default; --max-upload-mb)."""
    max_pixels: int = 40_000_000
    """Largest accepted image area (40 MP): bigger images would only be downscaled to 256² at great cost."""
    min_side: int = 16
    """Smallest accepted image width and height: below it there is no object to see."""


# -- pure helpers ---------------------------------------------------------------------------------------------------


def inspect_image(data: bytes, config: AppConfig) -> str:
    """Check an uploaded image before it is queued; return its file extension.

    The header is read first (size and format) so that a decompression bomb is refused before any pixel is decoded;
    then the image is decoded once to catch truncated or corrupt files now rather than minutes later in the worker.

    Raises:
        BadInputError: empty, not an image of an accepted format, corrupt, or outside the size limits.
        ApiError: ``too_large`` when the file exceeds ``config.max_upload_bytes``.
    """
    if not data:
        raise BadInputError("the image is empty (0 bytes)", fix="upload a PNG, JPEG or WebP file")
    if len(data) > config.max_upload_bytes:
        raise ApiError("too_large", f"the image is {len(data) / MIB:.1f} MiB; the limit is "
                                    f"{config.max_upload_bytes / MIB:g} MiB",
                       fix="downscale or recompress the image (the model sees it at 256×256)")
    accepted = ", ".join(IMAGE_FORMATS)
    try:
        image = Image.open(io.BytesIO(data), formats=list(IMAGE_FORMATS))
    except Image.DecompressionBombError as e:  # Pillow's own guard fires at open for > 2 × 89 MP
        raise BadInputError(f"the image is far too large ({e}); the limit is {config.max_pixels / 1e6:g} MP",
                            fix="downscale the image") from None
    except UnidentifiedImageError:  # its text names the in-memory buffer, which tells a client nothing
        raise BadInputError(f"the upload is not a readable image; accepted formats: {accepted}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise BadInputError(f"the upload is not a readable image ({e}); accepted formats: {accepted}") from None
    with image:
        check_image_size(image.size, "the image", config.max_pixels, config.min_side)  # the CLI's rule too
        try:
            image.load()
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise BadInputError(f"the {image.format} image is corrupt or truncated ({e})") from None
        return IMAGE_FORMATS[image.format]


def parse_options(text: str | None) -> dict[str, Any]:
    """The ``options`` form field (a JSON object string) → validated options as a plain dict (all fields).

    Raises:
        BadInputError: not JSON, not an object, an unknown field, a value out of range, or a texture in a format
            other than glb (:func:`server.service.jobs.check_options`).
    """
    return check_options(parse_json(text, "options", _OPTIONS_EXAMPLE))


def parse_json(text: str | bytes | None, what: str, example: str) -> Any:
    """A JSON document from a client (empty → ``{}``); NaN, Infinity, huge integers and deep nesting are refused.

    Raises:
        BadInputError: naming ``what`` and showing ``example``.
    """
    if text is None or not text.strip():
        return {}
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise BadInputError(f"{what} is nested too deeply to be an options object", fix=example) from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits, NaN or Infinity
        raise BadInputError(f"{what} is not valid JSON ({str(e)[:200]})", fix=example) from None


_OPTIONS_EXAMPLE = 'send a JSON object, e.g. {"steps_stage1": 50, "format": "glb"}'
_IMAGES_EXAMPLE = 'send a JSON object, e.g. {"prompt": "a rusty fire hydrant", "count": 4, "seed": 7}'


def parse_images_request(body: Any) -> dict[str, Any]:
    """The body of ``POST /v1/images`` → ``{"prompt", "count", "seed", "negative_prompt"}`` (count 4 and seed and
    negative prompt null by default), checked as far as it can be without the model
    (:func:`server.stages.text_to_image.check_request`).

    Raises:
        BadInputError: not an object, an unknown field, an empty prompt, a count outside 1…8, a bad seed.
    """
    from server.stages.text_to_image import check_request, check_text

    if not isinstance(body, dict):
        raise BadInputError(f"the images body must be a JSON object, got {type(body).__name__}", fix=_IMAGES_EXAMPLE)
    fields = ("prompt", "count", "seed", "negative_prompt")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise BadInputError(f"images field(s) {unknown} are unknown; allowed: {list(fields)}", fix=_IMAGES_EXAMPLE)
    if "prompt" not in body:
        raise BadInputError("the images body lacks its prompt", fix=_IMAGES_EXAMPLE)
    request = {"prompt": body["prompt"], "count": body.get("count", 4), "seed": body.get("seed"),
               "negative_prompt": body.get("negative_prompt")}
    check_request(request["prompt"], request["count"], request["seed"])
    if request["negative_prompt"] is not None:
        check_text(request["negative_prompt"], "negative prompt")
    return request


_REMESH_EXAMPLE = 'send a JSON object, e.g. {"target_faces": 20000, "texture_size": 1024}'
_BAKE_EXAMPLE = 'send a JSON object, e.g. {"texture_size": 1024, "keep_uvs": true, "format": "glb"}'
MESH_UPLOAD_FORMATS = ("glb", "obj", "ply")
"""Mesh files a bake accepts, told apart by their content (GLB: the ``glTF`` magic; PLY: the ``ply`` line; OBJ:
UTF-8 text)."""


def inspect_mesh(data: bytes, filename: str | None, config: AppConfig) -> str:
    """Check an uploaded mesh before a bake is queued (it is read whole now, not minutes later in the worker);
    return its format (``glb``, ``obj`` or ``ply``).

    Raises:
        BadInputError: empty, not a GLB, OBJ or PLY file (or not the format its name claims), or a file the mesh
            reader refuses (the message names the upload, never a server path).
        ApiError: ``too_large`` over the upload size limit.
    """
    from server.common.mesh_io import load_mesh_with_uvs

    name = PurePath((filename or "mesh").replace("\\", "/")).name[:80] or "mesh"
    if not data:
        raise BadInputError(f"the mesh {name!r} is empty (0 bytes)", fix="upload a GLB, OBJ or PLY file")
    if len(data) > config.max_upload_bytes:
        raise ApiError("too_large", f"the mesh is {len(data) / MIB:.1f} MiB; the limit is "
                                    f"{config.max_upload_bytes / MIB:g} MiB",
                       fix="decimate the mesh, or start the server with a larger --max-upload-mb")
    claimed = PurePath(name).suffix.lower().lstrip(".")
    if data[:4] == b"glTF":
        fmt = "glb"
    elif data[:4] in (b"ply\n", b"ply\r"):
        fmt = "ply"
    elif claimed in ("glb", "ply"):
        raise BadInputError(f"the mesh {name!r} is not a {claimed.upper()} file (its first bytes are not a "
                            f"{claimed.upper()} header)", fix="upload the file itself, as GLB, OBJ or PLY")
    else:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            raise BadInputError(f"the mesh {name!r} is not a GLB, OBJ or PLY file; allowed: "
                                f"{', '.join(MESH_UPLOAD_FORMATS)} (a .gltf, .fbx or .blend must be exported as one "
                                "of these)") from None
        fmt = "obj"
    with tempfile.TemporaryDirectory(prefix="one2345-mesh-") as folder:
        path = PurePath(folder) / f"upload.{fmt}"
        with open(path, "wb") as f:
            f.write(data)
        try:
            load_mesh_with_uvs(path)
        except BadInputError as e:  # the reader names its file: the upload's name, not the temporary path
            raise BadInputError(e.message.replace(str(path), f"the mesh {name!r}"), fix=e.fix) from None
    return fmt


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def download_stem(filename: str | None) -> str:
    """A safe stem for the result's file name from the upload's name (``"my photo.png"`` → ``"my_photo"``)."""
    stem = PurePath((filename or "").replace("\\", "/")).stem
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")[:64]
    return stem or "mesh"


class OpenFileResponse(Response):
    """Streams a file that is already open (and closes it): unlike FileResponse, nothing is looked up by path after
    the request was checked, so the file cannot vanish or be swapped in between."""

    def __init__(self, file: BinaryIO, media_type: str, filename: str | None = None, status_code: int = 200) -> None:
        self.file = file
        self.size = os.fstat(file.fileno()).st_size
        headers = {"content-length": str(self.size)}
        if filename is not None:  # download_stem() leaves only [A-Za-z0-9._-], so no quoting is needed
            headers["content-disposition"] = f'attachment; filename="{filename}"'
        super().__init__(status_code=status_code, media_type=media_type, headers=headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            left = self.size  # job files are written whole and never changed in place, so the size holds
            while True:
                chunk = await run_in_threadpool(self.file.read, min(_FILE_CHUNK, left)) if left > 0 else b""
                left -= len(chunk)
                last = not chunk or left <= 0  # a file that shrank ends short: a length mismatch, never garbage
                await send({"type": "http.response.body", "body": chunk, "more_body": not last})
                if last:
                    break
        finally:
            self.file.close()


# -- the app ----------------------------------------------------------------------------------------------------------


def create_app(manager: JobManager, config: AppConfig, weights: WeightsManager | None = None) -> FastAPI:
    """The FastAPI app serving ``manager``'s jobs. Its lifespan starts the worker and, at shutdown, cancels the
    running job and waits for the worker to end.

    Args:
        manager: the job store and worker (loaded from its jobs dir, not yet started).
        config: token, limits and what /v1/health reports.
        weights: the weights folder and its download job (``/v1/weights``); jobs are refused while it lacks a file
            the preset needs, and a finished download lifts a missing-weights refusal at once.
    """
    if weights is not None:
        manager.models.preflight = weights.require_ready
        weights.on_complete(manager.models.forget_failure)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        manager.start()
        try:
            yield
        finally:
            if weights is not None:
                await run_in_threadpool(weights.stop)
            await run_in_threadpool(manager.stop)

    app = FastAPI(title="One2345 inference server", version=__version__, lifespan=lifespan,
                  description="Image → 3D mesh jobs (One-2-3-45). All /v1 routes except /v1/health need "
                              "'Authorization: Bearer <token>'.")
    router = APIRouter(prefix="/v1", route_class=WholeFormRoute)

    @router.get("/health", response_model=Health, summary="Is the server up, and what is it doing")
    def health() -> dict[str, Any]:
        pipe = manager.pipeline
        device, preset = (pipe.device, pipe.preset) if pipe else (config.device, config.preset)
        return {"version": __version__, "device": device, "preset": preset, **manager.health(),  # with "status"
                "device_info": describe_device(device), "run_needs_bytes": PEAK_MEMORY_BYTES.get(preset),
                "weights": weights.health() if weights is not None else None}

    @router.post("/jobs", status_code=202, response_model=JobCreated, summary="Submit an image",
                 responses=documented_errors(400, 401, 413, 429, 503, 507))
    async def submit(
        request: Request,
        image: Annotated[UploadFile | None, File(description="the image: PNG, JPEG, WebP, BMP, TIFF or GIF, at most "
                                                             "--max-upload-mb, 16 px…40 MP (never empty); left out "
                                                             "when the options name a candidate (image_of, index)",
                                                 json_schema_extra={"minLength": 1})] = None,
        options: Annotated[str | None, Form(description="a JSON object with any of: elevation (null or −60…70), "
                                                        "seed (null or 0…2³²−1), steps_stage1 (2…200), "
                                                        "steps_stage2 (2…200), guidance (1…20), resolution "
                                                        "(32…512), format (ply|glb|obj), remove_background "
                                                        "(bool), target_faces (null or 1000…2000000), "
                                                        "texture_size (null or 256…4096, glb only), review (bool), "
                                                        "view_seeds (null or {view: seed}); and, instead of an "
                                                        "image, image_of (an images job's id) with index (its "
                                                        "candidate)")] = None,
    ) -> JSONResponse:
        form = await request.form()  # already parsed for the parameters above; checked for stray parts here
        unknown = sorted(set(form.keys()) - {"image", "options"})
        if unknown:
            raise BadInputError(f"unknown form field(s) {unknown}; the form has the parts 'image' and 'options'")
        if len(form.getlist("image")) > 1 or len(form.getlist("options")) > 1:
            raise BadInputError("send exactly one 'image' part and at most one 'options' part")
        raw = parse_json(options, "options", _OPTIONS_EXAMPLE)
        if isinstance(raw, dict) and ("image_of" in raw or "index" in raw):
            # A candidate of an images job as the input: the smallest change to this route (no image part).
            if image is not None:
                raise BadInputError("send either an 'image' part or options image_of and index, not both")
            rest = {k: v for k, v in raw.items() if k not in ("image_of", "index")}
            if "image_of" not in raw or "index" not in raw:
                raise BadInputError("options image_of and index go together: the images job's id and the "
                                    "candidate's number", fix='e.g. {"image_of": "<images job id>", "index": 2}')
            source, index = raw["image_of"], raw["index"]
            if not isinstance(source, str):
                raise BadInputError(f"option image_of={source!r} is not allowed: an images job's id (a string)")
            status = await run_in_threadpool(manager.submit_from_candidate, source, index, "candidate",
                                             check_options(rest))
            return JSONResponse({"id": status["id"], "state": status["state"], "url": f"/v1/jobs/{status['id']}"},
                                status_code=202)
        if image is None:
            raise BadInputError("send exactly one 'image' part (or options image_of and index, naming a candidate "
                                "of an images job)")
        data = await image.read()
        parsed = check_options(raw)
        ext = await run_in_threadpool(inspect_image, data, config)
        status = await run_in_threadpool(manager.submit, data, ext, download_stem(image.filename), parsed)
        return JSONResponse({"id": status["id"], "state": status["state"], "url": f"/v1/jobs/{status['id']}"},
                            status_code=202)

    @router.post("/images", status_code=202, response_model=JobCreated,
                 summary="Make candidate images of a prompt (a job of kind images)",
                 openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                     "schema": {**ImagesRequest.model_json_schema(), "additionalProperties": False}}}}},
                 responses=documented_errors(400, 401, 429, 507))
    async def submit_images(request: Request) -> JSONResponse:
        body = parse_json(await request.body(), "the images body", _IMAGES_EXAMPLE)
        status = await run_in_threadpool(manager.submit_images, parse_images_request(body))
        return JSONResponse({"id": status["id"], "state": status["state"], "url": f"/v1/jobs/{status['id']}"},
                            status_code=202)

    @router.get("/jobs/{job_id}/candidates/{name}", response_class=OpenFileResponse,
                summary="A candidate image of a done images job",
                responses={200: {"content": {"image/png": {}}, "description": "the candidate"},
                           **documented_errors(401, 404, 409, 507)})
    def job_candidate(job_id: str, name: str) -> OpenFileResponse:
        return OpenFileResponse(manager.open_candidate(job_id, name), media_type="image/png")

    @router.get("/jobs", response_model=JobList, summary="Jobs, newest first, a page at a time",
                responses=documented_errors(400, 401, 404))
    def list_jobs(request: Request,
                  limit: Annotated[int | None, Query(ge=1, le=1000, description="jobs per page, 1…1000 (default: "
                                                                             "all)")] = None,
                  after: Annotated[str | None, Query(description="the id of the last job of the previous page")] = None,
                  ) -> dict[str, Any]:
        only_query(request.query_params, "limit", "after")
        return manager.list_jobs(limit, after)

    @router.get("/jobs/{job_id}", response_model=JobStatus, summary="A job's state and progress",
                responses=documented_errors(401, 404))
    def job_status(job_id: str) -> dict[str, Any]:
        return manager.status(job_id)

    @router.get("/jobs/{job_id}/result", response_class=OpenFileResponse, summary="The mesh of a done job",
                responses={200: {"content": {t: {} for t in MEDIA_TYPES.values()},
                                 "description": "the mesh file as an attachment"},
                           **documented_errors(401, 404, 409, 507)})
    def job_result(job_id: str) -> OpenFileResponse:
        file, fmt, filename = manager.open_result(job_id)
        return OpenFileResponse(file, media_type=MEDIA_TYPES[fmt], filename=filename)

    @router.get("/jobs/{job_id}/meta", response_class=OpenFileResponse, summary="meta.json of a done job",
                responses={200: {"content": {"application/json": {"schema": {"type": "object"}}},
                                 "description": "elevation, timings, options, versions"},
                           **documented_errors(401, 404, 409, 507)})
    def job_meta(job_id: str) -> OpenFileResponse:
        return OpenFileResponse(manager.open_meta(job_id), media_type="application/json")

    @router.get("/jobs/{job_id}/input", response_class=OpenFileResponse, summary="The uploaded image, byte for byte",
                responses={200: {"content": {"image/*": {}}, "description": "the input image"},
                           **documented_errors(401, 404, 507)})
    def job_input(job_id: str) -> OpenFileResponse:
        file, name = manager.open_input(job_id)
        return OpenFileResponse(file, media_type=mimetypes.guess_type(name)[0] or "application/octet-stream")

    @router.get("/jobs/{job_id}/views/{name}", response_class=OpenFileResponse, summary="A generated view",
                responses={200: {"content": {"image/png": {}}, "description": "the view"},
                           **documented_errors(401, 404, 507)})
    def job_view(job_id: str, name: str) -> OpenFileResponse:
        return OpenFileResponse(manager.open_view(job_id, name), media_type="image/png")

    @router.post("/jobs/{job_id}/remesh", status_code=202, response_model=JobCreated,
                 summary="Mesh a done job's views again (no Zero123) as a new job",
                 openapi_extra={"requestBody": {"content": {"application/json": {"schema": {
                     "type": "object", "additionalProperties": False,
                     "properties": {name: {} for name in REMESH_OPTIONS}}}}}},
                 responses=documented_errors(400, 401, 404, 409, 429, 503, 507))
    async def remesh(job_id: str, request: Request) -> JSONResponse:
        overrides = parse_json(await request.body(), "the re-mesh body", _REMESH_EXAMPLE)
        status = await run_in_threadpool(manager.submit_remesh, job_id, overrides)
        return JSONResponse({"id": status["id"], "state": status["state"], "url": f"/v1/jobs/{status['id']}"},
                            status_code=202)

    @router.post("/jobs/{job_id}/bake", status_code=202, response_model=JobCreated,
                 summary="Bake a done job's views onto an uploaded mesh as a new job",
                 responses=documented_errors(400, 401, 404, 409, 413, 429, 507))
    async def bake(
        job_id: str,
        request: Request,
        mesh: Annotated[UploadFile, File(description="the mesh, in the job's frame: GLB, OBJ or PLY (as the "
                                                     "job's result), at most --max-upload-mb; its own UVs are "
                                                     "baked onto when usable", json_schema_extra={"minLength": 1})],
        options: Annotated[str | None, Form(description="a JSON object with any of: texture_size (256…4096, "
                                                        "default 1024 for glb; null: vertex colours, the default "
                                                        "for obj and ply), keep_uvs (bool, default true), format "
                                                        "(glb|obj|ply, default glb; a texture needs glb)")] = None,
    ) -> JSONResponse:
        form = await request.form()
        unknown = sorted(set(form.keys()) - {"mesh", "options"})
        if unknown:
            raise BadInputError(f"unknown form field(s) {unknown}; the form has the parts 'mesh' and 'options'")
        if len(form.getlist("mesh")) != 1 or len(form.getlist("options")) > 1:
            raise BadInputError("send exactly one 'mesh' part and at most one 'options' part")
        body = parse_json(options, "the bake options", _BAKE_EXAMPLE)
        if isinstance(body, dict) and set(body) - set(BAKE_OPTIONS):  # before the mesh is read: cheap
            raise BadInputError(f"bake option(s) {sorted(set(body) - set(BAKE_OPTIONS))} are unknown; allowed: "
                                f"{list(BAKE_OPTIONS)}")
        await run_in_threadpool(manager.status, job_id)  # a job that does not exist is 404 before the mesh is read
        data = await mesh.read()
        ext = await run_in_threadpool(inspect_mesh, data, mesh.filename, config)
        status = await run_in_threadpool(manager.submit_bake, job_id, data, ext, body)
        return JSONResponse({"id": status["id"], "state": status["state"], "url": f"/v1/jobs/{status['id']}"},
                            status_code=202)

    @router.post("/jobs/{job_id}/reroll", status_code=202, response_model=JobStatus,
                 summary="Re-roll some stage-1 views of a job in review",
                 responses=documented_errors(400, 401, 404, 409, 429, 507))
    async def reroll(job_id: str, request: Request) -> dict[str, Any]:
        body = parse_json(await request.body(), "the re-roll body", 'send e.g. {"views": [1, 5], "seed": 7}')
        return await run_in_threadpool(manager.reroll, job_id, body)

    @router.post("/jobs/{job_id}/continue", status_code=202, response_model=JobStatus,
                 summary="Go on from review to the mesh", responses=documented_errors(400, 401, 404, 409, 429, 507))
    async def continue_job(job_id: str, request: Request) -> dict[str, Any]:
        body = parse_json(await request.body(), "the continue body", 'send {} or e.g. {"elevation": 20}')
        return await run_in_threadpool(manager.continue_job, job_id, body)

    @router.put("/jobs/{job_id}/pin", response_model=JobStatus, summary="Keep a job through size-limit clean-ups",
                responses=documented_errors(401, 404, 507))
    def pin(job_id: str) -> dict[str, Any]:
        return manager.set_pinned(job_id, True)

    @router.delete("/jobs/{job_id}/pin", response_model=JobStatus, summary="Let size-limit clean-ups remove a job",
                   responses=documented_errors(401, 404, 507))
    def unpin(job_id: str) -> dict[str, Any]:
        return manager.set_pinned(job_id, False)

    @router.delete("/jobs/{job_id}", response_model=JobStatus, summary="Cancel a job, or delete a finished one",
                   responses={204: {"description": "the finished job's folder was removed"},
                              **documented_errors(401, 404, 507)})
    def delete_job(job_id: str) -> Response:
        status = manager.cancel_or_delete(job_id)
        return Response(status_code=204) if status is None else JSONResponse(status)

    if weights is not None:
        router.include_router(weights_router(weights))
    app.include_router(router)
    _install_error_handlers(app, router)
    app.add_middleware(Guard, token=config.token, max_body=config.max_upload_bytes + FORM_SLACK_BYTES)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _install_error_handlers(app: FastAPI, api: APIRouter) -> None:
    @app.exception_handler(One2345Error)
    async def on_error(_: Request, e: One2345Error) -> JSONResponse:
        return error_response(e.kind, e.message, e.fix, getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        parts = []
        for err in e.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            value = err.get("input")
            if isinstance(value, (int, float, str)) and len(str(value)) <= 80:  # name the bad value when it is short
                where = f"{where} {value}"
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return error_response("bad_input", "; ".join(parts) or "invalid request",
                              fix="see /openapi.json for the expected request")

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = {401: "unauthorized", 404: "not_found", 409: "conflict", 413: "too_large", 429: "queue_full"}.get(
            e.status_code, "bad_input" if e.status_code < 500 else "internal")
        message = str(e.detail)
        headers = dict(e.headers or {})
        if e.status_code in (404, 405):  # raised by the router: say what was asked for
            message = f"{message}: {request.method} {request.url.path[:200]}"
        if e.status_code == 405:
            # The router names the methods of the first route whose path matched; a path served by several routes
            # (GET and DELETE /v1/jobs/{id}) allows the methods of all of them.
            allowed = sorted({m for route in api.routes if route.matches(request.scope)[0] != Match.NONE
                              for m in getattr(route, "methods", None) or ()})
            headers["Allow"] = ", ".join(allowed)
            message = f"{message}; this path allows {headers['Allow']}"
        return error_response(kind, message, fix="see /openapi.json for the API" if e.status_code in (404, 405)
                              else None, headers=headers, status=e.status_code)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, made to tell the truth: validation errors are 400 (not 422) and /v1 needs the token."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.get("responses", {})
            if responses.pop("422", None) is not None:
                responses.setdefault("400", {"description": "bad input",
                                             "content": {"application/json": {
                                                 "schema": {"$ref": "#/components/schemas/ErrorBody"}}}})
            if path.startswith("/v1/") and path != "/v1/health":
                operation["security"] = [{"bearer": []}]
    components = schema.setdefault("components", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.get("schemas", {}).pop(unused, None)
    # The weights manager checks a download's hub token itself (its message says why); the schema states the rule.
    token = components.get("schemas", {}).get("DownloadRequest", {}).get("properties", {}).get("token", {})
    for variant in token.get("anyOf", [token]):
        if variant.get("type") == "string":
            variant["pattern"] = DOWNLOAD_TOKEN_PATTERN
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer",
                                                "description": "the server's token (ONE2345_TOKEN or the token "
                                                               "file of the ready line)"}}
    app.openapi_schema = schema
    return schema
