"""The training loop: tiny preset on synthetic objects, loss going down, checkpoints the server loads, exact resume,
and a two-process gloo run under torchrun."""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from server.common.errors import BadInputError
from server.common.synthetic import write_views_dir
from server.stages.reconstruction.checkpoint import load_checkpoint
from server.stages.reconstruction.model import build_model
from training.data import load_sample, read_object
from training.rays import sample_rays
from training.synthetic import write_synthetic_object
from training.train import (
    PRESETS,
    TrainConfig,
    TrainStep,
    add_fit_parser,
    checkpoint_dir,
    fit,
    model_config,
    override,
)

SIZE = 32
STEPS = 16


def tiny(**changes) -> TrainConfig:
    config = dataclasses.replace(PRESETS["tiny"], steps=STEPS, end_iter=STEPS, checkpoint_every=8, val_every=8,
                                 log_every=4, **changes)
    return dataclasses.replace(config, data=dataclasses.replace(config.data, prediction_ratio=0.0, val_fraction=0.0))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("renders")
    write_synthetic_object(root / "000-000" / "toy", polar=70, size=SIZE)
    return root


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    torch.manual_seed(123)  # the loop must not depend on the global RNG; resume below checks that too
    out = tmp_path_factory.mktemp("run")
    return out, fit(tiny(), data, out, device="cpu")


def fixed_loss(model, data: Path) -> float:
    """Colour loss of a network on fixed rays of 4 views of the object (same rays for every network)."""
    config = tiny()
    step = TrainStep(model, config)
    obj = read_object(data / "000-000" / "toy")
    total = 0.0
    with torch.no_grad():
        for view in range(0, 8, 2):
            sample = load_sample(obj, view, predicted=False)
            rays = sample_rays(sample, 128, torch.Generator().manual_seed(view))
            total += step(sample, rays, STEPS, torch.Generator().manual_seed(0))[1]["loss/color"]
    return total / 4


def test_loss_goes_down_and_checkpoints(run, data):
    out, result = run
    assert len(result.history) == STEPS
    before = fixed_loss(build_model(model_config(tiny()), seed=0), data)
    after = fixed_loss(load_checkpoint(result.checkpoint), data)
    assert after < 0.85 * before, (before, after)
    assert (out / "checkpoints" / "step_0000008" / "train_state.pt").is_file()
    assert result.checkpoint == checkpoint_dir(out, STEPS)
    assert any((out / "tb").iterdir())


def test_checkpoint_loads_in_server_reconstruct(run, tmp_path):
    from server.service.cli import main

    views = write_views_dir(tmp_path / "views", polar=75)
    mesh = tmp_path / "mesh.ply"
    code = main(["reconstruct", str(views), "-o", str(mesh), "--checkpoint", str(run[1].checkpoint),
                 "--resolution", "32", "--device", "cpu"])
    assert code == 0 and mesh.stat().st_size > 0


def test_resume_takes_the_same_next_steps(run, data, tmp_path):
    out, _ = run
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints" / "step_0000008", resumed / "checkpoints" / "step_0000008")
    torch.manual_seed(999)
    result = fit(tiny(), data, resumed, device="cpu")
    assert result.history[0]["step"] == 8 and len(result.history) == STEPS - 8
    first = load_file(str(checkpoint_dir(out, STEPS) / "model.safetensors"))
    second = load_file(str(checkpoint_dir(resumed, STEPS) / "model.safetensors"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert [h["loss/total"] for h in result.history] == [h["loss/total"] for h in run[1].history[8:]]


def test_override_and_parser():
    config = override(PRESETS["tiny"], "renderer.n_samples", "32")
    assert config.renderer.n_samples == 32 and config.renderer.n_importance == PRESETS["tiny"].renderer.n_importance
    assert override(config, "losses.depth_weight", "1").losses.depth_weight == 1.0
    with pytest.raises(BadInputError, match="unknown field"):
        override(config, "renderer.nope", "1")
    with pytest.raises(BadInputError, match="not a int"):
        override(config, "steps", "many")
    parser = argparse.ArgumentParser()
    add_fit_parser(parser.add_subparsers())
    args = parser.parse_args(["fit", "--preset", "tiny", "--data", "d", "--out", "o", "--steps", "5",
                              "--set", "renderer.perturb=false"])
    from training.train import config_from_args

    config = config_from_args(args)
    assert config.steps == 5 and config.end_iter == 5 and config.renderer.perturb is False
    assert TrainConfig.from_dict(config.to_dict()) == config


DDP_SCRIPT = """
import argparse, sys
from training.train import add_fit_parser
parser = argparse.ArgumentParser()
add_fit_parser(parser.add_subparsers())
args = parser.parse_args(sys.argv[1:])
sys.exit(args.handler(args))
"""


def test_two_process_gloo(data, tmp_path):
    script = tmp_path / "fit_ddp.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(script), "fit", "--preset", "tiny", "--data", str(data), "--out", str(out), "--steps", "2",
           "--prediction-ratio", "0", "--device", "cpu", "--set", "data.val_fraction=0", "--val-every", "0"]
    done = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (checkpoint_dir(out, 2) / "train_state.pt").is_file()
