"""Stand-ins for the One2345 server (standard library only), for fast tests of the add-on's client side.

* :class:`ScriptedServer` runs in a thread: each request is answered by the test's handler function, and every
  request (method, path, headers, body) is recorded.
* :class:`FakeWeights` imitates the server's weights routes (``GET /v1/weights``, ``POST/GET/DELETE
  /v1/weights/download`` and ``/v1/weights/import``) with the response shapes of ``server/service/weights_api.py``:
  one task at a time, progress over a few polls, an import's outcome per file from what a folder holds.
* Run as a program (``fake_server.py -m server serve --port 0 ...``) it imitates the real server's start-up for the
  process-lifecycle tests; ``FAKE_SERVER_MODE`` picks the behaviour: ``ready`` (print the ready line, answer
  ``/v1/health``, check the bearer token on ``/v1/jobs``), ``silent`` (never ready), ``crash`` (exit during
  start-up with an import error on stderr) or ``old`` (a server from before ``--owner-pid``, which argparse
  refuses). It reports the version in ``FAKE_SERVER_VERSION``, by default the repository manifest's (the add-on's
  own), so a test can make the versions match or differ.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

Reply = tuple[int, dict[str, str], bytes]


def json_reply(status: int, payload: Any, headers: dict[str, str] | None = None) -> Reply:
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(payload).encode()


class ScriptedServer:
    """An HTTP server on 127.0.0.1 whose answers come from ``handler(request) -> Reply``; a request is a dict with
    ``method``, ``path``, ``headers`` and ``body``."""

    def __init__(self, handler: Callable[[dict[str, Any]], Reply]) -> None:
        self.handler = handler
        self.requests: list[dict[str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                request = {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body}
                server.requests.append(request)
                status, headers, data = server.handler(request)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _serve

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


WEIGHT_FILES = (("sam", "sam_vit_h_4b8939.pth", 2_564_550_879, True),
                ("zero123-xl", "zero123-xl.ckpt", 15_465_973_531, True),
                ("loftr", "indoor_ds_new.ckpt", 46_355_053, False),
                ("reconstruction", "SparseNeuS_demo_v1/exp/lod0/checkpoints/ckpt_215000.pth", 5_310_000, True))
"""(name, file name, size, required) of the paper preset's files, as the server's table has them."""


class FakeWeights:
    """The server's weights routes over a folder of nothing: every file starts missing; a download or import runs
    for ``polls`` progress requests, then ends. An import looks for each file by its base name in the folder given
    (``DAMAGED`` as content stands for a file whose SHA-256 is wrong); what it imports, or a download fetches, is
    then present. ``handle(request)`` returns a reply, or None for a path it does not serve."""

    DAMAGED = b"damaged"

    def __init__(self, polls: int = 6, folder: str = "~/.cache/one2345/weights") -> None:
        self.polls = polls
        self.folder = folder
        self.present: set[str] = set()
        self.task: dict[str, Any] = self._status("idle", "download", [])
        self._left = 0
        self._source: Path | None = None
        self.paths: list[str] = []
        """The paths of every import POSTed."""

    def _status(self, state: str, operation: str, files: list[str], **fields: Any) -> dict[str, Any]:
        total = sum(size for name, _, size, _ in WEIGHT_FILES if name in files)
        return {"state": state, "operation": operation, "files": files, "current_file": None, "phase": None,
                "hashed_bytes": 0, "imported": None, "bytes_done": 0, "bytes_total": total, "fraction": 0.0,
                "resumed_bytes": 0, "rate_bps": None, "eta_s": None, "files_done": 0, "started": "2025-01-01T00:00:00Z",
                "finished": None, "error": None, **fields}

    def listing(self) -> dict[str, Any]:
        files = [{"name": name, "filename": filename, "purpose": name, "required": required, "licence": "MIT",
                  "source": f"https://huggingface.co/x/{filename}", "state": "present" if name in self.present
                  else "missing", "bytes_on_disk": size if name in self.present else 0, "expected_bytes": size,
                  "size_exact": True, "checksum": "verified" if name in self.present else None, "problem": None}
                 for name, filename, size, required in WEIGHT_FILES]
        missing = [f["name"] for f in files if f["state"] != "present"]
        required = [name for name, _, _, req in WEIGHT_FILES if req]
        left = sum(f["expected_bytes"] for f in files if f["state"] != "present")
        return {"folder": self.folder, "ready": not set(required) & set(missing), "complete": not missing,
                "required": required, "missing": missing, "download_bytes": left, "disk_needed_bytes": left,
                "disk_free_bytes": 10**12, "offline": False, "files": files, "download": self.progress(advance=False)}

    def health(self) -> dict[str, Any]:
        """What ``/v1/health`` says under ``weights``."""
        listing = self.listing()
        missing = listing["missing"]
        required = [n for n in missing if n in listing["required"]]
        return {"ready": not required, "complete": not missing, "missing": missing, "required_missing": required,
                "downloading": self.task["state"] == "running"}

    def progress(self, advance: bool = True) -> dict[str, Any]:
        """The task's status; each progress request while it runs advances it by one poll."""
        task = self.task
        if task["state"] != "running" or not advance:
            return dict(task)
        self._left -= 1
        files = task["files"]
        step = self.polls - self._left
        index = min(step * len(files) // max(self.polls, 1), len(files) - 1) if files else 0
        task.update(current_file=files[index] if files else None, files_done=index,
                    phase="copying" if task["operation"] == "import" else "downloading",
                    fraction=round(min(step / self.polls, 0.99), 4))
        task["bytes_done"] = int(task["bytes_total"] * task["fraction"])
        if task["operation"] == "download":
            task["rate_bps"] = 50_000_000.0
        if self._left <= 0:
            self._finish()
        return dict(task)

    def _finish(self) -> None:
        task = self.task
        if task["operation"] == "import":
            task["imported"] = self._outcomes()
            self.present |= {i["name"] for i in task["imported"] if i["outcome"] in ("imported", "already present")}
        else:
            self.present |= set(task["files"])
        task.update(state="done", phase="done", current_file=None, fraction=1.0, bytes_done=task["bytes_total"],
                    files_done=len(task["files"]), finished="2025-01-01T00:01:00Z", eta_s=0.0)

    def _outcomes(self) -> list[dict[str, Any]]:
        out = []
        for name, filename, _, _ in WEIGHT_FILES:
            base = Path(filename).name
            found = self._source / base if self._source is not None else None
            item = {"name": name, "outcome": "not found", "how": None, "source": None, "checksum": None,
                    "detail": f"looked for {filename}, {base}"}
            if name in self.present:
                item.update(outcome="already present", detail=None)
            elif found is not None and found.is_file():
                item.update(source=base, detail=None)
                if found.read_bytes() == self.DAMAGED:
                    item.update(outcome="damaged", checksum="mismatch",
                                detail="its SHA-256 is 0f0f…, the reference is a7bf…")
                else:
                    item.update(outcome="imported", how="hard link", checksum="verified")
            out.append(item)
        return out

    def handle(self, request: dict[str, Any]) -> Reply | None:
        path, method = request["path"].split("?", 1)[0], request["method"]
        if path == "/v1/weights" and method == "GET":
            return json_reply(200, self.listing())
        if path not in ("/v1/weights/download", "/v1/weights/import"):
            return None
        operation = path.rsplit("/", 1)[1]
        if method == "GET":
            return json_reply(200, self.progress())
        if method == "DELETE":
            if self.task["state"] != "running":
                return json_reply(409, {"error": {"kind": "conflict", "message": "no download or import is running",
                                                  "fix": None}})
            self.task.update(state="cancelled", finished="2025-01-01T00:01:00Z", error={
                "kind": "cancelled", "message": f"the {operation} was cancelled", "fix": None})
            return json_reply(200, dict(self.task))
        if self.task["state"] == "running":
            return json_reply(409, {"error": {"kind": "conflict", "message": f"a weights {self.task['operation']} "
                                              "is already running", "fix": "watch it, or cancel it"}})
        body = json.loads(request["body"] or b"{}")
        if operation == "import":
            self.paths.append(body.get("path"))
            source = Path(str(body.get("path") or "")).expanduser()
            if not source.is_dir():
                return json_reply(400, {"error": {"kind": "bad_input", "message": f"{body.get('path')!r} is not a "
                                                  "folder on the server's machine", "fix": None}})
            self._source = source
            files = [name for name, _, _, _ in WEIGHT_FILES]
        else:
            files = [name for name, _, _, _ in WEIGHT_FILES if name not in self.present]
        self.task = self._status("running", operation, files, phase="checking")
        self._left = self.polls
        return json_reply(202, dict(self.task))


class FakeBake:
    """A done generation job whose result is ``mesh`` (``POST /v1/jobs`` starts it) and the bake route of
    ``server/service/app.py``: ``POST /v1/jobs/{id}/bake`` takes the multipart ``mesh`` (refused unless a GLB, OBJ or
    PLY) and ``options`` parts, records them in :attr:`uploads`, and starts a bake job whose result is ``baked`` (a
    textured GLB, ``uv_source`` as given). ``handle(request)`` returns a reply, or None for a path it does not serve."""

    SOURCE = "5" * 32
    BAKE = "b" * 32

    def __init__(self, mesh: bytes, mesh_format: str, baked: bytes, uv_source: str = "mesh") -> None:
        self.mesh, self.mesh_format, self.baked, self.uv_source = mesh, mesh_format, baked, uv_source
        self.uploads: list[dict[str, Any]] = []
        """Each bake request's parts: ``mesh`` (bytes), ``filename`` and ``options`` (the parsed JSON)."""

    def _done(self, job_id: str, fmt: str, textured: bool, **extra: Any) -> Reply:
        return json_reply(200, {"id": job_id, "state": "done", "stage": "done", "step": 1, "total": 1,
                                "fraction": 1.0, "elapsed_s": 1.0, "eta_s": None, "previews": [], "error": None,
                                "result": {"url": f"/v1/jobs/{job_id}/result", "format": fmt, "textured": textured,
                                           "vertices": 0, "faces": 0, "elevation": 0.0, **extra}})

    def handle(self, request: dict[str, Any]) -> Reply | None:
        import email.parser
        import email.policy

        path, method = request["path"].split("?", 1)[0], request["method"]
        if path == "/v1/jobs" and method == "POST":
            return json_reply(202, {"id": self.SOURCE, "state": "queued", "url": f"/v1/jobs/{self.SOURCE}"})
        if path == f"/v1/jobs/{self.SOURCE}":
            return self._done(self.SOURCE, self.mesh_format, False)
        if path == f"/v1/jobs/{self.BAKE}":
            return self._done(self.BAKE, "glb", True, uv_source=self.uv_source)
        if path == f"/v1/jobs/{self.SOURCE}/result":
            return 200, {"Content-Type": "application/octet-stream"}, self.mesh
        if path == f"/v1/jobs/{self.BAKE}/result":
            return 200, {"Content-Type": "model/gltf-binary"}, self.baked
        if path.endswith("/bake") and method == "POST":
            if path != f"/v1/jobs/{self.SOURCE}/bake":
                return json_reply(404, {"error": {"kind": "not_found", "message": f"no job {path}", "fix": None}})
            head = f"Content-Type: {request['headers'].get('Content-Type', '')}\r\n\r\n".encode()
            form = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + request["body"])
            parts = {part.get_param("name", header="content-disposition"): part for part in form.iter_parts()}
            mesh = parts["mesh"].get_payload(decode=True) if "mesh" in parts else b""
            if mesh[:4] != b"glTF" and mesh[:4] not in (b"ply\n", b"ply\r") and not mesh.startswith(b"v "):
                return json_reply(400, {"error": {"kind": "bad_input", "message": "the mesh is not a GLB, OBJ or "
                                                  "PLY file", "fix": None}})
            options = json.loads(parts["options"].get_payload(decode=True)) if "options" in parts else {}
            self.uploads.append({"mesh": mesh, "filename": parts["mesh"].get_filename(), "options": options})
            return json_reply(202, {"id": self.BAKE, "state": "queued", "url": f"/v1/jobs/{self.BAKE}"})
        return None


