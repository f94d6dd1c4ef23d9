"""A job's record: the :class:`Job` kept in memory and written as status.json, its states, the words of the HTTP layer
(:class:`ApiError`, :func:`error_dict`), and the field-by-field check of a record read back from disk.

status.json is read back at every start, and anything may have been written there: a crash cannot half-write it (it
is replaced atomically), but a person or another program can edit it. :meth:`Job.from_record` therefore checks every
field for its type and range and raises :class:`RecordError` naming the field, so that a bad record is set aside
before it reaches the worker (the size limit sorts by ``created``), a GET (the response schema needs each type) or a
response header (the download name).
"""

from __future__ import annotations

import math
import re
import reprlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

from server.common.errors import One2345Error

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
DOWNLOAD_STEM_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
"""What the HTTP app's ``download_stem`` leaves of an upload's name: it goes into a Content-Disposition header, so a
record holding anything else (a CR/LF, a quote) is refused on load."""
REMESH_OPTIONS = ("resolution", "target_faces", "texture_size", "format")
"""What a re-mesh may change: everything else (elevation, seed, steps…) shaped the views, which it reuses."""
BAKE_OPTIONS = ("texture_size", "keep_uvs", "format")
"""What a bake (``POST /v1/jobs/<id>/bake``) takes besides its mesh."""
BAKE_MESH_RE = re.compile(r"bake_input\.(?:glb|obj|ply)")
"""The uploaded mesh's name inside a bake job's folder."""
IMAGES_FIELDS = ("prompt", "count", "seed", "negative_prompt")
"""An images job's request (``POST /v1/images``), as kept in its record."""
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


