"""`one2345 reconstruct` end to end with the tiny preset: real networks, real files, real errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from server.common.cameras import PoseFile
from server.common.errors import BadInputError
from server.common.mesh_io import load_mesh
from server.common.synthetic import write_views_dir
from server.common.views import load_views
from server.pipeline.reconstruct import reconstruct_mesh
from server.service.cli import main
from server.stages.meshing import MeshingConfig
from server.stages.reconstruction.model import build_model


@pytest.fixture(scope="module")
def views_dir(tmp_path_factory) -> Path:
    return write_views_dir(tmp_path_factory.mktemp("views") / "toy", polar=75)


def copy_views(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_cli_reconstruct_tiny_writes_a_coloured_mesh(views_dir, tmp_path, capsys):
    out = tmp_path / "toy.ply"
    assert main(["reconstruct", str(views_dir), "-o", str(out), "--preset", "tiny", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    mesh = load_mesh(out)
    assert len(mesh.vertices) > 1000 and len(mesh.faces) > 2000
    assert mesh.colors is not None and mesh.colors.shape == (len(mesh.vertices), 3)
    assert mesh.colors.std(axis=0).max() > 1.0  # colours come from the views, not a constant
    # pose.json world frame: the object sits around the origin, well inside the cameras' radius of 1.2.
    assert np.abs(mesh.vertices).max() < 1.2


def test_uniform_views_give_every_vertex_that_colour(views_dir, tmp_path):
    """The output colour is a convex blend of sampled source colours, whatever the (random) weights are."""
    folder = copy_views(views_dir, tmp_path / "uniform")
    colour = (200, 40, 90)
    for png in folder.glob("*.png"):
        Image.new("RGB", (256, 256), colour).save(png)
    result = reconstruct_mesh(build_model("tiny", seed=1), load_views(folder), MeshingConfig(resolution=64))
    assert (result.mesh.colors == np.array(colour, dtype=np.uint8)).all()


def test_reconstruction_is_deterministic_and_stage_timed(views_dir):
    views = load_views(views_dir)
    a = reconstruct_mesh(build_model("tiny", seed=0), views, MeshingConfig(resolution=48))
    b = reconstruct_mesh(build_model("tiny", seed=0), views, MeshingConfig(resolution=48))
    assert np.array_equal(a.mesh.vertices, b.mesh.vertices) and np.array_equal(a.mesh.colors, b.mesh.colors)
    assert list(a.timings) == ["features", "volume", "sdf", "marching_cubes", "colors"]


def test_glb_and_obj_outputs(views_dir, tmp_path):
    for suffix in (".glb", ".obj"):
        out = tmp_path / f"toy{suffix}"
        assert main(["reconstruct", str(views_dir), "-o", str(out), "--preset", "tiny", "--resolution", "48"]) == 0
        assert load_mesh(out).colors is not None


def _edit_pose(folder: Path, edit) -> None:
    path = folder / "pose.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_wrong_number_of_views(views_dir, tmp_path):
    folder = copy_views(views_dir, tmp_path / "v")
    _edit_pose(folder, lambda d: d["c2ws"].pop("7_3.png"))
    with pytest.raises(BadInputError, match="lists 31 nearby views"):
        load_views(folder)


def test_missing_reference_id_in_pose_json(views_dir, tmp_path):
    folder = copy_views(views_dir, tmp_path / "v")
    _edit_pose(folder, lambda d: d["c2ws"].pop("0.png"))
    with pytest.raises(BadInputError, match=r"0\.png"):
        load_views(folder)


def test_missing_image_file(views_dir, tmp_path):
    folder = copy_views(views_dir, tmp_path / "v")
    (folder / "3_2.png").unlink()
    with pytest.raises(BadInputError, match=r"lacks 1 of the images.*3_2\.png"):
        load_views(folder)


def test_images_of_different_sizes(views_dir, tmp_path):
    folder = copy_views(views_dir, tmp_path / "v")
    Image.new("RGB", (128, 128), "red").save(folder / "5_1.png")
    with pytest.raises(BadInputError, match="different sizes"):
        load_views(folder)


def test_non_image_file(views_dir, tmp_path):
    folder = copy_views(views_dir, tmp_path / "v")
    (folder / "2_0.png").write_text("not a png")
    with pytest.raises(BadInputError, match=r"2_0\.png is not a readable image"):
        load_views(folder)


def test_missing_pose_json_and_cli_exit_code(views_dir, tmp_path, capsys):
    folder = copy_views(views_dir, tmp_path / "v")
    (folder / "pose.json").unlink()
    assert main(["reconstruct", str(folder), "-o", str(tmp_path / "x.ply"), "--preset", "tiny"]) == 2
    assert "has no pose.json" in capsys.readouterr().err


def test_bad_output_suffix_and_resolution(views_dir, tmp_path, capsys):
    assert main(["reconstruct", str(views_dir), "-o", str(tmp_path / "x.stl"), "--preset", "tiny"]) == 2
    assert "must end in .ply, .glb or .obj" in capsys.readouterr().err
    assert main(["reconstruct", str(views_dir), "-o", str(tmp_path / "x.ply"), "--resolution", "8"]) == 2
    assert "outside 32…1024" in capsys.readouterr().err


def test_paper_preset_without_weights_names_the_download_command(views_dir, tmp_path, capsys):
    code = main(["reconstruct", str(views_dir), "-o", str(tmp_path / "x.ply"), "--weights-dir", str(tmp_path / "w")])
    assert code == 1
    assert "one2345 weights download --only reconstruction" in capsys.readouterr().err


def test_rgba_views_are_composited_on_white(views_dir, tmp_path):
    folder = copy_views(views_dir, tmp_path / "v")
    rgba = np.zeros((256, 256, 4), dtype=np.uint8)  # fully transparent → white
    Image.fromarray(rgba).save(folder / "1_1.png")
    views = load_views(folder)
    idx = views.ids.index("1_1.png")
    assert torch.all(views.images[idx] == 1.0)


def test_pose_file_is_the_reference_layout(views_dir):
    poses = PoseFile.read(views_dir / "pose.json")
    assert list(poses.c2ws)[:8] == [f"{i}.png" for i in range(8)]
    assert len(poses.c2ws) == 40
