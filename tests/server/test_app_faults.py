"""Regression tests for what an adversarial probe of the server found (issue #14), in process with the fast stand-in
pipeline of test_app.py. Each test names the finding it guards: F1 unparseable options, F5/F6 disk faults, F8
links and edited records in a job folder, F9 leaked internals, plus the last-resort 500 and the 405 Allow header.

Disk faults are injected where the server touches the disk, with the OSError a real full or read-only filesystem
raises (ENOSPC, EROFS); test_serve_storage.py makes the same faults with a real filesystem.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from server.service.jobs import Job, JobManager
from server.service.jobs import store as store_module
from tests.server.test_app import AUTH, FakePipeline, make_client, png_bytes, submit, wait_state


@pytest.fixture
def jobs_dir(tmp_path) -> Path:
    return tmp_path / "jobs"


@pytest.fixture
def fake() -> FakePipeline:
    return FakePipeline()


@pytest.fixture
def client(jobs_dir, fake):
    with make_client(jobs_dir, lambda: fake) as c:
        yield c


def done_job(client) -> str:
    job_id = submit(client, options={"format": "glb"}).json()["id"]
    assert wait_state(client, job_id)["state"] == "done"
    return job_id


def assert_no_server_paths(text: str, *roots: Path) -> None:
    for root in (*roots, Path.home()):
        assert str(root) not in text, f"{root} leaked into: {text}"


# -- F1: options JSON that the json module cannot turn into an options object ---------------------------------------


@pytest.mark.parametrize(("options", "needle"), [
    ('{"seed": 1' + "0" * 5000 + "}", "not valid JSON"),          # ValueError: over 4300 digits
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),          # RecursionError
    ('{"guidance": NaN}', "NaN is not a JSON number"),
    ('{"elevation": -Infinity}', "Infinity is not a JSON number"),
    ('{"elevation": 1' + "0" * 400 + "}", "elevation"),             # an int no float can hold
    ('{"seed": 1e400}', "seed"),
    ('{"resolution": 256.0}', "resolution"),
    ('{"format": {"a": 1}}', "format"),
    ("null", "JSON object"),
    ('"glb"', "JSON object"),
    ('{"": 1}', "unknown option"),
])
def test_options_that_cannot_be_parsed_are_400_and_keep_the_connection(client, options, needle):
    r = submit(client, options=options)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["kind"] == "bad_input" and needle in r.json()["error"]["message"]
    assert client.get("/v1/health").status_code == 200


# -- F5 / F6: a disk that refuses writes ------------------------------------------------------------------------------


def failing(error: int):
    """A stand-in for a filesystem call that fails as a real disk does: OSError(error) naming its first argument."""

    def fail(*args, **kwargs):
        raise OSError(error, os.strerror(error), str(args[0]) if args else None)
    return fail


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_submit_on_a_failing_disk_is_507_storage_without_paths(client, jobs_dir, monkeypatch, code):
    monkeypatch.setattr(store_module, "write_json_atomic", failing(code))
    r = submit(client)
    assert r.status_code == 507, r.text
    error = r.json()["error"]
    assert error["kind"] == "storage" and ("full" in error["message"] or "read-only" in error["message"])
    assert "--jobs-dir" in error["fix"]
    assert_no_server_paths(r.text, jobs_dir)
    assert client.get("/v1/jobs", headers=AUTH).json()["jobs"] == []  # nothing half-made is listed
    assert [p.name for p in jobs_dir.iterdir()] == []  # nor left behind
    monkeypatch.undo()
    assert submit(client).status_code == 202  # healthy again once the fault clears


def test_delete_on_a_failing_disk_keeps_the_job(jobs_dir, fake, monkeypatch):
    with make_client(jobs_dir, lambda: fake) as client:
        job_id = done_job(client)
        real_replace = os.replace
        monkeypatch.setattr(store_module.os, "replace", failing(errno.EROFS))
        r = client.delete(f"/v1/jobs/{job_id}", headers=AUTH)
        assert r.status_code == 507 and r.json()["error"]["kind"] == "storage", r.text
        assert_no_server_paths(r.text, jobs_dir)
        # Regression: the job used to leave memory first (then 404, and back as "done" after a restart).
        assert client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()["state"] == "done"
        assert client.get(f"/v1/jobs/{job_id}/result", headers=AUTH).status_code == 200
        monkeypatch.setattr(store_module.os, "replace", real_replace)
        assert client.delete(f"/v1/jobs/{job_id}", headers=AUTH).status_code == 204
    with make_client(jobs_dir, lambda: fake) as client:  # a restart neither loses nor resurrects anything
        assert client.get("/v1/jobs", headers=AUTH).json()["jobs"] == []


def test_a_run_that_hits_a_full_disk_fails_with_storage_and_the_worker_lives_on(client, fake, jobs_dir, monkeypatch):
    fake.actions = ["ok", "ok"]
    real_call = type(fake).__call__

    def full_disk(self, image, run_dir, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(run_dir) / "views" / "3_1.png"))

    monkeypatch.setattr(type(fake), "__call__", full_disk)
    job_id = submit(client).json()["id"]
    status = wait_state(client, job_id)
    assert status["state"] == "failed" and status["error"]["kind"] == "storage"
    assert "disk is full" in status["error"]["message"] and f"{job_id}/run/views/3_1.png" in status["error"]["message"]
    assert_no_server_paths(json.dumps(status), jobs_dir)
    monkeypatch.setattr(type(fake), "__call__", real_call)
    assert wait_state(client, submit(client).json()["id"])["state"] == "done"


def test_a_job_log_that_cannot_be_opened_fails_nothing_but_the_log(client, jobs_dir, monkeypatch):
    monkeypatch.setattr(store_module, "append_text_no_follow", failing(errno.EROFS))
    job_id = submit(client).json()["id"]
    assert wait_state(client, job_id)["state"] == "done"  # the worker ran it; only the log lines are lost


def test_a_bug_in_a_run_names_no_server_path(client, fake, jobs_dir):
    fake.actions = ["bug"]
    status = wait_state(client, submit(client).json()["id"])
    assert status["error"]["kind"] == "internal" and "log.txt" in status["error"]["fix"]
    assert_no_server_paths(json.dumps(status), jobs_dir)


# -- F8: nothing in a job folder is trusted -------------------------------------------------------------------------


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "secret.txt"
    path.write_text("server-only secret")
    return path


def test_links_in_a_job_folder_are_never_followed(jobs_dir, fake, secret):
    with make_client(jobs_dir, lambda: fake) as client:
        job_id = done_job(client)
        folder = jobs_dir / job_id
        for relative in ("run/mesh.glb", "run/meta.json", "run/views/0.png", "run/input_256.png"):
            (folder / relative).unlink()
            (folder / relative).symlink_to(secret)
        shutil.move(folder / "run" / "views", folder / "views-real")
        (folder / "run" / "views").symlink_to(folder / "views-real", target_is_directory=True)
        for path in ("result", "meta", "views/0.png", "views/input_256.png", "views/1.png"):
            r = client.get(f"/v1/jobs/{job_id}/{path}", headers=AUTH)
            assert r.status_code == 404 and "secret" not in r.text, (path, r.text)


def test_edited_status_records_and_linked_job_folders_are_ignored_on_load(jobs_dir, fake, secret, tmp_path):
    with make_client(jobs_dir, lambda: fake) as client:
        ids = [done_job(client) for _ in range(4)]
    edits = {
        ids[0]: lambda r: r["result"].update(mesh=str(secret)),         # an absolute path
        ids[1]: lambda r: r["result"].update(meta="../" + ids[2] + "/run/meta.json"),
        ids[2]: lambda r: r.update(input_file="../../secret.txt"),
    }
    for job_id, edit in edits.items():
        record = json.loads((jobs_dir / job_id / "status.json").read_text())
        edit(record)
        (jobs_dir / job_id / "status.json").write_text(json.dumps(record))
    outside = tmp_path / "outside-job"
    shutil.copytree(jobs_dir / ids[3], outside)
    linked = "f" * 32
    record = json.loads((outside / "status.json").read_text())
    (outside / "status.json").write_text(json.dumps({**record, "id": linked}))
    (jobs_dir / linked).symlink_to(outside, target_is_directory=True)
    (jobs_dir / ids[3] / "status.json").unlink()
    (jobs_dir / ids[3] / "status.json").symlink_to(outside / "status.json")

    with make_client(jobs_dir, lambda: fake) as client:
        assert client.get("/v1/jobs", headers=AUTH).json()["jobs"] == []
        for job_id in (*ids, linked):
            assert client.get(f"/v1/jobs/{job_id}/result", headers=AUTH).status_code == 404


def test_records_naming_other_files_are_refused(tmp_path):
    folder = tmp_path / ("a" * 32)
    base = {"id": folder.name, "created": "2026-01-01T00:00:00+00:00", "options": {}, "input_file": "input.png",
            "download_stem": "x", "state": "done", "stage": "export", "step": 1, "total": 1, "fraction": 1.0,
            "elapsed_s": 1.0, "previews": ["0.png"], "error": None,
            "result": {"format": "glb", "elevation": 0.0, "vertices": 8, "faces": 12, "mesh": "run/mesh.glb",
                       "meta": "run/meta.json"}}
    assert Job.from_record(folder, base).result["mesh"] == "run/mesh.glb"
    for bad in ({"previews": ["../../x.png"]}, {"result": {**base["result"], "format": "exe"}},
                {"result": {**base["result"], "mesh": "run/../../x"}}, {"input_file": "/etc/passwd"},
                {"result": "run/mesh.glb"}):
        with pytest.raises(ValueError):
            Job.from_record(folder, {**base, **bad})


# -- F9 and the last resort -----------------------------------------------------------------------------------------


def test_a_non_image_upload_names_no_internal_object(client):
    r = submit(client, image=b"\x00" * 64)
    assert r.status_code == 400 and "BytesIO" not in r.text and "0x" not in r.text


def test_405_allows_every_method_of_the_path(client):
    job_id = done_job(client)
    r = client.put(f"/v1/jobs/{job_id}", headers=AUTH)
    assert r.status_code == 405
    assert set(r.headers["Allow"].replace(" ", "").split(",")) == {"GET", "DELETE"}
    assert "GET, DELETE" in r.json()["error"]["message"] or "DELETE, GET" in r.json()["error"]["message"]
    r = client.patch("/v1/jobs", headers=AUTH)
    assert r.status_code == 405 and set(r.headers["Allow"].replace(" ", "").split(",")) == {"GET", "POST"}


def test_an_unexpected_exception_is_500_without_internals(client, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("cannot read /srv/secret/jobs/x")

    monkeypatch.setattr(JobManager, "list_jobs", broken)
    r = client.get("/v1/jobs", headers=AUTH)
    assert r.status_code == 500 and r.json()["error"]["kind"] == "internal"
    assert "RuntimeError" in r.json()["error"]["message"] and "/srv/secret" not in r.text
    assert client.get("/v1/health").status_code == 200


def test_uploads_still_work_after_every_refusal(client):
    for image in (b"", b"\x00" * 64, png_bytes((8, 8))):
        assert submit(client, image=image).status_code == 400
    assert submit(client).status_code == 202