class RecordError(ValueError):
    """A status.json that is not one this server wrote; :attr:`field` names the offending field (``result.mesh``)."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"field {name!r} {problem}")
        self.field = name


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


def check_bake_options(source_options: dict[str, Any], data: Any) -> tuple[dict[str, Any], bool]:
    """A bake's options (``texture_size``, ``keep_uvs``, ``format``) over its source job's → (the new job's options,
    keep_uvs).

    ``format`` defaults to glb; ``texture_size`` to 1024 for a GLB and to null (vertex colours) for a PLY or OBJ, as a
    job's result is one file (:func:`check_options`). The source's polygon budget does not apply (the mesh is the
    client's) and a bake never pauses for review.

    Raises:
        BadInputError: not an object, an unknown field, keep_uvs not a boolean, or what :func:`check_options` refuses.
    """
    from server.common.errors import BadInputError

    if not isinstance(data, dict):
        raise BadInputError(f"the bake options must be a JSON object, got {type(data).__name__}",
                            fix='e.g. {"texture_size": 1024, "keep_uvs": true, "format": "glb"}')
    unknown = sorted(set(data) - set(BAKE_OPTIONS))
    if unknown:
        raise BadInputError(f"bake option(s) {unknown} are unknown; allowed: {list(BAKE_OPTIONS)}",
                            fix="the views are the source job's; only the texture and the file format can be chosen")
    keep_uvs = data.get("keep_uvs", True)
    if not isinstance(keep_uvs, bool):
        raise BadInputError(f"option keep_uvs={keep_uvs!r} is not allowed: true or false")
    fmt = data.get("format", "glb")
    texture_size = data.get("texture_size", 1024 if fmt == "glb" else None)
    options = check_options({**source_options, "format": fmt, "texture_size": texture_size, "target_faces": None,
                             "review": False})
    return options, keep_uvs


def check_job_id(job_id: str) -> str:
    """``job_id`` if it is 32 lowercase hex digits, else ApiError not_found (an id that is not an id names no job)."""
    if not JOB_ID_RE.fullmatch(job_id):
        raise ApiError("not_found", f"no job {job_id[:80]!r}: job ids are 32 lowercase hex digits")
    return job_id


def now_iso() -> str:
    """The current UTC time in ISO 8601 with microseconds (sortable as a string)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


DEFAULT_FIX: dict[str, str] = {
    "bad_input": "correct the value the message names; /openapi.json says what each field allows",
    "unauthorized": "send the server's token as 'Authorization: Bearer <ONE2345_TOKEN>'",
    "not_found": "list what exists with GET /v1/jobs (a deleted job, or one the size limit removed, is gone)",
    "conflict": "read the job's state with GET /v1/jobs/<id>; this request fits another state",
    "too_large": "send less than the limit the message names",
    "queue_full": "wait the Retry-After seconds and submit again",
    "missing_weights": "download them: POST /v1/weights/download, or `one2345 weights download`",
    "out_of_memory": "turn on low-VRAM mode (`one2345 serve --low-vram`) or lower the resolution",
    "storage": "free space on the jobs folder's disk (or make it writable), then try again",
    "offline": "run the server with network access, or bring the files in with `one2345 weights import PATH`",
    "cancelled": "submit the job again to run it",
    "internal": "see the server's log (stderr) for the traceback; this is a bug worth reporting",
}
"""What to do about an error of each kind when the code that raised it knows nothing more specific, so no error
reaches a client with ``fix: null``."""


def error_dict(kind: str, message: str, fix: str | None = None) -> dict[str, Any]:
    """A job's ``error`` field, shaped like the HTTP error body's ``error`` object (the kind's default fix when
    ``fix`` is None)."""
    return {"kind": kind, "message": message, "fix": fix or DEFAULT_FIX.get(kind)}


def download_name(stem: str, fmt: str) -> str:
    """The result's download file name: ``stem.fmt`` with anything outside ``[A-Za-z0-9._-]`` replaced, so that it
    can go into a Content-Disposition header as it is (a second guard behind the check on load)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:64] or "mesh"
    return f"{safe}.{re.sub(r'[^a-z]', '', fmt)}"


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
    message: str | None = None
    """A line for people about the current step while one is given (the one-time Zero123-XL conversion: "One-time
    set-up: converting Zero123-XL …"); None otherwise and once a task ends."""
    error: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    """``format``, ``elevation``, ``vertices``, ``faces``, ``textured``, and the files ``mesh`` and ``meta``
    relative to the job folder."""
    remesh_of: str | None = None
    """The id of the job whose views this one re-meshes, or None for a generation."""
    bake_of: str | None = None
    """The id of the job whose views this one bakes onto an uploaded mesh, or None."""
    bake: dict[str, Any] | None = None
    """A bake job's own settings: ``mesh`` (the upload's name in the job folder, :data:`BAKE_MESH_RE`) and
    ``keep_uvs``; None for other jobs."""
    images: dict[str, Any] | None = None
    """An images job's request (``POST /v1/images``: :data:`IMAGES_FIELDS`, the seed drawn at submission when the
    client gave none); None for a mesh job. Its result is ``{"candidates": ["0.png", …], "seed"}``."""
    review: dict[str, Any] | None = None
    """While paused for review (and after): the views, the elevation and its source, the re-roll seeds, the
    revision (bumped by each re-roll), ``deadline`` (Unix time it expires) and ``timeout_s`` (the review time it was
    given, quoted when it expires, also after a restart with another timeout)."""
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
        "elapsed_s", "previews", "message", "error", "result", "remesh_of", "review", "pinned", "bake_of",
        "bake", "images")
    _OPTIONAL_FIELDS: ClassVar[tuple[str, ...]] = ("remesh_of", "review", "pinned", "message", "bake_of", "bake",
                                                   "images")
    """Fields added after the first release: a status.json from before them reads back with their default."""
    _PUBLIC_REVIEW: ClassVar[tuple[str, ...]] = (
        "views", "revision", "elevation", "elevation_source", "elevation_uncertain", "elevation_confidence", "seed",
        "view_seeds", "notes")

    @property
    def kind(self) -> str:
        """``images`` for a text-to-image job (``POST /v1/images``), ``mesh`` for every other."""
        return "mesh" if self.images is None else "images"

    def to_record(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._RECORD_FIELDS}

    @classmethod
    def from_record(cls, folder: Path, record: Any) -> Job:
        """A job read back from its status.json, every field checked for its type and range.

        Raises:
            RecordError: the first field that is not what this server writes (missing, mistyped, out of range, a
                file name outside the job's folder, or another job's id).
        """
        if not isinstance(record, dict):
            raise RecordError("(record)", f"is {_show(record)}, not a JSON object")
        for name in cls._RECORD_FIELDS:
            if name not in record:
                if name not in cls._OPTIONAL_FIELDS:
                    raise RecordError(name, "is missing")
                continue
            check, allowed = _FIELDS[name]
            _require(check(record[name]), name, allowed, record[name])
        if record["id"] != folder.name:
            raise RecordError("id", f"is {_show(record['id'])}, not the folder's name {folder.name!r}")
        if record.get("review") is not None:
            _check_review(record["review"])
        if record.get("images") is not None:
            _check_part("images", record["images"], _IMAGES_FIELDS, {})
            if record.get("remesh_of") is not None or record.get("bake_of") is not None:
                raise RecordError("images", "is set, but so is remesh_of or bake_of: an images job makes no mesh")
            if record.get("result") is not None:
                _check_images_result(record["result"])
        elif record.get("result") is not None:
            _check_result(record["result"])
        if (record.get("bake_of") is None) != (record.get("bake") is None):
            raise RecordError("bake", "and bake_of must be both set (a bake job) or both null")
        if record.get("bake_of") is not None and record.get("remesh_of") is not None:
            raise RecordError("bake_of", "is set, but so is remesh_of: a job is one or the other")
        if record["state"] == "review" and record.get("review") is None:
            raise RecordError("review", "is missing, but the state is review")
        if record["state"] == "done" and record["result"] is None:
            raise RecordError("result", "is null, but the state is done")
        return cls(**{name: record[name] for name in cls._RECORD_FIELDS if name in record}, folder=folder)

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
        if self.result is not None and self.images is not None:
            result = {"candidates": [{"name": n, "url": f"{base}/candidates/{n}"} for n in self.result["candidates"]],
                      "seed": self.result["seed"]}
        elif self.result is not None:
            result = {"url": f"{base}/result", "format": self.result["format"], "meta_url": f"{base}/meta",
                      "elevation": self.result["elevation"], "vertices": self.result["vertices"],
                      "faces": self.result["faces"],
                      "elevation_uncertain": bool(self.result.get("elevation_uncertain", False)),
                      "elevation_confidence": self.result.get("elevation_confidence"),
                      "textured": bool(self.result.get("textured", False)),
                      "texture_size": self.result.get("texture_size"),
                      "target_faces": self.result.get("target_faces"),
                      "uv_source": self.result.get("uv_source")}
        return {
            "id": self.id, "kind": self.kind, "state": self.state, "stage": self.stage, "step": self.step,
            "total": self.total,
            "fraction": self.fraction, "elapsed_s": round(elapsed, 3),
            "eta_s": None if eta is None else round(eta, 1), "created": self.created,
            "options": self.options,
            "previews": [{"name": name, "url": f"{base}/views/{name}"} for name in self.previews],
            "message": self.message, "error": self.error, "result": result, "remesh_of": self.remesh_of,
            "pinned": self.pinned, "bake_of": self.bake_of, "images": self.images,
            "review": self._public_review(),
        }

    def _public_review(self) -> dict[str, Any] | None:
        if self.review is None:
            return None
        base = f"/v1/jobs/{self.id}/views"
        review = {k: self.review[k] for k in self._PUBLIC_REVIEW if k in self.review}
        review["views"] = [{"name": f"{v}.png", "url": f"{base}/{v}.png"} for v in self.review["views"]]
        review["expires_in_s"] = (round(max(self.review["deadline"] - time.time(), 0.0), 1)
                                  if self.state == "review" else None)
        return review


# -- the check of a record read back -------------------------------------------------------------------------------

_shown = reprlib.Repr()
_shown.maxstring, _shown.maxother, _shown.maxlevel = 60, 60, 3


def _show(value: Any) -> str:
    """``value`` for a log line: short, one line, control characters escaped (repr does that)."""
    return _shown.repr(value)


def _require(ok: bool, name: str, allowed: str, value: Any) -> None:
    if not ok:
        raise RecordError(name, f"is {_show(value)}, not {allowed}")


def _is_int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value: Any, low: float = -math.inf, high: float = math.inf) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            and low <= value <= high)


