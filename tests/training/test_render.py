"""End-to-end tests of ``one2345-train render``: real BlenderProc renders on the bpy 4.2 wheel, checked geometrically.

The renders are small (32–64 px, a few samples) so the whole file runs in about a minute on two cores. Geometry is
checked against independent computations: the spec's camera formula written out here, a point-to-triangle distance
written out here, and the mesh read with trimesh.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from server.common.errors import BadInputError
from training.cli import build_parser, main
from training.render import driver

REPO = Path(__file__).resolve().parents[2]
BPY42 = Path(os.environ.get("ONE2345_BPY42_PYTHON") or REPO / ".venv-bpy42" / "bin" / "python")
SIZE = 64
FOCAL = 280.0 * SIZE / 256


@pytest.fixture(scope="module", autouse=True)
def bpy42() -> Path:
    """The bpy 4.2 interpreter must exist: a missing one is a broken setup, not an optional dependency."""
    if not BPY42.exists():
        pytest.fail(
            f"{BPY42} is missing: run .ci/blender-envs to build .venv-bpy42 (bpy 4.2.0 + BlenderProc 2.8.0); "
            "CI always has it"
        )
    return BPY42


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two procedural objects at 64², polar drawn from 50..100 (seeds 0 and 1 land on both sides of 75)."""
    out = tmp_path_factory.mktemp("render")
    args = ["render", "--source", "procedural", "--count", "2", "--out", str(out), "--size", str(SIZE)]
    args += ["--samples", "4", "--polar", "50:100", "--threads", "2"]
    assert main(args) == 0
    return out


def _objects(out: Path) -> list[Path]:
    return sorted(p for p in (out / "000-000").iterdir() if not p.name.startswith("."))


