"""Stand-ins for the One2345 server (standard library only), for fast tests of the add-on's client side.

* :class:`ScriptedServer` runs in a thread: each request is answered by the test's handler function, and every
  request (method, path, headers, body) is recorded.
* Run as a program (``fake_server.py -m server serve --port 0 ...``) it imitates the real server's start-up for the
  process-lifecycle tests; ``FAKE_SERVER_MODE`` picks the behaviour: ``ready`` (print the ready line, answer
  ``/v1/health``, check the bearer token on ``/v1/jobs``), ``silent`` (never ready) or ``crash`` (exit during
  start-up with an import error on stderr). It reports the version in ``FAKE_SERVER_VERSION``, by default the
  repository manifest's (the add-on's own), so a test can make the versions match or differ.
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
