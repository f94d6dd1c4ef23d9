"""Issue #26: a finished run's views baked onto a given mesh — the pipeline function, the CLI and the HTTP endpoint.

What must hold: a mesh with its own UVs comes back on exactly those UVs with the views' colours on them (a known
colour field: the synthetic sphere's octant colours); a mesh without UVs is unwrapped afresh and the outcome says so;
mesh files keep their UVs through the reader (GLB TEXCOORD_0, OBJ vt with v flipped, polygons fanned); a bad mesh
upload is refused with 400 naming the problem; ``one2345 bake`` writes the file and checks its inputs before torch.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from server.common.errors import BadInputError, CancelledError
from server.common.mesh_io import Mesh, export_mesh, load_mesh, load_mesh_with_uvs
from server.common.synthetic import AMBIENT, LIGHT_DIRECTION, PALETTE, SPHERE_REGION_OFFSET, write_views_dir
from server.pipeline import One2345Pipeline
from server.pipeline.bake import bake_run
from server.service.app import AppConfig, create_app
from server.service.cli import main
from server.service.jobs import JobManager
from server.stages.asset import TexturedMesh, export_textured_mesh

REPO = Path(__file__).resolve().parents[2]
TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RADIUS = 0.35  # the synthetic "sphere" shape
SIZE = 256


def uv_sphere(rings: int = 24, segments: int = 48) -> tuple[Mesh, np.ndarray, np.ndarray]:
    """A latitude-longitude sphere of the synthetic shape's radius with its own UVs: (mesh, uvs [T, 2] in glTF's
    convention, uv_faces [F, 3]). The UVs are the sphere's equirectangular map squeezed into [0.05, 0.95]², with a
    seam (split UV vertices) at longitude 0."""
    theta = np.linspace(0, np.pi, rings + 1)  # polar, from +z
    phi = np.linspace(0, 2 * np.pi, segments + 1)  # longitude; the last column repeats the first (the seam)
    tt, pp = np.meshgrid(theta, phi, indexing="ij")
    grid_uv = np.stack([0.05 + 0.9 * pp / (2 * np.pi), 0.05 + 0.9 * tt / np.pi], axis=-1).reshape(-1, 2)
    positions = RADIUS * np.stack([np.sin(tt) * np.cos(pp), np.sin(tt) * np.sin(pp), np.cos(tt)], -1).reshape(-1, 3)
    index = np.arange((rings + 1) * (segments + 1)).reshape(rings + 1, segments + 1)
    a, b = index[:-1, :-1].ravel(), index[:-1, 1:].ravel()
    c, d = index[1:, :-1].ravel(), index[1:, 1:].ravel()
    grid_faces = np.concatenate([np.stack([a, c, d], 1), np.stack([a, d, b], 1)])  # outward (counter-clockwise)
    grid_faces = grid_faces[np.linalg.norm(np.cross(positions[grid_faces[:, 1]] - positions[grid_faces[:, 0]],
                                                    positions[grid_faces[:, 2]] - positions[grid_faces[:, 0]]),
                                           axis=1) > 1e-12]  # the poles' zero-area triangles
    # Geometry: one vertex per position (the seam column and the pole rows welded); UVs keep the grid's corners.
    _, weld, = np.unique(np.round(positions, 9), axis=0, return_inverse=True)
    weld = weld.reshape(-1)
    vertices = np.zeros((weld.max() + 1, 3))
    vertices[weld] = positions
    return Mesh(vertices.astype(np.float32), weld[grid_faces]), grid_uv.astype(np.float32), grid_faces


def sphere_colour(points: np.ndarray) -> np.ndarray:
    """The synthetic renderer's colour of sphere surface points: octant albedo × world-fixed Lambert shading."""
    normal = points / np.linalg.norm(points, axis=1, keepdims=True)
    octant = 4 * (normal[:, 0] > 0) + 2 * (normal[:, 1] > 0) + (normal[:, 2] > 0)
    shading = AMBIENT + (1 - AMBIENT) * np.clip(normal @ LIGHT_DIRECTION, 0, 1)
    return PALETTE[SPHERE_REGION_OFFSET + octant] * shading[:, None]


