"""The review state machine (:mod:`server.service.jobs.review`) and what a failing disk does to it and to pins
(issue #31, findings 4 and 10).

Asserted: a re-roll, a continue or a pin whose state cannot be written is answered 507 ``storage`` and changes
nothing (before: 202 / 200 ``pinned: true`` that a restart forgot); a re-roll or continue that hits a full disk while
it runs leaves the job in review, so the client can go on once space is freed (before: ``failed`` for good, and
continue 409); a review that expires after a restart quotes the review time it was given, not the new server's.

The pipeline is a fast stand-in with the review methods (the real tiny pipeline runs the review flow in
test_review.py); disk faults are the OSError a full disk raises, injected into the store's writes.
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from server.service.app import AppConfig, create_app
from server.service.jobs import Job, JobManager, JobsConfig
from server.service.jobs import review as review_rules
from server.service.jobs import store as store_module
from tests.server.test_app import AUTH, TOKEN, FakePipeline, submit, wait_state


class FakeViewsRecord:
    """Stands in for :class:`server.pipeline.ViewsRecord`."""

    def __init__(self, revision: int = 0, view_seeds: dict[str, int] | None = None) -> None:
        self.polar, self.elevation_source, self.estimate, self.seed = 75.0, "given", None, 11
        self.view_seeds, self.notes, self.revision = view_seeds or {}, [], revision

    def views(self, config) -> list[int]:
        return list(range(8))


def full_disk(path: Path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


class ReviewFake(FakePipeline):
    """The stand-in pipeline with review: each review step takes the next action too (``ok`` or ``full``)."""

    def generate_views(self, image, run_dir, options, progress=None, should_cancel=None) -> FakeViewsRecord:
        views = Path(run_dir) / "views"
        views.mkdir(parents=True, exist_ok=True)
        for i in range(8):
            Image.new("RGB", (8, 8), (i, i, i)).save(views / f"{i}.png")
        progress(self._progress())
        return FakeViewsRecord()

    def reroll(self, run_dir, options, views, seed, progress=None, should_cancel=None) -> FakeViewsRecord:
        if (self.actions.pop(0) if self.actions else "ok") == "full":
            raise full_disk(Path(run_dir) / "views" / f"{views[0]}.png")
        return FakeViewsRecord(1, {str(v): seed for v in views})

    def finish(self, run_dir, options, progress=None, should_cancel=None):
        if self.actions and self.actions[0] == "full":
            self.actions.pop(0)
            raise full_disk(Path(run_dir) / "views" / "1_0.png")
        return self(Path(run_dir).parent / "input.png", run_dir, options, progress, should_cancel)

    @staticmethod
    def _progress():
        from server.pipeline import Progress

        return Progress("stage1", 1, 1, 0.3)


def client_for(jobs_dir: Path, fake: FakePipeline, **config) -> TestClient:
    return TestClient(create_app(JobManager(jobs_dir, lambda: fake, JobsConfig(**config)),
                                 AppConfig(token=TOKEN, preset="fake")))


def failing_writes(code: int = errno.ENOSPC):
    def fail(path, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(path))
    return fail


def in_review(client: TestClient) -> str:
    job_id = submit(client, options={"format": "glb", "review": True}).json()["id"]
    assert wait_state(client, job_id, ("review", "failed"))["state"] == "review"
    return job_id


def post(client: TestClient, job_id: str, action: str, body) -> object:
    return client.post(f"/v1/jobs/{job_id}/{action}", json=body, headers=AUTH)


def status(client: TestClient, job_id: str) -> dict:
    return client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()


def assert_storage(response) -> None:
    assert response.status_code == 507, response.text
    assert response.json()["error"]["kind"] == "storage" and "disk is full" in response.json()["error"]["message"]


# -- 507 wherever state is written ----------------------------------------------------------------------------------


def test_reroll_and_continue_answer_507_when_their_state_cannot_be_written(tmp_path, monkeypatch):
    fake = ReviewFake()
    with client_for(tmp_path / "jobs", fake) as client:
        job_id = in_review(client)
        monkeypatch.setattr(store_module, "write_json_atomic", failing_writes())
        assert_storage(post(client, job_id, "reroll", {"views": [1], "seed": 7}))
        assert_storage(post(client, job_id, "continue", {"elevation": 20}))
        after = status(client, job_id)
        assert after["state"] == "review" and after["error"] is None and after["options"]["elevation"] is None
        assert client.get("/v1/health").json()["queue_length"] == 0  # nothing was queued behind the client's back
        monkeypatch.undo()
        assert post(client, job_id, "reroll", {"views": [1], "seed": 7}).status_code == 202
        assert wait_state(client, job_id, ("review",))["review"]["view_seeds"] == {"1": 7}
        assert post(client, job_id, "continue", {"elevation": 20}).status_code == 202
        done = wait_state(client, job_id)
        assert done["state"] == "done" and done["options"]["elevation"] == 20


def test_a_pin_that_cannot_be_written_is_507_and_not_pinned(tmp_path, monkeypatch):
    jobs_dir = tmp_path / "jobs"
    fake = ReviewFake()
    with client_for(jobs_dir, fake) as client:
        job_id = submit(client).json()["id"]
        wait_state(client, job_id)
        monkeypatch.setattr(store_module, "write_json_atomic", failing_writes(errno.EROFS))
        r = client.put(f"/v1/jobs/{job_id}/pin", headers=AUTH)
        assert r.status_code == 507 and r.json()["error"]["kind"] == "storage", r.text
        assert "read-only" in r.json()["error"]["message"] and str(jobs_dir) not in r.text
        assert status(client, job_id)["pinned"] is False
        monkeypatch.undo()
        assert client.put(f"/v1/jobs/{job_id}/pin", headers=AUTH).json()["pinned"] is True
        monkeypatch.setattr(store_module, "write_json_atomic", failing_writes())
        assert_storage(client.delete(f"/v1/jobs/{job_id}/pin", headers=AUTH))
        assert status(client, job_id)["pinned"] is True
        monkeypatch.undo()
    with client_for(jobs_dir, fake) as client:  # what was answered is what a restart finds
        assert status(client, job_id)["pinned"] is True


def test_a_reroll_that_hits_a_full_disk_goes_back_to_review_and_can_continue(tmp_path):
    fake = ReviewFake()
    with client_for(tmp_path / "jobs", fake) as client:
        job_id = in_review(client)
        fake.actions = ["full"]
        assert post(client, job_id, "reroll", {"views": [2], "seed": 5}).status_code == 202
        back = wait_state(client, job_id, ("review", "failed"))
        assert back["state"] == "review", back
        assert back["error"]["kind"] == "storage" and "disk is full" in back["error"]["message"]
        assert f"{job_id}/run/views/2.png" in back["error"]["message"] and str(tmp_path) not in json.dumps(back)
        assert back["review"]["revision"] == 0 and back["review"]["expires_in_s"] > 0
        # Space freed: the client goes on.
        assert post(client, job_id, "continue", {}).status_code == 202
        assert wait_state(client, job_id)["state"] == "done"


def test_a_continue_that_hits_a_full_disk_goes_back_to_review(tmp_path):
    fake = ReviewFake()
    with client_for(tmp_path / "jobs", fake) as client:
        job_id = in_review(client)
        fake.actions = ["full"]
        assert post(client, job_id, "continue", {"elevation": 10}).status_code == 202
        back = wait_state(client, job_id, ("review", "failed"))
        assert back["state"] == "review" and back["error"]["kind"] == "storage", back
        assert back["options"]["elevation"] == 10  # what the client asked for is kept for the next try
        assert post(client, job_id, "continue", {}).status_code == 202
        done = wait_state(client, job_id)
        assert done["state"] == "done" and done["error"] is None


def test_other_failures_of_a_reroll_still_fail_the_job(tmp_path):
    fake = ReviewFake()
    with client_for(tmp_path / "jobs", fake) as client:
        job_id = in_review(client)
        fake.actions = ["bug"]
        assert post(client, job_id, "continue", {}).status_code == 202
        assert wait_state(client, job_id)["state"] == "failed"


# -- expiry across a restart ----------------------------------------------------------------------------------------


def test_a_review_that_expired_across_a_restart_quotes_its_own_timeout(tmp_path):
    jobs_dir = tmp_path / "jobs"
    fake = ReviewFake()
    with client_for(jobs_dir, fake, review_timeout_s=1234.0) as client:
        job_id = in_review(client)
    record = json.loads((jobs_dir / job_id / "status.json").read_text())
    assert record["review"]["timeout_s"] == 1234.0
    record["review"]["deadline"] = time.time() - 1  # the server stayed down past the deadline
    (jobs_dir / job_id / "status.json").write_text(json.dumps(record))
    with client_for(jobs_dir, fake, review_timeout_s=60.0) as client:
        expired = wait_state(client, job_id, ("expired",))
        assert "(1234 s)" in expired["error"]["message"] and "(60 s)" not in expired["error"]["message"]


def test_a_review_recorded_before_the_timeout_was_kept_quotes_the_servers(tmp_path):
    jobs_dir = tmp_path / "jobs"
    fake = ReviewFake()
    with client_for(jobs_dir, fake) as client:
        job_id = in_review(client)
    record = json.loads((jobs_dir / job_id / "status.json").read_text())
    del record["review"]["timeout_s"]
    record["review"]["deadline"] = time.time() - 1
    (jobs_dir / job_id / "status.json").write_text(json.dumps(record))
    with client_for(jobs_dir, fake, review_timeout_s=60.0) as client:
        assert "(60 s)" in wait_state(client, job_id, ("expired",))["error"]["message"]


# -- the rules alone -------------------------------------------------------------------------------------------------


@pytest.fixture
def job(tmp_path) -> Job:
    job = Job(id="a" * 32, folder=tmp_path, created="2026-01-01T00:00:00", options={"elevation": None},
              input_file="input.png", download_stem="x")
    review_rules.enter_review(job, FakeViewsRecord(), 100.0, list(range(8)))
    return job


def test_enter_review_records_the_deadline_and_the_timeout(job):
    assert job.state == "review" and job.review["timeout_s"] == 100.0
    assert 99 < job.review["deadline"] - time.time() <= 100.0
    assert job.review["views"] == list(range(8)) and job.review["elevation"] == 15.0


def test_requeue_and_undo_leave_the_job_as_it_was(job):
    before = {k: getattr(job, k) for k in ("state", "pending", "error", "options")}
    saved = review_rules.requeue(job, {"action": "continue"}, {"elevation": 20})
    assert job.state == "queued" and job.pending == {"action": "continue"} and job.options == {"elevation": 20}
    review_rules.undo(job, saved)
    assert {k: getattr(job, k) for k in before} == before


def test_only_a_storage_failure_of_a_review_task_goes_back_to_review(job):
    storage = {"kind": "storage", "message": "full", "fix": None}
    job.pending = {"action": "reroll", "views": [1], "seed": 1}
    assert review_rules.retries_in_review(job, storage)
    assert not review_rules.retries_in_review(job, {**storage, "kind": "internal"})
    assert not review_rules.retries_in_review(job, None)
    job.pending = None  # the job's first task (generating the views): nothing to go back to
    assert not review_rules.retries_in_review(job, storage)


def test_due_expires_only_past_deadlines(job, tmp_path):
    other = Job(id="b" * 32, folder=tmp_path, created="2026-01-01T00:00:00", options={}, input_file="input.png",
                download_stem="x")
    review_rules.enter_review(other, FakeViewsRecord(), 10.0, list(range(8)))
    now = time.time()
    assert review_rules.due([job, other], now) == ([], pytest.approx(10.0, abs=1.0))
    expired, wait = review_rules.due([job, other], now + 50)
    assert expired == [other] and wait == pytest.approx(50.0, abs=1.0)
    assert "(10 s)" in review_rules.expiry_error(other, 3600.0)["message"]
