"""Tests of server/elevation.py.

Ground truth comes from a camera model written here independently of the module (an OpenCV look-at built from the
camera centre of spec §3.2): synthetic correspondences for the polar search, and ray-cast renders of a textured sphere
for SIFT and the image-level entry point.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import map_coordinates

from server.common.cameras import calc_pose
from server.common.errors import BadInputError, CheckpointError, MissingWeightsError
from server.common.weights import weight_file
from server.service.cli import main as cli_main
from server.stages.elevation import (
    ISOTROPIC,
    LOFTR_WEIGHTS_FILENAME,
    ElevationEstimator,
    ElevationResult,
    FlowMatcher,
    LoFTRMatcher,
    Matcher,
    Matches,
    RobustFitConfig,
    SiftMatcher,
    available_matcher,
    candidate_poses,
    estimate_elevation,
    estimate_polar_from_matches,
    fit_polar,
    foreground_mask,
    frontier_points,
    fundamental_matrices,
    half_level_mask,
    match_views,
    sampson_distances,
    silhouette_outline,
)

FOCAL, CENTRE, SIZE = 280.0, 128.0, 256
K_TRUE = np.array([[FOCAL, 0.0, CENTRE], [0.0, FOCAL, CENTRE], [0.0, 0.0, 1.0]])
PAIRS = [(i, j) for i in range(4) for j in range(i + 1, 4)]


def nearby_views(polar: float) -> list[tuple[float, float]]:
    """(polar, azimuth) of the four stage-2 views of view 0 (spec §3.1/§4)."""
    return [(polar - 10, 30), (polar + 10, 30), (polar, 20), (polar, 40)]


def camera(polar: float, azimuth: float, radius: float = 1.2) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV world→camera rotation [3, 3] (rows = camera axes) and camera centre [3], looking at the origin, z-up."""
    p, a = np.radians(polar), np.radians(azimuth)
    c = radius * np.array([np.sin(a) * np.sin(p), -np.cos(a) * np.sin(p), np.cos(p)])
    z = -c / np.linalg.norm(c)
    x = np.cross(z, [0.0, 0.0, 1.0])
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    return np.stack([x, y, z]), c


def project(view: tuple[np.ndarray, np.ndarray], points: np.ndarray) -> np.ndarray:
    """[N, 2] pixels (continuous frame, principal point 128) of world points [N, 3]."""
    R, c = view
    cam = (points - c) @ R.T
    return FOCAL * cam[:, :2] / cam[:, 2:3] + CENTRE


