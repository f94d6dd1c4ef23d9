"""A standard-library HTTP client for the One2345 server (the contract of issue #4, ``/v1/...``).

It runs on a background thread inside Blender, so it never touches ``bpy``. Every failure becomes a
:class:`ServerError` carrying the server's error ``kind`` (``bad_input``, ``unauthorized``, ``not_found``,
``conflict``, ``too_large``, ``queue_full``, ``missing_weights``, ``out_of_memory``, ``storage``, ``cancelled``,
``internal``) or one of the add-on's own kinds for failures that happen before the server can answer (``unreachable``,
``protocol``).
"""

from __future__ import annotations

import http.client
import json
import mimetypes
import secrets
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


class ServerError(Exception):
    """A request that failed, with the server's (or the add-on's) error kind, a message and an optional fix."""

    def __init__(self, kind: str, message: str, fix: str | None = None, *, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        """Error kind: one of the contract's kinds or the add-on's (``unreachable``, ``protocol``, ``server_*``)."""
        self.message = message
        self.fix = fix
        """A sentence telling the user what resolves the problem, if anything does."""
        self.status = status
        """The HTTP status code, or None when no response arrived."""
        self.retry_after = retry_after
        """Seconds the server asked to wait (``429 queue_full``), or None."""

    def __str__(self) -> str:
        return f"{self.message} ({self.fix})" if self.fix else self.message


def encode_multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes, str]]) -> tuple[bytes, str]:
    """Encode form fields and files as ``multipart/form-data`` (RFC 7578).

    Args:
        fields: part name → text value (sent as UTF-8).
        files: part name → (file name, content, content type).

    Returns:
        (body, the Content-Type header value including the boundary).
    """
    boundary = f"one2345-{secrets.token_hex(16)}"
    chunks: list[bytes] = []
    for name, value in fields.items():
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        chunks.append(value.encode() + b"\r\n")
    for name, (filename, content, ctype) in files.items():
        # Quotes and line breaks would break the header; the server only uses the name for the result's file name.
        safe = filename.replace('"', "_").replace("\r", "_").replace("\n", "_")
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{safe}"\r\n'
                      f"Content-Type: {ctype}\r\n\r\n".encode())
        chunks.append(content + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def _is_loopback(url: str) -> bool:
    return (urllib.parse.urlsplit(url).hostname or "") in LOOPBACK_HOSTS


class Client:
    """Talks to one server. Thread-safe: it holds no connection state between calls.

    Args:
        url: base URL, e.g. ``http://127.0.0.1:8123`` (a trailing slash is ignored).
        token: bearer token, or None for a server that needs none (only ``/v1/health`` works then).
        timeout: seconds to wait for any single request before giving up.
    """

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        # A proxy from the environment must never see loopback traffic (it would leak the token and fail anyway).
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(self.url) else []
        self._opener = urllib.request.build_opener(*handlers)

    # -- the endpoints -------------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """``GET /v1/health`` (no token needed): status, version, device, preset, queue length."""
        return self._json("GET", "/v1/health", auth=False)

    def submit(self, image: Path, options: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/jobs`` with the image file and the options; returns ``{"id", "state", "url"}``."""
        image = Path(image)
        try:
            content = image.read_bytes()
        except OSError as exc:
            raise ServerError("bad_input", f"Cannot read the image {str(image)!r}: {exc.strerror or exc}.",
                              "Choose an image file that exists and is readable.") from exc
        ctype = mimetypes.guess_type(image.name)[0] or "application/octet-stream"
        body, content_type = encode_multipart({"options": json.dumps(options)}, {"image": (image.name, content, ctype)})
        return self._json("POST", "/v1/jobs", body=body, headers={"Content-Type": content_type})

    def submit_images(self, prompt: str, count: int, seed: int | None = None,
                      negative_prompt: str | None = None) -> dict[str, Any]:
        """``POST /v1/images``: a job of kind ``images`` making ``count`` candidate pictures of ``prompt`` (sent as
        typed: the server checks it and names what is wrong); returns ``{"id", "state", "url"}``."""
        body: dict[str, Any] = {"prompt": prompt, "count": int(count)}
        if seed is not None:
            body["seed"] = int(seed)
        if negative_prompt:
            body["negative_prompt"] = negative_prompt
        return self._post_json("/v1/images", body)

    def submit_candidate(self, images_job: str, index: int, options: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/jobs`` without an image part: the input is candidate ``index`` of the done images job
        ``images_job`` (options ``image_of`` and ``index``), so the run's recipe records the prompt."""
        payload = {**options, "image_of": images_job, "index": int(index)}
        body, content_type = encode_multipart({"options": json.dumps(payload)}, {})
        return self._json("POST", "/v1/jobs", body=body, headers={"Content-Type": content_type})

    def status(self, job_id: str) -> dict[str, Any]:
        """``GET /v1/jobs/{id}``: state, stage, step, fraction, previews, error, result."""
        return self._json("GET", f"/v1/jobs/{job_id}")

    def jobs(self) -> list[dict[str, Any]]:
        """``GET /v1/jobs``: every job's status, newest first."""
        return self._json("GET", "/v1/jobs")["jobs"]

    def job_page(self, limit: int | None = None, after: str | None = None) -> dict[str, Any]:
        """``GET /v1/jobs?limit&after``: a page of job statuses, newest first: ``{"jobs", "total", "next"}``."""
        query = urllib.parse.urlencode({k: v for k, v in (("limit", limit), ("after", after)) if v is not None})
        return self._json("GET", f"/v1/jobs?{query}" if query else "/v1/jobs")

    def remesh(self, job_id: str, overrides: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/jobs/{id}/remesh``: a new job meshing a done job's views again; returns ``{"id", "state",
        "url"}``."""
        return self._post_json(f"/v1/jobs/{job_id}/remesh", overrides)

    def bake(self, job_id: str, mesh: Path, options: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/jobs/{id}/bake`` (multipart: the ``mesh`` file, GLB/OBJ/PLY in the job's frame, and the
        ``options`` JSON: ``texture_size``, ``keep_uvs``, ``format``): a new job baking a done job's views onto that
        mesh; returns ``{"id", "state", "url"}``."""
        mesh = Path(mesh)
        try:
            content = mesh.read_bytes()
        except OSError as exc:
            raise ServerError("bad_input", f"Cannot read the mesh {str(mesh)!r}: {exc.strerror or exc}.") from exc
        body, content_type = encode_multipart({"options": json.dumps(options)}, {
            "mesh": (mesh.name, content, "model/gltf-binary" if mesh.suffix.lower() == ".glb" else
                     "application/octet-stream")})
        return self._json("POST", f"/v1/jobs/{job_id}/bake", body=body, headers={"Content-Type": content_type},
                          timeout=max(self.timeout, 120.0))

    def reroll(self, job_id: str, views: list[int], seed: int | None = None) -> dict[str, Any]:
        """``POST /v1/jobs/{id}/reroll``: regenerate some stage-1 views of a job in review; returns its status."""
        return self._post_json(f"/v1/jobs/{job_id}/reroll", {"views": list(views)} | (
            {} if seed is None else {"seed": int(seed)}))

    def continue_job(self, job_id: str, elevation: float | None = None) -> dict[str, Any]:
        """``POST /v1/jobs/{id}/continue``: go on from review to the mesh (optionally with another elevation)."""
        return self._post_json(f"/v1/jobs/{job_id}/continue", {} if elevation is None else {
            "elevation": float(elevation)})

    def pin(self, job_id: str, pinned: bool = True) -> dict[str, Any]:
        """``PUT`` / ``DELETE /v1/jobs/{id}/pin``: keep a job through the server's size-limit clean-ups (or not)."""
        return self._json("PUT" if pinned else "DELETE", f"/v1/jobs/{job_id}/pin")

    def meta(self, job_id: str) -> dict[str, Any]:
        """``GET /v1/jobs/{id}/meta``: meta.json of a done job (its ``recipe``, timings, elevation)."""
        return self._json("GET", f"/v1/jobs/{job_id}/meta")

    def weights(self, verify: bool = False) -> dict[str, Any]:
        """``GET /v1/weights``: every weight file's state, size, source and licence."""
        return self._json("GET", "/v1/weights?verify=true" if verify else "/v1/weights")

    def start_weights_download(self, files: list[str] | None = None) -> dict[str, Any]:
        """``POST /v1/weights/download``: fetch the missing weight files (resumes partial ones)."""
        return self._post_json("/v1/weights/download", {} if files is None else {"files": list(files)})

    def weights_download(self) -> dict[str, Any]:
        """``GET /v1/weights/download``: bytes done and total, rate, ETA, the current file."""
        return self._json("GET", "/v1/weights/download")

    def cancel_weights_download(self) -> dict[str, Any]:
        """``DELETE /v1/weights/download``: stop the download; the partial file is kept for the next start."""
        return self._json("DELETE", "/v1/weights/download")

    def start_weights_import(self, path: str) -> dict[str, Any]:
        """``POST /v1/weights/import``: take the weight files of a One-2-3-45 checkout (or a folder of them) on the
        server's own disk; verified, then linked or copied in. Loopback clients only; shares the download's slot."""
        return self._post_json("/v1/weights/import", {"path": str(path)})

    def weights_import(self) -> dict[str, Any]:
        """``GET /v1/weights/import``: progress of the running (or last) task; once done, ``imported`` holds each
        file's outcome (imported, already present, damaged, not found)."""
        return self._json("GET", "/v1/weights/import")

    def cancel_weights_import(self) -> dict[str, Any]:
        """``DELETE /v1/weights/import``: stop the import; nothing half-imported stays."""
        return self._json("DELETE", "/v1/weights/import")

    def cancel(self, job_id: str) -> dict[str, Any] | None:
        """``DELETE /v1/jobs/{id}``: cancels a queued/running job (returns its status) or removes a finished one."""
        body = self._request("DELETE", f"/v1/jobs/{job_id}")
        return json.loads(body) if body else None

    def download(self, path: str, dest: Path) -> Path:
        """GET a relative URL from a status (``result.url``, ``meta_url``, a preview's ``url``) into ``dest``.

        The file is written next to ``dest`` first and renamed, so a reader never sees half a file.
        """
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        data = self._request("GET", path, timeout=max(self.timeout, 120.0))
        tmp = dest.with_name(f".{dest.name}.part")
        tmp.write_bytes(data)
        tmp.replace(dest)
        return dest

    # -- plumbing ------------------------------------------------------------------------------------------------

    def _post_json(self, path: str, payload: dict[str, Any]) -> Any:
        return self._json("POST", path, body=json.dumps(payload).encode(), headers={
            "Content-Type": "application/json"})

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        body = self._request(method, path, **kwargs)
        try:
            return json.loads(body)
        except ValueError as exc:
            raise ServerError("protocol", f"The server at {self.url} answered {method} {path} with something that "
                              "is not JSON.", "Check that the URL points to a One2345 server.") from exc

    def _request(self, method: str, path: str, *, body: bytes | None = None, headers: dict[str, str] | None = None,
                 auth: bool = True, timeout: float | None = None) -> bytes:
        url = path if path.startswith(("http://", "https://")) else f"{self.url}{path}"
        request = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
        if auth and self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with self._opener.open(request, timeout=timeout or self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            raise _http_error(exc, method, path) from exc
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServerError("unreachable", f"No answer from the One2345 server at {self.url} ({reason}).",
                              "Start the server (or check its URL in the add-on preferences).") from exc


def _http_error(exc: urllib.error.HTTPError, method: str, path: str) -> ServerError:
    """Turn an HTTP error response into a ServerError, using the contract's ``{"error": {...}}`` body if present."""
    try:
        payload = json.loads(exc.read() or b"{}")
        error = payload.get("error") if isinstance(payload, dict) else None
    except ValueError:
        error = None
    retry = exc.headers.get("Retry-After") if exc.headers else None
    retry_after = float(retry) if retry and retry.replace(".", "", 1).isdigit() else None
    if isinstance(error, dict) and "kind" in error:
        return ServerError(str(error["kind"]), str(error.get("message") or f"HTTP {exc.code}"), error.get("fix"),
                           status=exc.code, retry_after=retry_after)
    kind = {401: "unauthorized", 404: "not_found", 409: "conflict", 413: "too_large", 429: "queue_full"}.get(
        exc.code, "internal")
    return ServerError(kind, f"The server answered {method} {path} with HTTP {exc.code} {exc.reason}.",
                       status=exc.code, retry_after=retry_after)
