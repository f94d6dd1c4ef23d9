"""Checkpoint loading: the official layout built from the spec's key/shape table, our folder format, verify."""

from __future__ import annotations

import json

import pytest
import torch

from server.common.errors import CheckpointError, MissingWeightsError
from server.service.cli import main
from server.stages.reconstruction.checkpoint import (
    load_checkpoint,
    load_official,
    load_reconstruction_model,
    save_checkpoint,
    verify_checkpoint,
)
from server.stages.reconstruction.model import build_model


def spec_official_shapes() -> dict[str, dict[str, tuple[int, ...]]]:
    """Key → shape per network, written from spec §5.9 (not from the model), for the paper architecture."""
    pyramid: dict[str, tuple[int, ...]] = {}
    convs = {
        "conv0.0": (8, 3, 3), "conv0.1": (8, 8, 3),
        "conv1.0": (16, 8, 5), "conv1.1": (16, 16, 3), "conv1.2": (16, 16, 3),
        "conv2.0": (32, 16, 5), "conv2.1": (32, 32, 3), "conv2.2": (32, 32, 3),
    }
    for name, (c_out, c_in, k) in convs.items():
        pyramid[f"{name}.conv.weight"] = (c_out, c_in, k, k)
        for p in ("weight", "bias", "running_mean", "running_var"):
            pyramid[f"{name}.bn.{p}"] = (c_out,)
    pyramid.update({
        "toplayer.weight": (32, 32, 1, 1), "toplayer.bias": (32,),
        # The spec lists only lat*.weight; the reference's nn.Conv2d(16, 32, 1) keeps PyTorch's default bias=True.
        "lat1.weight": (32, 16, 1, 1), "lat1.bias": (32,),
        "lat0.weight": (32, 8, 1, 1), "lat0.bias": (32,),
        "smooth1.weight": (16, 32, 3, 3), "smooth1.bias": (16,),
        "smooth0.weight": (8, 32, 3, 3), "smooth0.bias": (8,),
    })

    sdf: dict[str, tuple[int, ...]] = {"compress_layer.conv.weight": (16, 56, 3, 3)}
    for p in ("weight", "bias", "running_mean", "running_var"):
        sdf[f"compress_layer.bn.{p}"] = (16,)
    sparse = {0: (32, 16), 1: (16, 16), 2: (16, 16), 3: (16, 32), 4: (32, 32), 5: (32, 64), 6: (64, 64),
              7: (64, 32), 9: (32, 16), 11: (16, 16)}
    for n, (c_in, c_out) in sparse.items():
        sdf[f"sparse_costreg_net.conv{n}.net.0.kernel"] = (27, c_in, c_out)
        for p in ("weight", "bias", "running_mean", "running_var"):
            sdf[f"sparse_costreg_net.conv{n}.net.1.{p}"] = (c_out,)
        sdf[f"sparse_costreg_net.conv{n}.net.1.num_batches_tracked"] = ()
    for layer, d_in in (("lin0", 39), ("lin1", 144), ("lin2", 144)):
        sdf[f"sdf_layer.{layer}.weight_g"] = (128, 1)
        sdf[f"sdf_layer.{layer}.weight_v"] = (128, d_in)
        sdf[f"sdf_layer.{layer}.bias"] = (128,)

    rendering = {"s": ()}
    for name, (c_out, c_in) in {"ray_dir_fc.0": (16, 4), "ray_dir_fc.2": (59, 16), "base_fc.0": (64, 193),
                                "base_fc.2": (32, 64), "vis_fc.0": (32, 32), "vis_fc.2": (33, 32),
                                "vis_fc2.0": (32, 32), "vis_fc2.2": (1, 32), "rgb_fc.0": (16, 37),
                                "rgb_fc.2": (8, 16), "rgb_fc.4": (1, 8)}.items():
        rendering[f"{name}.weight"] = (c_out, c_in)
        rendering[f"{name}.bias"] = (c_out,)

    return {"pyramid_feature_network": pyramid, "sdf_network_lod0": sdf,
            "variance_network_lod0": {"variance": ()}, "rendering_network_lod0": rendering}


def random_state(shapes: dict[str, tuple[int, ...]], gen: torch.Generator) -> dict[str, torch.Tensor]:
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            state[key] = torch.randn(shape, generator=gen)
    return state


