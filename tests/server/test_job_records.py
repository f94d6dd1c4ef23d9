"""Job records read back from status.json, checked field by field (issue #31, finding 1 and 7).

A record that is not one this server wrote — a wrong type, a value out of range, a missing part of ``result``, a
download name that would break a response header — is refused with the field named (:class:`RecordError`), set aside
in ``<jobs_dir>/.quarantine/`` at start-up with a log line, counted in ``/v1/health``, and never reaches the worker or
a GET: before, ``"created": 5`` killed the worker at the next job's size-limit clean-up, and a mistyped field made
that job's GET, the list and health answer 500.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import pytest

from server.service.jobs import Job, RecordError
from server.service.jobs.records import download_name
from tests.server.test_app import AUTH, FakePipeline, make_client, submit, wait_state
from tests.server.test_serve_races import write_done_job

FOLDER = Path("/nonexistent/jobs") / ("a" * 32)
GOOD = {"id": FOLDER.name, "created": "2026-01-01T00:00:00.000000+00:00", "options": {"format": "glb"},
        "input_file": "input.png", "download_stem": "my_photo", "state": "done", "stage": "export", "step": 1,
        "total": 1, "fraction": 1.0, "elapsed_s": 1.5, "previews": ["input_256.png", "0.png", "0_3.png"],
        "message": None, "error": None, "remesh_of": None, "pinned": False, "bake_of": None, "bake": None,
        "images": None,
        "result": {"format": "glb", "elevation": 12.5, "vertices": 8, "faces": 12, "mesh": "run/mesh.glb",
                   "meta": "run/meta.json", "elevation_uncertain": False, "elevation_confidence": None,
                   "textured": False, "texture_size": None, "target_faces": None},
        "review": {"views": [0, 1, 2, 3, 4, 5, 6, 7], "revision": 1, "elevation": 15.0, "elevation_source": "given",
                   "elevation_uncertain": False, "elevation_confidence": None, "seed": 11, "view_seeds": {"1": 7},
                   "notes": [], "deadline": 1.7e9, "timeout_s": 3600.0}}


def edited(path: str, value, record: dict | None = None) -> dict:
    """GOOD with ``path`` (``"result.elevation"``) set to ``value``, or removed when ``value`` is ``DELETE``."""
    record = copy.deepcopy(record or GOOD)
    *parents, last = path.split(".")
    target = record
    for name in parents:
        target = target[name]
    if value is DELETE:
        del target[last]
    else:
        target[last] = value
    return record


DELETE = object()

BAD_FIELDS = [
    ("created", 5), ("created", None), ("created", "yesterday"), ("created", ["2026-01-01"]),
    ("elapsed_s", "1.5"), ("elapsed_s", -1.0), ("elapsed_s", math.inf), ("elapsed_s", None),
    ("fraction", "0.5"), ("fraction", 1.5), ("fraction", math.nan),
    ("step", "3"), ("step", -1), ("step", True), ("step", 2.5), ("total", None),
    ("options", []), ("options", "glb"), ("options", {"resolution": "high"}), ("options", {"bogus": 1}),
    ("error", "boom"), ("error", {"kind": 1, "message": "x", "fix": None}), ("error", {"kind": "x", "message": "y"}),
    ("result", "run/mesh.glb"), ("result.elevation", DELETE), ("result.elevation", "12"), ("result.vertices", -8),
    ("result.faces", None), ("result.textured", "yes"), ("result.elevation_confidence", "high"),
    ("result.mesh", "run/../../x"), ("result.format", "exe"),
    ("download_stem", "a\r\nSet-Cookie: x=1"), ("download_stem", ""), ("download_stem", 'x"; filename="y'),
    ("download_stem", "x" * 65), ("download_stem", 7),
    ("state", "paused"), ("state", None), ("stage", 5), ("previews", "0.png"), ("previews", ["../../x.png"]),
    ("pinned", "yes"), ("message", 5), ("message", "x" * 1001),
    ("remesh_of", "not-an-id"), ("input_file", "/etc/passwd"), ("id", "b" * 32),
    ("review", []), ("review.seed", None), ("review.views", [1, "2"]), ("review.deadline", "soon"),
    ("review.view_seeds", {"x": 1}), ("review.notes", "none"), ("review.timeout_s", 0),
    ("created", DELETE), ("result.meta", DELETE),
]


def test_a_record_this_server_writes_reads_back_whole():
    job = Job.from_record(FOLDER, GOOD)
    assert job.to_record() == {k: GOOD[k] for k in job.to_record()}
    older = ("remesh_of", "review", "pinned", "message", "bake_of", "bake", "images")  # added after the first release
    assert Job.from_record(FOLDER, {k: v for k, v in GOOD.items() if k not in older})
    assert Job.from_record(FOLDER, edited("created", "2000-01-01T00:00:00")).created == "2000-01-01T00:00:00"
    assert Job.from_record(FOLDER, edited("review.timeout_s", DELETE)).review["views"] == list(range(8))
    assert Job.from_record(FOLDER, edited("step", 0)).step == 0
    assert "timeout_s" not in job.to_public()["review"] and "deadline" not in job.to_public()["review"]


@pytest.mark.parametrize(("name", "value"), BAD_FIELDS, ids=[f"{n}={v!r}"[:40] for n, v in BAD_FIELDS])
def test_each_bad_field_is_refused_by_name(name, value):
    with pytest.raises(RecordError) as caught:
        Job.from_record(FOLDER, edited(name, value))
    assert caught.value.field == name
    assert isinstance(caught.value, ValueError)  # what the store catches
    assert "\r" not in str(caught.value) and "\n" not in str(caught.value)  # fit for one log line


def test_records_whose_state_needs_a_part_are_refused():
    with pytest.raises(RecordError, match="'review' is missing, but the state is review"):
        Job.from_record(FOLDER, {**edited("state", "review"), "review": None})
    with pytest.raises(RecordError, match="'result' is null, but the state is done"):
        Job.from_record(FOLDER, {**GOOD, "result": None})
    with pytest.raises(RecordError, match="not a JSON object"):
        Job.from_record(FOLDER, [GOOD])


def test_the_download_name_is_safe_for_a_header_whatever_the_stem():
    assert download_name("my_photo", "glb") == "my_photo.glb"
    assert download_name("a\r\nSet-Cookie: x=1", "glb") == "a_Set-Cookie_x_1.glb"
    assert download_name("", "ply") == "mesh.ply"


# -- at start-up, through the HTTP API ------------------------------------------------------------------------------

PLANTED = {
    "created=5": ("created", 5), "created=null": ("created", None), "elapsed_s": ("elapsed_s", "x"),
    "fraction": ("fraction", "x"), "step": ("step", "x"), "options": ("options", []), "error": ("error", "x"),
    "result without elevation": ("result.elevation", DELETE),
    "download name with CR/LF": ("download_stem", "a\r\nb"),
}


def test_damaged_records_are_quarantined_and_the_server_serves_the_rest(tmp_path, caplog):
    jobs_dir = tmp_path / "jobs"
    good, _ = write_done_job(jobs_dir, 99, mesh_bytes=64)
    planted = {}
    for seed, (name, value) in enumerate(PLANTED.values()):
        job_id, _ = write_done_job(jobs_dir, seed, mesh_bytes=64)
        record = json.loads((jobs_dir / job_id / "status.json").read_text())
        (jobs_dir / job_id / "status.json").write_text(json.dumps(edited(name, value, record)))
        planted[job_id] = name
    fake = FakePipeline()
    with caplog.at_level(logging.WARNING, logger="server.service.jobs"), \
            make_client(jobs_dir, lambda: fake, max_queue=8) as client:
        health = client.get("/v1/health")
        assert health.status_code == 200, health.text
        assert health.json()["quarantined"] == len(PLANTED) and health.json()["worker_alive"] is True
        listing = client.get("/v1/jobs", headers=AUTH)
        assert listing.status_code == 200 and [j["id"] for j in listing.json()["jobs"]] == [good]
        for job_id in planted:
            for path in ("", "/result", "/meta", "/views/0.png"):
                assert client.get(f"/v1/jobs/{job_id}{path}", headers=AUTH).status_code == 404, (job_id, path)
            assert client.delete(f"/v1/jobs/{job_id}", headers=AUTH).status_code == 404
        assert client.get(f"/v1/jobs/{good}/result", headers=AUTH).status_code == 200
        # The worker lives: new jobs finish (the size-limit clean-up sorts every job by its creation time).
        for _ in range(2):
            assert wait_state(client, submit(client).json()["id"])["state"] == "done"
        assert client.get("/v1/health").json()["status"] == "ok"
    quarantine = jobs_dir / ".quarantine"
    for job_id, name in planted.items():
        assert not (jobs_dir / job_id).exists()
        [moved] = quarantine.glob(f"{job_id}-*")
        assert (moved / "status.json").is_file() and (moved / "run" / "mesh.ply").is_file()  # set aside, not lost
        assert any(job_id in r.getMessage() and "status.json" in r.getMessage() and repr(name) in r.getMessage()
                   for r in caplog.records), (name, [r.getMessage() for r in caplog.records])
    with make_client(jobs_dir, lambda: fake) as client:  # a second start finds nothing more to set aside
        assert client.get("/v1/health").json()["quarantined"] == 0


def test_unreadable_or_linked_status_files_are_quarantined_too(tmp_path):
    jobs_dir = tmp_path / "jobs"
    broken, _ = write_done_job(jobs_dir, 1, mesh_bytes=64)
    (jobs_dir / broken / "status.json").write_text("{trunc")
    missing, _ = write_done_job(jobs_dir, 2, mesh_bytes=64)
    (jobs_dir / missing / "status.json").unlink()
    deep, _ = write_done_job(jobs_dir, 3, mesh_bytes=64)
    (jobs_dir / deep / "status.json").write_text("[" * 100_000 + "]" * 100_000)
    with make_client(jobs_dir, FakePipeline) as client:
        assert client.get("/v1/health").json()["quarantined"] == 3
        assert client.get("/v1/jobs", headers=AUTH).json()["jobs"] == []
    assert sorted(p.name[:32] for p in (jobs_dir / ".quarantine").iterdir()) == sorted([broken, missing, deep])
