"""Training at speed: the --amp option, autocast regions (bf16 on the CPU), the loader's workers and cache, several
objects per step, the fit benchmark, batched predictions, DDP over gloo with the new options, and (CUDA only) AMP
steps on a GPU."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from server.common.errors import BadInputError
from server.stages.reconstruction.model import build_model
from training.amp import Precision, conditional_volume, resolve_precision
from training.data import (
    DataConfig,
    LoaderConfig,
    ObjectDataset,
    StepSamples,
    find_objects,
    load_sample,
    read_object,
    step_loader,
)
from training.rays import sample_rays
from training.synthetic import write_synthetic_object
from training.train import (
    PRESETS,
    RuntimeConfig,
    TrainStep,
    add_fit_parser,
    checkpoint_dir,
    config_from_args,
    fit,
    model_config,
    runtime_from_args,
)

ROOT = Path(__file__).resolve().parents[2]
SIZE = 32


def tiny(**changes):
    config = dataclasses.replace(PRESETS["tiny"], val_every=0, **changes)
    return dataclasses.replace(config, data=dataclasses.replace(config.data, prediction_ratio=0.0, val_fraction=0.0))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("renders")
    write_synthetic_object(root / "000-000" / "toy", polar=70, size=SIZE)
    write_synthetic_object(root / "000-000" / "ball", polar=95, shape="sphere", size=SIZE, rotation_deg=40)
    return root


def parse_fit(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_fit_parser(parser.add_subparsers())
    return parser.parse_args(["fit", "--preset", "tiny", "--data", "d", "--out", "o", *extra])


def test_amp_option_parses_and_means_off_on_cpu():
    args = parse_fit()
    assert args.amp is None and resolve_precision(runtime_from_args(args).amp, torch.device("cpu")).mode == "off"
    args = parse_fit("--amp", "bf16", "--workers", "2", "--prefetch", "3", "--cache-mb", "64", "--batch-size", "2")
    runtime = runtime_from_args(args)
    assert runtime.amp == "bf16" and runtime.loader == LoaderConfig(workers=2, prefetch=3, cache_mb=64)
    assert config_from_args(args).batch_size == 2
    assert resolve_precision("bf16", torch.device("cpu")) == Precision("bf16", "cpu")
    with pytest.raises(SystemExit):
        parse_fit("--amp", "fp8")
    with pytest.raises(BadInputError, match="fp16 needs CUDA"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(BadInputError, match="--workers -1"):
        LoaderConfig(workers=-1)
    # Off is the plain fp32 code: no autocast anywhere, a disabled scaler.
    off = resolve_precision("off", torch.device("cpu"))
    assert not off.enabled and not off.grad_scaler().is_enabled()


def test_autocast_regions_on_cpu_bf16(data):
    """The CNNs run in bf16, the cost volume, SDF, rendering and loss in fp32; the volume matches the fp32 one."""
    config = tiny()
    model = build_model(model_config(config), seed=0).train()
    sample = load_sample(read_object(data / "000-000" / "toy"), 2, predicted=False)
    bf16 = Precision("bf16", "cpu")
    dtypes: dict[str, torch.dtype] = {}

    def record(name):
        def hook(module, args, output):
            dtypes[name] = (output.features if hasattr(output, "features") else output).dtype
        return hook

    step = TrainStep(model, config, bf16)
    model.pyramid_feature_network.conv0[0].conv.register_forward_hook(record("conv2d"))
    model.sdf_network_lod0.sparse_costreg_net.conv0.net[0].register_forward_hook(record("conv3d"))
    model.sdf_network_lod0.sdf_layer.register_forward_hook(record("sdf"))
    model.rendering_network_lod0.register_forward_hook(record("blend"))
    rays = sample_rays(sample, 64, torch.Generator().manual_seed(0))
    loss, logs = step(sample, rays, 0, torch.Generator().manual_seed(1))
    assert dtypes == {"conv2d": torch.bfloat16, "conv3d": torch.bfloat16, "sdf": torch.float32,
                      "blend": torch.float32}
    assert loss.dtype == torch.float32 and math.isfinite(logs["loss/total"])
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())

    with torch.no_grad():
        fused = model.pyramid_feature_network.fused(sample.images)
        exact = model.sdf_network_lod0.conditional_volume(fused, sample.proj)
        mixed = conditional_volume(model.sdf_network_lod0, fused, sample.proj, bf16)
        off = conditional_volume(model.sdf_network_lod0, fused, sample.proj, Precision("off", "cpu"))
    assert torch.equal(off.latent, exact.latent) and torch.equal(mixed.mask, exact.mask)
    assert mixed.latent.dtype == torch.float32
    error = (mixed.latent - exact.latent).norm() / exact.latent.norm()
    assert error < 0.05, float(error)


def test_three_bf16_steps_on_cpu(data, tmp_path):
    result = fit(tiny(steps=3, end_iter=3, log_every=2, checkpoint_every=3), data, tmp_path, device="cpu",
                 runtime=RuntimeConfig(amp="bf16"))
    assert [h["step"] for h in result.history] == [0, 1, 2]
    assert all(math.isfinite(h["loss/total"]) and math.isfinite(h["grad_norm"]) for h in result.history)
    assert result.checkpoint == checkpoint_dir(tmp_path, 3)
    assert json.loads((tmp_path / "config.json").read_text())["runtime"]["amp"] == "bf16"


def _fields(sample) -> dict:
    return {k: v for k, v in sample.__dict__.items() if k != "cameras"}


def _same(a, b) -> bool:
    fa, fb = _fields(a), _fields(b)
    return fa.keys() == fb.keys() and all(
        torch.equal(x, fb[k]) if isinstance(x, torch.Tensor) else x == fb[k] for k, x in fa.items())


def test_workers_and_cache_give_the_same_samples(data):
    objects = find_objects(data)
    recipe = DataConfig(prediction_ratio=0.0)
    steps = range(3, 9)  # 2 objects = 16 items, 4 per step: crosses an epoch
    serial = list(step_loader(StepSamples(ObjectDataset(objects, recipe, seed=5), 5, rank=1, world_size=2,
                                          per_step=2), steps, LoaderConfig(workers=0)))
    cached = ObjectDataset(objects, recipe, seed=5, cache_mb=16)
    parallel = list(step_loader(StepSamples(cached, 5, rank=1, world_size=2, per_step=2), steps,
                                LoaderConfig(workers=2, prefetch=2, cache_mb=16)))
    assert len(serial) == len(parallel) == len(steps) and all(len(s) == 2 for s in serial)
    assert all(_same(a, b) for sa, sb in zip(serial, parallel, strict=True) for a, b in zip(sa, sb, strict=True))
    again = StepSamples(cached, 5, rank=1, world_size=2, per_step=2)
    for s, expected in zip(steps, serial, strict=True):
        fresh, from_cache = again[s], again[s]  # the first call fills this process's cache, the second reads it
        assert all(_same(a, b) and _same(b, c) for a, b, c in zip(expected, fresh, from_cache, strict=True))
    assert cached.cache.bytes > 0
    # B objects per process on G processes read what one object per process on G·B processes reads.
    for s, expected in zip(steps, serial, strict=True):
        wide = [StepSamples(ObjectDataset(objects, recipe, seed=5), 5, rank=r, world_size=4)[s][0] for r in (2, 3)]
        assert all(_same(a, b) for a, b in zip(expected, wide, strict=True))


def test_two_objects_per_step(data, tmp_path):
    result = fit(tiny(steps=2, end_iter=2, log_every=1, checkpoint_every=2, batch_size=2), data, tmp_path,
                 device="cpu", runtime=RuntimeConfig(loader=LoaderConfig(workers=1)))
    assert len(result.history) == 2 and all(math.isfinite(h["loss/total"]) for h in result.history)
    assert (checkpoint_dir(tmp_path, 2) / "train_state.pt").is_file()
    with pytest.raises(BadInputError, match="batch size 0"):
        fit(tiny(steps=1, batch_size=0), data, tmp_path / "zero", device="cpu")


BENCHMARK_FIELDS = {"step_s", "data_wait_s", "forward_s", "backward_s", "optimizer_s", "peak_cuda_allocated_gib",
                    "gpu_utilization_pct", "loss_start", "loss_end", "nonfinite_steps", "checkpoint"}


def test_fit_benchmark_on_cpu(tmp_path):
    cmd = [sys.executable, "-m", "training.benchmarks.fit", "--preset", "tiny", "--device", "cpu", "--steps", "5",
           "--objects", "2", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    report = json.loads(lines[0])
    assert report.keys() >= BENCHMARK_FIELDS, sorted(BENCHMARK_FIELDS - report.keys())
    assert report["steps"] == 5 and report["timed_steps"] == 4 and report["nonfinite_steps"] == 0
    assert report["peak_cuda_allocated_gib"] is None and report["gpu_utilization_pct"] is None
    assert report["amp"] == "off" and report["objects"] == 2 and math.isfinite(report["loss_end"])
    parts = sum(report[k] for k in ("data_wait_s", "forward_s", "backward_s", "optimizer_s", "other_s"))
    assert report["step_s"] == pytest.approx(parts, abs=1e-3)
    assert Path(report["checkpoint"]) == checkpoint_dir(tmp_path / "run", 5)


def test_predict_batches_objects(tmp_path, capsys):
    from training.predict import PREDICTION_DIR, add_predict_parser

    root = tmp_path / "renders"
    for name in ("a", "b", "c"):
        write_synthetic_object(root / "000-000" / name, polar=80, size=SIZE, mesh_resolution=8)
    parser = argparse.ArgumentParser()
    add_predict_parser(parser.add_subparsers())
    args = parser.parse_args(["predict", "--data", str(root), "--tiny", "--steps", "2", "--device", "cpu",
                              "--batch-objects", "2", "--batch", "12"])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "predicted 3 object(s), 0 already cached; 24 target images (96 views)" in out and "target images/s" in out
    assert all(read_object(f).has_predictions() for f in find_objects(root))
    assert not any(p.name.startswith(".") for p in (root / "000-000").rglob("*"))
    assert args.handler(args) == 0 and "predicted 0 object(s), 3 already cached" in capsys.readouterr().out
    assert (root / "000-000" / "a" / PREDICTION_DIR).is_dir()
    assert args.cuda_graphs is True  # CUDA graphs on CUDA unless turned off
    assert parser.parse_args(["predict", "--data", str(root), "--tiny", "--no-cuda-graphs"]).cuda_graphs is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_predict_on_cuda_replays_graphs_with_the_eager_images(tmp_path):
    from PIL import Image

    from training.predict import PREDICTION_DIR, add_predict_parser

    root = tmp_path / "renders"
    write_synthetic_object(root / "000-000" / "a", polar=80, size=SIZE, mesh_resolution=8)
    parser = argparse.ArgumentParser()
    add_predict_parser(parser.add_subparsers())
    images = {}
    for flag in ([], ["--no-cuda-graphs"]):
        args = parser.parse_args(["predict", "--data", str(root), "--tiny", "--steps", "3", "--device", "cuda",
                                  "--overwrite", *flag])
        assert args.handler(args) == 0
        files = sorted((root / "000-000" / "a" / PREDICTION_DIR).glob("*.png"))
        images[bool(flag)] = np.stack([np.asarray(Image.open(f)) for f in files]).astype(int)
    assert images[False].shape[0] == 32 and np.abs(images[False] - images[True]).max() <= 1


DDP_SCRIPT = """
import argparse, sys
from training.train import add_fit_parser
parser = argparse.ArgumentParser()
add_fit_parser(parser.add_subparsers())
args = parser.parse_args(sys.argv[1:])
sys.exit(args.handler(args))
"""


def test_two_process_gloo_with_workers_batch_and_bf16(data, tmp_path):
    script = tmp_path / "fit_ddp.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
           str(script), "fit", "--preset", "tiny", "--data", str(data), "--out", str(out), "--steps", "2",
           "--prediction-ratio", "0", "--device", "cpu", "--set", "data.val_fraction=0", "--val-every", "0",
           "--batch-size", "2", "--workers", "1", "--amp", "bf16"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (checkpoint_dir(out, 2) / "train_state.pt").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_three_amp_steps_on_cuda(data, tmp_path, amp):
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    result = fit(tiny(steps=3, end_iter=3, log_every=2, checkpoint_every=3), data, tmp_path, device="cuda",
                 runtime=RuntimeConfig(amp=amp, loader=LoaderConfig(workers=2)))
    assert len(result.history) == 3
    assert all(math.isfinite(h["loss/total"]) and math.isfinite(h["grad_norm"]) for h in result.history)
    state = torch.load(checkpoint_dir(tmp_path, 3) / "train_state.pt", weights_only=False)
    assert ("scaler" in state) == (amp == "fp16")
    # The checkpoint resumes (on the GPU, with the scaler's state) and continues.
    more = fit(tiny(steps=4, end_iter=3, log_every=2, checkpoint_every=4), data, tmp_path, device="cuda",
               runtime=RuntimeConfig(amp=amp, loader=LoaderConfig(workers=2)))
    assert [h["step"] for h in more.history] == [3] and math.isfinite(more.history[0]["loss/total"])
