"""A real uvicorn server on loopback, in a thread of the test process, serving the app of test_app.py (a fast stand-in
pipeline) with the protocol and settings of ``one2345 serve``: for what only a real socket shows (timeouts, resets,
what is read of a body), in a fraction of the time a server process takes to start. Its log records reach caplog.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from server.service.app import AppConfig, create_app
from server.service.jobs import JobManager, JobsConfig
from server.service.serve import ClientTimeouts, bind_socket, timed_h11_protocol
from tests.server.test_app import TOKEN

AUTH = f"Bearer {TOKEN}"


@dataclass
class Live:
    host: str
    port: int
    manager: JobManager

    def connect(self, timeout: float = 30.0) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=timeout)


@contextmanager
def live_server(jobs_dir: Path, loader, timeouts: ClientTimeouts | None = None,
                max_upload_bytes: int = 20 * 2**20) -> Iterator[Live]:
    timeouts = timeouts or ClientTimeouts()
    manager = JobManager(jobs_dir, loader, JobsConfig())
    app = create_app(manager, AppConfig(token=TOKEN, preset="fake", max_upload_bytes=max_upload_bytes))
    sock = bind_socket("127.0.0.1", 0)
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=2,
                            http=timed_h11_protocol(timeouts), timeout_keep_alive=max(1, round(timeouts.keep_alive_s)))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the in-process server did not start"
        time.sleep(0.02)
    try:
        yield Live("127.0.0.1", sock.getsockname()[1], manager)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def read_response(sock: socket.socket, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (status, lower-case headers, body with Content-Length) from a raw socket."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a whole response head: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {len(rest)} of {length} body bytes")
        rest += chunk
    return int(lines[0].split()[1]), headers, rest[:length]


def closed_by_peer(sock: socket.socket, within: float) -> float | None:
    """Seconds until the server closes ``sock`` (EOF or reset), discarding what it sends; None if still open."""
    start = time.monotonic()
    sock.settimeout(0.05)
    while time.monotonic() - start < within:
        try:
            if not sock.recv(65536):
                return time.monotonic() - start
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - start
    return None
