"""Tests of server.common.synthetic: rendered pixels agree with the analytic object and with the cameras of
pose.json."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from server.common.cameras import PoseFile, calc_pose, nearby_view_ids, stage1_view_ids
from server.common.errors import BadInputError
from server.common.synthetic import PALETTE, cast_rays, render_view, render_views, shape_sdf, toy_sdf, write_views_dir

K = np.array([[280.0, 0.0, 128.0], [0.0, 280.0, 128.0], [0.0, 0.0, 1.0]])


def _pixel_ray(c2w_gl: np.ndarray, u: float, v: float) -> np.ndarray:
    """World direction (camera-space depth 1) through pixel coordinates (u, v) of an OpenGL camera, written out."""
    right, up, backward = c2w_gl[:3, 0], c2w_gl[:3, 1], c2w_gl[:3, 2]
    return (u - 128.0) / 280.0 * right - (v - 128.0) / 280.0 * up - backward


def _to_pixel(c2w_gl: np.ndarray, point: np.ndarray) -> tuple[float, float, float]:
    """(u, v, depth) of a world point in an OpenGL camera."""
    camera = (point - c2w_gl[:3, 3]) @ c2w_gl[:3, :3]
    depth = -camera[2]
    return 280.0 * camera[0] / depth + 128.0, -280.0 * camera[1] / depth + 128.0, depth


@pytest.fixture(scope="module")
def view0() -> tuple[np.ndarray, np.ndarray]:
    return render_view(calc_pose(75, 30), K)


def test_toy_sdf_known_values() -> None:
    points = np.array(
        [
            [0.08, -0.04, 0.10],  # sphere centre: −radius
            [0.08, -0.04, 0.60],  # 0.2 above the sphere's top
            [0.30, 0.18, -0.22],  # 0.1 in front of the box's +x face (x = 0.20); the sphere is 0.146 away
            [-0.06, 0.05, -0.30],  # 0.06 below the box's bottom (z = −0.24)
            [2.0, 2.0, 2.0],
        ]
    )
    np.testing.assert_allclose(toy_sdf(points)[:4], [-0.30, 0.20, 0.10, 0.06], atol=1e-12)
    assert toy_sdf(points)[4] > 2.5
    np.testing.assert_allclose(shape_sdf(np.array([[0.0, 0.0, 0.5]]), "sphere"), [0.15])


def test_cast_rays_hits_the_box_face_and_misses_the_sky() -> None:
    origins = np.array([[2.0, 0.15, -0.2], [0.0, 0.0, 2.0], [2.0, 2.0, 2.0]])
    directions = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 0.0, 1.0]])
    hits = cast_rays(origins, directions)
    assert hits.t[0] == pytest.approx(1.80)  # box +x face at x = 0.20; the sphere is missed at this y, z
    np.testing.assert_allclose(hits.normal[0], [1, 0, 0])
    assert hits.region[0] == 0
    top = 0.10 + math.sqrt(0.30**2 - 0.08**2 - 0.04**2)  # sphere surface above the origin
    assert hits.t[1] == pytest.approx(2.0 - top)
    assert hits.region[1] >= 6 and not hits.hit[2] and math.isinf(hits.t[2])


def test_centre_pixel_hits_the_object_and_corners_are_white(view0) -> None:
    rgb, depth = view0
    assert rgb.shape == (256, 256, 3) and rgb.dtype == np.uint8
    assert (rgb[128, 128] < 245).any() and math.isfinite(depth[128, 128])
    for row, column in [(0, 0), (0, 255), (255, 0), (255, 255)]:
        np.testing.assert_array_equal(rgb[row, column], [255, 255, 255])
        assert math.isinf(depth[row, column])


def test_every_hit_pixel_lies_on_the_surface(view0) -> None:
    _, depth = view0
    c2w = calc_pose(75, 30)
    rows, columns = np.nonzero(np.isfinite(depth))
    assert 5000 < len(rows) < 40000  # the object fills a sensible part of the frame
    picks = np.random.default_rng(0).choice(len(rows), 400, replace=False)
    points = np.array(
        [
            c2w[:3, 3] + depth[r, c] * _pixel_ray(c2w, c + 0.5, r + 0.5)
            for r, c in zip(rows[picks], columns[picks], strict=True)
        ]
    )
    np.testing.assert_allclose(toy_sdf(points), 0.0, atol=1e-9)


def test_a_hit_point_reprojects_consistently_into_another_view(view0) -> None:
    rgb0, depth0 = view0
    c2w0, c2w1 = calc_pose(75, 30), calc_pose(75, 40)  # views 0.png and 0_3.png
    point = c2w0[:3, 3] + depth0[100, 140] * _pixel_ray(c2w0, 140.5, 100.5)
    u, v, depth = _to_pixel(c2w1, point)
    assert 0 < u < 256 and 0 < v < 256
    # The ray of the second camera through the exact reprojection hits the same point (no occlusion, same surface).
    direction = _pixel_ray(c2w1, u, v)
    hits = cast_rays(c2w1[:3, 3][None], (direction / np.linalg.norm(direction))[None])
    np.testing.assert_allclose(c2w1[:3, 3] + hits.t[0] * direction / np.linalg.norm(direction), point, atol=1e-9)
    # The rendered second view agrees at the nearest pixel: depth up to the surface slope, colour up to shading.
    rgb1, depth1 = render_view(c2w1, K)
    assert depth1[int(v), int(u)] == pytest.approx(depth, abs=0.01)
    assert np.abs(rgb1[int(v), int(u)].astype(int) - rgb0[100, 140].astype(int)).max() <= 8


@pytest.mark.parametrize("polar", [75, 120])
def test_views_keep_the_object_inside_the_frame(polar: int) -> None:
    pose_file = PoseFile.for_polar(polar)
    views = render_views(pose_file, pose_file.view_ids[::3])
    assert list(views) == pose_file.view_ids[::3]
    for rgb in views.values():
        border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
        assert (border == 255).all()
        assert (rgb < 245).any(axis=-1).sum() > 3000


def test_colours_come_from_the_palette_with_shading(view0) -> None:
    rgb, depth = view0
    foreground = rgb[np.isfinite(depth)].astype(float)
    # Every foreground pixel is a palette colour times a shading factor in [0.5, 1], up to uint8 rounding.
    factor = np.clip(foreground @ PALETTE.T / (PALETTE**2).sum(axis=-1), 0.5, 1.0)  # [N, 14] least squares
    residual = np.abs(foreground[:, None, :] - factor[..., None] * PALETTE[None]).max(axis=-1)
    assert (residual.min(axis=-1) <= 1.0).all()
    assert len(np.unique(residual.argmin(axis=-1))) >= 5


def test_render_size_keeps_the_field_of_view() -> None:
    pose_file = PoseFile.for_polar(75)
    small = render_views(pose_file, ["0.png"], size=64)["0.png"]
    large = render_views(pose_file, ["0.png"], size=256)["0.png"]
    assert small.shape == (64, 64, 3)
    mask_small = (small < 245).any(axis=-1)
    mask_large = (large < 245).any(axis=-1).reshape(64, 4, 64, 4).mean(axis=(1, 3)) > 0.5
    assert (mask_small != mask_large).mean() < 0.03


def test_write_views_dir_writes_the_reconstruct_input_layout(tmp_path) -> None:
    folder = write_views_dir(tmp_path / "views", polar=100)
    expected = {*stage1_view_ids(100), *nearby_view_ids(100), "pose.json"}
    assert {path.name for path in folder.iterdir()} == expected
    pose_file = PoseFile.read(folder / "pose.json", require=nearby_view_ids(100))
    np.testing.assert_allclose(pose_file.c2ws["9_2.png"], calc_pose(70, 140), atol=1e-12)
    image = np.asarray(Image.open(folder / "9_2.png"))
    assert image.shape == (256, 256, 3)
    np.testing.assert_array_equal(image, render_view(calc_pose(70, 140), K)[0])


def test_unknown_shape_and_ids_are_rejected() -> None:
    with pytest.raises(BadInputError, match="unknown synthetic shape 'teapot'"):
        render_views(PoseFile.for_polar(75), ["0.png"], shape="teapot")
    with pytest.raises(BadInputError, match=r"8\.png"):
        render_views(PoseFile.for_polar(75), ["8.png"])