def synthetic_matches(
    polar: float, rng: np.random.Generator, n_points: int = 300, noise: float = 0.3
) -> dict[tuple[int, int], np.ndarray]:
    """Six pairs of noisy correspondences of random points in a ball of radius 0.35, each pair seeing 80 % of them;
    every observation gets its own noise (as LoFTR, whose keypoints of one image differ from pair to pair)."""
    direction = rng.normal(size=(n_points, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    points = direction * 0.35 * rng.random((n_points, 1)) ** (1 / 3)
    views = [camera(*pa) for pa in nearby_views(polar)]
    matches = {}
    for i, j in PAIRS:
        seen = points[rng.random(n_points) < 0.8]
        x0 = project(views[i], seen) + rng.normal(scale=noise, size=(len(seen), 2))
        x1 = project(views[j], seen) + rng.normal(scale=noise, size=(len(seen), 2))
        conf = rng.uniform(0.5, 1.0, size=(len(seen), 1))
        matches[(i, j)] = np.concatenate([x0, x1, conf], axis=1)
    return matches


# --- cameras ----------------------------------------------------------------------------------------------------------


def test_calc_pose_known_values():
    # polar 90, azimuth 0: camera on −y, x right = +x, up = +z, looking along +y (its z axis is −y).
    expected = np.array([[1, 0, 0, 0], [0, 0, -1, -1.2], [0, 1, 0, 0], [0, 0, 0, 1.0]])
    np.testing.assert_allclose(calc_pose(90, 0), expected, atol=1e-12)


@pytest.mark.parametrize(("polar", "azimuth"), [(20, 30), (67, 120), (112, 300), (149, 40)])
def test_calc_pose_matches_opencv_lookat(polar, azimuth):
    c2w_cv = calc_pose(polar, azimuth) @ np.diag([1.0, -1.0, -1.0, 1.0])
    R, c = camera(polar, azimuth)
    np.testing.assert_allclose(c2w_cv[:3, :3], R.T, atol=1e-12)
    np.testing.assert_allclose(c2w_cv[:3, 3], c, atol=1e-12)


# --- polar search on synthetic correspondences ----------------------------------------------------------------------


@pytest.mark.parametrize("polar", [55, 67, 75, 90, 112])
def test_polar_recovered_from_synthetic_matches(polar):
    matches = synthetic_matches(polar, np.random.default_rng(polar))
    assert abs(estimate_polar_from_matches(matches) - polar) <= 1


def test_polar_search_accepts_pairs_in_either_direction():
    polar = 83
    matches = synthetic_matches(polar, np.random.default_rng(7))
    flipped = dict(matches)
    for i, j in [(0, 1), (1, 3)]:
        flipped[(j, i)] = flipped.pop((i, j))[:, [2, 3, 0, 1, 4]]
    assert abs(estimate_polar_from_matches(flipped) - polar) <= 1
    assert estimate_polar_from_matches(flipped) == estimate_polar_from_matches(matches)


def test_polar_search_scales_with_image_size():
    # The same scene seen by 512² images (focal 560, principal point 256) gives the same angle.
    polar = 101
    matches = synthetic_matches(polar, np.random.default_rng(3), noise=0.0)
    doubled = {pair: m * np.array([2, 2, 2, 2, 1.0]) for pair, m in matches.items()}
    assert abs(estimate_polar_from_matches(doubled, image_size=512, focal=560.0) - polar) <= 1


def test_polar_search_rejects_bad_matches():
    matches = synthetic_matches(75, np.random.default_rng(0))
    missing = {pair: m for pair, m in matches.items() if pair != (2, 3)}
    with pytest.raises(BadInputError, match=r"\(2, 3\)"):
        estimate_polar_from_matches(missing)
    with pytest.raises(BadInputError, match=r"\(0, 2\).*no matches"):
        estimate_polar_from_matches({**matches, (0, 2): np.zeros((0, 5))})
    with pytest.raises(BadInputError, match=r"\[M, 5\]"):
        estimate_polar_from_matches({**matches, (0, 1): matches[(0, 1)][:, :4]})
    with pytest.raises(BadInputError, match="confidence"):
        estimate_polar_from_matches({**matches, (0, 1): matches[(0, 1)] * np.array([1, 1, 1, 1, 0.0])})


# --- images: an oracle matcher for the plumbing, SIFT on renders -----------------------------------------------------


class OracleMatcher:
    """Matches known 3D points between the views it recognises by their grey level (100 + 10·view), plus junk
    matches that start in the white band (x < 20) of image 0 or end in the white band of image 1."""

    name = "oracle"

    def __init__(self, polar: float, rng: np.random.Generator, empty_pair: tuple[int, int] | None = None) -> None:
        self.views = [camera(*pa) for pa in nearby_views(polar)]
        self.points = rng.uniform(-0.25, 0.25, size=(200, 3))
        self.rng = rng
        self.empty_pair = empty_pair

    def __call__(self, image0: np.ndarray, image1: np.ndarray) -> Matches:
        i, j = ((int(im[128, 128]) - 100) // 10 for im in (image0, image1))
        if (i, j) == self.empty_pair:
            return Matches.empty()
        kpts0 = project(self.views[i], self.points) + self.rng.normal(scale=0.2, size=(200, 2))
        kpts1 = project(self.views[j], self.points) + self.rng.normal(scale=0.2, size=(200, 2))
        # Junk: x0 in the white band with (y0, x1) in the foreground (kept by the reference's mask0[y0, x1] bug),
        # and x1 in the white band.
        junk0 = np.stack([self.rng.uniform(0, 19, 30), self.rng.uniform(40, 200, 30)], axis=1)
        junk1 = np.stack([self.rng.uniform(60, 200, 30), self.rng.uniform(40, 200, 30)], axis=1)
        kpts0 = np.concatenate([kpts0, junk0, junk1])
        kpts1 = np.concatenate([kpts1, junk1, junk0])
        return Matches(kpts0, kpts1, self.rng.uniform(0.5, 1.0, len(kpts0)))


def oracle_images() -> list[np.ndarray]:
    images = [np.full((SIZE, SIZE, 3), 100 + 10 * n, np.uint8) for n in range(4)]
    for image in images:
        image[:, :20] = 250  # white band: background
    return images


def test_matcher_protocol():
    assert isinstance(SiftMatcher(), Matcher)
    assert isinstance(OracleMatcher(60, np.random.default_rng(0)), Matcher)


def test_estimate_elevation_pairs_views_and_filters_background():
    polar = 72
    result = estimate_elevation(oracle_images(), OracleMatcher(polar, np.random.default_rng(1)))
    assert isinstance(result, ElevationResult)
    assert abs(result.polar - polar) <= 1
    assert result.elevation == 90 - result.polar
    assert result.matcher == "oracle"
    # Only the 200 true matches survive: both kinds of junk are background at one end.
    assert result.num_matches == dict.fromkeys(PAIRS, 200)


def test_estimate_elevation_pair_without_matches_leaves_the_others_to_fit():
    # The reference gives up when any pair has no match; the robust fit uses the pairs it has.
    matcher = OracleMatcher(72, np.random.default_rng(2), empty_pair=(1, 3))
    result = estimate_elevation(oracle_images(), matcher)
    assert result.num_matches[(1, 3)] == 0 and abs(result.polar - 72) <= 1


def test_estimate_elevation_with_only_background_matches_is_an_error():
    images = oracle_images()
    for n in (2, 3):  # images 2 and 3 all white: only pair (0, 1) keeps matches, and it says nothing of the polar
        images[n][:, :] = 250
        images[n][128, 128] = 100 + 10 * n  # keep the oracle's view marker
    with pytest.raises(BadInputError, match=r"too few matches.*\(0, 2\): 0"):
        estimate_elevation(images, OracleMatcher(72, np.random.default_rng(3)))


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ([np.zeros((256, 256, 3), np.uint8)] * 3, "exactly 4 images; got 3"),
        ([np.zeros((256, 256, 3), np.uint8)] * 3 + [np.zeros((128, 128, 3), np.uint8)], "same size"),
        ([np.zeros((256, 256, 3), np.float32)] * 4, "uint8 RGB"),
        ([np.zeros((256, 256), np.uint8)] * 4, "uint8 RGB"),
        ([np.zeros((256, 256, 4), np.uint8)] * 4, "uint8 RGB"),
        ([np.zeros((256, 200, 3), np.uint8)] * 4, "square"),
    ],
)
def test_estimate_elevation_bad_input(images, message):
    with pytest.raises(BadInputError, match=message):
        estimate_elevation(images, SiftMatcher())


SPHERE_RADIUS = 0.4


def sphere_hits(view: tuple[np.ndarray, np.ndarray], pixels: np.ndarray) -> np.ndarray:
    """World points [N, 3] where the rays through pixels [N, 2] hit the sphere; NaN for misses."""
    R, c = view
    d = np.concatenate([(pixels - CENTRE) / FOCAL, np.ones((len(pixels), 1))], axis=1) @ R
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    b = d @ c
    disc = b**2 - (c @ c - SPHERE_RADIUS**2)
    t = -b - np.sqrt(np.where(disc > 0, disc, np.nan))
    return c + t[:, None] * d


def render_sphere(view: tuple[np.ndarray, np.ndarray], noise: list[np.ndarray], supersample: int = 2) -> np.ndarray:
    """[256, 256, 3] uint8: a sphere with a solid (3D) random texture on white, anti-aliased by supersampling."""
    n = SIZE * supersample
    u = (np.arange(n) + 0.5) / supersample
    xx, yy = np.meshgrid(u, u)
    points = sphere_hits(view, np.stack([xx.ravel(), yy.ravel()], axis=1))
    hit = ~np.isnan(points[:, 0])
    lum = np.zeros(hit.sum())
    for weight, grid in zip((0.3, 0.35, 0.35), noise, strict=True):
        coords = (points[hit] / (2 * SPHERE_RADIUS) + 0.5).T * (grid.shape[0] - 1)
        lum += weight * map_coordinates(grid, coords, order=3, mode="nearest")
    lum = np.clip((lum - 0.5) * 2.0 + 0.5, 0, 1)
    image = np.full((n * n, 3), 255.0)
    image[hit] = 20 + 200 * lum[:, None] * np.array([1.0, 0.9, 0.8])  # never white: all foreground
    image = image.reshape(SIZE, supersample, SIZE, supersample, 3).mean(axis=(1, 3))
    return np.round(image).astype(np.uint8)


def render_nearby(polar: float) -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    noise = [rng.random((n, n, n)) for n in (10, 30, 60)]
    return [render_sphere(camera(*pa), noise) for pa in nearby_views(polar)]


@pytest.fixture(scope="module")
def renders_75() -> list[np.ndarray]:
    return render_nearby(75)


def test_sift_matches_agree_with_true_geometry(renders_75):
    gray = [image.mean(axis=-1).round().astype(np.uint8) for image in renders_75]
    views = [camera(*pa) for pa in nearby_views(75)]
    for i, j in [(0, 1), (2, 3), (1, 2)]:
        found = SiftMatcher()(gray[i], gray[j])
        assert len(found) >= 50
        assert found.kpts0.shape == found.kpts1.shape == (len(found), 2)
        assert ((found.confidence > 0.25) & (found.confidence <= 1)).all()
        # Reprojection through the true surface: back-project into the sphere from view i, project into view j.
        err = np.linalg.norm(project(views[j], sphere_hits(views[i], found.kpts0)) - found.kpts1, axis=1)
        err = np.where(np.isnan(err), np.inf, err)
        assert np.median(err) < 0.5
        assert (err < 2.0).mean() > 0.9


def test_sift_no_texture_no_matches():
    blank = np.full((64, 64), 200, np.uint8)
    found = SiftMatcher()(blank, blank)
    assert len(found) == 0 and found.kpts0.shape == (0, 2)


@pytest.mark.parametrize("polar", [75, 105])
def test_estimate_elevation_sift_on_renders(polar, renders_75):
    images = renders_75 if polar == 75 else render_nearby(polar)
    result = estimate_elevation(images, SiftMatcher())
    assert result.matcher == "sift"
    assert min(result.num_matches.values()) >= 50
    assert abs(result.polar - polar) <= 1


# --- LoFTR ------------------------------------------------------------------------------------------------------------


def save_checkpoint(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Save tensors the way the reference's checkpoint holds them: under ``state_dict``, keys prefixed ``matcher.``."""
    torch.save({"state_dict": {f"matcher.{k}": v for k, v in state.items()}, "epoch": 29}, path)


@pytest.fixture(scope="module")
def loftr_ckpt(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A randomly initialised indoor LoFTR (built here from kornia's default config) saved as the reference's file."""
    from kornia.feature import LoFTR
    from kornia.feature.loftr.loftr import default_cfg

    config = copy.deepcopy(default_cfg)
    config["coarse"]["temp_bug_fix"] = True
    torch.manual_seed(0)
    state = LoFTR(pretrained=None, config=config).state_dict()
    path = tmp_path_factory.mktemp("weights") / LOFTR_WEIGHTS_FILENAME
    save_checkpoint(path, state)
    return path, state


@pytest.fixture(scope="module")
def loftr_matcher(loftr_ckpt) -> LoFTRMatcher:
    return LoFTRMatcher(loftr_ckpt[0], device="cpu")


def test_loftr_loads_checkpoint_strictly(loftr_ckpt, loftr_matcher):
    loaded = loftr_matcher.model.state_dict()
    assert loaded.keys() == loftr_ckpt[1].keys()
    for key, value in loftr_ckpt[1].items():
        assert torch.equal(loaded[key], value), key
    assert loftr_matcher.model.config["coarse"]["temp_bug_fix"] is True
    assert not loftr_matcher.model.training
    assert loftr_matcher.input_size == 480 and loftr_matcher.name == "loftr"


def test_loftr_runs_on_small_images(loftr_matcher, monkeypatch):
    small = copy.copy(loftr_matcher)
    small.input_size = 64  # 480 takes seconds on a CPU
    monkeypatch.setattr(small.model.coarse_matching, "thr", 0.0)  # random weights: keep every mutual nearest pair
    rng = np.random.default_rng(0)
    image0 = rng.integers(0, 256, (64, 80), dtype=np.uint8)
    image1 = rng.integers(0, 256, (72, 56), dtype=np.uint8)
    found = small(image0, image1)
    assert len(found) > 0
    assert found.kpts0.shape == found.kpts1.shape == (len(found), 2)
    assert found.confidence.shape == (len(found),)
    for kpts, (h, w) in ((found.kpts0, image0.shape), (found.kpts1, image1.shape)):
        assert (kpts >= 0).all() and (kpts[:, 0] <= w).all() and (kpts[:, 1] <= h).all()


def test_loftr_rescales_keypoints_to_input_size(loftr_matcher):
    class FixedOutput(torch.nn.Module):
        def forward(self, data):
            assert data["image0"].shape == data["image1"].shape == (1, 1, 480, 480)
            return {
                "keypoints0": torch.tensor([[240.0, 120.0]]),
                "keypoints1": torch.tensor([[480.0, 48.0]]),
                "confidence": torch.tensor([0.9]),
            }

    fixed = copy.copy(loftr_matcher)
    fixed.model = FixedOutput()
    found = fixed(np.zeros((64, 80), np.uint8), np.zeros((256, 256), np.uint8))
    np.testing.assert_allclose(found.kpts0, [[40.0, 16.0]])  # ×80/480, ×64/480
    np.testing.assert_allclose(found.kpts1, [[256.0, 25.6]])
    np.testing.assert_allclose(found.confidence, [0.9], rtol=1e-6)


def test_loftr_missing_weights(tmp_path):
    path = tmp_path / LOFTR_WEIGHTS_FILENAME
    with pytest.raises(MissingWeightsError) as info:
        LoFTRMatcher(path)
    assert str(path) in str(info.value)
    assert "one2345 weights download --only loftr" in str(info.value)


def test_loftr_bad_checkpoints(loftr_ckpt, tmp_path):
    incomplete = tmp_path / "incomplete.ckpt"
    save_checkpoint(incomplete, {k: v for k, v in loftr_ckpt[1].items() if k != "backbone.conv1.weight"})
    with pytest.raises(CheckpointError, match=r"backbone\.conv1\.weight"):
        LoFTRMatcher(incomplete, device="cpu")
    no_state = tmp_path / "no_state.ckpt"
    torch.save({"model": {}}, no_state)
    with pytest.raises(CheckpointError, match="state_dict"):
        LoFTRMatcher(no_state, device="cpu")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="Cannot read"):
        LoFTRMatcher(garbage, device="cpu")
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="Cannot read"):
        LoFTRMatcher(empty, device="cpu")


def test_available_matcher(loftr_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("ONE2345_WEIGHTS", str(tmp_path / "default-weights"))  # the default folder is empty
    assert isinstance(available_matcher(None), SiftMatcher)
    assert isinstance(available_matcher(tmp_path), SiftMatcher)  # no weights there
    weights_dir = tmp_path / "weights"
    target = weights_dir / weight_file("loftr").local_name  # the registry's layout under the weights folder
    target.parent.mkdir(parents=True)
    shutil.copy(loftr_ckpt[0], target)
    assert isinstance(available_matcher(weights_dir), LoFTRMatcher)
    assert isinstance(available_matcher(weights_dir, prefer="sift"), SiftMatcher)
    with pytest.raises(BadInputError, match="superglue"):
        available_matcher(None, prefer="superglue")


# --- the robust fit, its confidence and the rule for low confidence (issue #12) ----------------------------------


def with_outliers(matches: dict, share: float, rng: np.random.Generator) -> dict:
    """Replace ``share`` of each pair's matches by wrong ones (the second end anywhere on the object's image)."""
    out = {}
    for pair, m in matches.items():
        m = m.copy()
        bad = rng.random(len(m)) < share
        m[bad, 2:4] = rng.uniform(40, 216, size=(int(bad.sum()), 2))
        out[pair] = m
    return out


@pytest.mark.parametrize("polar", [55, 67, 75, 90, 112])
def test_robust_fit_recovers_the_polar_with_30_percent_wrong_matches(polar):
    rng = np.random.default_rng(polar)
    fit = fit_polar(with_outliers(synthetic_matches(polar, rng), 0.3, rng))
    assert abs(fit.polar - polar) <= 1 and not fit.uncertain and fit.confidence > 0.7
    assert all(abs(p - polar) <= 2 for p in fit.pair_minima.values())
    assert fit.curve.shape == (151 - 20, 2) and fit.curve[:, 0].min() == 20 and fit.curve[:, 0].max() == 150


def shifted(matches: dict, shifts: np.ndarray) -> dict:
    """The same matches with each view's keypoints moved by its own 2D shift (a generated view off-centre)."""
    out = {}
    for (i, j), m in matches.items():
        m = m.copy()
        m[:, 0:2] += shifts[i]
        m[:, 2:4] += shifts[j]
        out[(i, j)] = m
    return out


@pytest.mark.parametrize("polar", [60, 95])
def test_view_shifts_are_fitted_away_and_the_plain_fit_is_kept_on_clean_matches(polar):
    rng = np.random.default_rng(polar + 1)
    clean = synthetic_matches(polar, rng)
    offset = shifted(clean, np.array([[1.2, -0.8], [-1.0, 1.1], [0.9, 1.2], [-1.2, -0.9]]))
    plain = fit_polar(offset)
    fitted = fit_polar(offset, config=RobustFitConfig(shift_px=1.0))
    # Shifts of about a pixel make the pairs disagree, so the plain fit doubts; with the shifts fitted they agree.
    assert plain.uncertain and not fitted.uncertain and fitted.confidence > 0.9 and abs(fitted.polar - polar) <= 1
    assert all(abs(p - polar) <= 1 for p in fitted.pair_minima.values())
    # On matches without shifts the shift fit changes little: the prior keeps the shifts near zero.
    assert abs(fit_polar(clean, config=RobustFitConfig(shift_px=1.0)).polar - fit_polar(clean).polar) <= 1


def test_the_reference_search_is_pulled_off_by_the_same_outliers():
    # Why the robust fit exists: on these matches the reference's mean reprojection error misses by far.
    rng = np.random.default_rng(75)
    matches = with_outliers(synthetic_matches(75, rng), 0.3, rng)
    assert abs(estimate_polar_from_matches(matches) - 75) > 5
    assert fit_polar(matches).polar == pytest.approx(75, abs=1)


def test_wrong_matches_only_give_no_confidence():
    rng = np.random.default_rng(5)
    random = {p: np.c_[rng.uniform(40, 216, (300, 4)), np.ones(300)] for p in PAIRS}
    fit = fit_polar(random)
    assert fit.uncertain and fit.confidence < 0.1


def test_two_objects_disagreeing_give_no_confident_answer():
    # Half the evidence says 60°, half 110°: two basins of equal depth. Whichever wins, it must not be trusted.
    rng = np.random.default_rng(9)
    a, b = synthetic_matches(60, rng), synthetic_matches(110, rng)
    mixed = {p: np.concatenate([a[p], b[p]]) for p in PAIRS}
    assert fit_polar(mixed).uncertain


def test_identical_views_are_refused_as_symmetric_or_textureless():
    rng = np.random.default_rng(4)
    points = rng.uniform(60, 200, (300, 2))
    same = {p: np.c_[points, points, np.ones(300)] for p in PAIRS}
    with pytest.raises(BadInputError, match="look the same"):
        fit_polar(same)


def test_a_symmetric_pair_never_gives_a_confident_wrong_answer():
    rng = np.random.default_rng(8)
    matches = synthetic_matches(80, rng)
    points = rng.uniform(60, 200, (300, 2))
    matches[(2, 3)] = np.c_[points, points, np.ones(300)]  # views 2 and 3 identical: a z-symmetric object
    fit = fit_polar(matches)
    assert abs(fit.polar - 80) <= 1 or fit.uncertain
    assert fit.confidence < fit_polar(synthetic_matches(80, np.random.default_rng(8))).confidence


class FixedMatcher:
    """Returns the given correspondences for each pair of the oracle images (recognised by their grey level)."""

    def __init__(self, name: str, matches: dict) -> None:
        self.name, self.matches = name, matches

    def __call__(self, image0: np.ndarray, image1: np.ndarray) -> Matches:
        i, j = ((int(im[128, 128]) - 100) // 10 for im in (image0, image1))
        m = self.matches.get((i, j), np.zeros((0, 5)))
        return Matches(m[:, 0:2], m[:, 2:4], m[:, 4])


def test_low_confidence_tries_each_matcher_then_keeps_the_best_guess_flagged():
    rng = np.random.default_rng(11)
    good = FixedMatcher("good", synthetic_matches(70, rng))
    noise = FixedMatcher("noise", {p: np.c_[rng.uniform(40, 216, (3000, 4)), np.ones(3000)] for p in PAIRS})
    images = oracle_images()
    images = [np.where(im == 250, 120 + 10 * n, im).astype(np.uint8) for n, im in enumerate(images)]  # no background
    for n, im in enumerate(images):
        im[128, 128] = 100 + 10 * n
    pooled_is_uncertain = estimate_elevation(images, [noise, good])
    assert pooled_is_uncertain.uncertain and pooled_is_uncertain.matcher == "noise+good"
    result = ElevationEstimator([noise, good])(images)  # 1. pooled: uncertain → 2. each alone: "good" is confident
    assert (result.polar, result.matcher, result.source, result.uncertain) == (70, "good", "estimated", False)
    assert "noise+good" in result.note and "good: polar 70" in result.note
    guess = ElevationEstimator([noise])(images)  # nothing confident → 3. the most confident fit, flagged
    assert (guess.source, guess.uncertain, guess.matcher) == ("estimated", True, "noise")
    assert guess.confidence < 0.5 and "every fit was uncertain" in guess.note
    nothing = ElevationEstimator([FixedMatcher("empty", {})])(images)  # no fit at all → 4. the reference's polar 90
    assert (nothing.polar, nothing.source, nothing.uncertain, nothing.matcher) == (90, "fallback", True, "none")
    assert nothing.to_json()["elevation"] == 0 and "no fit was possible" in nothing.note


def test_one_matcher_does_not_overrule_the_pooled_fit_from_elsewhere():
    rng = np.random.default_rng(11)
    good = FixedMatcher("good", synthetic_matches(70, rng))
    liar = FixedMatcher("liar", synthetic_matches(100, np.random.default_rng(5), n_points=60))  # consistent, wrong
    noise = FixedMatcher("noise", {p: np.c_[rng.uniform(40, 216, (3000, 4)), np.ones(3000)] for p in PAIRS})
    images = oracle_images()
    images = [np.where(im == 250, 120 + 10 * n, im).astype(np.uint8) for n, im in enumerate(images)]
    for n, im in enumerate(images):
        im[128, 128] = 100 + 10 * n
    alone = estimate_elevation(images, [liar])
    assert (alone.polar, alone.uncertain) == (100, False)  # sure of itself, 30° off
    result = ElevationEstimator([noise, liar, good])(images)  # the pooled fit is uncertain, near 70
    assert (result.polar, result.matcher, result.uncertain) == (70, "good", False), result
    assert "liar: polar 100 is more than 5° from the pooled fit's" in result.note


def test_the_estimator_matches_each_pair_once_whatever_it_fits():
    rng = np.random.default_rng(11)
    calls = []

    class Counting(FixedMatcher):
        def __call__(self, image0: np.ndarray, image1: np.ndarray) -> Matches:
            calls.append(self.name)
            return super().__call__(image0, image1)

    good = Counting("good", synthetic_matches(70, rng))
    noise = Counting("noise", {p: np.c_[rng.uniform(40, 216, (3000, 4)), np.ones(3000)] for p in PAIRS})
    images = oracle_images()
    images = [np.where(im == 250, 120 + 10 * n, im).astype(np.uint8) for n, im in enumerate(images)]
    for n, im in enumerate(images):
        im[128, 128] = 100 + 10 * n
    result = ElevationEstimator([noise, good])(images)  # three fits (pooled, noise, good), one matching
    assert result.matcher == "good" and sorted(calls) == ["good"] * 6 + ["noise"] * 6
    views = match_views(images, [noise, good])
    assert ElevationEstimator([noise, good]).fit(views) == result
    with pytest.raises(BadInputError, match="matched by"):
        ElevationEstimator([good]).fit(views)


def test_textureless_views_fall_back_flagged():
    blank = [np.full((SIZE, SIZE, 3), 180, np.uint8) for _ in range(4)]
    result = ElevationEstimator([FlowMatcher(), SiftMatcher()])(blank)
    assert result.source == "fallback" and result.uncertain and result.confidence == 0.0


@pytest.mark.parametrize("pair", FlowMatcher.pairs)
def test_flow_matches_agree_with_the_true_geometry(pair, renders_75):
    found = FlowMatcher()(*(cv2.cvtColor(renders_75[k], cv2.COLOR_RGB2GRAY) for k in pair))
    assert len(found) > 500
    r = sampson_distances(fundamental_matrices(candidate_poses(np.array([75.0])), pair, K_TRUE),
                          np.c_[found.kpts0, found.kpts1])[0]
    assert np.median(r) < 0.2 and (found.confidence > 0).all() and (found.confidence <= 1).all()
    assert set(FlowMatcher.pairs) | {(0, 1), (2, 3)} == set(PAIRS)  # the 20° pairs are left to feature matchers


def _covariance_rows(major: np.ndarray, variance: float) -> np.ndarray:
    """[M, 3] (σxx, σxy, σyy) with ``variance`` along the unit directions major [M, 2] and 1 across them."""
    minor = np.stack([-major[:, 1], major[:, 0]], axis=1)
    sigma = variance * major[:, :, None] * major[:, None, :] + minor[:, :, None] * minor[:, None, :]
    return np.stack([sigma[:, 0, 0], sigma[:, 0, 1], sigma[:, 1, 1]], axis=1)


def _stripes(size: int, angle_deg: float, amplitude: float, noise: float) -> np.ndarray:
    """[size, size] uint8: stripes of period 12 px whose brightness changes along angle_deg, over smooth noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    a = np.radians(angle_deg)
    blobs = cv2.GaussianBlur(np.random.default_rng(0).normal(size=(size, size)), (0, 0), 2) * 40 * noise
    image = 128 + amplitude * np.sin(2 * np.pi * (xx * np.cos(a) + yy * np.sin(a)) / 12) + blobs
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(("amplitude", "noise"), [(80, 1.0), (0, 3.0)])
def test_flow_is_unsure_along_stripes_and_sure_on_blobs(amplitude, noise):
    image0 = _stripes(SIZE, 30.0, amplitude, noise)
    image1 = cv2.warpAffine(image0, np.float32([[1, 0, 2.0], [0, 1, 1.0]]), (SIZE, SIZE),
                            borderMode=cv2.BORDER_REFLECT)
    found = FlowMatcher(range_px=0)(image0, image1)
    c = found.covariance
    values, vectors = np.linalg.eigh(np.stack([np.stack([c[:, 0], c[:, 1]], -1), np.stack([c[:, 1], c[:, 2]], -1)], 1))
    ratio = values[:, 1] / values[:, 0]
    assert len(found) > 1000 and np.allclose(values[:, 0], 1.0)
    if amplitude:  # brightness changes along 30°: the flow is unsure along 120°, the stripes' direction
        along = np.degrees(np.arctan2(vectors[:, 1, 1], vectors[:, 0, 1])) % 180
        assert np.median(ratio) == pytest.approx(FlowMatcher().max_spread)
        assert abs(np.median(along) - 120.0) < 3.0
    else:
        assert np.median(ratio) < 6.0


def test_irregular_flow_is_less_sure_in_every_direction():
    image0 = _stripes(SIZE, 30.0, 0, 3.0)
    image1 = cv2.warpAffine(image0, np.float32([[1, 0, 2.0], [0, 1, 1.0]]), (SIZE, SIZE),
                            borderMode=cv2.BORDER_REFLECT)
    plain, widened = FlowMatcher(range_px=0)(image0, image1), FlowMatcher(range_px=0.5)(image0, image1)
    np.testing.assert_array_equal(plain.kpts1, widened.kpts1)
    extra = widened.covariance - plain.covariance
    assert (extra[:, 0] > 0).all() and np.allclose(extra[:, 0], extra[:, 2]) and np.allclose(extra[:, 1], 0)


def test_sampson_distance_in_units_of_the_match_spread():
    m = synthetic_matches(75, np.random.default_rng(3))[(0, 2)]
    F = fundamental_matrices(candidate_poses(np.array([80.0])), (0, 2), K_TRUE)
    plain = sampson_distances(F, m)
    np.testing.assert_allclose(sampson_distances(F, np.c_[m, np.tile(ISOTROPIC, (len(m), 1))]), plain)
    np.testing.assert_allclose(sampson_distances(F, np.c_[m, np.tile([4.0, 0.0, 4.0], (len(m), 1))]), plain / 2)


@pytest.mark.parametrize("polar", [60, 95, 112])
def test_matches_unsure_along_their_error_do_not_pull_the_fit(polar):
    # Half the matches slide (about 1.3 px) onto the epipolar lines of polar + 8, as flow slides along a stripe.
    rng = np.random.default_rng(polar)
    plain, described = {}, {}
    for pair, m in synthetic_matches(polar, rng, noise=0.2).items():
        F = fundamental_matrices(candidate_poses(np.array([polar + 8.0])), pair, K_TRUE)[0]
        line = np.c_[m[:, :2], np.ones(len(m))] @ F.T
        normal = line[:, :2] / np.linalg.norm(line[:, :2], axis=1, keepdims=True)
        off = (np.c_[m[:, 2:4], np.ones(len(m))] * line).sum(axis=1) / np.linalg.norm(line[:, :2], axis=1)
        slid = rng.random(len(m)) < 0.5
        m = m.copy()
        m[slid, 2:4] -= off[slid, None] * normal[slid]
        covariance = np.tile(ISOTROPIC, (len(m), 1))
        covariance[slid] = _covariance_rows(normal[slid], 36.0)
        plain[pair], described[pair] = m, np.c_[m, covariance]
    assert fit_polar(plain).polar - polar >= 3  # told nothing, the fit follows the slid half
    assert fit_polar(described).polar == polar
    same = fit_polar({p: np.c_[m, np.tile(ISOTROPIC, (len(m), 1))] for p, m in plain.items()})
    np.testing.assert_array_equal(same.curve, fit_polar(plain).curve)  # [M, 5] is the isotropic [M, 8]


def test_match_views_keeps_each_matchers_covariance(renders_75):
    views = match_views(renders_75, [FlowMatcher(), SiftMatcher()])
    flow, sift = views.matches
    assert all(m.shape[1] == 8 for m in [*flow.values(), *sift.values()])
    assert all((m[:, 5:] == ISOTROPIC).all() for m in sift.values())
    assert any((m[:, 5:] != ISOTROPIC).any() for m in flow.values())
    assert views.pooled([0, 1])[(0, 2)].shape == (len(flow[(0, 2)]) + len(sift[(0, 2)]), 8)


def test_match_arrays_and_covariances_are_checked():
    good = synthetic_matches(75, np.random.default_rng(4))
    with pytest.raises(BadInputError, match=r"\[M, 8\] array .* or \[M, 5\].*got shape \(\d+, 6\)"):
        fit_polar({**good, (0, 2): np.c_[good[(0, 2)], np.ones(len(good[(0, 2)]))]})
    flat = np.c_[good[(0, 2)], np.tile([1.0, 1.0, 1.0], (len(good[(0, 2)]), 1))]  # σxx·σyy = σxy²: a line
    with pytest.raises(BadInputError, match=r"pair \(0, 2\): the covariance .* positive definite"):
        fit_polar({**good, (0, 2): flat})
    with pytest.raises(BadInputError, match=r"covariance must be \[M, 3\].*got shape \(2, 2\)"):
        Matches(np.zeros((2, 2)), np.zeros((2, 2)), np.ones(2), np.ones((2, 2)))
    with pytest.raises(BadInputError, match="positive definite"):
        Matches(np.zeros((2, 2)), np.zeros((2, 2)), np.ones(2), np.array([[1.0, 0.0, 1.0], [1.0, 2.0, 1.0]]))
    np.testing.assert_array_equal(Matches(np.zeros((2, 2)), np.zeros((2, 2)), np.ones(2)).covariance,
                                  np.tile(ISOTROPIC, (2, 1)))


@pytest.mark.parametrize("polar", [75, 105])
def test_estimate_elevation_pooled_on_renders(polar, renders_75):
    images = renders_75 if polar == 75 else render_nearby(polar)
    for matchers in ([FlowMatcher()], [FlowMatcher(), SiftMatcher()]):
        result = estimate_elevation(images, matchers)
        assert abs(result.polar - polar) <= 1 and not result.uncertain, (result, matchers)
    assert result.matcher == "flow+sift"


def test_cli_prints_the_confidence_fields(renders_75, tmp_path, capsys):
    paths = []
    for n, image in enumerate(renders_75):
        paths.append(tmp_path / f"0_{n}.png")
        Image.fromarray(image).save(paths[-1])
    assert cli_main(["elevation", *map(str, paths), "--matcher", "auto", "--weights-dir", str(tmp_path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"polar", "elevation", "matcher", "confidence", "uncertain", "inliers", "source", "note"}
    assert abs(printed["polar"] - 75) <= 1 and printed["uncertain"] is False and printed["matcher"] == "flow+sift"
    assert printed["inliers"] > 100 and 0.5 <= printed["confidence"] <= 1


def test_small_views_are_matched_at_256(renders_75):
    small = [cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA) for image in renders_75]
    result = estimate_elevation(small, [FlowMatcher(), SiftMatcher()])
    assert abs(result.polar - 75) <= 2 and not result.uncertain


# --- silhouettes: epipolar tangency for objects without texture (issue #12) ------------------------------------------


def ellipsoid_masks(polar: float, axes=(0.42, 0.25, 0.16), size: int = SIZE) -> list[np.ndarray]:
    """Silhouettes [S, S] bool of a tilted ellipsoid (no symmetry about any camera axis) in the four nearby views:
    the convex hull of 20 000 projected surface points, filled at 1/16-pixel precision."""
    rng = np.random.default_rng(0)
    u = rng.normal(size=(20000, 3))
    surface = u / np.linalg.norm(u, axis=1, keepdims=True) * np.array(axes)
    rotation, _ = np.linalg.qr(np.array([[0.8, -0.3, 0.5], [0.4, 0.9, -0.1], [-0.2, 0.3, 0.9]]))
    surface = surface @ rotation.T
    masks = []
    for view in (camera(*pa) for pa in nearby_views(polar)):
        hull = cv2.convexHull((project(view, surface) * size / SIZE).astype(np.float32))[:, 0]
        canvas = np.zeros((size, size), np.uint8)
        cv2.fillConvexPoly(canvas, np.round(hull * 16 - 8).astype(np.int32), 1, shift=4)  # pixel centres at +0.5
        masks.append(canvas.astype(bool))
    return masks


def test_frontier_points_lie_on_their_epipolar_lines_only_under_the_true_polar():
    masks = ellipsoid_masks(70)
    outlines = [silhouette_outline(m) for m in masks]
    poses = candidate_poses(np.array([50.0, 70.0, 90.0]))
    for pair in [(0, 2), (1, 3), (2, 3)]:
        frontier = frontier_points(poses, pair, K_TRUE, outlines[pair[0]], outlines[pair[1]])
        assert frontier.shape == (3, 2, 5)
        r = sampson_distances(fundamental_matrices(poses, pair, K_TRUE), frontier)
        assert r[1].max() < 0.5, (pair, r)  # pixel-quantised outlines, yet well within a pixel at the true polar
        assert (r[[0, 2]].max(axis=1) > 1.0).all(), (pair, r)  # 20° off: a tangency misses by over a pixel


@pytest.mark.parametrize("polar", [58, 85, 110])
def test_silhouettes_alone_give_the_polar_of_an_untextured_object(polar):
    outlines = [silhouette_outline(m) for m in ellipsoid_masks(polar)]
    fit = fit_polar({}, outlines=outlines)
    assert abs(fit.polar - polar) <= 2, fit
    assert fit.inliers == 0 and fit.matches == 0
    with pytest.raises(BadInputError, match="silhouettes inside the frame"):
        fit_polar({}, outlines=outlines, config=RobustFitConfig(silhouette_weight=0.0))


def test_an_untextured_object_is_estimated_from_its_silhouettes_not_the_fallback():
    polar = 64
    images = [np.where(m[..., None], np.uint8(150), np.uint8(255)).repeat(3, axis=2) for m in ellipsoid_masks(polar)]
    result = ElevationEstimator([FlowMatcher(), SiftMatcher()])(images)  # one flat grey: no match anywhere
    assert result.source == "estimated" and abs(result.polar - polar) <= 2, result
    assert max(result.num_matches.values()) < RobustFitConfig().min_pair_matches  # too few to fit any pair


def test_outline_of_the_object_without_specks_and_none_when_cut_off():
    mask = np.zeros((64, 64), bool)
    mask[20:40, 10:30] = True
    mask[50, 50] = True  # a speck of background noise
    outline = silhouette_outline(mask)
    assert outline.min(axis=0).tolist() == [10.5, 20.5] and outline.max(axis=0).tolist() == [29.5, 39.5]
    mask[20:40, 0:5] = True  # the object leaves the frame: its outline would have false tangents
    assert silhouette_outline(mask).shape == (0, 2)
    assert silhouette_outline(np.zeros((8, 8), bool)).shape == (0, 2)


def disc_view(sigma: float, grey: int = 128, radius: float = 60.0) -> np.ndarray:
    """[256, 256, 3] uint8: a grey disc on white, blurred by a Gaussian of ``sigma`` px (as a generated view is)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    disc = np.where((xx - 128) ** 2 + (yy - 128) ** 2 < radius**2, float(grey), 255.0)
    return cv2.GaussianBlur(disc, (0, 0), sigma).round().astype(np.uint8)[..., None].repeat(3, axis=2)


@pytest.mark.parametrize(("sigma", "within"), [(0.5, 0.1), (2.0, 0.1), (4.0, 0.8), (5.0, 1.5)])
def test_the_outline_of_a_blurred_view_stays_on_its_edge(sigma, within):
    image = disc_view(sigma)
    # Boundary pixel centres of a radius-60 disc lie at 59.5. Up to a blur as wide as the window (4 px) the edge
    # stays there; wider, the window no longer reaches the object's own level and the edge drifts out a little.
    moved = np.linalg.norm(silhouette_outline(half_level_mask(image)) - 128.0, axis=1).mean() - 59.5
    assert abs(moved) < within, moved
    # The near-white threshold moves out with the blur (1.4 σ for mid-grey): differently in every view.
    spread = np.linalg.norm(silhouette_outline(foreground_mask(image)) - 128.0, axis=1).mean() - 59.5
    assert spread > 1.3 * sigma and spread > 4 * abs(moved), spread


def test_the_half_level_outline_keeps_a_light_part_beside_a_dark_one():
    image = np.full((SIZE, SIZE, 3), 255, np.uint8)
    image[60:200, 40:128] = 40  # dark half
    image[60:200, 128:220] = 215  # light half: a fifth as dark as the other
    outline = silhouette_outline(half_level_mask(image))
    assert outline.min(axis=0).tolist() == [40.5, 60.5] and outline.max(axis=0).tolist() == [219.5, 199.5]


def test_matches_and_silhouettes_that_disagree_are_flagged():
    matches = synthetic_matches(70, np.random.default_rng(3), n_points=150)
    agreeing = fit_polar(matches, outlines=[silhouette_outline(m) for m in ellipsoid_masks(70)])
    assert agreeing.polar == 70 and not agreeing.uncertain
    outlines = [silhouette_outline(m) for m in ellipsoid_masks(90)]  # e.g. shifted or blurred generated views
    matches_alone, silhouettes_alone = fit_polar(matches), fit_polar({}, outlines=outlines)
    assert matches_alone.polar == 70 and abs(silhouettes_alone.polar - 90) <= 2
    assert not matches_alone.uncertain and not silhouettes_alone.uncertain  # each cue alone is sure of itself
    both = fit_polar(matches, outlines=outlines)
    assert both.uncertain and both.confidence <= 0.5 * agreeing.confidence, both


@pytest.mark.parametrize("own", [0, 8])  # 8 per pair: two pairs take part, 16 matches < min_inliers (24)
def test_a_matcher_without_matches_of_its_own_does_not_overrule_the_pooled_fit(own):
    masks = ellipsoid_masks(100, axes=(0.45, 0.40, 0.36))  # holds the matched points (a ball of radius 0.35)
    images = [np.where(m[..., None], np.uint8(100 + 10 * n), np.uint8(255)).repeat(3, axis=2)
              for n, m in enumerate(masks)]
    truth = synthetic_matches(70, np.random.default_rng(3), n_points=150)
    good = FixedMatcher("good", truth)
    wrong = synthetic_matches(100, np.random.default_rng(4))  # a few matches that side with the silhouettes
    sparse = FixedMatcher("sparse", {p: wrong[p][:own] for p in [(0, 2), (1, 3)]} if own else {})
    silhouettes = estimate_elevation(images, [sparse])
    assert silhouettes.fitted == 2 * own and not silhouettes.uncertain and silhouettes.polar > 95  # sure, 30° off
    result = ElevationEstimator([good, sparse])(images)
    assert result.uncertain and abs(result.polar - 70) <= 3 and result.matcher == "good+sparse", result
    assert f"sparse: too few matches of its own ({2 * own} < 24" in result.note
