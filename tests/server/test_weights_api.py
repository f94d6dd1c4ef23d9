"""The weights over HTTP: listing, the download job (progress, cancel, resume, refusals) and a server that starts
without weights and runs a job once they are downloaded — against the loopback stand-in of the hub.

The weights table is patched to small files with their real size and SHA-256, so every state (present, partial,
missing, corrupt) and every checksum status can be produced in milliseconds. The job runs on the test double of
test_app.py behind a loader that needs the files like the paper preset does (the paper networks cannot be built from
small files); the real server process is started once with the real table and the paper preset to check that it
starts without weights, refuses jobs with the download endpoint as the fix, and downloads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections import namedtuple
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.common import weights
from server.common.weights import integrity as weights_integrity
from server.common.weights import table as weights_table
from server.service.app import AppConfig, create_app
from server.service.jobs import JobManager, JobsConfig
from server.service.weights_api import PRESET_REQUIRES, WeightsConfig, WeightsManager
from tests.server.fake_hub import FakeHub, payload, serve_hub
from tests.server.test_app import FakePipeline, png_bytes

TOKEN = "weights-test-token-0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CONTENT = {"sam": payload(3000, 11), "zero123-xl": payload(200_000, 12), "loftr": payload(5000, 13),
           "reconstruction": payload(40_000, 14)}
REQUIRED = PRESET_REQUIRES["paper"]


@pytest.fixture
def table(monkeypatch: pytest.MonkeyPatch) -> dict[str, weights.WeightFile]:
    """The real table with each file's size and SHA-256 set to those of its small stand-in."""
    small = tuple(dataclasses.replace(w, approx_size_bytes=len(CONTENT[w.name]), size_bytes=len(CONTENT[w.name]),
                                      sha256=hashlib.sha256(CONTENT[w.name]).hexdigest(), derived_bytes=0)
                  for w in weights.WEIGHT_FILES if w.name in CONTENT)
    monkeypatch.setattr(weights_table, "WEIGHT_FILES", small)
    monkeypatch.setattr(weights_table, "REGISTRY", {w.name: w for w in small})
    return weights.REGISTRY


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, table) -> Iterator[FakeHub]:
    files = {table[name].filename: data for name, data in CONTENT.items()}
    with serve_hub(monkeypatch, tmp_path, files, lfs={table["zero123-xl"].filename}) as fake:
        yield fake


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "weights"


def gated_loader(root: Path, loads: list[str] | None = None):
    """Loads "the models" like the paper preset: every required file must resolve, then the test double is used."""

    def load() -> FakePipeline:
        for name in REQUIRED:
            weights.resolve(name, root)
        if loads is not None:
            loads.append("loaded")
        return FakePipeline()

    return load


def make_client(jobs_dir: Path, root: Path, loader=None, client_host: str = "testclient",
                **jobs_config) -> TestClient:
    manager = JobManager(jobs_dir, loader or gated_loader(root), JobsConfig(**jobs_config))
    manager_weights = WeightsManager(WeightsConfig(weights_dir=root, required=REQUIRED))
    return TestClient(create_app(manager, AppConfig(token=TOKEN, preset="paper"), manager_weights),
                      client=(client_host, 50000))


def put(root: Path, name: str, data: bytes | None = None) -> Path:
    path = root / weights.REGISTRY[name].local_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(CONTENT[name] if data is None else data)
    return path


def submit(client: TestClient):
    return client.post("/v1/jobs", files={"image": ("ball.png", png_bytes(), "image/png")}, headers=AUTH)


