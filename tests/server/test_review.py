"""Review mode, re-rolls, the recipe (Regenerate / Variation), job pages and the jobs folder's size limit.

The review flow runs the real tiny pipeline through the HTTP API: a job pauses after its 8 stage-1 views, re-rolls
exactly the views asked for, goes on to a mesh, expires when nobody continues, and survives a restart. Paging and the
size limit use the fast stand-in pipeline of test_app.py.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from server.pipeline import GenerateOptions, One2345Pipeline
from server.service.app import AppConfig, create_app
from server.service.jobs import JobManager, JobsConfig
from tests.server.test_app import AUTH, TOKEN, FakePipeline, make_client, submit, wait_state

FAST = {"steps_stage1": 2, "steps_stage2": 2, "resolution": 32, "seed": 11, "elevation": 15, "format": "glb"}
"""Elevation 15° is polar 75: ring 2 is views 4–7."""


@pytest.fixture(scope="module")
def tiny_pipe() -> One2345Pipeline:
    return One2345Pipeline.from_preset("tiny", device="cpu")


@pytest.fixture(scope="module")
def photo() -> bytes:
    img = np.full((160, 160, 3), 255, np.uint8)
    yy, xx = np.mgrid[:160, :160]
    img[(yy - 80) ** 2 + (xx - 80) ** 2 < 50**2] = (40, 160, 60)
    img[70:90, 40:120] = (200, 30, 30)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def tiny_client(jobs_dir: Path, pipe: One2345Pipeline, **config) -> TestClient:
    return TestClient(create_app(JobManager(jobs_dir, lambda: pipe, JobsConfig(**config)),
                                 AppConfig(token=TOKEN, preset="tiny")))


def send(client: TestClient, photo: bytes, options: dict) -> str:
    r = client.post("/v1/jobs", files={"image": ("leaf.png", photo, "image/png")},
                    data={"options": json.dumps(options)}, headers=AUTH)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def wait(client: TestClient, job_id: str, states=("review", "done", "failed", "cancelled", "expired"),
         timeout: float = 120.0) -> dict:
    """Until the job pauses for review or ends (the real tiny pipeline: a generous timeout)."""
    return wait_state(client, job_id, states, timeout)


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.png"))}


def post(client: TestClient, job_id: str, action: str, body) -> object:
    return client.post(f"/v1/jobs/{job_id}/{action}", json=body, headers=AUTH)


def test_review_pauses_rerolls_exactly_the_chosen_views_and_continues(tmp_path, tiny_pipe, photo):
    with tiny_client(tmp_path / "jobs", tiny_pipe) as client:
        job = send(client, photo, {**FAST, "review": True})
        status = wait(client, job)
        assert status["state"] == "review" and status["result"] is None
        review = status["review"]
        assert [v["name"] for v in review["views"]] == [f"{i}.png" for i in range(8)]
        assert review["revision"] == 0 and review["elevation"] == 15.0 and review["elevation_source"] == "given"
        assert 0 < review["expires_in_s"] <= 3600 and 0.05 < status["fraction"] < 0.5
        views = tmp_path / "jobs" / job / "run" / "views"
        assert not list(views.glob("1_*.png")) and not (tmp_path / "jobs" / job / "run" / "mesh.glb").exists()
        for view in review["views"]:
            assert client.get(view["url"], headers=AUTH).status_code == 200
        before = digests(views)

        r = post(client, job, "reroll", {"views": [5, 1], "seed": 7})
        assert r.status_code == 202 and r.json()["state"] == "queued"
        status = wait(client, job)
        assert status["state"] == "review", status["error"]
        assert status["review"]["revision"] == 1 and status["review"]["view_seeds"] == {"1": 7, "5": 7}
        after = digests(views)
        changed = {name for name in before if before[name] != after[name]}
        assert changed == {"1.png", "5.png"}  # the others byte for byte, including view 0's nearby views

        r = post(client, job, "continue", {})
        assert r.status_code == 202
        status = wait(client, job, ("done", "failed"))
        assert status["state"] == "done", status["error"]
        assert status["review"]["expires_in_s"] is None and status["review"]["revision"] == 1
        assert digests(views).items() >= {k: after[k] for k in after}.items()  # continuing changes no stage-1 view
        meta = client.get(status["result"]["meta_url"], headers=AUTH).json()
        recipe = meta["recipe"]
        assert recipe["options"]["seed"] == 11 and recipe["options"]["view_seeds"] == {"1": 7, "5": 7}
        assert recipe["options"]["review"] is False and recipe["input_sha256"] and recipe["models"]
        assert meta["seeds"] == {"stage1": 11, "stage2": 12, "stage1b": 13, "stage2b": 14}
        mesh = client.get(status["result"]["url"], headers=AUTH).content

        # Regenerate: the recipe, without review, repeats the reviewed run exactly.
        again = send(client, photo, recipe["options"])
        assert wait(client, again, ("done", "failed"))["state"] == "done"
        assert client.get(f"/v1/jobs/{again}/result", headers=AUTH).content == mesh
        # Variation: the same recipe with another seed gives another mesh.
        variation = send(client, photo, {**recipe["options"], "seed": 12345, "view_seeds": None})
        assert wait(client, variation, ("done", "failed"))["state"] == "done"
        assert client.get(f"/v1/jobs/{variation}/result", headers=AUTH).content != mesh


def test_a_review_without_rerolls_gives_the_mesh_of_a_plain_run(tmp_path, tiny_pipe, photo):
    with tiny_client(tmp_path / "jobs", tiny_pipe) as client:
        reviewed = send(client, photo, {**FAST, "review": True})
        assert wait(client, reviewed)["state"] == "review"
        post(client, reviewed, "continue", {})
        plain = send(client, photo, FAST)
        assert wait(client, reviewed, ("done",))["state"] == "done"
        assert wait(client, plain, ("done",))["state"] == "done"
        assert (client.get(f"/v1/jobs/{reviewed}/result", headers=AUTH).content
                == client.get(f"/v1/jobs/{plain}/result", headers=AUTH).content)


def test_review_requests_that_are_refused(tmp_path, tiny_pipe, photo):
    with tiny_client(tmp_path / "jobs", tiny_pipe) as client:
        job = send(client, photo, {**FAST, "review": True})
        r = post(client, job, "reroll", {"views": [1]})  # still queued or running
        assert r.status_code == 409 and "not in review" in r.json()["error"]["message"]
        wait(client, job)
        cases = [
            ("reroll", {"views": [9]}, "[0, 1, 2, 3, 4, 5, 6, 7]"),
            ("reroll", {"views": []}, "non-empty list"),
            ("reroll", {"views": [True]}, "cannot be re-rolled"),
            ("reroll", {"views": [1], "seed": -1}, "seed -1 is not allowed"),
            ("reroll", {"views": [1], "steps": 5}, "a re-roll is a JSON object"),
            ("reroll", [1, 2], "a re-roll is a JSON object"),
            ("continue", {"elevation": 95}, "elevation"),
            ("continue", {"seed": 3}, "at most 'elevation'"),
        ]
        for action, body, message in cases:
            r = post(client, job, action, body)
            assert r.status_code == 400 and message in r.json()["error"]["message"], (action, body, r.text)
        r = client.post(f"/v1/jobs/{job}/reroll", content=b"{", headers=AUTH)
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        assert client.get(f"/v1/jobs/{job}", headers=AUTH).json()["state"] == "review"  # nothing changed
        assert post(client, "0" * 32, "continue", {}).status_code == 404
        # A job in review is cancelled by DELETE (its folder stays until a second DELETE).
        assert client.delete(f"/v1/jobs/{job}", headers=AUTH).json()["state"] == "cancelled"
        assert post(client, job, "continue", {}).status_code == 409
        assert client.delete(f"/v1/jobs/{job}", headers=AUTH).status_code == 204
        r = client.post("/v1/jobs", files={"image": ("a.png", photo, "image/png")},
                        data={"options": json.dumps({"review": "yes"})}, headers=AUTH)
        assert r.status_code == 400 and "review" in r.json()["error"]["message"]


def test_an_unattended_review_expires_and_keeps_its_views(tmp_path, tiny_pipe, photo):
    with tiny_client(tmp_path / "jobs", tiny_pipe, review_timeout_s=0.5) as client:
        job = send(client, photo, {**FAST, "review": True})
        # Only a job in review can expire; a poll on a busy machine may miss the half-second review itself.
        assert wait(client, job)["state"] in ("review", "expired")
        status = wait(client, job, ("expired",), timeout=10)
        assert "no re-roll or continue within the review time (0.5 s)" in status["error"]["message"]
        assert client.get(f"/v1/jobs/{job}/views/5.png", headers=AUTH).status_code == 200
        assert post(client, job, "continue", {}).status_code == 409


def test_a_review_survives_a_restart_and_an_elevation_edit_moves_ring_two(tmp_path, tiny_pipe, photo):
    jobs = tmp_path / "jobs"
    with tiny_client(jobs, tiny_pipe) as client:
        job = send(client, photo, {**FAST, "review": True})
        assert wait(client, job)["state"] == "review"
    with tiny_client(jobs, tiny_pipe) as client:
        status = client.get(f"/v1/jobs/{job}", headers=AUTH).json()
        assert status["state"] == "review" and status["review"]["expires_in_s"] > 0
        # −20° is polar 110 > 75: ring 2 moves up, to views 8–11.
        assert post(client, job, "continue", {"elevation": -20}).status_code == 202
        status = wait(client, job, ("done", "failed"))
        assert status["state"] == "done", status["error"]
        assert status["options"]["elevation"] == -20 and status["result"]["elevation"] == pytest.approx(-20)
        views = jobs / job / "run" / "views"
        assert sorted(int(p.stem) for p in views.glob("*.png") if p.stem.isdigit()) == [0, 1, 2, 3, 8, 9, 10, 11]
        assert not (views / "4.png").exists() and (views / "9_3.png").exists()
        meta = client.get(status["result"]["meta_url"], headers=AUTH).json()
        assert any("ring 2 moved from views [4, 5, 6, 7] to [8, 9, 10, 11]" in n for n in meta["notes"])
        assert meta["elevation_source"] == "given"


def test_rerolling_view_zero_renews_its_nearby_views(tmp_path, tiny_pipe, photo):
    run = tmp_path / "run"
    options = GenerateOptions(**{**FAST, "elevation": None, "format": "ply"})
    record = tiny_pipe.generate_views(photo, run, options)
    before = digests(run / "views")
    record = tiny_pipe.reroll(run, options, [0], seed=99)
    after = digests(run / "views")
    changed = {n for n in before if before[n] != after.get(n)}
    view0 = {"0.png", "0_0.png", "0_1.png", "0_2.png", "0_3.png"}
    old_ring = {n for n in before if Path(n).stem.isdigit() and int(Path(n).stem) >= 4}
    new_ring = {f"{v}.png" for v in record.views(tiny_pipe.zero123_config)[4:]}
    assert new_ring <= set(after)
    if new_ring == old_ring:  # the new estimate kept ring 2 on its side: nothing else changed
        assert changed == view0 and not record.notes
    else:  # it moved: the old ring is gone and the note says so
        assert changed == view0 | old_ring and not old_ring & set(after)
        assert "ring 2 moved" in record.notes[-1]
    assert record.view_seeds == {"0": 99} and record.elevation_source in ("estimated", "fallback")
    with pytest.raises(Exception, match="cannot be re-rolled"):
        tiny_pipe.reroll(run, options, [12])


# -- pages and the size limit (stand-in pipeline) --------------------------------------------------------------


def test_job_pages_survive_a_restart(tmp_path):
    fake = FakePipeline()
    with make_client(tmp_path / "jobs", lambda: fake) as client:
        ids = []
        for _ in range(5):
            ids.append(submit(client).json()["id"])
            wait_state(client, ids[-1])
    with make_client(tmp_path / "jobs", lambda: fake) as client:
        seen, after = [], None
        while True:
            page = client.get("/v1/jobs", params={"limit": 2, **({"after": after} if after else {})},
                              headers=AUTH).json()
            assert page["total"] == 5 and len(page["jobs"]) <= 2
            seen += [j["id"] for j in page["jobs"]]
            after = page["next"]
            if after is None:
                break
        assert seen == ids[::-1]  # newest first, each once
        assert client.get("/v1/jobs", headers=AUTH).json()["next"] is None
        r = client.get("/v1/jobs", params={"limit": 0}, headers=AUTH)
        assert r.status_code == 400 and "limit 0" in r.json()["error"]["message"]
        assert client.get("/v1/jobs", params={"after": "f" * 32}, headers=AUTH).status_code == 404


def test_the_size_limit_deletes_the_oldest_unpinned_finished_jobs(tmp_path):
    fake = FakePipeline()
    jobs = tmp_path / "jobs"
    manager = JobManager(jobs, lambda: fake, JobsConfig(max_jobs_bytes=1))  # every job is over it
    with TestClient(create_app(manager, AppConfig(token=TOKEN, preset="fake"))) as client:
        first = submit(client).json()["id"]
        wait_state(client, first)
        assert client.put(f"/v1/jobs/{first}/pin", headers=AUTH).json()["pinned"] is True
        second = submit(client).json()["id"]
        wait_state(client, second)
        third = submit(client).json()["id"]
        wait_state(client, third)
        remaining = {j["id"] for j in client.get("/v1/jobs", headers=AUTH).json()["jobs"]}
        assert remaining == {first, third}  # the pinned and the newest stay; the second went
        assert not (jobs / second).exists() and (jobs / first / "run" / "mesh.glb").exists()
        assert client.delete(f"/v1/jobs/{first}/pin", headers=AUTH).json()["pinned"] is False
        fourth = submit(client).json()["id"]
        wait_state(client, fourth)
        assert {j["id"] for j in client.get("/v1/jobs", headers=AUTH).json()["jobs"]} == {fourth}
