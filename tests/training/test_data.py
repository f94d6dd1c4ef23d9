"""The training dataset on synthetic objects written in the render layout (exact geometry, no Blender)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from server.common.errors import BadInputError
from server.common.synthetic import shape_sdf
from training.data import (
    DataConfig,
    ObjectDataset,
    find_objects,
    item_for_step,
    load_sample,
    read_object,
    split_objects,
)
from training.rays import pixel_rays, sample_rays
from training.synthetic import write_synthetic_object

SIZE = 32


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("renders")
    write_synthetic_object(root / "000-000" / "low", polar=60, size=SIZE)
    write_synthetic_object(root / "000-000" / "high", polar=90, size=SIZE, rotation_deg=40, scale=0.9)
    (root / "000-000" / "unfinished").mkdir()  # no meta.json: skipped
    return root


def test_find_and_ids(root):
    objects = find_objects(root)
    assert [p.name for p in objects] == ["high", "low"]
    high = read_object(objects[0])
    # polar > 75: stage-1 ids 0..3, 8..11; the k-th is view_k.png.
    assert high.target_ids == ("0.png", "1.png", "2.png", "3.png", "8.png", "9.png", "10.png", "11.png")
    assert high.nearby_ids[16:20] == ("8_0.png", "8_1.png", "8_2.png", "8_3.png")
    assert high.reference_id == "0.png"
    with pytest.raises(BadInputError, match="holds no finished object"):
        find_objects(root / "000-000" / "unfinished")


def test_sample_geometry_is_exact(root):
    obj = read_object(root / "000-000" / "high")
    sample = load_sample(obj, 5, predicted=False)
    assert sample.images.shape == (32, 3, SIZE, SIZE)
    assert torch.equal(sample.query_mask > 0, sample.query_depth > 0)
    # Rays at the GT distance land on the analytic surface (rotated by 40° and scaled by 0.9 in the world).
    rows, cols = torch.nonzero(sample.query_mask > 0, as_tuple=True)
    origins, dirs = pixel_rays(sample.query_c2w, sample.query_K, rows, cols)
    points = (origins + dirs * sample.query_depth[rows, cols, None]).double().numpy()
    world = sample.cameras.to_world(points)
    a = np.radians(-40)
    unrotated = world @ np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]).T
    distance = np.abs(shape_sdf(unrotated / 0.9, "toy") * 0.9)
    # Half a pixel (the depth is rendered at pixel centres, rays use integer positions) ≈ 0.02 world units at 32².
    assert np.median(distance) < 0.01 and distance.max() < 0.06
    # The query camera sits where pose.json puts it.
    centre_world = sample.cameras.to_world(sample.query_c2w[:3, 3].double().numpy()[None])[0]
    assert np.allclose(centre_world, obj.poses.c2ws["9.png"][:3, 3], atol=1e-5)


def test_rays_mostly_inside_mask(root):
    sample = load_sample(read_object(root / "000-000" / "low"), 0, predicted=False)
    rays = sample_rays(sample, 400, torch.Generator().manual_seed(0))
    assert (rays.mask > 0).float().mean() >= 0.75
    assert torch.allclose(rays.directions.norm(dim=-1), torch.ones(400))
    assert rays.rgb.shape == (400, 3)


def test_item_order_is_deterministic_and_covers_epochs():
    items = [item_for_step(s, 16, seed=3) for s in range(16)]
    assert sorted(i for _, i in items) == list(range(16)) and {e for e, _ in items} == {0}
    assert items == [item_for_step(s, 16, seed=3) for s in range(16)]
    assert item_for_step(16, 16, seed=3)[0] == 1
    # Two processes take different items at the same step.
    pairs = [(item_for_step(s, 16, 3, 0, 2)[1], item_for_step(s, 16, 3, 1, 2)[1]) for s in range(8)]
    assert sorted(i for pair in pairs for i in pair) == list(range(16))


def test_split_is_stable(root, tmp_path):
    paths = [tmp_path / f"obj{i}" for i in range(40)]
    train, val = split_objects(paths, 0.1)
    assert len(val) == 4 and not set(train) & set(val)
    assert split_objects(paths[:20] + paths[20:], 0.1) == (train, val)
    # Adding objects never moves an existing one into or out of validation... for hash-ranked splits of same count.
    assert split_objects(paths, 0.0) == (paths, [])


def test_predictions_required_and_cached(root):
    objects = find_objects(root)
    with pytest.raises(BadInputError, match="one2345-train predict"):
        ObjectDataset(objects, DataConfig(prediction_ratio=1.0))
    from training.predict import add_predict_parser

    parser = argparse.ArgumentParser()
    add_predict_parser(parser.add_subparsers())
    args = parser.parse_args(["predict", "--data", str(root), "--tiny", "--steps", "2", "--device", "cpu",
                              "--limit", "1"])
    assert args.handler(args) == 0
    obj = read_object(objects[0])
    assert obj.has_predictions() and not read_object(objects[1]).has_predictions()
    predicted = load_sample(obj, 0, predicted=True)
    assert predicted.images.shape == (32, 3, SIZE, SIZE) and predicted.predicted
    # Sources differ from the GT renders; targets are the same GT view.
    gt = load_sample(obj, 0, predicted=False)
    assert not torch.equal(predicted.images, gt.images) and torch.equal(predicted.query_rgb, gt.query_rgb)
    mixed = ObjectDataset(objects[:1], DataConfig(prediction_ratio=0.5))
    flags = [mixed[i].predicted for i in range(8)]
    assert any(flags) and not all(flags)


def test_official_layout_reads_like_ours(tmp_path):
    """spec §6: one shared One2345_training_pose.json (cameras by position), zero12345_narrow/<folder_id>/<uid>/."""
    import json
    import shutil

    from training.data import OFFICIAL_POSE_FILE, find_objects, load_sample, official_poses, read_object
    from training.synthetic import write_synthetic_object

    ours = write_synthetic_object(tmp_path / "ours" / "000-000" / "obj", polar=60, size=32)
    root = tmp_path / "official"
    folder = root / "zero12345_narrow" / "000-003" / "obj"
    shutil.copytree(ours, folder)
    (folder / "pose.json").unlink()  # the official objects carry no pose of their own
    pose = json.loads((ours / "pose.json").read_text())
    # Key names of the official file are unknown: only the order (8 targets, then 4 nearby views each) is relied on.
    pose["c2ws"] = {f"cam{n:02d}": m for n, m in enumerate(pose["c2ws"].values())}
    (root / OFFICIAL_POSE_FILE).write_text(json.dumps(pose))

    assert find_objects(root) == [folder]
    official, reference = load_sample(read_object(folder), 3, False), load_sample(read_object(ours), 3, False)
    for name in ("images", "proj", "centres", "query_rgb", "query_depth", "query_mask"):
        a, b = getattr(official, name), getattr(reference, name)
        assert torch.equal(a, b), name

    pose["c2ws"].popitem()
    (root / OFFICIAL_POSE_FILE).write_text(json.dumps(pose))
    official_poses.cache_clear()
    with pytest.raises(BadInputError, match="has 39 cameras"):
        read_object(folder)
