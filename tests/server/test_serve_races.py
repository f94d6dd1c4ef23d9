"""Races and refusals against the real server process on loopback (issue #14: F2 and F4).

- F2: DELETE of a finished job at the same moment as GETs of its result, meta and a view. Every answer must be a
  whole response: a GET either streams the complete file (200, the exact bytes) or says the job is gone (404); the
  DELETE says 204; never a 500, never a connection cut mid-response.
- F4: a wrong token, or a Content-Length over the limit, is answered before the client sends its body: a client
  waiting for ``100 Continue`` gets the refusal instead, and a client that sends without waiting is answered at once.

The jobs are finished jobs written straight into the jobs folder (:func:`write_done_job`), which the server reads
back at start: seconds instead of a pipeline run per job.
"""

from __future__ import annotations

import http.client
import io
import json
import select
import socket
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from tests.server.test_serve_process import TOKEN, start_server, stop

JOBS = 40
MESH_BYTES = 3 * 2**20
"""A mesh big enough that streaming it overlaps the DELETE on loopback."""


def write_done_job(jobs_dir: Path, seed: int, mesh_bytes: int = MESH_BYTES) -> tuple[str, dict[str, bytes]]:
    """A finished job folder as the server writes it; returns its id and the bytes of the files it serves."""
    rng = np.random.default_rng(seed)
    job_id = uuid.UUID(int=int(rng.integers(0, 2**62)) << 60 | seed, version=4).hex
    folder = jobs_dir / job_id
    (folder / "run" / "views").mkdir(parents=True)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    files = {"result": rng.bytes(mesh_bytes), "meta": json.dumps({"elevation": 10.0, "seed": seed}).encode(),
             "views/0.png": buf.getvalue()}
    (folder / "input.png").write_bytes(buf.getvalue())
    (folder / "run" / "mesh.ply").write_bytes(files["result"])
    (folder / "run" / "meta.json").write_bytes(files["meta"])
    (folder / "run" / "views" / "0.png").write_bytes(files["views/0.png"])
    record = {"id": job_id, "created": f"2026-12-01T00:00:{seed % 60:02d}.000000+00:00", "options": {},
              "input_file": "input.png", "download_stem": "x", "state": "done", "stage": "export", "step": 1,
              "total": 1, "fraction": 1.0, "elapsed_s": 1.0, "previews": ["0.png"], "error": None,
              "result": {"format": "ply", "elevation": 10.0, "vertices": 8, "faces": 12, "mesh": "run/mesh.ply",
                         "meta": "run/meta.json"}}
    (folder / "status.json").write_text(json.dumps(record))
    return job_id, files


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("races")
    jobs = dict(write_done_job(root / "jobs", seed) for seed in range(JOBS))
    server = start_server(root / "jobs", root / "server.log")
    yield server, jobs
    if server.proc.poll() is None:
        stop(server)


def request(url, method: str, path: str, token: str = TOKEN) -> tuple[int | None, bytes, str | None]:
    """One request on its own connection → (status, body, the failure if the response was not whole)."""
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.request(method, path, headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        body = response.read()  # raises IncompleteRead if the body is cut short of its Content-Length
        return response.status, body, None
    except (http.client.HTTPException, OSError) as e:
        return None, b"", f"{type(e).__name__}: {e}"
    finally:
        conn.close()


def test_delete_racing_downloads_never_breaks_a_response(prepared):
    server, jobs = prepared
    url = urlparse(server.ready["url"])
    outcomes: list[tuple[str, str, int | None, str | None]] = []
    lock = threading.Lock()

    def race(job_id: str, files: dict[str, bytes]) -> None:
        barrier = threading.Barrier(4)

        def one(method: str, what: str) -> None:
            path = f"/v1/jobs/{job_id}" + ("" if what == "delete" else f"/{what}")
            barrier.wait()
            status, body, failure = request(url, method, path)
            if status == 200:  # a download that was answered must be the whole, exact file
                failure = failure or (None if body == files[what] else f"{what}: {len(body)} bytes, not the file")
            with lock:
                outcomes.append((job_id, what, status, failure))

        threads = [threading.Thread(target=one, args=args) for args in
                   (("GET", "result"), ("GET", "meta"), ("GET", "views/0.png"), ("DELETE", "delete"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)

    items = list(jobs.items())
    for start in range(0, len(items), 8):  # 8 jobs × 4 requests at a time
        racers = [threading.Thread(target=race, args=item) for item in items[start:start + 8]]
        for t in racers:
            t.start()
        for t in racers:
            t.join(300)

    assert len(outcomes) == 4 * JOBS
    broken = [o for o in outcomes if o[3] is not None]
    assert broken == [], broken[:5]
    codes = {}
    for _, what, status, _ in outcomes:
        codes.setdefault(what, set()).add(status)
    assert codes["delete"] == {204}
    for what in ("result", "meta", "views/0.png"):
        assert codes[what] <= {200, 404}, (what, codes[what])
    wins = sum(1 for o in outcomes if o[1] == "result" and o[2] == 200)
    print(f"\n{len(outcomes)} racing requests: {wins}/{JOBS} result downloads won against the DELETE; "
          f"codes {sorted((k, sorted(v)) for k, v in codes.items())}")
    assert request(url, "GET", "/v1/health")[0] == 200
    assert json.loads(request(url, "GET", "/v1/jobs")[1])["jobs"] == []
    assert "Traceback" not in server.stderr.read_text()


def raw_headers(url, token: str, length: int, expect: bool) -> socket.socket:
    sock = socket.create_connection((url.hostname, url.port), timeout=30)
    lines = ["POST /v1/jobs HTTP/1.1", f"Host: {url.hostname}:{url.port}", f"Authorization: Bearer {token}",
             "Content-Type: multipart/form-data; boundary=xyz", f"Content-Length: {length}"]
    if expect:
        lines.append("Expect: 100-continue")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def first_response(sock: socket.socket, within_s: float = 10.0) -> bytes:
    """What the server sent before the client sent any body."""
    readable, _, _ = select.select([sock], [], [], within_s)
    assert readable, f"no answer within {within_s} s without a body"
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.parametrize(("token", "status"), [("wrong-token-xyz", b"401"), (TOKEN, b"413")])
@pytest.mark.parametrize("expect", [True, False])
def test_refusals_come_before_the_body_is_read(prepared, token, status, expect):
    server, _ = prepared
    url = urlparse(server.ready["url"])
    start = time.monotonic()
    sock = raw_headers(url, token, 100 * 2**20, expect)  # announces 100 MiB, sends none of it
    try:
        answer = first_response(sock)
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
    assert b"100 Continue" not in answer
    assert time.monotonic() - start < 10
    if expect:  # the client never sent the body it announced, so this connection cannot carry another request
        assert b"connection: close" in answer.lower()
    assert request(url, "GET", "/v1/health")[0] == 200


def test_a_client_that_sends_its_body_anyway_still_gets_the_refusal_and_keeps_the_connection(prepared):
    server, _ = prepared
    url = urlparse(server.ready["url"])
    body = b"x" * (2 * 2**20)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.request("POST", "/v1/jobs", body=body, headers={"Authorization": "Bearer wrong-token-xyz",
                                                             "Content-Type": "multipart/form-data; boundary=xyz"})
        response = conn.getresponse()
        assert response.status == 401 and json.loads(response.read())["error"]["kind"] == "unauthorized"
        conn.request("GET", "/v1/health")  # the same connection, kept alive
        assert conn.getresponse().status == 200
    finally:
        conn.close()
