"""Tests of server.common.cameras against the spec's numbers and independent re-derivations (spec §3)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from server.common import cameras
from server.common.cameras import (
    PoseFile,
    calc_pose,
    nearby_view_ids,
    normalise_cameras,
    opengl_to_opencv,
    pixel_to_grid,
    project,
    stage1_indices,
    stage1_view_ids,
    view_angles,
)
from server.common.errors import BadInputError


def _centre(polar: float, azimuth: float, radius: float = 1.2) -> np.ndarray:
    """Camera centre of spec §3.2, written out independently of calc_pose."""
    p, a = math.radians(polar), math.radians(azimuth)
    return radius * np.array([math.sin(a) * math.sin(p), -math.cos(a) * math.sin(p), math.cos(p)])


def _project_opengl(c2w_gl: np.ndarray, points: np.ndarray, focal: float = 280.0, half: float = 128.0) -> np.ndarray:
    """Pixels of world points through an OpenGL camera (y up, looking along −z), image v pointing down."""
    camera = (points - c2w_gl[:3, 3]) @ c2w_gl[:3, :3]
    depth = -camera[:, 2]
    return np.stack([focal * camera[:, 0] / depth + half, -focal * camera[:, 1] / depth + half], axis=-1)


# --------------------------------------------------------------------------------------------------------------------
# calc_pose and conventions
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("polar", "azimuth"), [(75, 30), (20, 0), (149, 300), (105, 210), (90, -10), (-20, 40)])
def test_calc_pose_is_a_rigid_look_at_with_the_spec_centre(polar: float, azimuth: float) -> None:
    c2w = calc_pose(polar, azimuth)
    rotation = c2w[:3, :3]
    assert c2w.shape == (4, 4)
    np.testing.assert_allclose(rotation.T @ rotation, np.eye(3), atol=1e-12)
    assert np.linalg.det(rotation) == pytest.approx(1.0)
    np.testing.assert_allclose(c2w[3], [0, 0, 0, 1])
    centre = _centre(polar, azimuth)
    np.testing.assert_allclose(c2w[:3, 3], centre, atol=1e-12)
    # OpenGL: the camera looks along −z, i.e. its z axis points from the origin to the camera.
    np.testing.assert_allclose(rotation[:, 2], centre / 1.2, atol=1e-12)
    assert rotation[2, 0] == pytest.approx(0.0, abs=1e-12)  # x axis horizontal (ẑ × f)
    assert rotation[2, 1] > 0  # y axis = ẑ − (ẑ·f)f: image up is world up, even for a negative polar


def test_calc_pose_broadcasts_and_falls_back_at_the_pole() -> None:
    batch = calc_pose(np.array([60.0, 90.0]), np.array([30.0, 120.0]), radius=2.0)
    np.testing.assert_allclose(batch[1], calc_pose(90.0, 120.0, radius=2.0))
    np.testing.assert_allclose(batch[0, :3, 3], _centre(60, 30, 2.0), atol=1e-12)
    top = calc_pose(0.0, 30.0)
    np.testing.assert_allclose(top[:3, 0], [0, 1, 0], atol=1e-12)  # the reference's fallback x axis
    np.testing.assert_allclose(top[:3, :3].T @ top[:3, :3], np.eye(3), atol=1e-12)


def test_positive_azimuth_turns_counter_clockwise_seen_from_above() -> None:
    before, after = calc_pose(75, 30)[:3, 3], calc_pose(75, 40)[:3, 3]
    assert np.cross(before, after)[2] > 0
    assert calc_pose(75, 0)[1, 3] < 0  # azimuth 0 is on −y


def test_opengl_to_opencv_puts_the_origin_in_front_on_the_optical_axis() -> None:
    c2w_cv = opengl_to_opencv(calc_pose(75, 30))
    origin_in_camera = np.linalg.inv(c2w_cv) @ np.array([0, 0, 0, 1.0])
    np.testing.assert_allclose(origin_in_camera[:3], [0, 0, 1.2], atol=1e-12)
    # World +z (up) appears with negative camera y (image up) in OpenCV.
    up_in_camera = np.linalg.inv(c2w_cv)[:3, :3] @ np.array([0, 0, 1.0])
    assert up_in_camera[1] < 0


# --------------------------------------------------------------------------------------------------------------------
# View ids and angles
# --------------------------------------------------------------------------------------------------------------------


def test_stage1_branch_at_the_threshold() -> None:
    assert stage1_indices(75) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert stage1_indices(75.5) == [0, 1, 2, 3, 8, 9, 10, 11]
    assert stage1_view_ids(120) == ["0.png", "1.png", "2.png", "3.png", "8.png", "9.png", "10.png", "11.png"]


def test_nearby_ids_are_i_major_j_minor() -> None:
    ids = nearby_view_ids(100)
    assert len(ids) == 32 == len(set(ids))
    assert ids[:5] == ["0_0.png", "0_1.png", "0_2.png", "0_3.png", "1_0.png"]
    assert ids[12:16] == ["3_0.png", "3_1.png", "3_2.png", "3_3.png"]
    assert ids[16] == "8_0.png" and ids[-1] == "11_3.png"


def test_view_angles_match_the_spec_table() -> None:
    low = view_angles(60)
    assert list(low)[:8] == [f"{i}.png" for i in range(8)] and len(low) == 40
    assert low["0.png"] == (60, 30) and low["3.png"] == (60, 300)
    assert low["4.png"] == (90, 60) and low["7.png"] == (90, 330)
    assert low["4_0.png"] == (80, 60) and low["4_1.png"] == (100, 60)
    assert low["2_2.png"] == (60, 200) and low["7_3.png"] == (90, 340)  # not wrapped, like the reference
    high = view_angles(100)
    assert high["8.png"] == (70, 60) and high["11_2.png"] == (70, 320) and high["1_1.png"] == (110, 120)


@pytest.mark.parametrize("polar", [-1, 181, float("nan"), float("inf")])
def test_unusable_polar_is_rejected(polar: float) -> None:
    with pytest.raises(BadInputError, match="polar angle"):
        stage1_indices(polar)


# --------------------------------------------------------------------------------------------------------------------
# pose.json
# --------------------------------------------------------------------------------------------------------------------


def test_for_polar_reproduces_gen_poses() -> None:
    pose_file = PoseFile.for_polar(75)
    assert pose_file.view_ids == [f"{i}.png" for i in range(8)] + [f"{i}_{j}.png" for i in range(8) for j in range(4)]
    np.testing.assert_array_equal(pose_file.intrinsics, [[280, 0, 128], [0, 280, 128], [0, 0, 1]])
    assert pose_file.near_far == (0.5, 1.8)
    np.testing.assert_allclose(pose_file.c2ws["0.png"][:3, 3], _centre(75, 30), atol=1e-12)
    np.testing.assert_allclose(pose_file.c2ws["5_2.png"][:3, 3], _centre(105, 140), atol=1e-12)
    assert PoseFile.for_polar(76).view_ids[4:9] == ["8.png", "9.png", "10.png", "11.png", "0_0.png"]


def test_pose_file_round_trip_in_the_reference_layout(tmp_path) -> None:
    pose_file = PoseFile.for_polar(90)
    path = pose_file.write(tmp_path / "pose.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pose.json"]  # no temporary file left behind
    text = path.read_text()
    assert text.startswith('{\n    "intrinsics": [\n        [\n            280.0,')  # json.dump(indent=4)
    raw = json.loads(text)
    assert list(raw) == ["intrinsics", "near_far", "c2ws"]
    assert list(raw["c2ws"]) == pose_file.view_ids
    assert np.array(raw["c2ws"]["9_1.png"]).shape == (4, 4)
    again = PoseFile.read(path, require=nearby_view_ids(90))
    assert again.view_ids == pose_file.view_ids and again.near_far == pose_file.near_far
    for view_id in pose_file.view_ids:
        np.testing.assert_array_equal(again.c2ws[view_id], pose_file.c2ws[view_id])


def test_reads_a_reference_written_file_with_float32_values_and_integers(tmp_path) -> None:
    poses = calc_pose(np.array([75.0, 65.0]), np.array([30.0, 30.0])).astype(np.float32)
    data = {
        "intrinsics": [[280.0, 0, 128.0], [0, 280.0, 128.0], [0, 0, 1]],
        "near_far": [1.2 - 0.7, 1.2 + 0.6],
        "c2ws": {"0.png": [*poses[0].tolist()[:3], [0, 0, 0, 1]], "0_0.png": [*poses[1].tolist()[:3], [0, 0, 0, 1]]},
    }
    (tmp_path / "pose.json").write_text(json.dumps(data, indent=4))
    pose_file = PoseFile.read(tmp_path / "pose.json")
    np.testing.assert_allclose(pose_file.c2ws["0_0.png"], calc_pose(65, 30), atol=1e-6)


def _valid() -> dict:
    return PoseFile.for_polar(75).to_dict()


def _with(path: tuple, value) -> dict:
    data = _valid()
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return data


_scaled = (np.diag([1.5, 1.5, 1.5, 1.0]) @ calc_pose(75, 30)).tolist()
_mirrored = (calc_pose(75, 30) @ np.diag([-1.0, 1, 1, 1])).tolist()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([1, 2, 3], "must be a JSON object"),
        ({"intrinsics": [[1, 0, 0], [0, 1, 0], [0, 0, 1]], "c2ws": {}}, "lacks the key.*near_far"),
        (
            _with(("intrinsics",), [[280, 0, 128], [0, 280, 128]]),
            r"intrinsics must be a 3×3 matrix, got shape \(2, 3\)",
        ),
        (_with(("intrinsics",), "K"), "intrinsics must be a 3×3 matrix"),
        (_with(("intrinsics",), [[-280, 0, 128], [0, 280, 128], [0, 0, 1]]), "not a pinhole camera matrix"),
        (_with(("near_far",), [1.8, 0.5]), "near_far"),
        (_with(("near_far",), [0.5]), "near_far must be a list of two numbers"),
        (_with(("c2ws",), []), "c2ws must be a JSON object"),
        (_with(("c2ws",), {}), "non-empty"),
        (_with(("c2ws", "3_1.png"), calc_pose(75, 30)[:3].tolist()), r"c2ws\['3_1.png'\] must be a 4×4 matrix"),
        (_with(("c2ws", "0.png"), [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, float("nan")]]), "non-finite"),
        (_with(("c2ws", "0.png"), [[True, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), "list of rows of num"),
        (_with(("c2ws", "1.png"), _scaled), r"c2ws\['1.png'\] is not a rigid transform"),
        (_with(("c2ws", "2.png"), _mirrored), r"c2ws\['2.png'\] is not a rigid transform"),
    ],
)
def test_read_rejects_malformed_pose_files(tmp_path, data, message: str) -> None:
    path = tmp_path / "pose.json"
    path.write_text(json.dumps(data))
    with pytest.raises(BadInputError, match=message) as info:
        PoseFile.read(path)
    assert str(path) in str(info.value)


def test_read_rejects_missing_files_non_json_and_missing_ids(tmp_path) -> None:
    with pytest.raises(BadInputError, match="does not exist"):
        PoseFile.read(tmp_path / "absent.json")
    (tmp_path / "broken.json").write_text('{"intrinsics": [')
    with pytest.raises(BadInputError, match="is not JSON"):
        PoseFile.read(tmp_path / "broken.json")
    path = PoseFile.for_polar(60).write(tmp_path / "pose.json")
    with pytest.raises(BadInputError, match=r"2 required image id\(s\): 8_0.png, 9.png"):
        PoseFile.read(path, require=["0.png", "8_0.png", "9.png"])
    with pytest.raises(BadInputError, match=r"12_0\.png"):
        PoseFile.for_polar(60).require(["12_0.png"])


# --------------------------------------------------------------------------------------------------------------------
# Reconstruction frames
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("polar", "scale"), [(60, 1.4205), (75, 1.3413), (90, 1.3943), (105, 1.3413), (120, 1.4205)])
def test_scale_matches_the_reference_dataset_code(polar: int, scale: float) -> None:
    cams = normalise_cameras(PoseFile.for_polar(polar), nearby_view_ids(polar))
    assert round(cams.scale, 4) == scale
    assert len(cams.view_ids) == 32 and cams.w2c.shape == (32, 4, 4) and cams.intrinsics.shape == (32, 3, 3)


def test_centre_at_polar_75_matches_the_reference() -> None:
    cams = normalise_cameras(PoseFile.for_polar(75), nearby_view_ids(75))
    np.testing.assert_allclose(cams.centre, [0.0, 0.0016, 1.2513], atol=5e-5)
    np.testing.assert_allclose(cams.ref_c2w, calc_pose(75, 30) @ np.diag([1, -1, -1, 1.0]), atol=1e-12)


@pytest.fixture(scope="module")
def cams_75() -> cameras.ReconstructionCameras:
    return normalise_cameras(PoseFile.for_polar(75), nearby_view_ids(75))


def test_to_world_and_to_normalised_are_inverse(cams_75) -> None:
    points = np.random.default_rng(0).uniform(-1, 1, (100, 3))
    np.testing.assert_allclose(cams_75.to_normalised(cams_75.to_world(points)), points, atol=1e-12)
    np.testing.assert_allclose(cams_75.to_world(cams_75.to_normalised(points)), points, atol=1e-12)
    # Distances scale by s, so the map is a similarity.
    assert np.linalg.norm(cams_75.to_world(points[:1]) - cams_75.to_world(points[1:2])) == pytest.approx(
        cams_75.scale * np.linalg.norm(points[0] - points[1])
    )


def test_normalised_centres_map_back_to_the_pose_json_cameras(cams_75) -> None:
    angles = view_angles(75)
    expected = np.array([_centre(*angles[view_id]) for view_id in cams_75.view_ids])
    np.testing.assert_allclose(cams_75.to_world(cams_75.centres), expected, atol=1e-12)
    np.testing.assert_allclose(cams_75.c2w[:, :3, 3], cams_75.centres, atol=1e-12)
    np.testing.assert_allclose(cams_75.c2w @ cams_75.w2c, np.broadcast_to(np.eye(4), (32, 4, 4)), atol=1e-12)
    distance = np.linalg.norm(expected - cams_75.to_world(np.zeros((1, 3))), axis=-1) / cams_75.scale
    np.testing.assert_allclose(cams_75.near_far, np.stack([0.95 * (distance - 1), 1.05 * (distance + 1)], -1))
    assert (distance > 0.85).all() and (distance < 0.95).all()  # spec: cameras sit inside the cube


def test_world_points_project_to_the_same_pixels_through_normalised_cameras(cams_75) -> None:
    pose_file = PoseFile.for_polar(75)
    points = np.random.default_rng(1).uniform(-0.4, 0.4, (50, 3))
    uv, z = project(cams_75.proj, cams_75.to_normalised(points))
    for v, view_id in enumerate(cams_75.view_ids):
        c2w = pose_file.c2ws[view_id]
        np.testing.assert_allclose(uv[v], _project_opengl(c2w, points), atol=1e-9)
        depth = (points - c2w[:3, 3]) @ -c2w[:3, 2]
        np.testing.assert_allclose(z[v] * cams_75.scale, depth, atol=1e-12)


def test_proj_is_the_reference_decomposition_of_k_w2c_s(cams_75) -> None:
    """The reference builds P = K·(w2c_i·c2w_ref)·S and decomposes it; its rows equal s·proj."""
    ref = calc_pose(75, 30) @ np.diag([1, -1, -1, 1.0])
    k4 = np.eye(4)
    k4[:3, :3] = [[280, 0, 128], [0, 280, 128], [0, 0, 1]]
    angles = view_angles(75)
    for v, view_id in enumerate(cams_75.view_ids):
        w2c_frame = np.linalg.inv(calc_pose(*angles[view_id]) @ np.diag([1, -1, -1, 1.0])) @ ref
        reference = k4 @ w2c_frame @ cams_75.scale_mat
        np.testing.assert_allclose(reference[:3], cams_75.scale * cams_75.proj[v, :3], atol=1e-10)


def test_reference_camera_and_object_sit_where_the_spec_says(cams_75) -> None:
    ref_w2c = cams_75.normalised_w2c(PoseFile.for_polar(75).c2ws["0.png"])
    np.testing.assert_allclose(ref_w2c[:3, :3], np.eye(3), atol=1e-12)
    np.testing.assert_allclose(np.linalg.inv(ref_w2c)[:3, 3], -np.array([0, 0.0016, 1.2513]) / 1.3413, atol=1e-4)
    origin = cams_75.to_normalised(np.zeros((1, 3)))[0]
    assert 0.0 < np.linalg.norm(origin) < 0.05  # near, not at, the cube centre
    batch = cams_75.normalised_w2c(np.stack([PoseFile.for_polar(75).c2ws[i] for i in cams_75.view_ids]))
    np.testing.assert_allclose(batch, cams_75.w2c, atol=1e-12)


def test_normalise_cameras_rejects_unknown_ids() -> None:
    with pytest.raises(BadInputError, match=r"8_0\.png"):
        normalise_cameras(PoseFile.for_polar(60), ["0_0.png", "8_0.png"])
    with pytest.raises(BadInputError, match="at least one"):
        normalise_cameras(PoseFile.for_polar(60), [])


# --------------------------------------------------------------------------------------------------------------------
# Projection helpers
# --------------------------------------------------------------------------------------------------------------------


def test_project_clamps_small_depths_and_keeps_negative_ones() -> None:
    proj = np.eye(4)
    uv, z = project(proj, np.array([[2.0, 4.0, 2.0], [1.0, 1.0, 0.0], [3.0, 6.0, -3.0]]))
    np.testing.assert_allclose(uv, [[1.0, 2.0], [1e6, 1e6], [-1.0, -2.0]])
    np.testing.assert_allclose(z, [2.0, 0.0, -3.0])
    uv_batch, z_batch = project(np.stack([proj, 2 * np.eye(4)]), np.array([[2.0, 4.0, 2.0]]))
    assert uv_batch.shape == (2, 1, 2) and z_batch.shape == (2, 1)
    np.testing.assert_allclose(uv_batch[1, 0], [1.0, 2.0])


def test_pixel_to_grid_uses_align_corners_true() -> None:
    grid = pixel_to_grid(np.array([[0.0, 0.0], [255.0, 255.0], [127.5, 63.75]]), 256)
    np.testing.assert_allclose(grid, [[-1, -1], [1, 1], [0, -0.5]])
    np.testing.assert_allclose(pixel_to_grid(np.array([99.0, 49.0]), (50, 100)), [1.0, 1.0])