def texel_truth(uvs: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """For the UV sphere's map: (texel indices [N, 2] (row, column) well inside an octant, away from octant borders and
    the map's edges; their true colours [N, 3])."""
    rows, cols = np.mgrid[0:size, 0:size]
    u, v = (cols.ravel() + 0.5) / size, (rows.ravel() + 0.5) / size
    phi, theta = (u - 0.05) / 0.9 * 2 * np.pi, (v - 0.05) / 0.9 * np.pi
    inside = (u > 0.07) & (u < 0.93) & (v > 0.1) & (v < 0.9)
    normal = np.stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)], 1)
    clear = inside & (np.abs(normal) > 0.15).all(axis=1)  # off the octant borders, where a texel could straddle two
    return np.stack([rows.ravel()[clear], cols.ravel()[clear]], 1), sphere_colour(normal[clear])


@pytest.fixture(scope="module")
def sphere_run(tmp_path_factory) -> Path:
    """A run folder whose views are exact renders of the synthetic sphere (a generator that shows the truth)."""
    run = tmp_path_factory.mktemp("sphere") / "sphere.one2345"
    write_views_dir(run / "views", polar=75.0, shape="sphere")
    (run / "meta.json").write_text(json.dumps({"seed": 1, "polar": 75.0, "elevation": 15.0}))
    return run


