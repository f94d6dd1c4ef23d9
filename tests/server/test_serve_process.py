"""The real server process on loopback, running the real `tiny` pipeline on the CPU.

One server is started for the module (``--preload --max-queue 2``) and its jobs are shared between the tests, which
run in file order: two clients submit at once (and the queue overflows), bad requests are refused while those jobs
run, both results are fetched and checked, a long job is cancelled mid-denoising, and finally the server is stopped
and a second one started on the same jobs folder (without ONE2345_TOKEN, so with a token file) which lists the old
jobs, serves the old result, and is stopped with SIGTERM in the middle of a job.

Jobs use the lowest settings (2 DDIM steps per stage, a given elevation, a 32³ grid) so a job takes ~30 s on a loaded
2-core machine.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
import trimesh
from PIL import Image, ImageDraw

from server.common.mesh_io import load_mesh

REPO = Path(__file__).resolve().parents[2]
TOKEN = "process-test-token-5b1e"
FAST = {"steps_stage1": 2, "steps_stage2": 2, "resolution": 32, "elevation": 20.0, "seed": 7}
"""The cheapest job: the given elevation skips estimation; the result's elevation must be exactly 20."""
SLOW = {"steps_stage1": 200, "steps_stage2": 200, "resolution": 32, "elevation": 20.0, "guidance": 1.0}
"""A job that spends minutes denoising: the one to cancel. Guidance 1 halves the UNet batch, so the denoising steps
(between which the pipeline polls for cancellation) are short even on a busy machine."""
STAGES = ("preprocess", "stage1", "stage2", "elevation", "stage1b", "stage2b", "reconstruct", "export")
JOB_TIMEOUT_S = 240.0


def ball_png() -> bytes:
    image = Image.new("RGB", (96, 80), "white")
    ImageDraw.Draw(image).ellipse((20, 12, 76, 68), fill=(200, 60, 40))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Server:
    proc: subprocess.Popen
    ready: dict
    client: httpx.Client
    stderr: Path

    def tail(self) -> str:
        return "\n".join(self.stderr.read_text(errors="replace").splitlines()[-30:])


def start_server(jobs_dir: Path, log: Path, *flags: str, token: str | None = TOKEN) -> Server:
    env = {k: v for k, v in os.environ.items() if k != "ONE2345_TOKEN"}
    if token is not None:
        env["ONE2345_TOKEN"] = token
    with open(log, "w") as err:  # a file, not a pipe: a chatty server can never block on a full pipe
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.service.serve", "--preset", "tiny", "--device", "cpu", "--port", "0",
             "--jobs-dir", str(jobs_dir), *flags],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    readable, _, _ = select.select([proc.stdout], [], [], 120)
    line = proc.stdout.readline() if readable else ""
    if not line:
        proc.kill()
        raise AssertionError(f"no ready line; stderr:\n{log.read_text()[-3000:]}")
    ready = json.loads(line)
    headers = {"Authorization": f"Bearer {token or Path(ready['token_file']).read_text()}"}
    return Server(proc, ready, httpx.Client(base_url=ready["url"], headers=headers, timeout=60), log)