def _is_text(value: Any, max_length: int = 10_000) -> bool:
    return isinstance(value, str) and len(value) <= max_length


def _matches(pattern: re.Pattern[str]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, str) and pattern.fullmatch(value) is not None


def _or_null(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def _is_time(value: Any) -> bool:
    if not _is_text(value, 64):
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def _are_options(value: Any) -> bool:
    try:
        check_options(value)
    except Exception:  # BadInputError, or a TypeError of a value no option takes: either way not a valid record
        return False
    return True


def _is_error(value: Any) -> bool:
    return (isinstance(value, dict) and _is_text(value.get("kind"), 64) and _is_text(value.get("message"))
            and "fix" in value and _or_null(_is_text)(value["fix"]))


_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "id": (_matches(JOB_ID_RE), "32 lowercase hex digits"),
    "created": (_is_time, "an ISO 8601 time"),
    "options": (_are_options, "a JSON object of valid job options"),
    "input_file": (_matches(INPUT_FILE_RE), "input.<png|jpg|webp|bmp|tif|gif>"),
    "download_stem": (_matches(DOWNLOAD_STEM_RE), "1 to 64 of the characters A-Z a-z 0-9 . _ -"),
    "state": (lambda v: isinstance(v, str) and v in STATES, f"one of {', '.join(STATES)}"),
    "stage": (_or_null(lambda v: _is_text(v, 64)), "null or a stage name"),
    "step": (_is_int, "an integer ≥ 0"),
    "total": (_is_int, "an integer ≥ 0"),
    "fraction": (lambda v: _is_number(v, 0.0, 1.0), "a number in [0, 1]"),
    "elapsed_s": (lambda v: _is_number(v, 0.0), "a finite number ≥ 0"),
    "previews": (lambda v: isinstance(v, list) and all(_matches(VIEW_NAME_RE)(n) for n in v),
                 "a list of view names (<i>.png, <i>_<j>.png, input_256.png)"),
    "message": (_or_null(lambda v: _is_text(v, 1000)), "null or a string of at most 1000 characters"),
    "error": (_or_null(_is_error), 'null or {"kind", "message", "fix"} (strings; fix may be null)'),
    "result": (_or_null(lambda v: isinstance(v, dict)), "null or a JSON object"),
    "remesh_of": (_or_null(_matches(JOB_ID_RE)), "null or a job id"),
    "bake_of": (_or_null(_matches(JOB_ID_RE)), "null or a job id"),
    "bake": (_or_null(lambda v: isinstance(v, dict) and set(v) == {"mesh", "keep_uvs"}
                      and _matches(BAKE_MESH_RE)(v["mesh"]) and isinstance(v["keep_uvs"], bool)),
             'null or {"mesh": "bake_input.<glb|obj|ply>", "keep_uvs": true|false}'),
    "review": (_or_null(lambda v: isinstance(v, dict)), "null or a JSON object"),
    "pinned": (lambda v: isinstance(v, bool), "true or false"),
    "images": (_or_null(lambda v: isinstance(v, dict)), "null or a JSON object"),
}
"""Each field of status.json → its check and what it allows (for the log line)."""

