"""The job store on disk (:mod:`server.service.jobs.store`): start-up on a read-only or full jobs folder, hard links
in a job folder, and the size limit (issue #31, findings 5 and 6).

Disk faults are the OSError a read-only or full filesystem raises, injected into the store's writes;
test_serve_storage.py makes the same faults with a real filesystem.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import pytest

from server.common.fsutil import open_regular_inside
from server.service.jobs import JobManager
from server.service.jobs import store as store_module
from server.service.jobs.records import Job
from server.service.jobs.store import JobStore
from tests.server.test_app import AUTH, FakePipeline, make_client, submit, wait_state
from tests.server.test_serve_races import write_done_job


def refuse(code: int):
    def fail(path, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(path))
    return fail


def interrupted_job(jobs_dir: Path, seed: int, state: str = "running") -> str:
    job_id, _ = write_done_job(jobs_dir, seed, mesh_bytes=64)
    path = jobs_dir / job_id / "status.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "state": state, "result": None}))
    return job_id


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
def test_the_server_starts_on_a_jobs_folder_that_refuses_writes(tmp_path, monkeypatch, caplog, code):
    jobs_dir = tmp_path / "jobs"
    running = interrupted_job(jobs_dir, 1)
    queued = interrupted_job(jobs_dir, 2, "queued")
    done, _ = write_done_job(jobs_dir, 3, mesh_bytes=64)
    monkeypatch.setattr(store_module, "write_json_atomic", refuse(code))
    monkeypatch.setattr(store_module, "append_text_no_follow", refuse(code))
    with caplog.at_level(logging.ERROR, logger="server.service.jobs"), \
            make_client(jobs_dir, FakePipeline) as client:
        for job_id, was in ((running, "running"), (queued, "queued")):
            status = client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
            assert status["state"] == "failed" and f"stopped while this job was {was}" in status["error"]["message"]
        assert client.get(f"/v1/jobs/{done}/result", headers=AUTH).status_code == 200  # it serves what it can
        assert client.get("/v1/health").json()["status"] == "ok"
        r = submit(client)
        assert r.status_code == 507 and r.json()["error"]["kind"] == "storage"
    assert json.loads((jobs_dir / running / "status.json").read_text())["state"] == "running"  # not written
    assert any(running in r.getMessage() and "reported failed" in r.getMessage() for r in caplog.records)


def test_a_folder_that_cannot_be_moved_aside_is_ignored(tmp_path, monkeypatch):
    jobs_dir = tmp_path / "jobs"
    bad = interrupted_job(jobs_dir, 1)
    path = jobs_dir / bad / "status.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "created": 5}))
    monkeypatch.setattr(store_module.os, "replace", refuse(errno.EROFS))
    loaded = JobStore(jobs_dir).load()
    assert loaded.jobs == [] and loaded.quarantined == [bad]
    assert path.exists()  # left in place, never loaded


# -- hard links -----------------------------------------------------------------------------------------------------


def test_hard_links_in_a_job_folder_are_never_served(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("server-only secret")
    jobs_dir = tmp_path / "jobs"
    fake = FakePipeline()
    with make_client(jobs_dir, lambda: fake) as client:
        job_id = submit(client, options={"format": "glb"}).json()["id"]
        assert wait_state(client, job_id)["state"] == "done"
        folder = jobs_dir / job_id
        for relative in ("run/mesh.glb", "run/meta.json", "run/views/0.png", "run/input_256.png", "input.png"):
            (folder / relative).unlink()
            os.link(secret, folder / relative)
        for path in ("result", "meta", "views/0.png", "views/input_256.png", "input"):
            r = client.get(f"/v1/jobs/{job_id}/{path}", headers=AUTH)
            assert r.status_code == 404 and "secret" not in r.text, (path, r.text)


def test_open_regular_inside_counts_links(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    with open_regular_inside(tmp_path, "a.txt") as f:
        assert f.read() == b"a"
    os.link(tmp_path / "a.txt", tmp_path / "b.txt")
    for name in ("a.txt", "b.txt"):  # both names of the file: neither is trusted
        with pytest.raises(FileNotFoundError, match="2 hard links"):
            open_regular_inside(tmp_path, name)
    (tmp_path / "b.txt").unlink()
    with open_regular_inside(tmp_path, "a.txt") as f:
        assert f.read() == b"a"


# -- the size limit -------------------------------------------------------------------------------------------------


def job_of(store: JobStore, jobs_dir: Path, seed: int, size: int, **fields) -> Job:
    job_id, _ = write_done_job(jobs_dir, seed, mesh_bytes=64)
    folder = jobs_dir / job_id
    job = Job.from_record(folder, json.loads((folder / "status.json").read_text()))
    job.size_bytes = size
    for name, value in fields.items():
        setattr(job, name, value)
    return job


def test_the_size_limit_deletes_the_oldest_finished_unpinned_jobs_but_never_the_newest(tmp_path):
    jobs_dir = tmp_path / "jobs"
    store = JobStore(jobs_dir)
    old_pinned = job_of(store, jobs_dir, 1, 100, pinned=True)
    old = job_of(store, jobs_dir, 2, 100)
    in_review = job_of(store, jobs_dir, 3, 100, state="review")
    middle = job_of(store, jobs_dir, 4, 100)
    newest = job_of(store, jobs_dir, 5, 500)
    jobs = {j.id: j for j in (old_pinned, old, in_review, middle, newest)}
    assert store.enforce_size_limit(jobs, None) == [] and len(jobs) == 5
    assert store.enforce_size_limit(jobs, 800) == [old.id]
    assert set(jobs) == {old_pinned.id, in_review.id, middle.id, newest.id} and not old.folder.exists()
    assert store.enforce_size_limit(jobs, 1) == [middle.id]  # the pinned, the review and the newest stay
    assert set(jobs) == {old_pinned.id, in_review.id, newest.id}


def test_the_size_limit_skips_a_folder_the_disk_refuses_to_move(tmp_path, monkeypatch):
    jobs_dir = tmp_path / "jobs"
    store = JobStore(jobs_dir)
    jobs = {j.id: j for j in (job_of(store, jobs_dir, 1, 100), job_of(store, jobs_dir, 2, 100))}
    monkeypatch.setattr(store_module.os, "replace", refuse(errno.EROFS))
    assert store.enforce_size_limit(jobs, 1) == [] and len(jobs) == 2


def test_a_manager_reads_back_what_its_store_wrote(tmp_path):
    fake = FakePipeline()
    jobs_dir = tmp_path / "jobs"
    with make_client(jobs_dir, lambda: fake) as client:
        job_id = submit(client).json()["id"]
        before = wait_state(client, job_id)
    again = JobManager(jobs_dir, lambda: fake)
    after = again.status(job_id)
    assert {k: v for k, v in after.items() if k != "elapsed_s"} == {k: v for k, v in before.items()
                                                                     if k != "elapsed_s"}
    assert again.health()["quarantined"] == 0 and not (jobs_dir / ".quarantine").exists()