def _spec_c2w(polar: float, azimuth: float) -> np.ndarray:
    """Spec §3.2 written out: centre 1.2·(sin a sin φ, −cos a sin φ, cos φ), x = ẑ × f, y = f × x, z = f."""
    phi, a = math.radians(polar), math.radians(azimuth)
    centre = 1.2 * np.array([math.sin(a) * math.sin(phi), -math.cos(a) * math.sin(phi), math.cos(phi)])
    forward = centre / np.linalg.norm(centre)
    right = np.cross([0.0, 0.0, 1.0], forward)
    right /= np.linalg.norm(right)
    up = np.cross(forward, right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, forward, centre
    return c2w


def _spec_angles(polar: int) -> dict[str, tuple[float, float]]:
    """Spec §3.1 written out: ids in pose.json order → (polar, azimuth)."""
    if polar <= 75:
        stage1 = {f"{i}.png": (polar, 30 + 90 * i) for i in range(4)}
        stage1 |= {f"{4 + i}.png": (polar + 30, 60 + 90 * i) for i in range(4)}
    else:
        stage1 = {f"{i}.png": (polar, 30 + 90 * i) for i in range(4)}
        stage1 |= {f"{8 + i}.png": (polar - 30, 60 + 90 * i) for i in range(4)}
    angles = dict(stage1)
    for view_id, (p, a) in stage1.items():
        i = view_id.removesuffix(".png")
        for j, (dp, da) in enumerate([(-10, 0), (10, 0), (0, -10), (0, 10)]):
            angles[f"{i}_{j}.png"] = (p + dp, a + da)
    return angles


def _read_view(folder: Path, k: int) -> tuple[np.ndarray, np.ndarray]:
    """alpha [H, W] uint8 and depth [H, W] metres of target view k."""
    alpha = np.asarray(Image.open(folder / f"view_{k}.png"))[..., 3]
    depth_image = Image.open(folder / f"view_{k}_depth_mm.png")
    depth = np.asarray(depth_image).astype(np.float64) / 1000.0
    return alpha, depth


def _back_project(depth: np.ndarray, c2w: np.ndarray, k: np.ndarray) -> np.ndarray:
    """World points [N, 3] of the pixels with depth > 0; pixel (i, j) has its centre at (j + 0.5, i + 0.5)."""
    rows, cols = np.nonzero(depth > 0)
    z = depth[rows, cols]
    x = (cols + 0.5 - k[0, 2]) * z / k[0, 0]
    y = (rows + 0.5 - k[1, 2]) * z / k[1, 1]
    return np.stack([x, -y, -z], -1) @ c2w[:3, :3].T + c2w[:3, 3]  # OpenCV camera → OpenGL camera → world


def _project(points: np.ndarray, c2w: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel column, row (continuous) and z-depth of world points in an OpenGL camera."""
    camera = (points - c2w[:3, 3]) @ c2w[:3, :3]
    z = -camera[:, 2]
    return k[0, 0] * camera[:, 0] / z + k[0, 2], -k[1, 1] * camera[:, 1] / z + k[1, 2], z


def _distance_to_triangles(points: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Exact distance [N] from points [N, 3] to the closest of triangles [F, 3, 3] (Ericson's region tests)."""
    best = np.full(len(points), np.inf)
    p = points[:, None]
    for start in range(0, len(triangles), 256):
        t = triangles[start : start + 256]
        a, b, c = t[None, :, 0], t[None, :, 1], t[None, :, 2]
        ab, ac = b - a, c - a
        d1, d2 = ((p - a) * ab).sum(-1), ((p - a) * ac).sum(-1)
        d3, d4 = ((p - b) * ab).sum(-1), ((p - b) * ac).sum(-1)
        d5, d6 = ((p - c) * ab).sum(-1), ((p - c) * ac).sum(-1)
        va, vb, vc = d3 * d6 - d5 * d4, d5 * d2 - d1 * d6, d1 * d4 - d3 * d2
        with np.errstate(divide="ignore", invalid="ignore"):
            denom = va + vb + vc
            closest = a + ab * (vb / denom)[..., None] + ac * (vc / denom)[..., None]
            regions = [
                ((va <= 0) & (d4 >= d3) & (d5 >= d6), b + (c - b) * ((d4 - d3) / ((d4 - d3) + (d5 - d6)))[..., None]),
                ((vb <= 0) & (d2 >= 0) & (d6 <= 0), a + ac * (d2 / (d2 - d6))[..., None]),
                ((vc <= 0) & (d1 >= 0) & (d3 <= 0), a + ab * (d1 / (d1 - d3))[..., None]),
                ((d6 >= 0) & (d5 <= d6), np.broadcast_to(c, closest.shape)),
                ((d3 >= 0) & (d4 <= d3), np.broadcast_to(b, closest.shape)),
                ((d1 <= 0) & (d2 <= 0), np.broadcast_to(a, closest.shape)),
            ]
        for mask, point in regions:
            closest = np.where(mask[..., None], point, closest)
        best = np.minimum(best, np.linalg.norm(p - closest, axis=-1).min(axis=1))
    return best


def test_distance_helper_known_values() -> None:
    triangle = np.array([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    points = np.array([[0.2, 0.2, 0.5], [2.0, 0.0, 0.0], [-1.0, -1.0, 0.0], [1.0, 1.0, 0.0]])
    expected = [0.5, 1.0, math.sqrt(2), math.sqrt(2) / 2]
    np.testing.assert_allclose(_distance_to_triangles(points, triangle), expected, atol=1e-12)


def test_layout_and_pose_json(rendered: Path) -> None:
    objects = _objects(rendered)
    assert [p.name for p in objects] == ["proc-000000", "proc-000001"]
    polars = []
    for folder in objects:
        meta = json.loads((folder / "meta.json").read_text())
        polar = meta["polar"]
        polars.append(polar)
        expected_files = {f"view_{k}.png" for k in range(8)} | {f"view_{k}_depth_mm.png" for k in range(8)}
        expected_files |= {f"view_{k}_{j}_10.png" for k in range(8) for j in range(4)}
        expected_files |= {"pose.json", "mesh.ply", "meta.json"}
        assert {p.name for p in folder.iterdir()} == expected_files
        for name in expected_files - {"pose.json", "mesh.ply", "meta.json"}:
            image = Image.open(folder / name)
            assert image.size == (SIZE, SIZE)
            assert image.mode == ("RGBA" if "depth" not in name else "I;16")

        pose = json.loads((folder / "pose.json").read_text())
        assert list(pose) == ["intrinsics", "near_far", "c2ws"]
        np.testing.assert_allclose(pose["intrinsics"], [[FOCAL, 0, SIZE / 2], [0, FOCAL, SIZE / 2], [0, 0, 1]])
        assert pose["near_far"] == [0.5, 1.8]
        angles = _spec_angles(polar)
        assert list(pose["c2ws"]) == list(angles)
        for view_id, (p, a) in angles.items():
            np.testing.assert_allclose(pose["c2ws"][view_id], _spec_c2w(p, a), atol=1e-9, err_msg=view_id)

        # File ↔ id map: the k-th stage-1 id is view_k, its nearby id <i>_<j> is view_k_j_10.
        stage1 = list(angles)[:8]
        expected_map = {view_id: f"view_{k}.png" for k, view_id in enumerate(stage1)}
        expected_map |= {
            f"{view_id[:-4]}_{j}.png": f"view_{k}_{j}_10.png" for k, view_id in enumerate(stage1) for j in range(4)
        }
        assert meta["files"] == expected_map
    assert min(polars) <= 75 < max(polars), polars  # both stage-1b branches are covered


def test_mesh_is_normalised(rendered: Path) -> None:
    for folder in _objects(rendered):
        mesh = trimesh.load(folder / "mesh.ply", process=False)
        low, high = mesh.vertices.min(axis=0), mesh.vertices.max(axis=0)
        np.testing.assert_allclose((low + high) / 2, 0.0, atol=1e-5)
        assert (high - low).max() == pytest.approx(0.8, abs=1e-5)


def test_mask_equals_depth(rendered: Path) -> None:
    for folder in _objects(rendered):
        for k in range(8):
            alpha, depth = _read_view(folder, k)
            np.testing.assert_array_equal(alpha > 0, depth > 0, err_msg=f"{folder.name} view {k}")
            assert 0.1 < (alpha > 0).mean() < 0.9  # the object is in view and not clipped everywhere
            assert alpha[[0, 0, -1, -1], [0, -1, 0, -1]].max() == 0  # corners are background


def test_depth_lies_on_the_mesh_surface(rendered: Path) -> None:
    for folder in _objects(rendered):
        pose = json.loads((folder / "pose.json").read_text())
        k = np.array(pose["intrinsics"])
        mesh = trimesh.load(folder / "mesh.ply", process=False)
        triangles = np.asarray(mesh.triangles, dtype=np.float64)
        for view, view_id in enumerate(list(pose["c2ws"])[:8]):
            _, depth = _read_view(folder, view)
            points = _back_project(depth, np.array(pose["c2ws"][view_id]), k)
            distance = _distance_to_triangles(points, triangles)
            # Interior pixels (all four neighbours on the object): millimetre quantisation bounds them to ~0.5 mm.
            # Silhouette pixels sample the surface off the pixel centre, or took their depth from a neighbour
            # (reconcile_alpha_depth): within about a pixel's footprint (1.8 m / 70 px ≈ 26 mm at most).
            padded = np.pad(depth > 0, 1)
            interior = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])[depth > 0]
            assert interior.mean() > 0.7, (folder.name, view)
            assert np.median(distance) < 0.001, (folder.name, view)
            assert np.mean(distance[interior] < 0.002) > 0.99, (folder.name, view)
            assert distance.max() < 2 * depth.max() / k[0, 0], (folder.name, view)


def _two_view_agreement(
    depth_a: np.ndarray, c2w_a: np.ndarray, depth_b: np.ndarray, c2w_b: np.ndarray, k: np.ndarray
) -> tuple[float, float]:
    """Back-project view a's depth, project into camera b, compare with b's depth at that pixel.

    Returns:
        (matched, contradicted): fractions of a's points that b sees at the same depth (within a pixel's footprint),
        and that b sees as background or farther away (b would be looking through a's surface).
    """
    points = _back_project(depth_a, c2w_a, k)
    u, v, z = _project(points, c2w_b, k)
    cols, rows = np.floor(u).astype(int), np.floor(v).astype(int)
    inside = (cols >= 0) & (cols < SIZE) & (rows >= 0) & (rows < SIZE)
    seen = depth_b[rows[inside], cols[inside]]
    difference, footprint = seen - z[inside], z[inside] / k[0, 0]
    matched = np.mean(np.abs(difference) < footprint)
    contradicted = np.mean((seen == 0) | (difference > 2 * footprint))
    return float(matched), float(contradicted)


def test_a_point_seen_in_two_views_reprojects_consistently(rendered: Path) -> None:
    for folder in _objects(rendered):
        pose = json.loads((folder / "pose.json").read_text())
        k, ids = np.array(pose["intrinsics"]), list(pose["c2ws"])
        for a, b in [(0, 4), (2, 6), (3, 7)]:  # target views 30° apart in polar and azimuth
            _, depth_a = _read_view(folder, a)
            _, depth_b = _read_view(folder, b)
            c2w_a, c2w_b = np.array(pose["c2ws"][ids[a]]), np.array(pose["c2ws"][ids[b]])
            matched, contradicted = _two_view_agreement(depth_a, c2w_a, depth_b, c2w_b, k)
            # Points are either seen at the same depth or occluded; contradictions only along silhouettes.
            assert matched > 0.5 and contradicted < 0.08, (folder.name, a, b, matched, contradicted)
            # Control: the same images with b's camera moved by 10° (its nearby camera j = 1) disagree clearly.
            wrong = np.array(pose["c2ws"][f"{ids[b][:-4]}_1.png"])
            _, contradicted_wrong = _two_view_agreement(depth_a, c2w_a, depth_b, wrong, k)
            assert contradicted_wrong > max(0.1, 2 * contradicted), (folder.name, a, b, contradicted_wrong)


def test_nearby_views_contain_the_target_surface(rendered: Path) -> None:
    """Every surface point of target view k projects into the silhouette of each nearby view k_j (silhouettes hold
    whatever occludes what), which ties each nearby file to its pose.json camera."""
    for folder in _objects(rendered):
        pose = json.loads((folder / "pose.json").read_text())
        meta = json.loads((folder / "meta.json").read_text())
        k = np.array(pose["intrinsics"])
        by_file = {name: view_id for view_id, name in meta["files"].items()}
        for view in range(8):
            _, depth = _read_view(folder, view)
            points = _back_project(depth, np.array(pose["c2ws"][by_file[f"view_{view}.png"]]), k)
            fractions = []
            for j in range(4):
                name = f"view_{view}_{j}_10.png"
                alpha = np.asarray(Image.open(folder / name))[..., 3] > 0
                grown = alpha.copy()  # one-pixel tolerance for the silhouette edge
                grown[1:] |= alpha[:-1]
                grown[:-1] |= alpha[1:]
                grown[:, 1:] |= alpha[:, :-1]
                grown[:, :-1] |= alpha[:, 1:]
                u, v, _ = _project(points, np.array(pose["c2ws"][by_file[name]]), k)
                cols = np.clip(np.floor(u).astype(int), 0, SIZE - 1)
                rows = np.clip(np.floor(v).astype(int), 0, SIZE - 1)
                fractions.append(grown[rows, cols].mean())
            assert min(fractions) > 0.99, (folder.name, view, fractions)


def _manifest(out: Path) -> list[dict]:
    lines = [line for path in sorted(out.glob("manifest-*.jsonl")) for line in path.read_text().splitlines()]
    return [json.loads(line) for line in lines]


def test_resume_after_a_kill_loses_at_most_the_object_in_flight(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["render", "--source", "procedural", "--count", "3", "--out", str(out), "--size", "32"]
    args += ["--samples", "2", "--no-denoise", "--threads", "1", "--no-mesh"]
    process = subprocess.Popen(
        [sys.executable, "-m", "training.cli", *args],
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 90
    try:
        while time.time() < deadline and not list(out.glob("000-000/*/meta.json")):
            assert process.poll() is None, "the render finished or failed before it could be killed"
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the driver and its Blender process
        process.wait()
    done_before = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("000-000/*/meta.json")}
    assert 1 <= len(done_before) < 3
    # Nothing half-written under a final name: every final folder is complete.
    for folder in _objects(out):
        assert (folder / "meta.json").is_file()
        assert len(list(folder.glob("view_*.png"))) == 48
    records_before = len(_manifest(out))

    assert main(args) == 0
    all_uids = {"proc-000000", "proc-000001", "proc-000002"}
    rerun = _manifest(out)[records_before:]
    assert {r["uid"] for r in rerun} == all_uids - set(done_before)
    assert all(r["status"] == "done" for r in rerun)
    assert {p.name for p in _objects(out)} == all_uids
    assert not list(out.glob("000-000/.tmp-*"))  # the killed object's temporary folder is gone
    for uid, mtime in done_before.items():
        assert (out / "000-000" / uid / "meta.json").stat().st_mtime_ns == mtime  # not rendered again


def test_a_broken_file_is_logged_and_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = tmp_path / "meshes"
    source.mkdir()
    (source / "broken.glb").write_bytes(b"glTF\x02\x00\x00\x00 this is not a real binary glTF file")
    trimesh.creation.box(extents=(2.0, 1.0, 0.5)).export(source / "brick.obj")
    out = tmp_path / "out"
    args = ["render", "--source", str(source), "--out", str(out), "--size", "32", "--samples", "2"]
    args += ["--no-denoise", "--threads", "2", "--polar", "60", "--exr-depth"]
    with caplog.at_level(logging.WARNING, logger="training.render"):
        assert main(args) == 0
    assert any("broken" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records), caplog.text

    records = {r["uid"]: r for r in _manifest(out)}
    assert records["broken"]["status"] == "failed" and records["broken"]["error"]
    assert records["brick"]["status"] == "done"
    brick = next(out.glob("*/brick"))
    assert not (brick.parent / "broken").exists()
    mesh = trimesh.load(brick / "mesh.ply", process=False)
    low, high = mesh.vertices.min(axis=0), mesh.vertices.max(axis=0)
    np.testing.assert_allclose(sorted(high - low), [0.2, 0.4, 0.8], atol=1e-5)  # extent 0.8, proportions kept
    np.testing.assert_allclose((low + high) / 2, 0.0, atol=1e-5)

    # --exr-depth: float metres equal to the millimetre PNG (read in a fresh interpreter: OpenCV reads EXR only when
    # OPENCV_IO_ENABLE_OPENEXR is set before its first import).
    read = (
        "import sys, cv2, numpy as np; exr = cv2.imread(sys.argv[1], cv2.IMREAD_UNCHANGED); "
        "mm = cv2.imread(sys.argv[2], cv2.IMREAD_UNCHANGED).astype(np.float64); "
        "print(exr.dtype, exr.shape, np.abs(exr - mm / 1000).max(), ((exr > 0) == (mm > 0)).all())"
    )
    for view in (0, 7):
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                read,
                str(brick / f"view_{view}_depth.exr"),
                str(brick / f"view_{view}_depth_mm.png"),
            ],
            env=dict(os.environ, OPENCV_IO_ENABLE_OPENEXR="1"),
            capture_output=True,
            text=True,
            check=True,
        )
        fields = result.stdout.split()
        assert fields[0] == "float32" and fields[1:3] == ["(32,", "32)"], result.stdout
        assert float(fields[3]) <= 0.0005 + 1e-6 and fields[4] == "True", result.stdout

    # A second run neither retries the broken file nor re-renders the brick.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="training.render"):
        assert main(args) == 0
    assert len(_manifest(out)) == 2
    assert "0 object(s) to render, 1 already done, 1 failed before" in caplog.text


# ---------------------------------------------------------------------------------------------------------------------
# --views elevation, --surface
# ---------------------------------------------------------------------------------------------------------------------

ELEVATION_IDS = ["0.png", "0_0.png", "0_1.png", "0_2.png", "0_3.png"]
ELEVATION_IMAGES = {"view_0.png", "view_0_depth_mm.png"} | {f"view_0_{j}_10.png" for j in range(4)}


def _elevation_args(out: Path, *extra: str) -> list[str]:
    """The settings of the `rendered` fixture (same objects, polars and image size) with --views elevation."""
    args = ["render", "--source", "procedural", "--count", "2", "--out", str(out), "--size", str(SIZE)]
    return [*args, "--samples", "4", "--polar", "50:100", "--threads", "2", "--views", "elevation", *extra]


@pytest.fixture(scope="module")
def rendered_elevation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two objects of `rendered`, rendered with --views elevation."""
    out = tmp_path_factory.mktemp("render-elevation")
    assert main(_elevation_args(out)) == 0
    return out


def test_elevation_views_are_the_full_renders_view_0_and_its_nearby_views(
    rendered: Path, rendered_elevation: Path
) -> None:
    objects = _objects(rendered_elevation)
    assert [p.name for p in objects] == ["proc-000000", "proc-000001"]
    for folder in objects:
        full = rendered / folder.parent.name / folder.name
        meta, full_meta = json.loads((folder / "meta.json").read_text()), json.loads((full / "meta.json").read_text())
        assert meta["views"] == meta["settings"]["views"] == "elevation" and full_meta["views"] == "all"
        assert meta["polar"] == full_meta["polar"]
        assert {p.name for p in folder.iterdir()} == ELEVATION_IMAGES | {"pose.json", "mesh.ply", "meta.json"}

        # pose.json: the full file's format and cameras, for just the five ids.
        pose, full_pose = json.loads((folder / "pose.json").read_text()), json.loads((full / "pose.json").read_text())
        assert list(pose) == ["intrinsics", "near_far", "c2ws"] and list(pose["c2ws"]) == ELEVATION_IDS
        assert pose["intrinsics"] == full_pose["intrinsics"] and pose["near_far"] == full_pose["near_far"]
        angles = _spec_angles(meta["polar"])
        for view_id, c2w in pose["c2ws"].items():
            assert c2w == full_pose["c2ws"][view_id], view_id
            np.testing.assert_allclose(c2w, _spec_c2w(*angles[view_id]), atol=1e-9, err_msg=view_id)
        assert meta["files"] == {view_id: full_meta["files"][view_id] for view_id in ELEVATION_IDS}

        # The same cameras, normalisation and light: the same mesh and (up to sampling noise) the same pixels.
        assert (folder / "mesh.ply").read_bytes() == (full / "mesh.ply").read_bytes()
        for name in sorted(ELEVATION_IMAGES):
            image, full_image = Image.open(folder / name), Image.open(full / name)
            assert image.mode == full_image.mode and image.size == (SIZE, SIZE)
            difference = np.abs(np.asarray(image).astype(np.int64) - np.asarray(full_image).astype(np.int64))
            assert difference.mean() < 0.5, (folder.name, name, difference.mean())
        alpha, depth = _read_view(folder, 0)
        np.testing.assert_array_equal(alpha > 0, depth > 0)


def test_elevation_renders_resume_and_are_refused_as_training_data(
    rendered_elevation: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="training.render"):
        assert main(_elevation_args(rendered_elevation)) == 0
    assert "0 object(s) to render, 2 already done, 0 failed before" in caplog.text
    # The full layout is not done: `render` without --views elevation would render both again, in full.
    full = build_parser().parse_args(_elevation_args(rendered_elevation)[:-2])
    assert [job.uid for job in driver.plan_jobs(full).jobs] == ["proc-000000", "proc-000001"]

    from training.data import read_object

    folder = _objects(rendered_elevation)[0]
    with pytest.raises(BadInputError, match="holds only the elevation views") as caught:
        read_object(folder)
    assert str(folder) in str(caught.value)


def test_surface_flat_changes_only_the_paint(rendered_elevation: Path, tmp_path: Path) -> None:
    out = tmp_path / "flat"
    args = _elevation_args(out, "--surface", "flat")
    args[args.index("--count") + 1] = "1"
    assert main(args) == 0
    folder, mixed = out / "000-000" / "proc-000000", rendered_elevation / "000-000" / "proc-000000"
    assert json.loads((folder / "meta.json").read_text())["settings"]["surface"] == "flat"
    assert (folder / "mesh.ply").read_bytes() == (mixed / "mesh.ply").read_bytes()  # the same shapes
    assert (folder / "pose.json").read_bytes() == (mixed / "pose.json").read_bytes()
    flat_rgba, mixed_rgba = (np.asarray(Image.open(f / "view_0.png")).astype(np.int64) for f in (folder, mixed))
    silhouette = (flat_rgba[..., 3] > 0) & (mixed_rgba[..., 3] > 0)
    assert silhouette.sum() / max((flat_rgba[..., 3] > 0).sum(), (mixed_rgba[..., 3] > 0).sum()) > 0.99
    # Seed 0's textured parts (a cone and a sphere) are flat-coloured now.
    change = np.abs(flat_rgba[..., :3] - mixed_rgba[..., :3])[silhouette].mean()
    assert change > 3, change


def test_the_elevation_report_runs_on_rendered_objects(
    rendered: Path, rendered_elevation: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    argv = ["evaluate", "--elevation", "data", "--elevation-data", str(rendered_elevation), "--elevation-data",
            str(rendered), "--degrade", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())["elevation"]
    names = [rendered_elevation.name, f"{rendered_elevation.name}, degraded",
             rendered.name, f"{rendered.name}, degraded"]
    assert list(report["settings"]) == names
    truth = sorted(json.loads((f / "meta.json").read_text())["polar"] for f in _objects(rendered_elevation))
    for name in names:
        rows = report["trials"][name]
        assert sorted(round(r["polar"]) for r in rows) == truth  # the true polar comes from each object's pose.json
        assert all(r["abs_error"] == pytest.approx(abs(r["estimate"] - r["polar"])) for r in rows)
        assert report["settings"][name]["all"]["count"] == 2
    assert f"| {rendered_elevation.name}, degraded | 2 |" in (out / "report.md").read_text()


def test_an_object_renders_the_same_after_others_in_the_same_process(tmp_path: Path, bpy42: Path) -> None:
    """Many objects share one Blender process (deleted between them). BlenderProc's init turns on Cycles' persistent
    data, with which the fourth of these objects was drawn with earlier objects' textures (three of its five parts);
    rendered after three others it must look exactly as it does alone."""
    script = REPO / "tests" / "training" / "render_sequence_script.py"
    launcher = REPO / "training" / "render" / "launch_inprocess.py"
    for name, seeds in (("sequence", ["0", "1", "2", "3"]), ("alone", ["3"])):
        subprocess.run([str(bpy42), str(launcher), str(script), str(tmp_path / name), *seeds], check=True,
                       capture_output=True, timeout=600)
    after = np.asarray(Image.open(tmp_path / "sequence" / "3.png")).astype(int)
    alone = np.asarray(Image.open(tmp_path / "alone" / "3.png")).astype(int)
    assert (alone[..., 3] > 0).sum() > 500  # the object is in view
    assert np.array_equal(after, alone), np.abs(after - alone)[..., :3].mean()