def stop(server: Server, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
    server.proc.send_signal(sig)
    try:
        return server.proc.wait(timeout)
    finally:
        server.client.close()
        if server.proc.poll() is None:
            server.proc.kill()


def submit(server: Server, options: dict, name: str = "ball.png", image: bytes | None = None) -> httpx.Response:
    return server.client.post("/v1/jobs", files={"image": (name, ball_png() if image is None else image,
                                                           "image/png")},
                              data={"options": json.dumps(options)})


def wait_for(server: Server, job_id: str, until, timeout: float = JOB_TIMEOUT_S, trace: list | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = server.client.get(f"/v1/jobs/{job_id}").json()
        if trace is not None:
            trace.append(status)
        if until(status):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} stuck: {status}\n{server.tail()}")
        time.sleep(0.25)


def finished(status: dict) -> bool:
    return status["state"] in ("done", "failed", "cancelled")


@pytest.fixture(scope="module")
def jobs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve") / "jobs"


@pytest.fixture(scope="module")
def server(jobs_dir) -> Server:
    srv = start_server(jobs_dir, jobs_dir.parent / "server-a.log", "--preload", "--max-queue", "2")
    yield srv
    if srv.proc.poll() is None:
        stop(srv)


@pytest.fixture(scope="module")
def two_jobs(server) -> dict[str, str]:
    """Two clients submit at the same moment; returns {"glb": id, "ply": id}."""
    answers: dict[str, httpx.Response] = {}
    barrier = threading.Barrier(2)

    def client(fmt: str) -> None:
        with httpx.Client(base_url=server.ready["url"], headers=server.client.headers, timeout=60) as c:
            barrier.wait()
            answers[fmt] = c.post("/v1/jobs", files={"image": ("ball.png", ball_png(), "image/png")},
                                  data={"options": json.dumps({**FAST, "format": fmt})})

    threads = [threading.Thread(target=client, args=(fmt,)) for fmt in ("glb", "ply")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert {fmt: r.status_code for fmt, r in answers.items()} == {"glb": 202, "ply": 202}
    return {fmt: r.json()["id"] for fmt, r in answers.items()}


def test_ready_line_and_health(server):
    ready = server.ready
    assert set(ready) == {"event", "url", "pid", "version", "device", "preset", "token_file", "jobs_dir"}
    assert ready["event"] == "ready" and ready["pid"] == server.proc.pid and ready["token_file"] is None
    assert (ready["device"], ready["preset"], ready["version"]) == ("cpu", "tiny", "0.1.0")
    url = urlparse(ready["url"])
    assert url.hostname == "127.0.0.1" and url.port > 0
    health = httpx.get(f"{ready['url']}/v1/health", timeout=30).json()  # no token needed
    assert health["status"] == "ok" and health["device"] == "cpu" and health["preset"] == "tiny"
    assert set(health["models_loaded"]) >= {"zero123", "reconstruction"}  # --preload


def test_two_clients_then_the_queue_overflows(server, two_jobs):
    # One of the two runs, the other waits; with --max-queue 2 one more fits, and the next is refused.
    deadline = time.monotonic() + 30
    while (health := server.client.get("/v1/health").json())["running"] is None:
        assert time.monotonic() < deadline, health
        time.sleep(0.05)
    assert health["running"] in two_jobs.values() and health["queue_length"] == 1
    third = submit(server, FAST)
    assert third.status_code == 202
    full = submit(server, FAST)
    assert full.status_code == 429 and full.json()["error"]["kind"] == "queue_full"
    assert int(full.headers["Retry-After"]) >= 1
    # Cancelling a queued job is immediate, and it never runs.
    r = server.client.delete(third.json()["url"])
    assert r.status_code == 200 and r.json()["state"] == "cancelled" and r.json()["stage"] is None


def test_bad_requests_while_jobs_run(server):
    no_token = httpx.Client(base_url=server.ready["url"], timeout=30)
    assert no_token.get("/v1/jobs").status_code == 401
    assert no_token.get("/v1/jobs", headers={"Authorization": "Bearer not-the-token"}).status_code == 401
    r = no_token.post("/v1/jobs", files={"image": ("b.png", ball_png(), "image/png")})
    assert r.status_code == 401 and r.json()["error"]["kind"] == "unauthorized"

    png = ball_png()
    cases = {"corrupt": (png[: len(png) // 2], 400), "zero-byte": (b"", 400),
             "non-image": (b"%PDF-1.7 definitely not a picture", 400),
             "huge": (png + os.urandom(21 * 2**20), 413)}  # over the default 20 MiB
    for name, (image, code) in cases.items():
        r = submit(server, FAST, image=image)
        assert r.status_code == code, (name, r.text)
        assert r.json()["error"]["kind"] == ("too_large" if code == 413 else "bad_input"), name
    r = submit(server, {**FAST, "turbo": True})
    assert r.status_code == 400 and "turbo" in r.json()["error"]["message"]

    # Raw requests, so that no client library normalises the paths.
    url = urlparse(server.ready["url"])
    for path in ("/v1/jobs/..%2F..", "/v1/jobs/abc", "/v1/jobs/" + "a" * 33, "/v1/jobs/..%2F..%2Fetc%2Fpasswd",
                 "/v1/jobs/" + "a" * 32, "/v1/jobs/" + "a" * 32 + "/views/..%2Fstatus.json"):
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        conn.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}"})
        response = conn.getresponse()
        body = json.loads(response.read())
        conn.close()
        assert response.status == 404 and body["error"]["kind"] == "not_found", path
    assert server.client.get("/v1/health").status_code == 200


def test_both_jobs_finish_with_valid_meshes(server, two_jobs, tmp_path):
    traces: dict[str, list] = {"glb": [], "ply": []}
    for fmt, job_id in two_jobs.items():
        status = wait_for(server, job_id, finished, trace=traces[fmt])
        assert status["state"] == "done", status
    for fmt in two_jobs:
        status = traces[fmt][-1]
        result = status["result"]
        assert result["format"] == fmt and result["elevation"] == pytest.approx(20.0)
        r = server.client.get(result["url"])
        assert r.status_code == 200 and r.headers["content-disposition"] == f'attachment; filename="ball.{fmt}"'
        if fmt == "glb":
            assert r.headers["content-type"] == "model/gltf-binary"
            mesh = trimesh.load(io.BytesIO(r.content), file_type="glb", force="mesh", process=False)
            vertices, faces = len(mesh.vertices), len(mesh.faces)
        else:
            path = tmp_path / "downloaded.ply"
            path.write_bytes(r.content)
            mesh = load_mesh(path)
            vertices, faces = len(mesh.vertices), len(mesh.faces)
            assert mesh.colors is not None and mesh.colors.shape == (vertices, 3)
        assert vertices == result["vertices"] > 0 and faces == result["faces"] > 0
        meta = server.client.get(result["meta_url"]).json()
        assert meta["elevation"] == pytest.approx(20.0) and meta["options"]["format"] == fmt
        assert meta["timings"] and meta["seed"] == 7

        # Progress was reported along the way: stages in pipeline order, fraction never going back.
        seen = [s for s in traces[fmt] if s["state"] == "running" and s["stage"]]
        order = [STAGES.index(s["stage"]) for s in seen]
        assert order == sorted(order)
        fractions = [s["fraction"] for s in seen] + [status["fraction"]]
        assert fractions == sorted(fractions) and status["fraction"] == 1.0
        names = [p["name"] for p in status["previews"]]
        assert {"input_256.png", "0.png", "0_0.png"} <= set(names)
        view = server.client.get(status["previews"][1]["url"])
        assert view.headers["content-type"] == "image/png" and Image.open(io.BytesIO(view.content)).size[0] > 0


def test_cancel_mid_denoising(server):
    job_id = submit(server, SLOW).json()["id"]
    running = wait_for(server, job_id, lambda s: finished(s) or (s["stage"] == "stage1" and s["step"] >= 1))
    assert running["state"] == "running" and running["total"] > running["step"]
    start = time.monotonic()
    server.client.delete(f"/v1/jobs/{job_id}")
    status = wait_for(server, job_id, finished, timeout=10)
    assert status["state"] == "cancelled" and status["error"]["kind"] == "cancelled"
    assert time.monotonic() - start < 2.5
    assert server.client.get(f"/v1/jobs/{job_id}/result").status_code == 409
    assert server.client.get("/v1/health").json()["running"] is None


def test_restart_lists_jobs_and_sigterm_cancels_the_running_job(server, two_jobs, jobs_dir):
    assert stop(server) == 0, server.tail()
    assert server.proc.stdout.read() == "", "stdout must carry nothing but the ready line"
    # A job that was running when a server died (as a crash would leave it).
    crashed = "e" * 32
    (jobs_dir / crashed).mkdir()
    record = json.loads((jobs_dir / two_jobs["ply"] / "status.json").read_text())
    (jobs_dir / crashed / "status.json").write_text(json.dumps({**record, "id": crashed, "state": "running",
                                                                "result": None}))

    second = start_server(jobs_dir, jobs_dir.parent / "server-b.log", token=None)
    try:
        token_file = Path(second.ready["token_file"])
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        jobs = {j["id"]: j for j in second.client.get("/v1/jobs").json()["jobs"]}
        assert jobs[two_jobs["glb"]]["state"] == "done" and jobs[two_jobs["ply"]]["state"] == "done"
        assert jobs[crashed]["state"] == "failed" and jobs[crashed]["error"]["kind"] == "internal"
        assert sum(j["state"] == "cancelled" for j in jobs.values()) == 2  # the queued one and the slow one
        r = second.client.get(f"/v1/jobs/{two_jobs['glb']}/result")
        assert r.status_code == 200 and r.content == (jobs_dir / two_jobs["glb"] / "run" / "mesh.glb").read_bytes()

        job_id = submit(second, SLOW).json()["id"]
        wait_for(second, job_id, lambda s: finished(s) or (s["stage"] == "stage1" and s["step"] >= 1))
        start = time.monotonic()
        code = stop(second)
        assert code == 0, second.tail()
        assert time.monotonic() - start < 20
        record = json.loads((jobs_dir / job_id / "status.json").read_text())
        assert record["state"] == "cancelled" and "server was stopped" in record["error"]["message"]
        assert not token_file.exists(), "the generated token file outlives the server"
    finally:
        if second.proc.poll() is None:
            second.proc.kill()


def test_refuses_a_public_address_without_a_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "ONE2345_TOKEN"}
    run = subprocess.run([sys.executable, "-m", "server.service.serve", "--host", "0.0.0.0", "--jobs-dir",
    str(tmp_path)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stdout == ""
    assert "ONE2345_TOKEN" in run.stderr and "0.0.0.0" in run.stderr