def manifest_version() -> str:
    """The ``version`` of the repository's blender_manifest.toml (the add-on's version)."""
    text = (Path(__file__).resolve().parents[2] / "blender_manifest.toml").read_text(encoding="utf-8")
    found = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
    assert found, "blender_manifest.toml has no version"
    return found.group(1)


def _serve_like_the_real_one(argv: list[str]) -> int:
    mode = os.environ.get("FAKE_SERVER_MODE", "ready")
    version = os.environ.get("FAKE_SERVER_VERSION") or manifest_version()
    print(f"fake server starting with {argv}", file=sys.stderr, flush=True)
    if mode == "crash":
        print("ModuleNotFoundError: No module named 'server'", file=sys.stderr, flush=True)
        return 1
    if mode == "old" and "--owner-pid" in argv:
        value = argv[argv.index("--owner-pid") + 1]
        print(f"one2345 serve: error: unrecognized arguments: --owner-pid {value}", file=sys.stderr, flush=True)
        return 2
    if mode == "silent":
        time.sleep(600)
        return 0
    token = os.environ.get("ONE2345_TOKEN")
    jobs_dir = argv[argv.index("--jobs-dir") + 1] if "--jobs-dir" in argv else None

    def handler(request: dict[str, Any]) -> Reply:
        if request["path"] == "/v1/health":
            return json_reply(200, {"status": "ok", "version": version, "device": "cpu", "preset": "tiny",
                                    "models_loaded": {}, "queue_length": 0, "running": None})
        if request["headers"].get("Authorization") != f"Bearer {token}":
            return json_reply(401, {"error": {"kind": "unauthorized", "message": "bad token", "fix": None}})
        return json_reply(200, {"jobs": []})

    with ScriptedServer(handler) as server:
        print(json.dumps({"event": "ready", "url": server.url, "pid": os.getpid(), "version": version,
                          "device": "cpu", "preset": "tiny", "token_file": None, "jobs_dir": jobs_dir}), flush=True)
        while True:
            time.sleep(1)


if __name__ == "__main__":
    sys.exit(_serve_like_the_real_one(sys.argv[1:]))
