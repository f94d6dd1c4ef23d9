"""The HTTP layer and the job store, in process, with a fast stand-in for the pipeline.

The stand-in writes a real run folder (a box mesh, views, meta.json) and can be told to fail the way the real pipeline
fails (CUDA OOM, bad input, a bug, missing weights) or to block until cancelled, so that the error mapping, queueing,
cancellation and restart logic are checked in milliseconds. The real `tiny` pipeline runs in test_serve_process.py.
"""

from __future__ import annotations

import io
import json
import threading
import time
import zlib
from pathlib import Path

import pytest
import torch
import trimesh
from fastapi.testclient import TestClient
from PIL import Image

from server.common.errors import BadInputError, CancelledError, MissingWeightsError
from server.pipeline import GenerateOptions, GenerateResult, Progress
from server.service.app import AppConfig, create_app
from server.service.jobs import JobManager, JobsConfig, write_json_atomic

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def png_bytes(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 50, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width``×``height`` (valid CRC) but holds the pixels of a 16×16 image: the server
    must refuse it from the header alone, without decoding."""
    data = bytearray(png_bytes((16, 16)))
    assert data[12:16] == b"IHDR"
    data[16:20] = width.to_bytes(4, "big")
    data[20:24] = height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


class FakePipeline:
    """Stands in for One2345Pipeline. Each call takes the next action from ``actions`` (default ``ok``)."""

    device = "cpu"
    preset = "fake"

    def __init__(self) -> None:
        self.actions: list[str] = []
        self.gate = threading.Event()
        self.calls: list[GenerateOptions] = []

    def models_loaded(self) -> dict[str, str]:
        return {"fake": "test double"}

    def __call__(self, image, run_dir, options=None, progress=None, should_cancel=None) -> GenerateResult:
        self.calls.append(options)
        action = self.actions.pop(0) if self.actions else "ok"
        run_dir = Path(run_dir)
        (run_dir / "views").mkdir(parents=True, exist_ok=True)
        Image.open(image).convert("RGB").resize((32, 32)).save(run_dir / "input_256.png")
        progress(Progress("preprocess", 1, 1, 0.01, preview=run_dir / "input_256.png"))
        if action == "oom":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if action == "bad":
            raise BadInputError("the image shows no object (all pixels are background)")
        if action == "bug":
            raise RuntimeError("shape mismatch in the fake")
        if action in ("block", "gate"):
            time.sleep(0.3)
            progress(Progress("stage1", 3, 12, 0.25))
            while not (self.gate.is_set() if action == "gate" else should_cancel()):
                time.sleep(0.01)
            if action == "block":
                raise CancelledError("the job was cancelled")
        Image.new("RGB", (32, 32), (9, 9, 9)).save(run_dir / "views" / "0.png")
        progress(Progress("stage1", 12, 12, 0.5, preview=run_dir / "views" / "0.png"))
        mesh = trimesh.creation.box()
        mesh_path = run_dir / f"mesh.{options.format}"
        mesh.export(mesh_path)
        meta_path = run_dir / "meta.json"
        meta_path.write_text(json.dumps({"elevation": 12.5, "options": {"format": options.format}}))
        progress(Progress("export", 1, 1, 1.0))
        return GenerateResult(mesh_path=mesh_path, views_dir=run_dir / "views", elevation=12.5, polar=77.5,
                              elevation_source="given", background="none", timings={"stage1": 0.1},
                              meta_path=meta_path, vertices=len(mesh.vertices), faces=len(mesh.faces), seed=1)


@pytest.fixture
def fake() -> FakePipeline:
    return FakePipeline()


def make_client(jobs_dir: Path, loader, **config) -> TestClient:
    manager = JobManager(jobs_dir, loader, JobsConfig(**{k: v for k, v in config.items() if k in
                                                          ("max_queue", "missing_weights_retry_s")}))
    app_config = AppConfig(token=TOKEN, preset="fake",
                           **{k: v for k, v in config.items() if k in ("max_upload_bytes",)})
    return TestClient(create_app(manager, app_config))


@pytest.fixture
def client(tmp_path, fake):
    with make_client(tmp_path / "jobs", lambda: fake) as c:
        yield c


def submit(client: TestClient, image: bytes | None = None, options: dict | str | None = None,
           filename: str = "my photo.png", **extra) -> object:
    files = {"image": (filename, png_bytes() if image is None else image, "image/png")}
    data = {} if options is None else {"options": options if isinstance(options, str) else json.dumps(options)}
    data.update(extra)
    return client.post("/v1/jobs", files=files, data=data, headers=AUTH)


def wait_state(client: TestClient, job_id: str, states=("done", "failed", "cancelled"), timeout=10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
        if status["state"] in states:
            return status
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} not in {states} after {timeout}s: {status}")


def test_job_round_trip(client, tmp_path):
    r = submit(client, options={"format": "ply", "steps_stage1": 5})
    assert r.status_code == 202
    body = r.json()
    assert len(body["id"]) == 32 and int(body["id"], 16) >= 0 and body["state"] == "queued"
    assert body["url"] == f"/v1/jobs/{body['id']}"
    status = wait_state(client, body["id"])
    assert status["state"] == "done" and status["error"] is None and status["fraction"] == 1.0
    assert status["options"]["format"] == "ply" and status["options"]["steps_stage1"] == 5
    assert status["options"]["guidance"] == 3.0  # defaults filled in
    box = trimesh.creation.box()
    assert status["result"] == {"url": f"/v1/jobs/{body['id']}/result", "format": "ply",
                                "meta_url": f"/v1/jobs/{body['id']}/meta", "elevation": 12.5,
                                "vertices": len(box.vertices), "faces": len(box.faces),
                                "elevation_uncertain": False, "elevation_confidence": None,
                                "textured": False, "texture_size": None, "target_faces": None,
                                "uv_source": None}  # which UVs a bake used (#26); null for other jobs
    assert status["remesh_of"] is None
    assert [p["name"] for p in status["previews"]] == ["input_256.png", "0.png"]

    r = client.get(status["result"]["url"], headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    assert r.headers["content-disposition"] == 'attachment; filename="my_photo.ply"'
    mesh = trimesh.load(io.BytesIO(r.content), file_type="ply", process=False)
    assert len(mesh.vertices) == 8 and len(mesh.faces) == 12
    assert client.get(status["result"]["meta_url"], headers=AUTH).json()["elevation"] == 12.5
    view = client.get(status["previews"][1]["url"], headers=AUTH)
    assert view.headers["content-type"] == "image/png" and Image.open(io.BytesIO(view.content)).size == (32, 32)

    folder = tmp_path / "jobs" / body["id"]
    assert (folder / "input.png").read_bytes() == png_bytes()
    assert json.loads((folder / "status.json").read_text())["state"] == "done"
    assert "done" in (folder / "log.txt").read_text()
    assert not list(folder.rglob("*.tmp")), "temporary files left behind"


def test_progress_eta_and_health_while_running(client, fake):
    fake.actions = ["gate"]
    job_id = submit(client).json()["id"]
    deadline = time.monotonic() + 5
    while (status := client.get(f"/v1/jobs/{job_id}", headers=AUTH).json())["stage"] != "stage1":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert status["state"] == "running" and (status["step"], status["total"]) == (3, 12)
    # ETA = elapsed · (1 − f) / f at the report: f = 0.25 → 3 × elapsed (rounded to 0.1 s in the answer).
    assert status["fraction"] == 0.25 and status["elapsed_s"] >= 0.3
    assert status["eta_s"] == pytest.approx(3 * status["elapsed_s"], abs=0.06)
    health = client.get("/v1/health").json()
    assert health["running"] == job_id and health["queue_length"] == 0 and health["status"] == "ok"
    assert health["models_loaded"] == {"fake": "test double"}
    # The add-on's pre-flight line: the device, and no time estimate before a job has finished.
    assert health["device_info"]["kind"] == "cpu" and health["device_info"]["memory_free_bytes"] is None
    assert health["recent_job_s"] is None
    r = client.get(f"/v1/jobs/{job_id}/result", headers=AUTH)
    assert r.status_code == 409 and r.json()["error"]["kind"] == "conflict"
    fake.gate.set()
    done = wait_state(client, job_id)
    assert done["state"] == "done"
    assert client.get("/v1/health").json()["recent_job_s"] == done["elapsed_s"] > 0


def test_cuda_oom_fails_the_job_frees_memory_and_the_server_lives_on(client, fake, monkeypatch):
    freed = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed.append(True))
    fake.actions = ["oom"]
    first = wait_state(client, submit(client).json()["id"])
    assert first["state"] == "failed" and first["result"] is None
    assert first["error"]["kind"] == "out_of_memory" and "out of memory" in first["error"]["message"]
    assert "resolution" in first["error"]["fix"]
    assert freed, "torch.cuda.empty_cache() was not called"
    assert client.get("/v1/health").status_code == 200
    assert wait_state(client, submit(client).json()["id"])["state"] == "done"


@pytest.mark.parametrize(("action", "kind", "text"), [("bad", "bad_input", "no object"),
                                                      ("bug", "internal", "RuntimeError: shape mismatch")])
def test_pipeline_errors_become_typed_job_errors(client, fake, tmp_path, action, kind, text):
    fake.actions = [action]
    job_id = submit(client).json()["id"]
    status = wait_state(client, job_id)
    assert status["state"] == "failed" and status["error"]["kind"] == kind and text in status["error"]["message"]
    assert "Traceback" in (tmp_path / "jobs" / job_id / "log.txt").read_text()
    r = client.get(f"/v1/jobs/{job_id}/meta", headers=AUTH)
    assert r.status_code == 409


def test_missing_weights_fails_the_job_then_refuses_with_503_until_retry(tmp_path, fake):
    attempts = []

    def loader():
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            raise MissingWeightsError("zero123-xl.ckpt is not in /w", fix="one2345 weights fetch")
        return fake

    with make_client(tmp_path / "jobs", loader, missing_weights_retry_s=0.5) as c:
        status = wait_state(c, submit(c).json()["id"])
        assert status["error"] == {"kind": "missing_weights", "message": "zero123-xl.ckpt is not in /w",
                                   "fix": "one2345 weights fetch"}
        r = submit(c)
        assert r.status_code == 503 and r.json()["error"]["kind"] == "missing_weights"
        assert 1 <= int(r.headers["retry-after"]) <= 1
        time.sleep(0.6)
        r = submit(c)
        assert r.status_code == 202
        assert wait_state(c, r.json()["id"])["state"] == "done" and len(attempts) == 2


def test_cancel_running_and_queued_then_delete(client, fake, tmp_path):
    fake.actions = ["block"]
    running = submit(client).json()["id"]
    wait_state(client, running, ("running",))
    queued = submit(client).json()["id"]
    assert client.get(f"/v1/jobs/{queued}", headers=AUTH).json()["state"] == "queued"

    r = client.delete(f"/v1/jobs/{queued}", headers=AUTH)
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    start = time.monotonic()
    r = client.delete(f"/v1/jobs/{running}", headers=AUTH)
    assert r.status_code == 200 and r.json()["state"] == "cancelled" and time.monotonic() - start < 2.0
    assert r.json()["error"]["kind"] == "cancelled"
    assert fake.calls and len(fake.calls) == 1, "the cancelled queued job must never run"

    assert client.delete(f"/v1/jobs/{running}", headers=AUTH).status_code == 204
    assert not (tmp_path / "jobs" / running).exists()
    assert client.get(f"/v1/jobs/{running}", headers=AUTH).status_code == 404
    assert [j["id"] for j in client.get("/v1/jobs", headers=AUTH).json()["jobs"]] == [queued]


def test_queue_full_is_429_with_retry_after(tmp_path, fake):
    fake.actions = ["gate"]
    with make_client(tmp_path / "jobs", lambda: fake, max_queue=1) as c:
        first = submit(c).json()["id"]
        wait_state(c, first, ("running",))
        second = submit(c).json()["id"]
        r = submit(c)
        assert r.status_code == 429 and r.json()["error"]["kind"] == "queue_full"
        assert int(r.headers["retry-after"]) >= 1
        assert c.get("/v1/health").json()["queue_length"] == 1
        fake.gate.set()
        assert wait_state(c, second)["state"] == "done"
        listed = [j["id"] for j in c.get("/v1/jobs", headers=AUTH).json()["jobs"]]
        assert listed == [second, first]  # newest first


@pytest.mark.parametrize(("image", "status", "text"), [
    (b"", 400, "empty"),
    (b"this is not an image at all", 400, "not a readable image"),
    (png_bytes()[:60], 400, "image"),                       # truncated: header fine, pixels missing
    (png_bytes((8, 40)), 400, "at least 16 px"),
    (png_header_claiming(7000, 6000), 400, "42.0 MP"),       # refused from the header, 42 MP > 40 MP
    (b"GIF89a" + b"\0" * 20, 400, "not a readable image"),
])
def test_bad_images_are_refused_before_queuing(client, fake, image, status, text):
    r = submit(client, image=image)
    assert r.status_code == status, r.text
    assert r.json()["error"]["kind"] == "bad_input" and text in r.json()["error"]["message"]
    assert client.get("/v1/jobs", headers=AUTH).json()["jobs"] == [] and not fake.calls


@pytest.mark.parametrize(("options", "text"), [
    ({"steps_stage1": 0}, "steps_stage1"),
    ({"resolution": 1024}, "resolution"),
    ({"elevation": 80}, "elevation"),
    ({"format": "stl"}, "format"),
    ({"colour": "red"}, "unknown option"),
    ("[1, 2]", "JSON object"),
    ("{not json", "not valid JSON"),
])
def test_bad_options_are_400_naming_the_field(client, options, text):
    r = submit(client, options=options)
    assert r.status_code == 400 and r.json()["error"]["kind"] == "bad_input"
    assert text in r.json()["error"]["message"]


def test_malformed_requests_are_400_not_422(client):
    r = client.post("/v1/jobs", data={"options": "{}"}, headers=AUTH)  # no image part
    assert r.status_code == 400 and "image" in r.json()["error"]["message"]
    r = submit(client, extra_part="x")
    assert r.status_code == 400 and "extra_part" in r.json()["error"]["message"]


def test_upload_size_limit_with_and_without_content_length(tmp_path, fake):
    with make_client(tmp_path / "jobs", lambda: fake, max_upload_bytes=100_000) as c:
        big = png_bytes() + b"\0" * 200_000  # a PNG with trailing junk, over the limit
        r = submit(c, image=big)
        assert r.status_code == 413 and r.json()["error"]["kind"] == "too_large"

        def chunks():  # no Content-Length: the body is counted as it streams
            yield b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n"
            for _ in range(30):
                yield b"\0" * 10_000
        r = c.post("/v1/jobs", content=chunks(), headers={**AUTH, "Content-Type": "multipart/form-data; boundary=b"})
        assert r.status_code == 413 and r.json()["error"]["kind"] == "too_large"
        assert c.get("/v1/health").status_code == 200 and not fake.calls


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                                     {"Authorization": f"Basic {TOKEN}"}, {"Authorization": f"Bearer {TOKEN}x"}])
def test_token_is_required_except_for_health_and_schema(client, headers):
    for method, url in [("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/" + "a" * 32),
                        ("DELETE", "/v1/jobs/" + "a" * 32)]:
        r = client.request(method, url, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["kind"] == "unauthorized", (method, url)
        assert r.headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/health").status_code == 200
    assert client.get("/openapi.json").status_code == 200


@pytest.mark.parametrize("path", ["abc", "A" * 32, "a" * 31, "a" * 33, "..%2F..", "%2e%2e", "g" * 32])
def test_ids_that_are_not_ids_are_404(client, path):
    for suffix in ("", "/result", "/meta", "/views/0.png", "/input"):
        r = client.get(f"/v1/jobs/{path}{suffix}", headers=AUTH)
        assert r.status_code == 404 and r.json()["error"]["kind"] == "not_found", (path, suffix)
    assert client.delete(f"/v1/jobs/{path}", headers=AUTH).status_code == 404


def test_view_names_are_validated(client):
    job_id = submit(client).json()["id"]
    wait_state(client, job_id)
    for name in ("status.json", "..%2Fstatus.json", "0.PNG", "input.png", "123.png", "0_0_0.png", "9.png"):
        r = client.get(f"/v1/jobs/{job_id}/views/{name}", headers=AUTH)
        assert r.status_code == 404, name
    assert client.get(f"/v1/jobs/{job_id}/views/input_256.png", headers=AUTH).status_code == 200


def test_the_uploaded_input_is_served_byte_for_byte(client):
    """History and Regenerate in the add-on fetch the original upload (its SHA-256 is in the recipe)."""
    job_id = submit(client).json()["id"]
    r = client.get(f"/v1/jobs/{job_id}/input", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content == png_bytes()
    assert client.get(f"/v1/jobs/{job_id}/input").status_code == 401


def test_openapi_documents_the_api(client):
    schema = client.get("/openapi.json").json()
    weights = {p for p in schema["paths"] if p.startswith("/v1/weights")}  # tested in test_weights_api.py
    assert set(schema["paths"]) == {"/v1/health", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/result",
                                    "/v1/jobs/{job_id}/meta", "/v1/jobs/{job_id}/views/{name}",
                                    "/v1/jobs/{job_id}/input", "/v1/jobs/{job_id}/remesh", "/v1/jobs/{job_id}/reroll",
                                    "/v1/jobs/{job_id}/continue", "/v1/jobs/{job_id}/pin", "/v1/jobs/{job_id}/bake",
                                    "/v1/images", "/v1/jobs/{job_id}/candidates/{name}", *weights}
    post = schema["paths"]["/v1/jobs"]["post"]
    assert {"202", "400", "401", "413", "429", "503"} <= set(post["responses"])
    assert "422" not in json.dumps(schema["paths"])
    assert post["security"] == [{"bearer": []}] and "security" not in schema["paths"]["/v1/health"]["get"]
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_restart_reads_jobs_back_and_fails_interrupted_ones(tmp_path, fake):
    jobs_dir = tmp_path / "jobs"
    with make_client(jobs_dir, lambda: fake) as c:
        done = submit(c).json()["id"]
        wait_state(c, done)
    # What a crash leaves: a job that was running, a half-created folder, and an unreadable status.
    running = "b" * 32
    (jobs_dir / running).mkdir()
    record = json.loads((jobs_dir / done / "status.json").read_text())
    write_json_atomic(jobs_dir / running / "status.json",
                      {**record, "id": running, "state": "running", "result": None, "created": "2000-01-01T00:00:00"})
    (jobs_dir / f".incoming-{'c' * 32}").mkdir()
    (jobs_dir / ("d" * 32)).mkdir()
    (jobs_dir / ("d" * 32) / "status.json").write_text("{trunc")

    with make_client(jobs_dir, lambda: fake) as c:
        jobs = c.get("/v1/jobs", headers=AUTH).json()["jobs"]
        assert [j["id"] for j in jobs] == [done, running]
        assert jobs[0]["state"] == "done"
        assert c.get(f"/v1/jobs/{done}/result", headers=AUTH).content == (jobs_dir / done / "run/mesh.glb").read_bytes()
        assert jobs[1]["state"] == "failed" and jobs[1]["error"]["kind"] == "internal"
        assert "stopped while this job was running" in jobs[1]["error"]["message"]
    assert json.loads((jobs_dir / running / "status.json").read_text())["state"] == "failed"
    assert not (jobs_dir / f".incoming-{'c' * 32}").exists()


def test_stop_cancels_the_running_job(tmp_path, fake):
    fake.actions = ["block"]
    jobs_dir = tmp_path / "jobs"
    with make_client(jobs_dir, lambda: fake) as c:
        job_id = submit(c).json()["id"]
        wait_state(c, job_id, ("running",))
    record = json.loads((jobs_dir / job_id / "status.json").read_text())
    assert record["state"] == "cancelled" and "server was stopped" in record["error"]["message"]
