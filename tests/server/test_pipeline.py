"""The whole pipeline with the tiny preset: real (small, random) models, real files, real cancellation."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from server.common.cameras import PoseFile
from server.common.errors import BadInputError, CancelledError
from server.common.mesh_io import load_mesh
from server.pipeline import GenerateOptions, One2345Pipeline
from server.pipeline.reconstruct import STAGE_COST, reconstruction_fraction
from server.service.cli import main
from server.stages.elevation import ElevationEstimator, Matches
from server.stages.multiview.ddim import ddim_timesteps

FAST = dict(steps_stage1=2, steps_stage2=3, resolution=32)


@pytest.fixture(scope="module")
def pipe() -> One2345Pipeline:
    return One2345Pipeline.from_preset("tiny", device="cpu")


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    """A red disc with a blue stripe on a plain, slightly noisy grey background (no alpha)."""
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(200, 3, (300, 400, 3)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:300, :400]
    disc = (yy - 150) ** 2 + (xx - 210) ** 2 < 90**2
    img[disc] = (200, 30, 30)
    img[disc & (abs(yy - 150) < 12)] = (30, 30, 200)
    path = tmp_path_factory.mktemp("in") / "photo.jpg"
    Image.fromarray(img).save(path, quality=95)
    return path


@pytest.fixture(scope="module")
def run(pipe, photo, tmp_path_factory):
    events = []
    result = pipe(photo, tmp_path_factory.mktemp("run") / "photo", GenerateOptions(seed=7, format="ply", **FAST),
                  progress=events.append)
    return result, events


def test_run_folder_holds_every_intermediate(run):
    result, _ = run
    root = result.views_dir.parent
    assert (root / "input.png").is_file() and (root / "input_256.png").is_file()
    assert Image.open(root / "input_256.png").size == (256, 256)
    poses = PoseFile.read(result.views_dir / "pose.json")
    assert len(poses.c2ws) == 40
    for view_id in poses.c2ws:
        with Image.open(result.views_dir / view_id) as im:
            assert im.size == (256, 256) and im.mode == "RGB"
    meta = json.loads(result.meta_path.read_text())
    assert meta["seed"] == 7 and meta["background"] == "foreground-estimate" == result.background
    assert meta["options"]["steps_stage1"] == 2 and meta["elevation"] == result.elevation
    assert set(meta["timings"]) >= {"preprocess", "stage1", "stage2", "elevation", "stage1b", "stage2b",
                                    "reconstruct", "reconstruct.colors"}
    mesh = load_mesh(result.mesh_path)
    assert result.mesh_path.suffix == ".ply" and mesh.colors is not None and len(mesh.vertices) == result.vertices


def test_progress_is_ordered_monotone_and_ends_at_one(run):
    _, events = run
    stages = list(dict.fromkeys(e.stage for e in events))
    assert stages == ["preprocess", "stage1", "stage2", "elevation", "stage1b", "stage2b", "reconstruct", "export"]
    fractions = [e.fraction for e in events]
    assert all(b >= a - 1e-9 for a, b in itertools.pairwise(fractions))
    assert fractions[-1] == pytest.approx(1.0)
    previews = [e.preview for e in events if e.preview is not None]
    assert previews[0].name == "input_256.png" and len(previews) == 1 + 4 + 4 + 4
    assert all(p.is_file() for p in previews)


def test_progress_moves_through_reconstruction_by_its_sub_stages(run):
    # Regression: each sub-stage's own done/total was reported as the whole stage's, so the job sat at 99.6 % for
    # the whole reconstruction. Now the sub-stages advance the fraction by their measured shares of its time.
    _, events = run
    recon = [e for e in events if e.stage == "reconstruct"]
    reached = {e.message: e.fraction for e in recon}  # the last fraction reported by each sub-stage
    assert list(reached) == ["features", "volume", "sdf", "marching_cubes", "colors", ""]
    start = [e for e in events if e.stage == "stage2b"][-1].fraction  # where reconstruction began
    end = recon[-1].fraction
    costs = STAGE_COST["cpu"]
    total = sum(costs.values())
    for name in ("features", "volume", "sdf", "marching_cubes"):  # "colors" is reported once, on completion
        share_done = sum(costs[n] for n in list(costs)[: list(costs).index(name) + 1]) / total
        assert reached[name] == pytest.approx(start + (end - start) * share_done, abs=0.01), name
    assert (reached["sdf"] - reached["volume"]) > 0.1 * (end - start)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_reconstruction_fraction_spans_zero_to_one_in_stage_order(device):
    names = list(STAGE_COST[device])
    points = [reconstruction_fraction(n, d, 4, device) for n in names for d in range(5)]
    assert points[0] == 0.0 and points[-1] == pytest.approx(1.0)
    assert all(b >= a for a, b in itertools.pairwise(points))
    assert reconstruction_fraction("sdf", 7, 0, device) == reconstruction_fraction("sdf", 0, 5, device)


def test_stage2_runs_as_one_batch(run):
    _, events = run
    # Stage 2b: all 28 nearby views in one sampler run, so each denoising step is reported once (not once per image).
    expected = len(ddim_timesteps(FAST["steps_stage2"]))
    steps = [e.step for e in events if e.stage == "stage2b" and e.total == expected]
    assert steps == list(range(1, expected + 1))


def test_given_elevation_chooses_the_ring(pipe, photo, tmp_path):
    low = pipe(photo, tmp_path / "low", GenerateOptions(elevation=30, seed=1, **FAST))  # polar 60 ≤ 75 → views 4–7
    assert low.polar == 60 and low.elevation_source == "given"
    assert (low.views_dir / "4.png").is_file() and not (low.views_dir / "8.png").exists()
    high = pipe(photo, tmp_path / "high", GenerateOptions(elevation=-20, seed=1, **FAST))  # polar 110 → views 8–11
    assert high.polar == 110 and (high.views_dir / "8_3.png").is_file() and not (high.views_dir / "4.png").exists()


def test_same_seed_same_views(pipe, photo, tmp_path):
    a = pipe(photo, tmp_path / "a", GenerateOptions(elevation=0, seed=3, **FAST))
    b = pipe(photo, tmp_path / "b", GenerateOptions(elevation=0, seed=3, **FAST))
    for name in ("0.png", "9_2.png"):  # elevation 0 → polar 90 > 75 → the second ring is views 8–11
        assert np.array_equal(np.asarray(Image.open(a.views_dir / name)), np.asarray(Image.open(b.views_dir / name)))


def test_failed_matching_falls_back_to_polar_90(pipe, photo, tmp_path):
    class NoMatches:
        name = "none"

        def __call__(self, image0, image1):
            return Matches.empty()

    original = pipe.models.elevation
    pipe.models.elevation = ElevationEstimator([NoMatches()])
    try:
        result = pipe(photo, tmp_path / "fb", GenerateOptions(seed=2, **FAST))
    finally:
        pipe.models.elevation = original
    assert result.polar == 90 and result.elevation_source == "fallback" and result.elevation_uncertain
    meta = json.loads(result.meta_path.read_text())
    assert meta["elevation_source"] == "fallback" and meta["elevation_estimate"]["uncertain"] is True
    assert "too few matches" in meta["elevation_estimate"]["note"]


def test_cancel_stops_between_denoising_steps(pipe, photo, tmp_path):
    calls = []

    def should_cancel() -> bool:
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(CancelledError):
        pipe(photo, tmp_path / "c", GenerateOptions(seed=1, steps_stage1=50, steps_stage2=50, resolution=32),
             should_cancel=should_cancel)
    assert len(calls) == 4  # polled once per step; the 4th poll stops the run before any further UNet call
    assert not (tmp_path / "c" / "views" / "pose.json").exists()


@pytest.mark.parametrize(("field", "value", "allowed"), [
    ("elevation", 80, "[-60, 70]"), ("seed", -1, "2**32"), ("steps_stage1", 1, "[2, 200]"),
    ("steps_stage2", 2.5, "[2, 200]"), ("guidance", 0.5, "[1, 20]"), ("resolution", 16, "[32, 512]"),
    ("format", "stl", "ply, glb, obj"), ("remove_background", "yes", "true or false"),
])
def test_bad_options_name_the_field_and_what_is_allowed(field, value, allowed):
    with pytest.raises(BadInputError) as err:
        GenerateOptions(**{field: value}).check()
    assert field in str(err.value) and allowed in str(err.value)


def test_options_from_dict_rejects_unknown_fields():
    assert GenerateOptions.from_dict({"seed": 5}).seed == 5
    with pytest.raises(BadInputError, match=r"unknown option.*stepz"):
        GenerateOptions.from_dict({"stepz": 5})


def test_not_an_image_is_rejected_before_any_model_runs(pipe, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("hello")
    with pytest.raises(BadInputError):
        pipe(bad, tmp_path / "x", GenerateOptions(**FAST))
    assert not (tmp_path / "x" / "views" / "0.png").exists()


def test_cli_generate_several_images(photo, tmp_path, capsys):
    second = tmp_path / "second.png"
    Image.open(photo).transpose(Image.FLIP_LEFT_RIGHT).save(second)
    args = ["generate", str(photo), str(second), "--out-dir", str(tmp_path / "out"), "--preset", "tiny",
            "--device", "cpu", "--steps-stage1", "2", "--steps-stage2", "2", "--resolution", "32", "--format", "obj"]
    assert main(args) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "out" / "photo.obj"), str(tmp_path / "out" / "second.obj")]
    assert (tmp_path / "out" / "photo.one2345" / "views" / "pose.json").is_file()
    assert load_mesh(tmp_path / "out" / "second.obj").colors is not None


def test_cli_generate_argument_errors(photo, tmp_path, capsys):
    assert main(["generate", str(photo), str(photo), "-o", str(tmp_path / "a.glb"), "--preset", "tiny"]) == 2
    assert "use --out-dir" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "missing.png"), "-o", str(tmp_path / "a.glb"), "--preset", "tiny"]) == 2
    assert "missing.png' does not exist" in capsys.readouterr().err
    assert main(["generate", str(photo), "-o", str(tmp_path / "a.fbx"), "--preset", "tiny"]) == 2
    assert "must end in .ply, .glb or .obj" in capsys.readouterr().err


def test_png_writer_finishes_every_file_even_when_the_block_fails(tmp_path):
    from server.common.views import read_rgb
    from server.pipeline.one2345 import _png_writer

    views = {f"{i}.png": np.full((16, 16, 3), 10 * i, np.uint8) for i in range(6)}
    with pytest.raises(CancelledError, match="cancelled while meshing"), _png_writer() as write:
        for name, view in views.items():
            write(tmp_path / name, view)
        raise CancelledError("cancelled while meshing")
    for name, view in views.items():  # every view written in full (nothing made is lost), no temporary left
        np.testing.assert_array_equal(read_rgb(tmp_path / name), view)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(views)
    with pytest.raises(FileNotFoundError), _png_writer() as write:  # a write that fails is not swallowed
        write(tmp_path / "missing" / "0.png", views["0.png"])
