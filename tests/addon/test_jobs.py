"""GenerateJob (worker thread + main-thread drain) against a scripted server: progress, previews, results, cancel,
server-side failures, a queue that is full, and a server that dies mid-job."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from one2345_addon.core import jobs
from one2345_addon.core.server_process import Connection
from tests.addon.fake_server import ScriptedServer, json_reply

JOB = "0123456789abcdef0123456789abcdef"


class Script:
    """A server whose job goes through ``states`` (one per status request) and that records DELETEs."""

    def __init__(self, states: list[dict], submit: list[tuple] | None = None) -> None:
        self.states = states
        self.submit = submit or []
        self.deleted = False

    def __call__(self, request: dict):
        path, method = request["path"], request["method"]
        if method == "POST":
            return self.submit.pop(0) if self.submit else json_reply(202, {"id": JOB, "state": "queued"})
        if method == "DELETE":
            self.deleted = True
            return json_reply(200, {"id": JOB, "state": "cancelled"})
        if path == f"/v1/jobs/{JOB}":
            if self.deleted:
                return json_reply(200, status(state="cancelled"))
            return json_reply(200, self.states.pop(0) if len(self.states) > 1 else self.states[0])
        if path.endswith("/result"):
            return 200, {"Content-Type": "application/octet-stream"}, b"ply mesh bytes"
        if path.endswith("/meta"):
            return json_reply(200, {"elevation": 12.5})
        if "/views/" in path:
            return 200, {"Content-Type": "image/png"}, f"png {path.rsplit('/', 1)[1]}".encode()
        return json_reply(404, {"error": {"kind": "not_found", "message": path, "fix": None}})


def status(state: str = "running", stage: str = "stage1", fraction: float = 0.3, previews=(), **extra) -> dict:
    return {"id": JOB, "state": state, "stage": stage, "step": 2, "total": 4, "fraction": fraction,
            "elapsed_s": 1.0, "eta_s": 3.0, "previews": [{"name": n, "url": f"/v1/jobs/{JOB}/views/{n}"}
                                                         for n in previews],
            "error": None, "result": None, **extra}


DONE = status("done", "export", 1.0, ("0.png", "1.png"), result={
    "url": f"/v1/jobs/{JOB}/result", "format": "ply", "meta_url": f"/v1/jobs/{JOB}/meta", "elevation": 12.5,
    "vertices": 100, "faces": 196})


def make_job(tmp_path: Path, url: str, exit_code=lambda: None, note: str | None = None) -> jobs.GenerateJob:
    image = tmp_path / "job" / "input.png"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"png")
    connection = Connection(url=url, token="t", local=False, note=note)
    return jobs.GenerateJob(image, {"resolution": 32}, tmp_path / "job", lambda: connection, exit_code,
                            mesh_name="teapot", poll_interval=0.02)


def test_progress_previews_and_result(tmp_path):
    script = Script([status(previews=("input_256.png",)), status(stage="stage2", fraction=0.6,
                                                                 previews=("input_256.png", "0.png")), DONE])
    seen: dict[str, list] = {"progress": [], "preview": [], "note": [], "done": []}
    with ScriptedServer(script) as server:
        job = make_job(tmp_path, server.url, note="restarted")
        for event in seen:
            job.on(event, seen[event].append)
        assert job.start().wait(timeout=20)
    assert job.state == "done" and seen["done"] == [job] and seen["note"] == ["restarted"]
    stages = [p.stage for p in seen["progress"]]
    assert stages[:2] == ["Starting server", "Uploading image"] and "Stage2" in stages and stages[-1] == "Export"
    assert [p.name for p in seen["preview"]] == ["input_256.png", "0.png", "1.png"]
    result = job.result
    assert result.mesh == tmp_path / "job" / "teapot.ply" and result.mesh.read_bytes() == b"ply mesh bytes"
    assert json.loads(result.meta.read_text()) == {"elevation": 12.5}
    assert (result.job_id, result.format, result.elevation, result.vertices, result.faces) == (JOB, "ply", 12.5, 100,
                                                                                               196)
    assert (tmp_path / "job" / "views" / "0.png").read_bytes() == b"png 0.png"
    # events reach the job's fields only through drain() on the calling ("main") thread
    assert job.progress.fraction == 1.0 and len(job.previews) == 3


def test_events_wait_for_drain(tmp_path):
    with ScriptedServer(Script([DONE])) as server:
        job = make_job(tmp_path, server.url).start()
        time.sleep(1.0)
        assert job.state == "running" and job.result is None  # the worker finished, the main thread did not look
        assert job.drain() and job.state == "done"


def test_cancel_sends_delete_and_ends_cancelled(tmp_path):
    script = Script([status()])
    with ScriptedServer(script) as server:
        job = make_job(tmp_path, server.url).start()
        while job.progress.stage != "Stage1":
            job.drain()
            time.sleep(0.01)
        job.cancel()
        assert job.wait(timeout=10)
    assert script.deleted and job.state == "cancelled" and job.error.kind == "cancelled"
    assert job.result is None


def test_server_side_failure_keeps_kind_message_and_fix(tmp_path):
    failed = status("failed", error={"kind": "out_of_memory", "message": "CUDA out of memory at R=512",
                                     "fix": "lower the mesh resolution"})
    with ScriptedServer(Script([status(), failed])) as server:
        job = make_job(tmp_path, server.url).start()
        job.wait(timeout=10)
    assert job.state == "failed"
    assert (job.error.kind, job.error.message, job.error.fix) == ("out_of_memory", "CUDA out of memory at R=512",
                                                                  "lower the mesh resolution")


def test_full_queue_is_retried_after_the_servers_delay(tmp_path):
    busy = json_reply(429, {"error": {"kind": "queue_full", "message": "full", "fix": None}}, {"Retry-After": "0.3"})
    script = Script([DONE], submit=[busy])
    with ScriptedServer(script) as server:
        job = make_job(tmp_path, server.url)
        stages = []
        job.on("progress", lambda p: stages.append(p.stage))
        job.start().wait(timeout=10)
        posts = [r for r in server.requests if r["method"] == "POST"]
    assert job.state == "done" and len(posts) == 2 and "Server busy, waiting in line" in stages


def test_server_that_dies_mid_job_is_named(tmp_path):
    server = ScriptedServer(Script([status()]))
    with server:
        job = make_job(tmp_path, server.url, exit_code=lambda: None if server.thread.is_alive() else -9).start()
        while job.progress.stage != "Stage1":
            job.drain()
            time.sleep(0.01)
    server.thread.join(timeout=5)  # the "server process" is gone; the port refuses connections
    assert job.wait(timeout=10)
    assert job.state == "failed" and job.error.kind == "server_died" and "exit code -9" in job.error.message


def test_unreachable_remote_server_fails_fast_when_connecting(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    job = make_job(tmp_path, url).start()
    assert job.wait(timeout=10)
    assert job.state == "failed" and job.error.kind == "unreachable"


def test_a_bug_in_the_worker_still_ends_the_job(tmp_path, capsys):
    def broken_connect():
        raise KeyError("oops")

    job = jobs.GenerateJob(tmp_path / "x.png", {}, tmp_path / "job", broken_connect).start()
    assert job.wait(timeout=5)
    assert job.state == "failed" and job.error.kind == "internal" and "KeyError: 'oops'" in job.error.message
    assert "Traceback" in capsys.readouterr().err  # the traceback went to the console


SETUP_LINE = "One-time set-up: converting Zero123-XL from zero123-xl.ckpt (15.5 GB), about a minute…"


def test_a_one_time_set_up_shows_its_message_and_steps_not_a_stalled_zero(tmp_path):
    """#25: while the first Generate converts Zero123-XL the job's fraction stays 0; the progress says what runs,
    with a step-based bar."""
    script = Script([status(stage="prepare", fraction=0.0, message=SETUP_LINE, step=1, total=6),
                     status(stage="prepare", fraction=0.0, message="converting the UNet (3.4 GB)", step=3, total=6),
                     status(stage="stage1", fraction=0.2, message=None), DONE])
    seen: list[jobs.Progress] = []
    with ScriptedServer(script) as server:
        job = make_job(tmp_path, server.url)
        job.on("progress", seen.append).start()
        assert job.wait(timeout=10) and job.state == "done"
    setup = [p for p in seen if p.setup]
    assert [jobs.bar(p) for p in setup] == [
        (1 / 6, "One-time set-up: converting Zero123-XL from zero123-xl.ckpt (15.5 GB), about a minute… (1/6)"),
        (0.5, "One-time set-up: converting the UNet (3.4 GB) (3/6)")]
    after = next(p for p in seen if p.stage == "Stage1")
    assert not after.setup and jobs.bar(after) == (0.2, "Stage1 2/4 (20%, 3 s left)")
    assert jobs.bar(setup[0], cancelling=True) == (0.0, "Cancelling…")


def test_a_set_up_without_a_message_or_steps_still_says_what_it_is():
    progress = jobs._progress({"state": "running", "stage": "prepare", "step": 0, "total": 0, "fraction": 0.0})
    assert progress.setup and jobs.bar(progress) == (0.0, "One-time set-up: converting Zero123-XL")
    queued = jobs._progress({"state": "queued", "stage": "prepare", "fraction": 0.0})  # only a running job converts
    assert not queued.setup
