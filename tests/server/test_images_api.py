"""Text to image over HTTP (issue #30): ``POST /v1/images`` makes candidates with the tiny random text-to-image model
(no weights), ``GET /v1/jobs/<id>/candidates/<i>.png`` serves them, and ``POST /v1/jobs`` with options
``{"image_of", "index"}`` makes a mesh of one, the candidate's record handed to the pipeline for the recipe. The
image-to-3D pipeline is the fast stand-in of test_app.py."""

from __future__ import annotations

import io
import json
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from server.service.app import AppConfig, create_app
from server.service.jobs import JobManager, TextToImage
from server.stages.text_to_image import TextSource
from tests.server.test_app import AUTH, TOKEN, FakePipeline, png_bytes, submit, wait_state


class TextPipeline(FakePipeline):
    """The stand-in pipeline, also taking ``text`` (what the real one records in meta.json's recipe)."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[TextSource | None] = []
        self.images: list[bytes] = []

    def __call__(self, image, run_dir, options=None, progress=None, should_cancel=None, text=None):
        self.texts.append(text)
        with open(image, "rb") as f:
            self.images.append(f.read())
        return super().__call__(image, run_dir, options, progress, should_cancel)


class GatedImages(TextToImage):
    """The tiny text-to-image calls, optionally held at their first progress report until released or cancelled."""

    def __init__(self) -> None:
        super().__init__("tiny", "cpu")
        self.hold = False
        self.started = threading.Event()
        self.reports: list[tuple[int, int]] = []

    def __call__(self, prompt, *, progress=None, should_cancel=None, **kwargs):
        def report(step: int, total: int) -> None:
            self.reports.append((step, total))
            progress(step, total)
            self.started.set()
            while self.hold and not should_cancel():
                threading.Event().wait(0.01)

        return super().__call__(prompt, progress=report, should_cancel=should_cancel, **kwargs)


@pytest.fixture
def parts(tmp_path):
    pipe, images = TextPipeline(), GatedImages()
    manager = JobManager(tmp_path / "jobs", lambda: pipe, make_images=images)
    with TestClient(create_app(manager, AppConfig(token=TOKEN, preset="fake"))) as client:
        yield client, pipe, images, tmp_path / "jobs"


def make_images(client: TestClient, **body) -> dict:
    r = client.post("/v1/images", json={"prompt": "a rusty fire hydrant", "count": 3, "seed": 11, **body},
                    headers=AUTH)
    assert r.status_code == 202, r.text
    return wait_state(client, r.json()["id"], timeout=120)


def test_images_job_makes_candidates_served_as_png(parts):
    client, _, images, jobs = parts
    status = make_images(client)
    assert status["state"] == "done", status
    assert status["kind"] == "images" and status["stage"] == "text_to_image" and status["fraction"] == 1.0
    assert status["images"] == {"prompt": "a rusty fire hydrant", "count": 3, "seed": 11, "negative_prompt": None}
    job_id = status["id"]
    assert [c["name"] for c in status["result"]["candidates"]] == ["0.png", "1.png", "2.png"]
    assert status["result"]["seed"] == 11
    # progress went through the worker as step/total of the stage
    assert images.reports and images.reports[-1][0] == images.reports[-1][1]
    pngs = []
    for c in status["result"]["candidates"]:
        r = client.get(c["url"], headers=AUTH)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        pngs.append(np.asarray(Image.open(io.BytesIO(r.content))))
        assert r.content == (jobs / job_id / "candidates" / c["name"]).read_bytes()
    assert pngs[0].shape == (32, 32, 3)
    record = json.loads((jobs / job_id / "candidates" / "candidates.json").read_text())
    assert [s["index"] for s in record["sources"]] == [0, 1, 2] and record["sources"][2]["seed"] == 11
    # the same seed gives the same candidates
    again = make_images(client)
    assert client.get(f"/v1/jobs/{again['id']}/candidates/1.png", headers=AUTH).content == \
        (jobs / job_id / "candidates" / "1.png").read_bytes()
    # names that are not candidates, and an images job's mesh files, are 404
    for path in (f"/v1/jobs/{job_id}/candidates/3.png", f"/v1/jobs/{job_id}/candidates/..%2Fstatus.json",
                 f"/v1/jobs/{job_id}/result", f"/v1/jobs/{job_id}/meta", f"/v1/jobs/{job_id}/input"):
        assert client.get(path, headers=AUTH).status_code == 404, path
    assert client.post(f"/v1/jobs/{job_id}/remesh", json={}, headers=AUTH).status_code == 404


def test_a_drawn_seed_is_recorded(parts):
    client = parts[0]
    r = client.post("/v1/images", json={"prompt": "a teapot", "count": 1}, headers=AUTH)
    status = wait_state(client, r.json()["id"], timeout=120)
    assert status["state"] == "done"
    assert isinstance(status["images"]["seed"], int) and status["result"]["seed"] == status["images"]["seed"]


@pytest.mark.parametrize(("body", "text"), [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "cat " * 200}, "77 tokens"),
    ({"prompt": "a cat", "negative_prompt": "dog " * 200}, "negative prompt is too long"),
    ({"prompt": "a cat", "count": 0}, "[1, 8]"),
    ({"prompt": "a cat", "count": 9}, "[1, 8]"),
    ({"prompt": "a cat", "seed": -1}, "seed"),
    ({"prompt": "a cat", "steps": 4}, "unknown"),
    ({"count": 2}, "prompt"),
    ([1, 2], "JSON object"),
])
def test_bad_images_requests_are_400_naming_the_limit(parts, body, text):
    client, _, images, _ = parts
    r = client.post("/v1/images", json=body, headers=AUTH)
    assert r.status_code == 400, r.text
    assert text in r.json()["error"]["message"]
    assert client.get("/v1/jobs", headers=AUTH).json()["total"] == 0 and not images.reports


def test_images_job_can_be_cancelled_while_running(parts):
    client, _, images, _ = parts
    images.hold = True
    r = client.post("/v1/images", json={"prompt": "a lamp", "count": 2, "seed": 1}, headers=AUTH)
    assert images.started.wait(60)
    assert client.delete(f"/v1/jobs/{r.json()['id']}", headers=AUTH).status_code == 200
    status = wait_state(client, r.json()["id"], timeout=60)
    assert status["state"] == "cancelled" and status["error"]["kind"] == "cancelled"


def test_mesh_job_from_a_candidate_records_the_prompt(parts):
    client, pipe, _, jobs = parts
    source = make_images(client, negative_prompt="blurry")
    options = {"image_of": source["id"], "index": 2, "format": "ply"}
    r = client.post("/v1/jobs", data={"options": json.dumps(options)}, headers=AUTH)
    assert r.status_code == 202, r.text
    status = wait_state(client, r.json()["id"])
    assert status["state"] == "done" and status["kind"] == "mesh" and status["options"]["format"] == "ply"
    assert "image_of" not in status["options"]
    assert pipe.images[-1] == (jobs / source["id"] / "candidates" / "2.png").read_bytes()
    text = pipe.texts[-1]
    assert (text.prompt, text.negative_prompt, text.seed, text.index, text.count) == (
        "a rusty fire hydrant", "blurry", 11, 2, 3)
    assert text.model == "tiny random LCM (no weights)"
    assert text.images_job == source["id"]  # so Regenerate from History can name the same candidate again
    assert client.get(f"/v1/jobs/{status['id']}/input", headers=AUTH).content == pipe.images[-1]
    # an ordinary upload hands no text to the pipeline
    assert wait_state(client, submit(client).json()["id"])["state"] == "done"
    assert pipe.texts[-1] is None


def test_the_pipeline_call_gets_text_so_meta_records_it(tmp_path):
    """The worker passes the copied record as ``text=``: the real pipeline writes it to meta.json's recipe."""
    import inspect

    from server.pipeline.one2345 import One2345Pipeline

    assert "text" in inspect.signature(One2345Pipeline.__call__).parameters
    assert "text" in inspect.signature(One2345Pipeline.generate_views).parameters