_RESULT_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "format": (lambda v: isinstance(v, str) and v in MEDIA_TYPES, f"one of {', '.join(MEDIA_TYPES)}"),
    "mesh": (_matches(RESULT_FILES_RE["mesh"]), "run/mesh.<format>"),
    "meta": (_matches(RESULT_FILES_RE["meta"]), "run/meta.json"),
    "elevation": (_is_number, "a finite number"),
    "vertices": (_is_int, "an integer ≥ 0"),
    "faces": (_is_int, "an integer ≥ 0"),
}
_RESULT_OPTIONAL: dict[str, tuple[Callable[[Any], bool], str]] = {
    "elevation_uncertain": (lambda v: isinstance(v, bool), "true or false"),
    "elevation_confidence": (_or_null(_is_number), "null or a finite number"),
    "textured": (lambda v: isinstance(v, bool), "true or false"),
    "texture_size": (_or_null(lambda v: _is_int(v, 1)), "null or an integer ≥ 1"),
    "target_faces": (_or_null(lambda v: _is_int(v, 1)), "null or an integer ≥ 1"),
    "uv_source": (_or_null(lambda v: v in ("mesh", "unwrap")), "null, mesh or unwrap"),
}
_REVIEW_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "views": (lambda v: isinstance(v, list) and all(_is_int(i) and i < 100 for i in v),
              "a list of view numbers 0…99"),
    "revision": (_is_int, "an integer ≥ 0"),
    "elevation": (_is_number, "a finite number"),
    "elevation_source": (lambda v: _is_text(v, 64), "a string"),
    "elevation_uncertain": (lambda v: isinstance(v, bool), "true or false"),
    "elevation_confidence": (_or_null(_is_number), "null or a finite number"),
    "seed": (_is_int, "an integer ≥ 0"),
    "view_seeds": (lambda v: isinstance(v, dict) and all(
        re.fullmatch(r"[0-9]{1,2}", k) and _is_int(s) for k, s in v.items()),
                   "a JSON object of view number → seed"),
    "notes": (lambda v: isinstance(v, list) and all(_is_text(n) for n in v), "a list of strings"),
    "deadline": (_is_number, "a Unix time"),
}
_REVIEW_OPTIONAL: dict[str, tuple[Callable[[Any], bool], str]] = {
    "timeout_s": (lambda v: _is_number(v) and v > 0, "a number of seconds > 0"),
}