@pytest.fixture(scope="module")
def sphere_glb(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """The UV sphere as a GLB with its own UVs (written by the project's textured exporter, a blank texture), and the
    UV triangles [F, 3, 2] it carries."""
    mesh, uvs, uv_faces = uv_sphere()
    path = tmp_path_factory.mktemp("mesh") / "retopo.glb"
    pairs, corner = np.unique(np.stack([mesh.faces.ravel(), uv_faces.ravel()], 1), axis=0, return_inverse=True)
    textured = TexturedMesh(vertices=mesh.vertices[pairs[:, 0]], faces=corner.reshape(-1, 3), uvs=uvs[pairs[:, 1]],
                            texture=np.zeros((8, 8, 3), np.uint8))
    export_textured_mesh(textured, path, vertex_colors=False)
    return path, uvs[uv_faces]


def glb_parts(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    assert data[:4] == b"glTF"
    (length,) = struct.unpack_from("<I", data, 12)
    return json.loads(data[20 : 20 + length]), data[20 + length + 8 :]


def glb_texture(path: Path) -> np.ndarray:
    gltf, blob = glb_parts(path)
    view = gltf["bufferViews"][gltf["images"][0]["bufferView"]]
    start = view.get("byteOffset", 0)
    return np.asarray(Image.open(io.BytesIO(blob[start : start + view["byteLength"]])).convert("RGB"))


def uv_triangles(path: Path) -> np.ndarray:
    """[F, 3, 2] UV triangles of a mesh file, face by face."""
    _mesh, uvs = load_mesh_with_uvs(path)
    assert uvs is not None
    return uvs.uvs[uvs.faces]


def assert_known_colours_on_uvs(texture: np.ndarray, uvs: np.ndarray) -> None:
    """The baked texture holds the sphere's true colours at texels away from octant borders."""
    texels, truth = texel_truth(uvs, texture.shape[0])
    got = texture[texels[:, 0], texels[:, 1]].astype(np.float64)
    error = np.abs(got - truth).max(axis=1)
    assert texels.shape[0] > 0.3 * texture.shape[0] ** 2
    assert np.median(error) < 4, np.median(error)
    assert np.mean(error < 12) > 0.95, np.mean(error < 12)


# -- the mesh reader keeps UVs --------------------------------------------------------------------------------------


def test_mesh_files_keep_their_uvs(sphere_glb, tmp_path):
    glb, triangles = sphere_glb
    assert np.allclose(uv_triangles(glb), triangles, atol=1e-6)
    # OBJ: vt lines are bottom-left based, so v is flipped to glTF's; a quad is fanned into two triangles.
    (tmp_path / "quad.obj").write_text("v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nvt 0 0\nvt 1 0\nvt 1 1\nvt 0 1\n"
                                       "vn 0 0 1\nf 1/1/1 2/2/1 3/3/1 4/4/1\n")
    mesh, uvs = load_mesh_with_uvs(tmp_path / "quad.obj")
    assert mesh.faces.tolist() == [[0, 1, 2], [0, 2, 3]]
    assert np.allclose(uvs.uvs[uvs.faces[0]], [[0, 1], [1, 1], [1, 0]])
    # A face without vt (in a file where others have them) gets a zero-area UV triangle, which the UV check counts.
    (tmp_path / "part.obj").write_text("v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nvt 0 0\nvt 1 0\nvt 1 1\n"
                                       "f 1/1 2/2 3/3\nf 1 3 4\n")
    _, uvs = load_mesh_with_uvs(tmp_path / "part.obj")
    assert np.ptp(uvs.uvs[uvs.faces[1]], axis=0).max() == 0
    # Files without UVs say so; load_mesh is unchanged.
    mesh, _, _ = uv_sphere(4, 8)
    for suffix in (".ply", ".glb", ".obj"):
        export_mesh(mesh, tmp_path / f"plain{suffix}")
        assert load_mesh_with_uvs(tmp_path / f"plain{suffix}")[1] is None
        assert np.allclose(load_mesh(tmp_path / f"plain{suffix}").vertices, mesh.vertices, atol=1e-6)


@pytest.mark.parametrize(("name", "data", "needle"), [
    ("bad.glb", b"glTF\x02\x00\x00\x00" + b"\x00" * 12, "could not be read as glTF binary"),
    ("bad.ply", b"ply\nformat binary_little_endian 1.0\nelement vertex 5\nproperty float x\nend_header\n",
     "could not be read as PLY"),
    ("bad.obj", b"v 0 0 0\nf 1 2 3\n", "indices outside 1..1"),
    ("bad.obj", b"v 0 0 0\nv 1 0 0\nv 0 1 0\nvt 0 0\nf 1/7 2/1 3/1\n", "texture indices outside 1..1"),
    ("bad.obj", b"\xff\xfe binary", "could not be read as OBJ"),
])
def test_a_broken_mesh_file_is_bad_input(tmp_path, name, data, needle):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(BadInputError, match=needle):
        load_mesh_with_uvs(tmp_path / name)


# -- the pipeline function ------------------------------------------------------------------------------------------


def test_bake_run_puts_the_views_colours_on_the_meshs_own_uvs(sphere_run, sphere_glb, tmp_path):
    glb, triangles = sphere_glb
    reports = []
    out = bake_run(sphere_run, glb, tmp_path / "baked.glb", texture_size=SIZE, progress=reports.append)
    assert out.uv_source == "mesh" and out.uv_check["usable"] and out.uv_check["degenerate_faces"] == 0
    assert out.files == [tmp_path / "baked.glb"] and out.meta_path == tmp_path / "baked.meta.json"
    assert np.allclose(uv_triangles(out.files[0]), triangles, atol=1e-6)  # the very UVs it came with
    assert_known_colours_on_uvs(glb_texture(out.files[0]), triangles)
    meta = json.loads(out.meta_path.read_text())
    assert meta["bake"]["uv_source"] == "mesh" and meta["bake"]["uv_check"] == out.uv_check
    assert meta["seed"] == 1 and meta["textured"] is True and meta["faces"] == len(triangles)
    assert [r.stage for r in reports][::2] == ["load", "bake", "export"] and reports[-1].fraction == 1.0
    # The same mesh as an OBJ (vt flipped on disk) gives the same UVs and texture.
    obj = bake_run(sphere_run, out.files[0], tmp_path / "again.obj", texture_size=SIZE)
    assert obj.uv_source == "mesh" and len(obj.files) == 3
    assert np.allclose(uv_triangles(obj.files[0]), triangles, atol=1e-6)


def test_a_mesh_without_uvs_is_unwrapped_and_the_outcome_says_so(sphere_run, tmp_path):
    mesh, _, _ = uv_sphere()
    export_mesh(mesh, tmp_path / "plain.ply")
    out = bake_run(sphere_run, tmp_path / "plain.ply", tmp_path / "plain.glb", texture_size=SIZE)
    assert out.uv_source == "unwrap" and out.uv_check is None and "no UVs" in out.uv_reason
    assert json.loads(out.meta_path.read_text())["bake"]["uv_source"] == "unwrap"
    assert out.coverage > 0.9
    # keep_uvs=False unwraps a mesh that has UVs; degenerate UVs are not used and the check says why.
    mesh, _uvs, _uv_faces = uv_sphere()
    assert bake_run(sphere_run, tmp_path / "plain.glb", tmp_path / "fresh.glb", texture_size=SIZE,
                    keep_uvs=False).uv_source == "unwrap"
    flat = TexturedMesh(vertices=mesh.vertices, faces=mesh.faces, uvs=np.full((len(mesh.vertices), 2), 0.5,
                                                                              np.float32),
                        texture=np.zeros((8, 8, 3), np.uint8))
    export_textured_mesh(flat, tmp_path / "flat.glb", vertex_colors=False)
    out = bake_run(sphere_run, tmp_path / "flat.glb", tmp_path / "flat_baked.glb", texture_size=SIZE)
    assert out.uv_source == "unwrap" and not out.uv_check["usable"]
    assert out.uv_check["degenerate_faces"] == len(mesh.faces) and "not usable" in out.uv_reason


def test_vertex_colours_and_ply_take_the_same_sampler(sphere_run, sphere_glb, tmp_path):
    glb, _ = sphere_glb
    out = bake_run(sphere_run, glb, tmp_path / "coloured.ply")
    assert out.texture_size is None and out.uv_source is None
    mesh = load_mesh(out.files[0])
    clear = (np.abs(mesh.vertices / RADIUS) > 0.2).all(axis=1)
    error = np.abs(mesh.colors[clear].astype(float) - sphere_colour(mesh.vertices[clear].astype(float))).max(axis=1)
    assert np.median(error) < 4


def test_bake_run_refuses_bad_inputs_and_stops_when_cancelled(sphere_run, sphere_glb, tmp_path):
    glb, _ = sphere_glb
    cases = [
        ((tmp_path / "nowhere", glb, tmp_path / "x.glb"), {}, "does not exist"),
        ((sphere_run, tmp_path / "missing.glb", tmp_path / "x.glb"), {}, "does not exist"),
        ((sphere_run, tmp_path / "mesh.stl", tmp_path / "x.glb"), {}, "allowed: .ply, .glb, .obj"),
        ((sphere_run, glb, tmp_path / "x.glb"), {"texture_size": 100}, "texture size 100 is not allowed"),
        ((sphere_run, glb, tmp_path / "x.glb"), {"format": "obj"}, "disagrees with the output"),
    ]
    for args, kwargs, needle in cases:
        with pytest.raises(BadInputError, match=needle):
            bake_run(*args, **kwargs)
    with pytest.raises(CancelledError):
        bake_run(sphere_run, glb, tmp_path / "x.glb", should_cancel=lambda: True)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing half made


# -- the CLI --------------------------------------------------------------------------------------------------------


def test_cli_bake_writes_the_file(sphere_run, sphere_glb, tmp_path, capsys):
    glb, triangles = sphere_glb
    out = tmp_path / "cli.glb"
    assert main(["bake", str(sphere_run), str(glb), "-o", str(out), "--texture", str(SIZE)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == str(out)
    assert "its own UVs" in captured.err and (tmp_path / "cli.meta.json").is_file()
    assert np.allclose(uv_triangles(out), triangles, atol=1e-6)
    assert main(["bake", str(sphere_run), str(glb), "-o", str(tmp_path / "u.glb"), "--texture", str(SIZE),
                 "--no-keep-uvs"]) == 0
    assert "fresh unwrap" in capsys.readouterr().err
    assert main(["bake", str(sphere_run), str(glb), "-o", str(tmp_path / "v.ply"), "--texture", "512"]) == 2
    assert "PLY, which has no texture" in capsys.readouterr().err


_PROBE = """
import json, sys
from server.service.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "heavy": sorted(m for m in sys.modules if m in ("torch", "scipy", "cv2"))}))
"""


@pytest.mark.parametrize(("argv", "needle"), [
    (["bake", "{tmp}/nowhere", "{tmp}/m.glb", "-o", "{tmp}/x.glb"], "does not exist"),
    (["bake", "{run}", "{tmp}/missing.glb", "-o", "{tmp}/x.glb"], "does not exist"),
    (["bake", "{run}", "{tmp}/m.stl", "-o", "{tmp}/x.glb"], "allowed: .ply, .glb, .obj"),
    (["bake", "{run}", "{tmp}/m.glb", "-o", "{tmp}/x.stl"], "must end in"),
    (["bake", "{run}", "{tmp}/m.glb", "-o", "{tmp}/x.glb", "--texture", "64"], "texture size 64"),
    (["bake", "{run}", "{tmp}/m.glb", "-o", "{tmp}/x.glb", "--texture", "512", "--vertex-colors"], "--vertex-colors"),
])
def test_cli_bake_checks_its_inputs_before_torch_loads(sphere_run, tmp_path, argv, needle):
    (tmp_path / "m.glb").write_bytes(b"glTF")
    (tmp_path / "m.stl").write_bytes(b"solid")
    argv = [a.format(tmp=tmp_path, run=sphere_run) for a in argv]
    done = subprocess.run([sys.executable, "-c", _PROBE, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["code"] == 2 and needle in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert report["heavy"] == [], report


# -- the HTTP endpoint ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pipe() -> One2345Pipeline:
    return One2345Pipeline.from_preset("tiny", device="cpu")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_pipe):
    """A server with one finished tiny-preset job: (client, jobs folder, the job's id)."""
    jobs = tmp_path_factory.mktemp("jobs")
    manager = JobManager(jobs, lambda: tiny_pipe)
    image = np.full((128, 128, 3), 255, np.uint8)
    image[30:98, 30:98] = (200, 40, 40)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    with TestClient(create_app(manager, AppConfig(token=TOKEN, preset="tiny"))) as client:
        options = {"steps_stage1": 2, "steps_stage2": 2, "resolution": 32, "seed": 3, "elevation": 15}
        r = client.post("/v1/jobs", files={"image": ("red.png", buffer.getvalue(), "image/png")},
                        data={"options": json.dumps(options)}, headers=AUTH)
        assert r.status_code == 202, r.text
        source = r.json()["id"]
        assert wait_done(client, source)["state"] == "done"
        yield client, jobs, source


def wait_done(client: TestClient, job_id: str, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
        if status["state"] in ("done", "failed", "cancelled"):
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {status}")


def post_bake(client: TestClient, job: str, name: str, data: bytes, options: dict | None = None):
    extra = {"data": {"options": json.dumps(options)}} if options is not None else {}
    return client.post(f"/v1/jobs/{job}/bake", files={"mesh": (name, data, "application/octet-stream")},
                       headers=AUTH, **extra)


def test_bake_endpoint_round_trips_a_mesh_with_its_own_uvs(server, sphere_glb, tmp_path):
    client, jobs, source = server
    glb, triangles = sphere_glb
    source_status = client.get(f"/v1/jobs/{source}", headers=AUTH).json()
    r = post_bake(client, source, "retopo.glb", glb.read_bytes(), {"texture_size": SIZE})
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    status = wait_done(client, job)
    assert status["state"] == "done", status["error"]
    assert status["bake_of"] == source and status["remesh_of"] is None
    assert status["result"]["textured"] is True and status["result"]["uv_source"] == "mesh"
    assert status["result"]["texture_size"] == SIZE and status["result"]["faces"] == len(triangles)
    result = tmp_path / "result.glb"
    result.write_bytes(client.get(status["result"]["url"], headers=AUTH).content)
    assert np.allclose(uv_triangles(result), triangles, atol=1e-6)  # the uploaded UVs, unchanged
    texture = glb_texture(result)
    # The tiny preset's views are random, but the texture comes from them: not blank where they see the mesh.
    assert texture.reshape(-1, 3).std(axis=0).max() > 2 and len(np.unique(texture.reshape(-1, 3), axis=0)) > 100
    meta = client.get(status["result"]["meta_url"], headers=AUTH).json()
    assert meta["bake"]["uv_source"] == "mesh" and meta["bake"]["mesh_file"] == "bake_input.glb"
    assert meta["seed"] == 3  # the source run's record, carried over
    assert client.get(f"/v1/jobs/{source}", headers=AUTH).json() == source_status  # the source as it was
    stages = (jobs / job / "log.txt").read_text()
    assert "stage bake" in stages and "stage reconstruct" not in stages

    # With views that show the truth (the source's views replaced on disk by exact renders of the synthetic sphere),
    # the known colour field comes back on the uploaded UVs through the whole HTTP path.
    views = jobs / source / "run" / "views"
    for f in views.iterdir():
        f.unlink()
    write_views_dir(views, polar=75.0, shape="sphere")
    status = wait_done(client, post_bake(client, source, "retopo.glb", glb.read_bytes(),
                                         {"texture_size": SIZE}).json()["id"])
    assert status["state"] == "done" and status["result"]["uv_source"] == "mesh", status["error"]
    result.write_bytes(client.get(status["result"]["url"], headers=AUTH).content)
    assert np.allclose(uv_triangles(result), triangles, atol=1e-6)
    assert_known_colours_on_uvs(glb_texture(result), triangles)


def test_bake_endpoint_vertex_colours_and_obj(server, sphere_glb, tmp_path):
    client, _, source = server
    glb, _triangles = sphere_glb
    r = post_bake(client, source, "retopo.glb", glb.read_bytes(), {"format": "ply"})
    status = wait_done(client, r.json()["id"])
    assert status["state"] == "done", status["error"]
    assert status["result"]["format"] == "ply" and status["result"]["textured"] is False
    (tmp_path / "r.ply").write_bytes(client.get(status["result"]["url"], headers=AUTH).content)
    assert load_mesh(tmp_path / "r.ply").colors is not None
    # An OBJ upload without UVs (quads): triangulated, unwrapped, baked into a GLB.
    text = "v 0 0 0\nv 0.3 0 0\nv 0.3 0.3 0\nv 0 0.3 0\nv 0 0 0.3\nv 0.3 0 0.3\nv 0.3 0.3 0.3\nv 0 0.3 0.3\n" \
           "f 1 4 3 2\nf 5 6 7 8\nf 1 2 6 5\nf 2 3 7 6\nf 3 4 8 7\nf 4 1 5 8\n"
    r = post_bake(client, source, "cube.obj", text.encode(), {"texture_size": SIZE, "keep_uvs": True})
    status = wait_done(client, r.json()["id"])
    assert status["state"] == "done", status["error"]
    assert status["result"]["uv_source"] == "unwrap" and status["result"]["faces"] == 12


def test_bad_bake_requests_are_refused(server, sphere_glb):
    client, jobs, source = server
    glb, _ = sphere_glb
    before = sorted(p.name for p in jobs.iterdir())
    cases = [
        ("m.glb", b"", None, 400, "is empty"),
        ("m.glb", b"not a mesh at all", None, 400, "is not a GLB file"),
        ("m.stl", b"\x00\x01\x02\xff" * 10, None, 400, "is not a GLB, OBJ or PLY file"),
        ("m.obj", b"v 0 0 0\nf 1 2 3\n", None, 400, "indices outside 1..1"),
        ("m.glb", b"glTF\x02\x00\x00\x00" + b"\x00" * 12, None, 400, "could not be read as glTF binary"),
        ("m.glb", glb.read_bytes(), {"seed": 4}, 400, "are unknown"),
        ("m.glb", glb.read_bytes(), {"texture_size": 64}, 400, "texture size 64 is not allowed"),
        ("m.glb", glb.read_bytes(), {"texture_size": 512, "format": "obj"}, 400, "cannot carry a texture over HTTP"),
        ("m.glb", glb.read_bytes(), {"keep_uvs": "yes"}, 400, "keep_uvs"),
    ]
    for name, data, options, code, needle in cases:
        r = post_bake(client, source, name, data, options)
        assert r.status_code == code and needle in r.json()["error"]["message"], (name, options, r.text)
        assert "/tmp" not in r.text and "one2345-mesh-" not in r.text  # no server path
    assert post_bake(client, "0" * 32, "m.glb", glb.read_bytes()).status_code == 404
    assert client.post(f"/v1/jobs/{source}/bake", files={"mesh": ("m.glb", glb.read_bytes())}).status_code == 401
    assert sorted(p.name for p in jobs.iterdir()) == before  # nothing was queued


# -- the bake job's record, checked on load ------------------------------------------------------------------------


def test_a_bake_jobs_record_is_checked_field_by_field():
    from server.service.jobs import Job, RecordError
    from tests.server.test_job_records import FOLDER, GOOD

    good = {**GOOD, "bake_of": "b" * 32, "bake": {"mesh": "bake_input.obj", "keep_uvs": False},
            "result": {**GOOD["result"], "uv_source": "mesh"}}
    job = Job.from_record(FOLDER, good)
    assert job.bake_of == "b" * 32 and job.to_public()["bake_of"] == "b" * 32
    assert job.to_public()["result"]["uv_source"] == "mesh"
    bad = [
        ({"bake_of": "not-an-id"}, "bake_of"),
        ({"bake": {"mesh": "../../etc/passwd", "keep_uvs": True}}, "bake"),
        ({"bake": {"mesh": "bake_input.glb", "keep_uvs": "yes"}}, "bake"),
        ({"bake": {"mesh": "bake_input.glb", "keep_uvs": True, "extra": 1}}, "bake"),
        ({"bake": None}, "bake"),  # bake_of without its settings
        ({"remesh_of": "c" * 32}, "bake_of"),  # a job is a re-mesh or a bake, not both
        ({"result": {**GOOD["result"], "uv_source": "xatlas"}}, "result.uv_source"),
    ]
    for change, name in bad:
        with pytest.raises(RecordError) as caught:
            Job.from_record(FOLDER, {**good, **change})
        assert caught.value.field == name, (change, caught.value)


def _raw_glb(path, positions: np.ndarray, uvs: np.ndarray, colors: np.ndarray, faces: np.ndarray) -> None:
    """A one-primitive GLB with POSITION, TEXCOORD_0, COLOR_0 and indices and no material, as an artist's export
    without a texture is: written by hand so no library decides what to keep."""
    import json
    import struct

    arrays = [positions.astype("<f4"), uvs.astype("<f4"), colors.astype("<f4"), faces.astype("<u4").ravel()]
    blob, views, offset = b"", [], 0
    for a in arrays:
        data = a.tobytes()
        views.append({"buffer": 0, "byteOffset": offset, "byteLength": len(data)})
        blob += data
        offset += len(data)
    n = len(positions)
    gltf = {"asset": {"version": "2.0"}, "buffers": [{"byteLength": len(blob)}], "bufferViews": views,
            "accessors": [{"bufferView": 0, "componentType": 5126, "count": n, "type": "VEC3",
                           "min": positions.min(0).tolist(), "max": positions.max(0).tolist()},
                          {"bufferView": 1, "componentType": 5126, "count": n, "type": "VEC2"},
                          {"bufferView": 2, "componentType": 5126, "count": n, "type": "VEC4"},
                          {"bufferView": 3, "componentType": 5125, "count": faces.size, "type": "SCALAR"}],
            "meshes": [{"primitives": [{"attributes": {"POSITION": 0, "TEXCOORD_0": 1, "COLOR_0": 2},
                                        "indices": 3}]}],
            "nodes": [{"mesh": 0}], "scenes": [{"nodes": [0]}], "scene": 0}
    text = json.dumps(gltf).encode()
    text += b" " * (-len(text) % 4)
    blob += b"\0" * (-len(blob) % 4)
    body = struct.pack("<II", len(text), 0x4E4F534A) + text + struct.pack("<II", len(blob), 0x004E4942) + blob
    path.write_bytes(struct.pack("<III", 0x46546C67, 2, 12 + len(body)) + body)


def test_a_glb_without_material_keeps_its_uvs_beside_vertex_colours(tmp_path):
    positions = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], dtype=np.float64)
    uvs = np.array([[0.1, 0.2], [0.9, 0.2], [0.9, 0.8], [0.1, 0.8]])
    colors = np.tile([0.5, 0.25, 1.0, 1.0], (4, 1))
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    _raw_glb(tmp_path / "artist.glb", positions, uvs, colors, faces)
    mesh, found = load_mesh_with_uvs(tmp_path / "artist.glb")
    assert found is not None, "TEXCOORD_0 was dropped"
    assert np.allclose(found.uvs[found.faces], uvs[faces], atol=1e-6)
    assert mesh.colors is not None and len(mesh.vertices) == 4