def test_bad_candidate_references(parts):
    client, _, images, _ = parts
    source = make_images(client)
    mesh_job = wait_state(client, submit(client).json()["id"])

    def post(options, **files):
        return client.post("/v1/jobs", data={"options": json.dumps(options)}, files=files or None, headers=AUTH)

    cases = [
        ({"image_of": source["id"], "index": 3}, 400, "[0, 2]"),
        ({"image_of": source["id"], "index": -1}, 400, "[0, 2]"),
        ({"image_of": source["id"], "index": "1"}, 400, "[0, 2]"),
        ({"image_of": source["id"]}, 400, "go together"),
        ({"index": 1}, 400, "go together"),
        ({"image_of": mesh_job["id"], "index": 0}, 400, "not an images job"),
        ({"image_of": "0" * 32, "index": 0}, 404, "no job"),
        ({"image_of": "nope", "index": 0}, 404, "no job"),
        ({"image_of": 5, "index": 0}, 400, "image_of"),
        ({"image_of": source["id"], "index": 0, "steps_stage1": 1}, 400, "steps_stage1"),
    ]
    for options, code, text in cases:
        r = post(options)
        assert r.status_code == code, (options, r.text)
        assert text in r.json()["error"]["message"], (options, r.json())
    r = post({"image_of": source["id"], "index": 0}, image=("a.png", png_bytes(), "image/png"))
    assert r.status_code == 400 and "not both" in r.json()["error"]["message"]
    r = client.post("/v1/jobs", headers=AUTH, data={"options": "{}"})
    assert r.status_code == 400 and "'image' part" in r.json()["error"]["message"]
    # an images job that is not done yet: 409
    images.hold = True
    running = client.post("/v1/images", json={"prompt": "a lamp", "count": 1, "seed": 1}, headers=AUTH).json()
    assert images.started.wait(60)
    r = post({"image_of": running["id"], "index": 0})
    assert r.status_code == 409 and "running" in r.json()["error"]["message"]
    images.hold = False