def _check_part(name: str, value: dict[str, Any], required: dict[str, tuple[Callable[[Any], bool], str]],
                optional: dict[str, tuple[Callable[[Any], bool], str]]) -> None:
    for key, (check, allowed) in required.items():
        if key not in value:
            raise RecordError(f"{name}.{key}", "is missing")
        _require(check(value[key]), f"{name}.{key}", allowed, value[key])
    for key, (check, allowed) in optional.items():
        if key in value:
            _require(check(value[key]), f"{name}.{key}", allowed, value[key])


_IMAGES_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "prompt": (lambda v: _is_text(v, 4000) and bool(v.strip()), "a non-empty string"),
    "count": (lambda v: _is_int(v, 1) and v <= 8, "an integer in [1, 8]"),
    "seed": (_is_int, "an integer ≥ 0"),
    "negative_prompt": (_or_null(lambda v: _is_text(v, 4000)), "null or a string"),
}
CANDIDATE_NAME_RE = re.compile(r"[0-9]\.png")
"""A candidate image of an images job: ``candidates/<i>.png``, i in 0…7."""


def _check_images_result(result: Any) -> None:
    if not isinstance(result, dict) or set(result) != {"candidates", "seed"}:
        raise RecordError("result", f"is {_show(result)}; an images job's result is {{\"candidates\", \"seed\"}}")
    _require(isinstance(result["candidates"], list) and 1 <= len(result["candidates"]) <= 8
             and all(_matches(CANDIDATE_NAME_RE)(n) for n in result["candidates"]),
             "result.candidates", "a list of 1 to 8 names <i>.png", result["candidates"])
    _require(_is_int(result["seed"]), "result.seed", "an integer ≥ 0", result["seed"])


def _check_result(result: dict[str, Any]) -> None:
    _check_part("result", result, _RESULT_FIELDS, _RESULT_OPTIONAL)


def _check_review(review: dict[str, Any]) -> None:
    _check_part("review", review, _REVIEW_FIELDS, _REVIEW_OPTIONAL)
