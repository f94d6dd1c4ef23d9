"""A loopback stand-in of the Hugging Face hub's ``resolve`` endpoint, for the weights tests (no real network).

``serve_hub`` starts it in a thread and points every hub setting of this process at it (``HF_ENDPOINT`` and
huggingface_hub's frozen constants); a server subprocess only needs ``HF_ENDPOINT=<hub.url>`` in its environment.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest
from huggingface_hub import constants as hf_constants

from server.common import weights

COMMIT = "0123456789abcdef0123456789abcdef01234567"
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


@dataclass
class FakeHub:
    """Serves ``files`` (repo path → bytes) like huggingface.co: HEAD/GET on ``/{repo}/resolve/{rev}/{file}``.

    Files named in ``lfs`` are served like LFS files on the real hub: the resolve HEAD answers 302 with
    ``X-Linked-Etag``/``X-Linked-Size`` and a ``Location`` on a "CDN" path, where the bytes live. ``/api/...`` requests
    (huggingface_hub's own telemetry) get a 404 and are counted apart.
    """

    files: dict[str, bytes]
    lfs: set[str] = field(default_factory=set)
    repo_id: str = weights.HUB_REPO_ID
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    """(method, path, Range header) of every file request."""
    api_requests: list[str] = field(default_factory=list)
    cut_after: int | None = None
    """When set, a GET without Range sends only this many bytes, then drops the connection; Range GETs get a 500."""
    garbage_prefix: bool = False
    """When set (with cut_after), the bytes sent before the cut are wrong."""
    delay_s: float = 0.0
    """Pause after every ``chunk_bytes`` of a GET body: a slow hub, so that a transfer can be watched and cancelled."""
    chunk_bytes: int = 1024
    authorization: list[str | None] = field(default_factory=list)
    """The Authorization header of every file request."""
    url: str = ""

    def etag(self, name: str) -> str:
        return hashlib.sha256(self.files[name]).hexdigest()


def handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep pytest output clean
            pass

        def _lookup(self) -> tuple[str, bool] | None:
            path = unquote(self.path)
            if path.startswith("/cdn/"):
                return path.removeprefix("/cdn/"), True
            m = RESOLVE.match(path)
            if m is None or m["repo"] != hub.repo_id or m["rev"] != weights.HUB_REVISION:
                return None
            return m["file"], False

        def _not_found(self) -> None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_HEAD(self) -> None:
            hub.requests.append(("HEAD", self.path, self.headers.get("Range")))
            hub.authorization.append(self.headers.get("Authorization"))
            found = self._lookup()
            if found is None or found[0] not in hub.files:
                self._not_found()
                return
            name, on_cdn = found
            data = hub.files[name]
            if name in hub.lfs and not on_cdn:
                self.send_response(302)
                self.send_header("Location", f"{hub.url}/cdn/{name}")
                self.send_header("X-Linked-Etag", f'"{hub.etag(name)}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("ETag", '"git-blob-of-the-lfs-pointer"')
            else:
                self.send_response(200)
                self.send_header("ETag", f'"{hub.etag(name)}"')
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()

        def do_GET(self) -> None:
            if self.path.startswith("/api/"):
                hub.api_requests.append(self.path)
                self._not_found()
                return
            range_header = self.headers.get("Range")
            hub.requests.append(("GET", self.path, range_header))
            hub.authorization.append(self.headers.get("Authorization"))
            found = self._lookup()
            if found is None or found[0] not in hub.files:
                self._not_found()
                return
            data = hub.files[found[0]]
            if hub.cut_after is not None:
                if range_header is not None:
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                sent = data[: hub.cut_after]
                self.wfile.write(bytes(255 - b for b in sent) if hub.garbage_prefix else sent)
                self.wfile.flush()
                self.close_connection = True
                return
            start = 0
            if range_header is not None:
                start = int(re.fullmatch(r"bytes=(\d+)-", range_header)[1])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            if hub.delay_s <= 0:
                self.wfile.write(data[start:])
                return
            with contextlib.suppress(ConnectionError):  # the client gave up (a cancelled download)
                for at in range(start, len(data), hub.chunk_bytes):
                    self.wfile.write(data[at:at + hub.chunk_bytes])
                    self.wfile.flush()
                    time.sleep(hub.delay_s)

    return Handler


def payload(n: int, seed: int) -> bytes:
    """Deterministic, non-repeating bytes (so a resume at a wrong offset changes the hash)."""
    out = bytearray()
    block = seed.to_bytes(4, "little")
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:n])


@contextlib.contextmanager
def run_hub(files: dict[str, bytes], lfs: set[str] | None = None) -> Iterator[FakeHub]:
    """Run a :class:`FakeHub` of ``files`` (repo path → bytes) on loopback; ``hub.url`` is its base URL. Nothing of
    this process is changed: a server subprocess needs ``HF_ENDPOINT=<hub.url>`` in its environment."""
    fake = FakeHub(files=files, lfs=lfs or set())
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler(fake))
    server.daemon_threads = True
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextlib.contextmanager
def serve_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, files: dict[str, bytes],
              lfs: set[str] | None = None) -> Iterator[FakeHub]:
    """:func:`run_hub`, with this process's hub settings pointed at it (for in-process tests)."""
    with run_hub(files, lfs) as fake:
        # Every hub access of the code under test must land on the stand-in, even one that ignores `endpoint=`.
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        monkeypatch.setattr(hf_constants, "ENDPOINT", fake.url)
        monkeypatch.setattr(
            hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", fake.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        # Small chunks so that an interrupted transfer has written something (httpx drops a partly received chunk).
        monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 512)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        monkeypatch.setattr(hf_constants, "AGENT_HARNESSES_PATH", str(tmp_path / "hf_home" / "agents.json"),
                            raising=False)
        yield fake
