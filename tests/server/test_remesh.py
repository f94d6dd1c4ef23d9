"""The asset options end to end and re-meshing a finished run: the CLI, the pipeline and the HTTP API with the real
tiny pipeline.

What must hold: a run with ``--faces/--texture`` and a plain run re-meshed with the same settings give the same file;
a textured GLB has a texture and UVs but no COLOR_0; a re-mesh job never changes its source; every bad input is
refused with a message naming it.
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from server.common.errors import BadInputError
from server.pipeline import GenerateOptions, One2345Pipeline
from server.service.app import AppConfig, create_app
from server.service.cli import main
from server.service.jobs import JobManager

FAST = ["--preset", "tiny", "--steps-stage1", "2", "--steps-stage2", "2", "--resolution", "48", "--seed", "3",
        "--elevation", "15", "--device", "cpu"]
TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def glb_json(path: Path) -> dict:
    """The JSON chunk of a GLB file."""
    data = path.read_bytes()
    assert data[:4] == b"glTF"
    length, kind = struct.unpack_from("<II", data, 12)
    assert kind == 0x4E4F534A
    return json.loads(data[20 : 20 + length])


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    """A red disc with a blue stripe on white."""
    img = np.full((200, 200, 3), 255, np.uint8)
    yy, xx = np.mgrid[:200, :200]
    img[(yy - 100) ** 2 + (xx - 100) ** 2 < 60**2] = (200, 40, 40)
    img[90:110, 50:150] = (30, 40, 220)
    path = tmp_path_factory.mktemp("photo") / "disc.png"
    Image.fromarray(img).save(path)
    return path


@pytest.fixture(scope="module")
def runs(photo, tmp_path_factory) -> Path:
    """Two CLI runs of the same image and seed: ``asset.glb`` with a budget and a texture, ``plain.glb`` without."""
    out = tmp_path_factory.mktemp("runs")
    assert main(["generate", str(photo), "-o", str(out / "asset.glb"), "--faces", "1000", "--texture", "256",
                 *FAST]) == 0
    assert main(["generate", str(photo), "-o", str(out / "plain.glb"), *FAST]) == 0
    return out


def test_generate_with_budget_and_texture_writes_a_textured_glb(runs):
    gltf = glb_json(runs / "asset.glb")
    attributes = gltf["meshes"][0]["primitives"][0]["attributes"]
    assert "TEXCOORD_0" in attributes and "COLOR_0" not in attributes  # glTF would multiply COLOR_0 in
    assert gltf["materials"][0]["pbrMetallicRoughness"]["baseColorTexture"]["index"] == 0
    assert gltf["images"][0]["mimeType"] == "image/png"
    faces = gltf["accessors"][gltf["meshes"][0]["primitives"][0]["indices"]]["count"] // 3
    assert abs(faces - 1000) <= 10  # within 1 % of the budget
    meta = json.loads((runs / "asset.one2345" / "meta.json").read_text())
    assert meta["textured"] is True and meta["options"]["texture_size"] == 256
    assert meta["asset"]["faces"] == faces and meta["asset"]["raw_faces"] > faces
    assert 0.3 < meta["asset"]["texture_coverage"] <= 1.0
    assert {"asset.views", "asset.fill", "asset.decimate", "reconstruct.sdf"} <= set(meta["timings"])
    # The run folder's copy and the user's file are the same mesh.
    assert (runs / "asset.one2345" / "mesh.glb").read_bytes() == (runs / "asset.glb").read_bytes()
    plain = glb_json(runs / "plain.glb")["meshes"][0]["primitives"][0]["attributes"]
    assert "COLOR_0" in plain and "TEXCOORD_0" not in plain


def test_remesh_gives_the_mesh_of_a_fresh_run_with_those_settings(runs, capsys):
    out = runs / "remeshed.glb"
    assert main(["remesh", str(runs / "plain.one2345"), "-o", str(out), "--resolution", "48", "--faces", "1000",
                 "--texture", "256", "--device", "cpu"]) == 0
    assert out.read_bytes() == (runs / "asset.glb").read_bytes()
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    # The run itself is left as it was.
    assert "COLOR_0" in glb_json(runs / "plain.one2345" / "mesh.glb")["meshes"][0]["primitives"][0]["attributes"]


def test_remesh_defaults_to_the_runs_resolution_and_network(runs, capsys):
    out = runs / "same.glb"
    assert main(["remesh", str(runs / "plain.one2345"), "-o", str(out), "--device", "cpu"]) == 0
    assert out.read_bytes() == (runs / "plain.glb").read_bytes()
    assert "tiny" in capsys.readouterr().err


def test_textured_obj_writes_its_material_and_texture(runs):
    out = runs / "obj" / "thing.obj"
    assert main(["remesh", str(runs / "plain.one2345"), "-o", str(out), "--texture", "256", "--device", "cpu"]) == 0
    text = out.read_text()
    assert "mtllib thing.mtl" in text and "\nvt " in text
    assert "map_Kd thing_texture.png" in (runs / "obj" / "thing.mtl").read_text()
    assert Image.open(runs / "obj" / "thing_texture.png").size == (256, 256)


@pytest.mark.parametrize(("args", "message"), [
    (["--texture", "256", "-o", "{out}/x.ply"], "ply, which has no texture"),
    (["--texture", "100", "-o", "{out}/x.glb"], "texture size 100 is not allowed"),
    (["--texture", "8192", "-o", "{out}/x.glb"], "[256, 4096]"),
    (["--faces", "10", "-o", "{out}/x.glb"], "target faces 10 is not allowed"),
    (["--faces", "0", "-o", "{out}/x.glb"], "[1,000, 2,000,000]"),
])
def test_bad_asset_options_are_refused_before_any_work(runs, tmp_path, capsys, args, message):
    args = [a.replace("{out}", str(tmp_path)) for a in args]
    for command in (["remesh", str(runs / "plain.one2345")], ["reconstruct", str(runs / "plain.one2345" / "views"),
                                                             "--preset", "tiny"]):
        assert main([*command, *args]) == 2
        assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_remesh_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "views").mkdir()
    assert main(["remesh", str(tmp_path), "-o", str(tmp_path / "x.glb")]) == 2
    assert "neither views/pose.json nor run/views/pose.json" in capsys.readouterr().err
    assert main(["remesh", str(tmp_path / "missing"), "-o", str(tmp_path / "x.glb")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_generate_options_check_the_asset_fields():
    GenerateOptions(format="obj", texture_size=1024, target_faces=50_000).check()
    with pytest.raises(BadInputError, match="ply, which has no texture"):
        GenerateOptions(format="ply", texture_size=1024).check()
    for bad in (True, 1.5, "1024", 4097):
        with pytest.raises(BadInputError, match="texture size"):
            GenerateOptions(texture_size=bad).check()
    with pytest.raises(BadInputError, match="target faces"):
        GenerateOptions(target_faces=999).check()


# -- the HTTP API --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pipe() -> One2345Pipeline:
    return One2345Pipeline.from_preset("tiny", device="cpu")


@pytest.fixture
def client(tmp_path, tiny_pipe):
    manager = JobManager(tmp_path / "jobs", lambda: tiny_pipe)
    with TestClient(create_app(manager, AppConfig(token=TOKEN, preset="tiny"))) as c:
        yield c


def wait_done(client: TestClient, job_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
        if status["state"] in ("done", "failed", "cancelled"):
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {status}")


def submit(client: TestClient, photo: Path, options: dict) -> object:
    return client.post("/v1/jobs", files={"image": ("disc.png", photo.read_bytes(), "image/png")},
                       data={"options": json.dumps(options)}, headers=AUTH)


HTTP_FAST = {"steps_stage1": 2, "steps_stage2": 2, "resolution": 48, "seed": 3, "elevation": 15}


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in ("status.json", "log.txt")}


def test_remesh_job_over_http(client, photo, tmp_path):
    source = submit(client, photo, HTTP_FAST).json()["id"]
    assert wait_done(client, source)["state"] == "done"
    source_files = folder_digest(tmp_path / "jobs" / source)
    source_status = client.get(f"/v1/jobs/{source}", headers=AUTH).json()

    r = client.post(f"/v1/jobs/{source}/remesh", json={"target_faces": 1000, "texture_size": 256}, headers=AUTH)
    assert r.status_code == 202, r.text
    new = r.json()["id"]
    assert new != source and r.json()["url"] == f"/v1/jobs/{new}"
    status = wait_done(client, new)
    assert status["state"] == "done", status["error"]
    assert status["remesh_of"] == source
    assert status["options"] == {**source_status["options"], "target_faces": 1000, "texture_size": 256}
    assert status["result"]["textured"] is True and status["result"]["texture_size"] == 256
    assert abs(status["result"]["faces"] - 1000) <= 10
    stages = (tmp_path / "jobs" / new / "log.txt").read_text()
    assert "stage reconstruct" in stages and "stage asset" in stages and "stage stage1" not in stages

    mesh = tmp_path / "remeshed.glb"
    mesh.write_bytes(client.get(status["result"]["url"], headers=AUTH).content)
    assert "TEXCOORD_0" in glb_json(mesh)["meshes"][0]["primitives"][0]["attributes"]
    meta = client.get(status["result"]["meta_url"], headers=AUTH).json()
    assert meta["remeshed"] and meta["seed"] == 3 and meta["textured"] is True

    # The source is untouched: its status and every file of its folder.
    assert client.get(f"/v1/jobs/{source}", headers=AUTH).json() == source_status
    assert folder_digest(tmp_path / "jobs" / source) == source_files
    # The same settings in a fresh job give the same mesh.
    fresh = submit(client, photo, {**HTTP_FAST, "target_faces": 1000, "texture_size": 256}).json()["id"]
    assert wait_done(client, fresh)["state"] == "done"
    assert client.get(f"/v1/jobs/{fresh}/result", headers=AUTH).content == mesh.read_bytes()

    # Deleting the source does not break its re-meshes: they hold their own copy of the views.
    again = client.post(f"/v1/jobs/{source}/remesh", json={"resolution": 32}, headers=AUTH).json()["id"]
    client.delete(f"/v1/jobs/{source}", headers=AUTH)
    assert wait_done(client, again)["state"] == "done"
    assert client.post(f"/v1/jobs/{source}/remesh", json={}, headers=AUTH).status_code == 404


def test_remesh_requests_that_are_refused(client, photo):
    source = submit(client, photo, HTTP_FAST).json()["id"]

    def remesh(body, job=source, **kwargs):
        return client.post(f"/v1/jobs/{job}/remesh", headers=AUTH, **({"json": body} if body is not None else kwargs))

    wait_done(client, source)
    cases = [
        ({"seed": 4}, 400, "cannot be changed by a re-mesh"),
        ({"texture_size": 256, "format": "obj"}, 400, "cannot carry a texture over HTTP"),
        ({"texture_size": 256, "format": "ply"}, 400, "which has no texture"),
        ({"target_faces": 5}, 400, "target faces 5 is not allowed"),
        ([1, 2], 400, "must be a JSON object"),
    ]
    for body, code, message in cases:
        r = remesh(body)
        assert r.status_code == code and message in r.json()["error"]["message"], (body, r.text)
    r = remesh(None, content=b'{"resolution": NaN}')
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert remesh({}, job="0" * 32).status_code == 404
    assert client.post(f"/v1/jobs/{source}/remesh", json={}).status_code == 401
    # Over HTTP a texture is asked for at submit time too only as a GLB.
    r = submit(client, photo, {**HTTP_FAST, "texture_size": 256, "format": "obj"})
    assert r.status_code == 400 and "cannot carry a texture over HTTP" in r.json()["error"]["message"]


def test_remesh_of_an_unfinished_job_is_a_conflict(client, photo):
    first = submit(client, photo, HTTP_FAST).json()["id"]
    queued = submit(client, photo, HTTP_FAST).json()["id"]
    r = client.post(f"/v1/jobs/{queued}/remesh", json={}, headers=AUTH)
    assert r.status_code == 409 and r.json()["error"]["kind"] == "conflict"
    wait_done(client, first)
    wait_done(client, queued)


def test_remesh_jobs_come_back_after_a_restart(tmp_path, tiny_pipe, photo):
    jobs = tmp_path / "jobs"
    manager = JobManager(jobs, lambda: tiny_pipe)
    with TestClient(create_app(manager, AppConfig(token=TOKEN, preset="tiny"))) as c:
        source = submit(c, photo, HTTP_FAST).json()["id"]
        wait_done(c, source)
        new = c.post(f"/v1/jobs/{source}/remesh", json={"resolution": 32}, headers=AUTH).json()["id"]
        wait_done(c, new)
    restarted = JobManager(jobs, lambda: tiny_pipe)
    assert restarted.status(new)["remesh_of"] == source and restarted.status(new)["state"] == "done"
    assert restarted.status(source)["remesh_of"] is None


# -- issue #31: a damaged record, the umask, nothing half made -----------------------------------------------------


def test_the_pipelines_remesh_of_a_deeply_nested_meta_json_is_bad_input(tiny_pipe, tmp_path):
    from server.common.synthetic import write_views_dir

    run = tmp_path / "run"
    write_views_dir(run / "views", polar=75.0)
    (run / "meta.json").write_text("[" * 100_000 + "]" * 100_000)  # a RecursionError in json.loads
    with pytest.raises(BadInputError, match="nested too deeply"):  # the server's remesh: bad_input, not internal
        tiny_pipe.remesh(run, GenerateOptions(resolution=32))
    (run / "meta.json").write_text('{"polar": 75}')
    with pytest.raises(BadInputError, match="lacks seed, background"):
        tiny_pipe.remesh(run, GenerateOptions(resolution=32))


def test_a_real_run_writes_every_file_with_the_umask_and_leaves_no_partial_folder(runs):
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    files = [p for p in runs.rglob("*") if p.is_file()]
    assert any(p.name == "meta.json" for p in files) and any(p.name == "pose.json" for p in files)
    wrong = {str(p.relative_to(runs)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
             if stat.S_IMODE(p.stat().st_mode) != 0o666 & ~umask}
    assert wrong == {}
    folders = {p.name for p in runs.iterdir() if p.is_dir()}  # other tests of this module add their own folders
    assert {"asset.one2345", "plain.one2345"} <= folders
    assert not [name for name in folders if name.endswith(".incomplete")]