@pytest.fixture(scope="module")
def official_file(tmp_path_factory) -> tuple:
    gen = torch.Generator().manual_seed(0)
    nets = {name: random_state(shapes, gen) for name, shapes in spec_official_shapes().items()}
    path = tmp_path_factory.mktemp("ckpt") / "ckpt_215000.pth"
    torch.save({**nets, "optimizer": {"state": {}, "param_groups": [{"lr": 2e-4}]}, "iter_step": 215000,
                "val_step": 0}, path)
    return path, nets


def test_official_layout_from_spec_loads_strictly(official_file):
    path, nets = official_file
    model = load_official(path)
    state = model.state_dict()
    for net, values in nets.items():
        for key, value in values.items():
            assert torch.equal(state[f"{net}.{key}"], value), key


def test_official_without_2d_num_batches_tracked_still_loads(official_file, tmp_path):
    # Older InPlaceABN releases did not store num_batches_tracked; the spec table does not list it for the 2D nets.
    path, nets = official_file
    model = load_official(path)
    assert not any(k.endswith("num_batches_tracked") for k in nets["pyramid_feature_network"])
    assert model is not None


def test_official_checkpoint_with_wrong_shape_is_rejected_with_the_key(official_file, tmp_path):
    _, nets = official_file
    bad = {k: dict(v) for k, v in nets.items()}
    bad["sdf_network_lod0"]["sdf_layer.lin0.weight_v"] = torch.zeros(128, 40)
    del bad["rendering_network_lod0"]["rgb_fc.4.bias"]
    bad["rendering_network_lod0"]["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(CheckpointError) as err:
        load_official(path)
    text = str(err.value)
    assert "sdf_network_lod0.sdf_layer.lin0.weight_v (file [128, 40], expected [128, 39])" in text
    assert "rendering_network_lod0.rgb_fc.4.bias" in text and "rendering_network_lod0.extra.weight" in text


def test_truncated_checkpoint_is_a_clear_error(official_file, tmp_path):
    path, _ = official_file
    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt or not a checkpoint"):
        load_official(cut)


def test_checkpoint_of_another_network_names_what_it_looks_like(tmp_path):
    path = tmp_path / "zero123-xl.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.2.weight": torch.zeros(4, 320, 3, 3)}, "epoch": 1}, path)
    with pytest.raises(CheckpointError, match="Lightning"):
        load_reconstruction_model(path)


def test_missing_file_names_the_fix(tmp_path):
    with pytest.raises(MissingWeightsError, match="weights download"):
        load_reconstruction_model(tmp_path / "nope.pth")


def test_our_format_round_trip_is_exact(tmp_path):
    model = build_model("tiny", seed=3)
    folder = save_checkpoint(model, tmp_path / "run" / "ckpt", extra={"step": 12})
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_checkpoint(folder)
    assert loaded.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    # Overwriting an existing checkpoint is atomic and leaves no temp folders behind.
    save_checkpoint(build_model("tiny", seed=4), folder)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["ckpt"]


def test_our_format_errors(tmp_path):
    folder = save_checkpoint(build_model("tiny"), tmp_path / "ckpt")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(folder)
    (folder / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="not a one2345-reconstruction config"):
        load_checkpoint(folder)


def test_verify_accepts_and_rejects(official_file, tmp_path, capsys):
    path, nets = official_file
    result = verify_checkpoint(path)
    assert result.ok and "iteration 215000" in result.details
    assert main(["weights", "verify", str(path)]) == 0
    assert "OK" in capsys.readouterr().out

    bad = {k: dict(v) for k, v in nets.items()}
    bad["sdf_network_lod0"]["sparse_costreg_net.conv5.net.0.kernel"] = torch.zeros(27, 32, 63)
    bad_path = tmp_path / "bad.pth"
    torch.save(bad, bad_path)
    assert main(["weights", "verify", str(bad_path)]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "sparse_costreg_net.conv5.net.0.kernel (file [27, 32, 63], expected [27, 32, 64])" in err

    folder = save_checkpoint(build_model("tiny"), tmp_path / "ours")
    assert main(["weights", "verify", str(folder)]) == 0
    assert "architecture tiny" in capsys.readouterr().out