def test_images_jobs_read_back_after_a_restart_and_bad_records_are_refused(parts, tmp_path):
    from server.service.jobs.records import Job, RecordError

    client, _, _, jobs = parts
    status = make_images(client)
    folder = jobs / status["id"]
    record = json.loads((folder / "status.json").read_text())
    job = Job.from_record(folder, record)
    assert job.images == status["images"] and job.result["candidates"] == ["0.png", "1.png", "2.png"]
    for change, name in [({"images": {**record["images"], "count": 9}}, "images.count"),
                         ({"images": {**record["images"], "prompt": 3}}, "images.prompt"),
                         ({"images": {**record["images"], "seed": -2}}, "images.seed"),
                         ({"images": {k: v for k, v in record["images"].items() if k != "seed"}}, "images.seed"),
                         ({"images": {**record["images"], "negative_prompt": 1}}, "images.negative_prompt"),
                         ({"result": {**record["result"], "candidates": ["../x.png"]}}, "result.candidates"),
                         ({"result": {"candidates": ["0.png"]}}, "result"),
                         ({"remesh_of": "1" * 32}, "images")]:
        with pytest.raises(RecordError) as e:
            Job.from_record(folder, {**record, **change})
        assert e.value.field == name, (change, e.value)
    # a mesh job's record is still checked as one
    with pytest.raises(RecordError):
        Job.from_record(folder, {**record, "images": None})


def test_progress_reports_stage_text_to_image(parts):
    client, _, images, _ = parts
    images.hold = True
    r = client.post("/v1/images", json={"prompt": "a chair", "count": 2, "seed": 3}, headers=AUTH)
    assert images.started.wait(60)
    running = client.get(f"/v1/jobs/{r.json()['id']}", headers=AUTH).json()
    assert running["state"] == "running" and running["kind"] == "images"
    assert running["stage"] == "text_to_image" and running["total"] > 0 and 0 < running["fraction"] < 1
    images.hold = False
    status = wait_state(client, r.json()["id"], timeout=120)
    assert status["state"] == "done"
    steps = images.reports
    assert all(total == steps[0][1] for _, total in steps) and [s for s, _ in steps] == sorted(s for s, _ in steps)