def wait(client: TestClient, url: str, until, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = client.get(url, headers=AUTH).json()
        if until(status):
            return status
        assert time.monotonic() < deadline, f"timed out; last answer {status}"
        time.sleep(0.02)


def by_name(listing: dict) -> dict[str, dict]:
    return {f["name"]: f for f in listing["files"]}


def test_listing_states_and_lazy_checksums(hub: FakeHub, root: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    put(root, "sam")
    partial = root / (weights.REGISTRY["loftr"].local_name + ".abc" + weights.PARTIAL_SUFFIX)
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(CONTENT["loftr"][:1200])
    bad = bytearray(CONTENT["reconstruction"])
    bad[100] ^= 1
    put(root, "reconstruction", bytes(bad))  # the right size, the wrong bytes
    hashed: list[Path] = []
    real_sha256 = weights.sha256_file
    monkeypatch.setattr(weights_integrity, "sha256_file", lambda path, *a: hashed.append(path) or real_sha256(path, *a))

    with make_client(tmp_path / "jobs", root) as client:
        assert client.get("/v1/weights").status_code == 401
        listing = client.get("/v1/weights", headers=AUTH).json()
        files = by_name(listing)
        assert [f["name"] for f in listing["files"]] == ["sam", "zero123-xl", "loftr", "reconstruction"]
        assert {n: (f["state"], f["checksum"]) for n, f in files.items()} == {
            "sam": ("present", "unchecked"), "zero123-xl": ("missing", None), "loftr": ("partial", None),
            "reconstruction": ("present", "unchecked")}  # nothing is hashed unasked
        assert hashed == []
        assert files["loftr"]["bytes_on_disk"] == 1200 and files["loftr"]["expected_bytes"] == 5000
        assert files["zero123-xl"]["source"] == f"{hub.url}/One-2-3-45/code/resolve/main/zero123-xl.ckpt"
        assert files["sam"]["licence"].startswith("MIT (the hub repo's card)") and not files["sam"]["required"]
        assert "Apache-2.0" in files["sam"]["licence"]
        assert files["reconstruction"]["required"]
        assert listing["missing"] == ["zero123-xl", "loftr"] and not listing["ready"] and not listing["complete"]
        assert listing["download_bytes"] == 200_000 + 5000 - 1200
        assert listing["disk_needed_bytes"] == listing["download_bytes"]  # the stand-ins have no conversion
        assert listing["disk_free_bytes"] > 0 and listing["offline"] is False
        assert listing["download"]["state"] == "idle"

        files = by_name(client.get("/v1/weights", params={"verify": "true"}, headers=AUTH).json())
        assert (files["sam"]["state"], files["sam"]["checksum"]) == ("present", "verified")
        assert (files["reconstruction"]["state"], files["reconstruction"]["checksum"]) == ("corrupt", "mismatch")
        assert "SHA-256" in files["reconstruction"]["problem"]
        assert len(hashed) == 2

        # Digests are kept per size and mtime: a second verify hashes nothing, a touched file is hashed again.
        client.get("/v1/weights", params={"verify": "true"}, headers=AUTH)
        assert len(hashed) == 2
        sam = root / weights.REGISTRY["sam"].local_name
        os.utime(sam, ns=(sam.stat().st_atime_ns, sam.stat().st_mtime_ns + 10**9))
        assert by_name(client.get("/v1/weights", headers=AUTH).json())["sam"]["checksum"] == "unchecked"
        client.get("/v1/weights", params={"verify": "true"}, headers=AUTH)
        assert len(hashed) == 3

        put(root, "sam", CONTENT["sam"][:-1])  # a size other than the exact one: corrupt without hashing
        files = by_name(client.get("/v1/weights", headers=AUTH).json())
        assert (files["sam"]["state"], files["sam"]["checksum"]) == ("corrupt", "mismatch")
        assert "2,999 bytes" in files["sam"]["problem"]

        health = client.get("/v1/health").json()["weights"]
        assert health == {"ready": False, "complete": False, "missing": ["sam", "zero123-xl", "loftr",
                                                                         "reconstruction"],
                          "required_missing": ["zero123-xl", "reconstruction"], "downloading": False}
    assert hub.requests == []  # listing never touches the network


def test_without_weights_jobs_are_refused_then_a_download_with_cancel_and_resume_makes_them_run(
        hub: FakeHub, root: Path, tmp_path: Path) -> None:
    hub.delay_s, hub.chunk_bytes = 0.01, 1024  # 200 KB of zero123-xl take ≥ 2 s
    loads: list[str] = []
    with make_client(tmp_path / "jobs", root, gated_loader(root, loads)) as client:
        health = client.get("/v1/health").json()
        assert health["status"] == "ok" and health["weights"]["required_missing"] == ["zero123-xl", "reconstruction"]
        refused = submit(client)
        assert refused.status_code == 503
        error = refused.json()["error"]
        assert error["kind"] == "missing_weights"
        assert "zero123-xl" in error["message"] and "reconstruction" in error["message"]
        assert "POST /v1/weights/download" in error["fix"]
        # One command for every file the preset lacks (issue #31 finding 14), without the server's paths.
        assert "`one2345 weights download --only zero123-xl --only reconstruction --dir the weights folder`" in \
            error["fix"]
        assert loads == []  # refused before the worker tried to load anything

        started = client.post("/v1/weights/download", headers=AUTH)
        assert started.status_code == 202, started.text
        assert started.json()["state"] == "running"
        assert started.json()["files"] == ["sam", "zero123-xl", "loftr", "reconstruction"]
        again = client.post("/v1/weights/download", headers=AUTH)
        assert again.status_code == 409 and again.json()["error"]["kind"] == "conflict"
        during = submit(client)
        assert during.status_code == 503 and "Retry-After" in during.headers
        assert client.get("/v1/health").json()["weights"]["downloading"] is True

        seen = wait(client, "/v1/weights/download",
                    lambda s: s["current_file"] == "zero123-xl" and s["rate_bps"] and s["eta_s"] is not None)
        assert seen["state"] == "running" and seen["phase"] == "downloading"
        assert 3000 < seen["bytes_done"] < seen["bytes_total"] == sum(len(c) for c in CONTENT.values())
        assert seen["rate_bps"] > 0 and seen["eta_s"] > 0 and 0 < seen["fraction"] < 1

        cancelled = client.delete("/v1/weights/download", headers=AUTH)
        assert cancelled.status_code == 200
        status = wait(client, "/v1/weights/download", lambda s: s["state"] != "running")
        assert status["state"] == "cancelled" and status["error"]["kind"] == "cancelled"
        assert client.delete("/v1/weights/download", headers=AUTH).status_code == 409
        partials = list(root.rglob(f"zero123-xl.ckpt.*{weights.PARTIAL_SUFFIX}"))
        assert len(partials) == 1
        kept = partials[0].stat().st_size
        assert 0 < kept < 200_000 and partials[0].read_bytes() == CONTENT["zero123-xl"][:kept]
        files = by_name(client.get("/v1/weights", headers=AUTH).json())
        assert files["sam"]["state"] == "present" and files["zero123-xl"]["state"] == "partial"
        assert submit(client).status_code == 503

        hub.delay_s = 0.0
        hub.requests.clear()
        resumed = client.post("/v1/weights/download", headers=AUTH).json()
        assert resumed["files"] == ["zero123-xl", "loftr", "reconstruction"]
        done = wait(client, "/v1/weights/download", lambda s: s["state"] != "running")
        assert done["state"] == "done", done
        assert done["bytes_done"] == done["bytes_total"] == 245_000 and done["resumed_bytes"] == kept
        assert done["eta_s"] == 0.0 and done["fraction"] == 1.0 and done["error"] is None
        assert ("GET", "/cdn/zero123-xl.ckpt", f"bytes={kept}-") in hub.requests
        for name, data in CONTENT.items():
            assert (root / weights.REGISTRY[name].local_name).read_bytes() == data
        assert not list(root.rglob(f"*{weights.PARTIAL_SUFFIX}"))

        listing = client.get("/v1/weights", headers=AUTH).json()
        assert listing["ready"] and listing["complete"] and listing["download_bytes"] == 0
        # Every file was hashed while it was downloaded, so the listing knows without hashing again.
        assert {f["checksum"] for f in listing["files"]} == {"verified"}
        assert client.get("/v1/health").json()["weights"] == {
            "ready": True, "complete": True, "missing": [], "required_missing": [], "downloading": False}

        job = submit(client)
        assert job.status_code == 202, job.text
        status = wait(client, job.json()["url"], lambda s: s["state"] in ("done", "failed", "cancelled"))
        assert status["state"] == "done", status["error"]
        assert loads == ["loaded"]
        mesh = client.get(status["result"]["url"], headers=AUTH)
        assert mesh.status_code == 200 and mesh.content[:4] == b"glTF"


def test_a_finished_download_lifts_a_load_refusal_at_once(hub: FakeHub, root: Path, tmp_path: Path) -> None:
    for name in CONTENT:
        put(root, name)
    calls: list[int] = []

    def flaky() -> FakePipeline:  # the first load finds a file gone (removed between the check and the load)
        calls.append(1)
        if len(calls) == 1:
            raise weights.MissingWeightsError("zero123-xl.ckpt vanished")
        return gated_loader(root)()

    with make_client(tmp_path / "jobs", root, flaky, missing_weights_retry_s=600) as client:
        first = submit(client).json()
        assert wait(client, first["url"], lambda s: s["state"] == "failed")["error"]["kind"] == "missing_weights"
        assert submit(client).status_code == 503  # for the next 600 s…
        (root / weights.REGISTRY["loftr"].local_name).unlink()
        assert client.post("/v1/weights/download", headers=AUTH).status_code == 202
        wait(client, "/v1/weights/download", lambda s: s["state"] == "done")
        job = submit(client)  # …unless a download completes
        assert job.status_code == 202
        assert wait(client, job.json()["url"], lambda s: s["state"] in ("done", "failed"))["state"] == "done"


def test_nothing_to_fetch_is_done_at_once(hub: FakeHub, root: Path, tmp_path: Path) -> None:
    for name in CONTENT:
        put(root, name)
    with make_client(tmp_path / "jobs", root) as client:
        answer = client.post("/v1/weights/download", headers=AUTH)
        assert answer.status_code == 202 and answer.json()["state"] == "done" and answer.json()["files"] == []
    assert hub.requests == []


def test_a_full_disk_is_refused_before_anything_moves(hub: FakeHub, root: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(weights_integrity.shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 12_345, 12_345))
    with make_client(tmp_path / "jobs", root) as client:
        answer = client.post("/v1/weights/download", headers=AUTH)
        assert answer.status_code == 507
        error = answer.json()["error"]
        assert error["kind"] == "storage"
        assert "248,000 bytes" in error["message"] and "12,345 bytes" in error["message"]
        assert "ONE2345_WEIGHTS" in error["fix"] and str(tmp_path) not in json.dumps(error)
        assert client.get("/v1/weights/download", headers=AUTH).json()["state"] == "idle"
    assert hub.requests == [] and not root.exists()


def test_the_exact_sizes_from_the_hub_are_checked_again(hub: FakeHub, root: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The table's sizes are rough for the real files: the download checks the hub's sizes before moving a byte."""
    small = {n: dataclasses.replace(w, approx_size_bytes=1, size_bytes=None) for n, w in weights.REGISTRY.items()}
    monkeypatch.setattr(weights_table, "REGISTRY", small)
    monkeypatch.setattr(weights_table, "WEIGHT_FILES", tuple(small.values()))
    monkeypatch.setattr(weights_table, "FREE_SPACE_MARGIN_BYTES", 0)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(weights_integrity.shutil, "disk_usage", lambda _: usage(10**9, 0, 100_000))
    with make_client(tmp_path / "jobs", root) as client:
        assert client.post("/v1/weights/download", headers=AUTH).status_code == 202  # 4 bytes by the table
        status = wait(client, "/v1/weights/download", lambda s: s["state"] != "running")
    assert status["state"] == "failed" and status["error"]["kind"] == "storage"
    assert "248,000 bytes" in status["error"]["message"]
    assert {m for m, _, _ in hub.requests} == {"HEAD"}  # sizes asked, no byte fetched


def test_offline_is_refused_with_a_clear_message(hub: FakeHub, root: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with make_client(tmp_path / "jobs", root) as client:
        answer = client.post("/v1/weights/download", headers=AUTH)
        assert answer.status_code == 503
        error = answer.json()["error"]
        assert error["kind"] == "offline" and "HF_HUB_OFFLINE=1" in error["message"]
        assert "zero123-xl" in error["message"] and "HF_HUB_OFFLINE" in error["fix"]
        assert client.get("/v1/weights", headers=AUTH).json()["offline"] is True
    assert hub.requests == []


def test_token_and_request_checks(hub: FakeHub, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_from_the_environment")
    with make_client(tmp_path / "jobs", root) as client:
        assert client.post("/v1/weights/download").status_code == 401
        for body in ({"files": ["zero123"]}, {"token": "has space"}, {"files": ["sam"], "colour": 1}):
            answer = client.post("/v1/weights/download", json=body, headers=AUTH)
            assert answer.status_code == 400, body
            assert answer.json()["error"]["kind"] == "bad_input"
        unknown = client.post("/v1/weights/download", json={"files": ["zero123"]}, headers=AUTH).json()
        assert "sam, zero123-xl, loftr, reconstruction" in unknown["error"]["message"]

        assert client.post("/v1/weights/download", json={"files": ["sam"]}, headers=AUTH).status_code == 202
        wait(client, "/v1/weights/download", lambda s: s["state"] == "done")
        assert set(hub.authorization) == {"Bearer hf_from_the_environment"}

        hub.authorization.clear()
        answer = client.post("/v1/weights/download", json={"files": ["loftr"], "token": "hf_from_the_request"},
                             headers=AUTH)
        assert "hf_from_the_request" not in answer.text
        wait(client, "/v1/weights/download", lambda s: s["state"] == "done")
        assert set(hub.authorization) == {"Bearer hf_from_the_request"}
        assert "hf_from_the_request" not in client.get("/v1/weights/download", headers=AUTH).text
        assert [f["state"] for f in client.get("/v1/weights", headers=AUTH).json()["files"]] == [
            "present", "missing", "present", "missing"]


def test_a_failed_download_says_why_without_server_paths(hub: FakeHub, root: Path, tmp_path: Path) -> None:
    del hub.files[weights.REGISTRY["reconstruction"].filename]
    with make_client(tmp_path / "jobs", root) as client:
        client.post("/v1/weights/download", json={"files": ["reconstruction"]}, headers=AUTH)
        status = wait(client, "/v1/weights/download", lambda s: s["state"] != "running")
    assert status["state"] == "failed" and status["error"]["kind"] == "missing_weights"
    assert "ckpt_215000.pth" in status["error"]["message"]
    assert str(tmp_path) not in json.dumps(status)


def test_the_openapi_schema_lists_the_weights_routes(tmp_path: Path, root: Path) -> None:
    with make_client(tmp_path / "jobs", root) as client:
        schema = client.get("/openapi.json").json()
    assert {"get"} <= set(schema["paths"]["/v1/weights"])
    assert {"get", "post", "delete"} <= set(schema["paths"]["/v1/weights/download"])
    assert {"get", "post", "delete"} <= set(schema["paths"]["/v1/weights/import"])
    assert schema["paths"]["/v1/weights/download"]["post"]["security"] == [{"bearer": []}]
    assert "weights" in schema["components"]["schemas"]["Health"]["properties"]


def test_the_weights_routes_document_their_errors_with_the_one_error_envelope(tmp_path: Path, root: Path) -> None:
    """Every documented error of the weights routes is the :class:`ErrorBody` the job routes document (one builder,
    ``documented_errors``), with the weights' own reason for each status.

    Before: the weights router wrote its own inline copy of the envelope (a cycle kept it from the job routes' one)."""
    with make_client(tmp_path / "jobs", root) as client:
        schema = client.get("/openapi.json").json()
    seen = set()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            for code, response in operation["responses"].items():
                if int(code) < 400 or not path.startswith("/v1/weights"):
                    continue
                assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
                seen.add((path, method, code, response["description"]))
    assert ("/v1/weights/download", "post", "507", "storage: the weights folder's disk lacks the space still needed "
            "(the message names both sizes)") in seen
    assert ("/v1/weights/import", "delete", "409", "a download or import is already running (POST), or none is "
            "(DELETE)") in seen
    tasks = {(f"/v1/weights/{task}", m) for task in ("download", "import") for m in ("get", "post", "delete")}
    assert {(path, method) for path, method, _, _ in seen} == {("/v1/weights", "get"), *tasks}


def test_the_paper_server_starts_without_weights_and_downloads_them(hub: FakeHub, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The real process with the real table (the stand-in serves small files under the real names)."""
    from tests.server.test_serve_process import start_server, stop

    root = tmp_path / "empty-weights"
    server = start_server(tmp_path / "jobs", tmp_path / "stderr.txt", "--preset", "paper", "--weights-dir",
                          str(root))
    try:
        health = server.client.get("/v1/health").json()
        assert health["preset"] == "paper" and health["weights"]["ready"] is False
        assert health["weights"]["required_missing"] == ["zero123-xl", "reconstruction"]
        refused = server.client.post("/v1/jobs", files={"image": ("b.png", png_bytes(), "image/png")})
        assert refused.status_code == 503 and "POST /v1/weights/download" in refused.json()["error"]["fix"]
        started = server.client.post("/v1/weights/download", json={"files": ["loftr", "reconstruction"]})
        assert started.status_code == 202, started.text
        deadline = time.monotonic() + 30
        while (status := server.client.get("/v1/weights/download").json())["state"] == "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert status["state"] == "done", status
        assert (root / "SparseNeuS_demo_v1/exp/lod0/checkpoints/ckpt_215000.pth").read_bytes() == CONTENT[
            "reconstruction"]
        assert server.client.get("/v1/health").json()["weights"]["required_missing"] == ["zero123-xl"]
    finally:
        stop(server)


REFERENCE_LAYOUT = {"sam": "sam_vit_h_4b8939.pth", "zero123-xl": "zero123-xl.ckpt",
                    "loftr": "elevation_estimate/utils/weights/indoor_ds_new.ckpt",
                    "reconstruction": "reconstruction/exp/lod0/checkpoints/ckpt_215000.pth"}


def test_an_import_from_a_checkout_runs_as_a_task_and_lifts_the_refusal(hub: FakeHub, root: Path,
                                                                         tmp_path: Path) -> None:
    """POST /v1/weights/import: the add-on's way to reuse an official checkout on the server's machine."""
    src = tmp_path / "One-2-3-45"
    for name, rel in REFERENCE_LAYOUT.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(CONTENT[name] if name != "sam" else CONTENT["sam"][:-1])  # SAM truncated
    with make_client(tmp_path / "jobs", root, client_host="127.0.0.1") as client:
        assert submit(client).status_code == 503
        bad = client.post("/v1/weights/import", json={"path": str(tmp_path / "nope")}, headers=AUTH)
        assert bad.status_code == 400 and bad.json()["error"]["kind"] == "bad_input"
        assert client.post("/v1/weights/import", json={"path": str(src), "x": 1}, headers=AUTH).status_code == 400
        started = client.post("/v1/weights/import", json={"path": str(src)}, headers=AUTH)
        assert started.status_code == 202, started.text
        assert started.json()["operation"] == "import"
        done = wait(client, "/v1/weights/import", lambda s: s["state"] != "running")
        assert done["state"] == "done", done
        outcomes = {r["name"]: (r["outcome"], r["how"]) for r in done["imported"]}
        assert outcomes == {"sam": ("damaged", None), "zero123-xl": ("imported", "hard link"),
                            "loftr": ("imported", "hard link"), "reconstruction": ("imported", "hard link")}
        assert client.get("/v1/weights/download", headers=AUTH).json()["operation"] == "import"  # the one task
        assert client.get("/v1/health").json()["weights"]["required_missing"] == []
        job = submit(client)
        assert job.status_code == 202, job.text
    assert hub.requests == []  # nothing fetched


def test_an_import_is_accepted_only_from_the_servers_own_machine(hub: FakeHub, root: Path, tmp_path: Path) -> None:
    with make_client(tmp_path / "jobs", root, client_host="192.0.2.7") as client:
        answer = client.post("/v1/weights/import", json={"path": str(tmp_path)}, headers=AUTH)
        assert answer.status_code == 400
        assert "server's own machine" in answer.json()["error"]["message"]
        assert client.get("/v1/weights/import", headers=AUTH).json()["state"] == "idle"
