"""``one2345-train fit``: train the reconstruction network from rendered objects (spec §6).

The loop in :func:`fit` reads top to bottom: pick the step's (object, view) item, sample rays, render, loss, Adam step
with the cosine schedule and gradient clipping, log, validate, checkpoint. Everything random flows from one
``torch.Generator`` per process whose state is checkpointed, and the item order is a pure function of (seed, step),
so a resumed run takes the same next step as an uninterrupted one (bit for bit on the CPU).

Checkpoints: ``<out>/checkpoints/step_<N>/`` in the server's format (``config.json`` + ``model.safetensors``, loadable
by ``one2345 reconstruct --checkpoint``; ``config.json`` also carries the training config and step) plus
``train_state.pt`` (optimizer, generator, step). Several GPUs: ``torchrun --nproc_per_node G -m training.cli fit …``
(DistributedDataParallel over NCCL, gloo on the CPU; one object per process and step, as the reference's batch of one
object per GPU).

Speed (:class:`RuntimeConfig`; its defaults leave the CPU path exactly as it was, and every option also runs there):

* ``--amp`` (default bf16 on CUDA, off on the CPU): the 2D and 3D CNNs under autocast, rendering and losses in fp32
  (:mod:`training.amp`); fp16 (CUDA only) adds a GradScaler, checkpointed with the optimizer. CUDA also gets fused
  Adam and cuDNN autotuning.
* ``--workers`` DataLoader processes load steps ahead (on CUDA into pinned memory; copies to the GPU are
  non-blocking); ``--cache-mb`` keeps decoded images.
* No step waits for the GPU on training's side: the logged scalars stay on the device and are read back together
  every ``--log-every`` steps. (The server's sparse volume still reads its active-site counts back: boolean-mask
  indexing has data-dependent shapes.)
* ``--batch-size B`` > 1 trains B objects per process and step (the paper's 2 A10s are B = 2 on one GPU). The network
  regularises one volume at a time — the sparse 3D CNN's batch norm is over one object's active voxels, as on each of
  the reference's GPUs — so the B objects run one after another and their gradients add up, averaged like DDP's.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from server.common.errors import BadInputError, CheckpointError
from server.stages.reconstruction.checkpoint import WEIGHTS_FILE, save_checkpoint
from server.stages.reconstruction.model import PRESETS as MODEL_PRESETS
from server.stages.reconstruction.model import ReconstructionConfig, ReconstructionModel, build_model
from training.amp import AMP_MODES, Precision, conditional_volume, keep_norms_fp32, resolve_precision
from training.data import (
    DataConfig,
    LoaderConfig,
    ObjectDataset,
    Sample,
    StepSamples,
    find_objects,
    load_sample,
    read_object,
    split_objects,
    step_loader,
)
from training.losses import LossConfig, total_loss
from training.rays import RayBatch, image_rays, sample_rays
from training.renderer import RendererConfig, VolumeRenderer, render_chunks

log = logging.getLogger(__name__)

TRAIN_STATE_FILE = "train_state.pt"
CHECKPOINTS_DIR = "checkpoints"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run; stored in every checkpoint. Defaults are the paper's."""

    model: str = "paper"
    """Network preset of :data:`server.stages.reconstruction.model.PRESETS` (``paper`` or ``tiny``)."""
    volume_dims: int = 0
    """Cost-volume voxels per axis, overriding the network preset's (0: keep it). The checkpoint records it."""
    steps: int = 200_000
    """Iterations to train (the released checkpoint is at 215 000)."""
    end_iter: int = 200_000
    """Iteration at which the cosine schedule reaches its floor (0.1·lr)."""
    lr: float = 2e-4
    """Base learning rate of Adam (default betas)."""
    grad_clip: float = 1.0
    """Gradient-norm clip."""
    rays: int = 512
    """Rays per step, process and object."""
    batch_size: int = 1
    """Objects per step and process, their gradients averaged (the reference: one per GPU; the paper: 2 GPUs)."""
    inside_fraction: float = 0.75
    """Share of the rays drawn inside the query's mask (the rest uniform over the image)."""
    seed: int = 0
    """Seeds the network's initialisation, the item order, the rays and the stratified jitter."""
    log_every: int = 100
    """Iterations between scalar logs."""
    val_every: int = 1600
    """Iterations between validation renders (0: never)."""
    val_level: int = 4
    """Validation renders use every val_level-th pixel (the reference's ``validate_resolution_level``)."""
    checkpoint_every: int = 5000
    """Iterations between checkpoints (the last step is always saved)."""
    data: DataConfig = field(default_factory=DataConfig)
    renderer: RendererConfig = field(default_factory=RendererConfig)
    losses: LossConfig = field(default_factory=LossConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        nested = {"data": DataConfig, "renderer": RendererConfig, "losses": LossConfig}
        return cls(**{k: nested[k](**v) if k in nested else v for k, v in data.items()})


PRESETS: dict[str, TrainConfig] = {
    "paper": TrainConfig(),
    # Everything scaled down so a few dozen CPU steps take well under a minute on 64² images; schedules shortened
    # proportionally so every term of the loss is exercised.
    "tiny": TrainConfig(
        model="tiny", volume_dims=16, steps=40, end_iter=40, lr=2e-3, rays=64, log_every=5, val_every=20,
        val_level=2, checkpoint_every=20,
        renderer=RendererConfig(n_samples=16, n_importance=8, up_sample_steps=1, anneal_end=20, min_valid_samples=4),
        losses=LossConfig(sparse_ramp=20, sparse_points=128, fgbg_start=20),
    ),
}


@dataclass(frozen=True)
class RuntimeConfig:
    """How a run executes rather than what it learns; not checkpointed, so a run may resume with other settings."""

    amp: str | None = None
    """Mixed precision, one of :data:`training.amp.AMP_MODES`; None: bf16 on CUDA, off on the CPU."""
    loader: LoaderConfig = field(default_factory=LoaderConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def model_config(config: TrainConfig) -> ReconstructionConfig:
    """The network architecture of a run: the model preset with the run's overrides."""
    if config.model not in MODEL_PRESETS:
        raise BadInputError(f"unknown model preset {config.model!r}; choose one of {sorted(MODEL_PRESETS)}")
    network = MODEL_PRESETS[config.model]
    return dataclasses.replace(network, volume_dims=config.volume_dims) if config.volume_dims else network


def lr_at(step: int, base: float, end_iter: int) -> float:
    """The reference's cosine schedule: base·(0.1 + 0.45·(1 + cos(π·step/end_iter))), from base down to 0.1·base."""
    progress = min(step / max(end_iter, 1), 1.0)
    return base * (0.1 + 0.45 * (1.0 + math.cos(math.pi * progress)))


def override(config: TrainConfig, key: str, text: str) -> TrainConfig:
    """Replace one (possibly nested, dotted) field, parsing ``text`` as the field's type: ``renderer.n_samples=32``.

    Raises:
        BadInputError: unknown field or a value of the wrong type.
    """
    head, _, rest = key.partition(".")
    names = {f.name for f in dataclasses.fields(config)}
    if head not in names:
        raise BadInputError(f"--set {key}: unknown field {head!r}; known: {', '.join(sorted(names))}")
    current = getattr(config, head)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise BadInputError(f"--set {key}: {head!r} has no sub-fields")
        return dataclasses.replace(config, **{head: override(current, rest, text)})
    if dataclasses.is_dataclass(current):
        raise BadInputError(f"--set {key}: {head!r} is a group; name one of its fields ({head}.<field>)")
    try:
        value = (text.lower() in ("1", "true", "yes")) if isinstance(current, bool) else type(current)(text)
    except ValueError as e:
        raise BadInputError(f"--set {key}={text}: not a {type(current).__name__}") from e
    return dataclasses.replace(config, **{head: value})


# ---------------------------------------------------------------------------------------------------------------------
# One step's forward pass
# ---------------------------------------------------------------------------------------------------------------------


class TrainStep(nn.Module):
    """Loss of one (object, query view) sample; a module so DistributedDataParallel can wrap it.

    Args:
        model: the network (trained in place).
        config: the run's settings.
        precision: mixed precision of the CNNs (:mod:`training.amp`); None: fp32 throughout.
        tensor_logs: return the logged scalars as detached 0-d tensors (nothing waits for the GPU), not floats.
    """

    def __init__(self, model: ReconstructionModel, config: TrainConfig, precision: Precision | None = None,
                 tensor_logs: bool = False) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.renderer = VolumeRenderer(model, config.renderer)
        self.precision = precision or Precision("off", "cpu")
        self.tensor_logs = tensor_logs
        if self.precision.enabled:
            keep_norms_fp32(model)

    def forward(self, sample: Sample, rays: RayBatch, step: int,
                generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        model = self.model
        precision = self.precision
        with precision.autocast():
            fused = model.pyramid_feature_network.fused(sample.images)
        volume = conditional_volume(model.sdf_network_lod0, fused, sample.proj, precision)
        with precision.fp32():
            fused = fused.float()
            out = self.renderer.render(rays.origins, rays.directions, *sample.near_far, volume, fused, sample.images,
                                       sample.proj, sample.centres, sample.query_c2w[:3, 3], step, generator)
            random_points = (torch.rand(self.config.losses.sparse_points, 3, generator=generator) * 2 - 1)
            sdf_random = self.renderer.sdf(random_points.to(fused.device, non_blocking=True), volume)
            loss, logs = total_loss(step, self.config.losses, out.color, rays.rgb, out.valid_rays,
                                    out.gradient_error, out.valid_samples, out.sdf, sdf_random, out.weights_sum,
                                    rays.mask, out.depth, rays.depth, background=rays.background,
                                    tensor_logs=self.tensor_logs)
        value = (lambda t: t.detach()) if self.tensor_logs else (lambda t: float(t.detach()))
        logs["stats/valid_rays"] = value(out.valid_rays.float().mean())
        logs["stats/inv_s"] = value(model.variance_network_lod0.inv_s())
        return loss, logs


@torch.no_grad()
def render_view(model: ReconstructionModel, renderer_config: RendererConfig, sample: Sample, step: int,
                level: int = 4) -> dict[str, torch.Tensor]:
    """Render a sample's query view at every ``level``-th pixel (deterministic samples, batch statistics).

    Returns:
        ``color`` [h, w, 3], ``opacity`` [h, w], ``depth`` [h, w], ``target`` [h, w, 3].
    """
    was_training = model.training
    model.eval()  # batch statistics without touching the running statistics
    try:
        renderer = VolumeRenderer(model, dataclasses.replace(renderer_config, perturb=False))
        fused = model.pyramid_feature_network.fused(sample.images)
        volume = model.sdf_network_lod0.conditional_volume(fused, sample.proj)
        origins, directions, shape = image_rays(sample, level)

        def render(o: torch.Tensor, d: torch.Tensor):
            return renderer.render(o, d, *sample.near_far, volume, fused, sample.images, sample.proj, sample.centres,
                                   sample.query_c2w[:3, 3], step, None, create_graph=False)

        color, opacity, depth = render_chunks(render, origins, directions)
    finally:
        model.train(was_training)
    target = sample.query_rgb[::level, ::level]
    return {"color": color.reshape(*shape, 3), "opacity": opacity.reshape(shape), "depth": depth.reshape(shape),
            "target": target}


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------------


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / CHECKPOINTS_DIR / f"step_{step:07d}"


def latest_checkpoint(out: Path) -> Path | None:
    """The complete checkpoint (weights and train state) with the highest step, or None."""
    folders = sorted((out / CHECKPOINTS_DIR).glob("step_*"))
    complete = [f for f in folders if (f / TRAIN_STATE_FILE).is_file() and (f / WEIGHTS_FILE).is_file()]
    return complete[-1] if complete else None


def save_training_checkpoint(out: Path, model: ReconstructionModel, optimizer: torch.optim.Optimizer,
                             generator: torch.Generator, step: int, config: TrainConfig,
                             scaler: torch.amp.GradScaler | None = None) -> Path:
    """Write ``step_<N>/`` (model in the server's format, then ``train_state.pt``, whose presence marks completion)."""
    folder = save_checkpoint(model, checkpoint_dir(out, step), extra={"step": step, "training": config.to_dict()})
    state = {"step": step, "optimizer": optimizer.state_dict(), "generator": generator.get_state()}
    if scaler is not None and scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    tmp = folder / f".{TRAIN_STATE_FILE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, folder / TRAIN_STATE_FILE)
    return folder


def load_training_checkpoint(folder: Path, model: ReconstructionModel, optimizer: torch.optim.Optimizer,
                             generator: torch.Generator, scaler: torch.amp.GradScaler | None = None) -> int:
    """Restore model, optimizer, generator (and the fp16 loss scale, if saved) from ``folder``; returns the number of
    steps done."""
    from safetensors.torch import load_file

    try:
        model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        state = torch.load(folder / TRAIN_STATE_FILE, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"cannot resume from {folder}: {e}") from e
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    if scaler is not None and scaler.is_enabled() and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    return int(state["step"])


# ---------------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class FitResult:
    steps_done: int
    history: list[dict[str, float]]
    """Per-step logs of this process (``step``, ``lr`` and the loss terms)."""
    checkpoint: Path | None


class StepTimer(Protocol):
    """Receives the phases of every step (the benchmark's hook; :func:`fit` calls nothing else on it)."""

    def lap(self, phase: str) -> None:
        """The time since the previous lap belongs to ``phase``. Once before the first step: ``other`` (setup); then
        per step, in order: ``data`` (waiting for the loader, rays, copies), ``forward`` and ``backward`` (once per
        object of the step), ``optimizer`` (clip and Adam), ``other`` (logging, validation, checkpoint)."""


class _NoTimer:
    def lap(self, phase: str) -> None:
        pass


def _setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank)  # `--device cuda` under torchrun: this process's GPU
        torch.cuda.set_device(dev)
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl", device_id=dev)
    elif world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return (dist.get_rank() if world > 1 else 0), world, dev


def _read_back(entries: list[dict]) -> list[dict[str, float]]:
    """Step logs with their tensors as floats, read back from the device in one transfer."""
    tensors = [v for entry in entries for v in entry.values() if isinstance(v, torch.Tensor)]
    values = iter(torch.stack([t.float().reshape(()) for t in tensors]).tolist() if tensors else [])
    return [{k: next(values) if isinstance(v, torch.Tensor) else v for k, v in entry.items()} for entry in entries]


def fit(config: TrainConfig, data: str | Path, out: str | Path, device: str = "auto", resume: bool = True,
        runtime: RuntimeConfig | None = None, timer: StepTimer | None = None) -> FitResult:
    """Train (or continue training) a reconstruction network.

    Args:
        config: the run's settings.
        data: the render root (``<folder_id>/<uid>/`` objects).
        out: run folder: ``checkpoints/``, ``tb/`` (TensorBoard), ``config.json``.
        device: ``auto`` (CUDA if present), ``cpu``, ``cuda:N``.
        resume: continue from the latest complete checkpoint in ``out`` if there is one.
        runtime: precision and loading (defaults: bf16 and loader workers on CUDA; fp32 in-process on the CPU).
        timer: told the phases of every step (:class:`StepTimer`; benchmarks).

    Raises:
        BadInputError: no usable objects, a batch size below 1, or an unusable ``runtime`` setting.
    """
    out = Path(out)
    runtime = runtime or RuntimeConfig()
    timer = timer or _NoTimer()
    if config.batch_size < 1:
        raise BadInputError(f"batch size {config.batch_size}: train at least 1 object per step and process")
    rank, world, dev = _setup_distributed(device)
    cuda = dev.type == "cuda"
    precision = resolve_precision(runtime.amp, dev)
    if cuda:
        torch.backends.cudnn.benchmark = True  # every step has the same shapes: pick the fastest convolutions once
    objects = find_objects(data)
    train_objects, val_objects = split_objects(objects, config.data.val_fraction)
    if not train_objects:
        raise BadInputError(f"{data} has {len(objects)} object(s), all held out; lower --set data.val_fraction")
    dataset = ObjectDataset(train_objects, config.data, seed=config.seed, cache_mb=runtime.loader.cache_mb)
    val_sample = load_sample(read_object((val_objects or train_objects)[0]), 1, predicted=False)

    model = build_model(model_config(config), seed=config.seed).to(dev).train()
    step_module = TrainStep(model, config, precision, tensor_logs=True)
    # Fused Adam: one kernel for all parameters, and it takes the fp16 scaler's inf check without a read-back.
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, **({"fused": True} if cuda else {}))
    scaler = precision.grad_scaler()
    generator = torch.Generator().manual_seed(config.seed * 1000 + rank)
    start = 0
    latest = latest_checkpoint(out) if resume else None
    if latest is not None:
        start = load_training_checkpoint(latest, model, optimizer, generator, scaler)
        log.info("resuming from %s (step %d)", latest, start)
    if world > 1:
        step_module = nn.parallel.DistributedDataParallel(step_module, device_ids=[dev.index] if cuda else None)
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"data": str(data), "world_size": world, **config.to_dict(),
                                                     "runtime": {**runtime.to_dict(), "amp": precision.mode}},
                                                    indent=2))
        writer = SummaryWriter(str(out / "tb"), purge_step=start)
        log.info("training on %d objects (%d held out), %d process(es), %s, amp %s", len(train_objects),
                 len(val_objects), world, dev, precision.mode)

    per_step = config.batch_size
    batches = (step_loader(StepSamples(dataset, config.seed, rank, world, per_step), range(start, config.steps),
                           runtime.loader, cuda) if start < config.steps else iter(()))
    history: list[dict[str, float]] = []
    pending: list[dict] = []  # this window's step logs, tensors still on the device
    checkpoint = latest
    clock = time.perf_counter()
    timer.lap("other")
    for step in range(start, config.steps):
        # 1. Learning rate of this step.
        lr = lr_at(step, config.lr, config.end_iter)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # 2. This process's (object, query view) samples and their rays (drawn on the host, then copied).
        samples = next(batches)
        rays = [sample_rays(sample, config.rays, generator, config.inside_fraction).to(dev, non_blocking=True)
                for sample in samples]
        samples = [sample.to(dev, non_blocking=True) for sample in samples]
        timer.lap("data")
        # 3. Render and loss, backward (gradients summed over the step's objects, averaged over processes by DDP);
        #    clip; Adam.
        optimizer.zero_grad(set_to_none=True)
        step_logs = []
        for b, (sample, ray_batch) in enumerate(zip(samples, rays, strict=True)):
            accumulate = world > 1 and b + 1 < per_step  # DDP all-reduces once, after the last object's backward
            with step_module.no_sync() if accumulate else contextlib.nullcontext():
                loss, logs = step_module(sample, ray_batch, step, generator)
                timer.lap("forward")
                scaler.scale(loss / per_step if per_step > 1 else loss).backward()
                timer.lap("backward")
            step_logs.append(logs)
        if scaler.is_enabled():
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        timer.lap("optimizer")
        logs = step_logs[0] if per_step == 1 else {k: sum(e[k] for e in step_logs) / per_step for k in step_logs[0]}
        logs.update(step=step, lr=lr, grad_norm=grad_norm.detach())
        pending.append(logs)
        done = step + 1
        # 4. Logs (the only read-back of the window's scalars), validation, checkpoints (rank 0).
        if done % config.log_every == 0 or done == config.steps:
            history += _read_back(pending)
            pending = []
            logs = history[-1]
        if writer is not None and (done % config.log_every == 0 or done == config.steps):
            for key, value in logs.items():
                if key != "step":
                    writer.add_scalar(key, value, done)
            seconds = (time.perf_counter() - clock) / config.log_every
            writer.add_scalar("time/seconds_per_step", seconds, done)
            log.info("step %d  loss %.4f  colour %.4f  lr %.2e  %.2fs/step", done, logs["loss/total"],
                     logs["loss/color"], lr, seconds)
            clock = time.perf_counter()
        if writer is not None and config.val_every and done % config.val_every == 0:
            view = render_view(model, config.renderer, val_sample.to(dev), done, config.val_level)
            mse = float(((view["color"] - view["target"]) ** 2).mean())
            writer.add_scalar("val/psnr", -10 * math.log10(max(mse, 1e-10)), done)
            grid = torch.cat([view["target"], view["color"].clamp(0, 1), view["opacity"][..., None].expand(-1, -1, 3)],
                             dim=1)
            writer.add_image("val/target_render_opacity", grid.cpu().numpy(), done, dataformats="HWC")
        if rank == 0 and (done % config.checkpoint_every == 0 or done == config.steps):
            checkpoint = save_training_checkpoint(out, model, optimizer, generator, done, config, scaler)
        timer.lap("other")
    del batches  # stops the loader's workers
    if writer is not None:
        writer.close()
    if world > 1:
        dist.barrier()
    return FitResult(steps_done=config.steps, history=history, checkpoint=checkpoint)


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The preset with the command line's overrides applied."""
    config = PRESETS[args.preset]
    direct = {"steps": args.steps, "rays": args.rays, "lr": args.lr, "seed": args.seed,
              "checkpoint_every": args.checkpoint_every, "val_every": args.val_every, "log_every": args.log_every,
              "batch_size": args.batch_size}
    config = dataclasses.replace(config, **{k: v for k, v in direct.items() if v is not None})
    if args.steps is not None and args.end_iter is None and args.preset == "tiny":
        config = dataclasses.replace(config, end_iter=args.steps)
    if args.end_iter is not None:
        config = dataclasses.replace(config, end_iter=args.end_iter)
    if args.prediction_ratio is not None:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data,
                                                                      prediction_ratio=args.prediction_ratio))
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise BadInputError(f"--set {item!r}: expected KEY=VALUE, e.g. renderer.n_samples=32")
        config = override(config, key.strip(), value.strip())
    return config


def runtime_from_args(args: argparse.Namespace) -> RuntimeConfig:
    """Precision and loading of the command line (device defaults where not given)."""
    loader = LoaderConfig(workers=args.workers, prefetch=args.prefetch, pin_memory=not args.no_pin_memory,
                          cache_mb=args.cache_mb)
    return RuntimeConfig(amp=args.amp, loader=loader)


def run_fit(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    result = fit(config, args.data, args.out, device=args.device, resume=not args.no_resume,
                 runtime=runtime_from_args(args))
    if result.checkpoint is not None and int(os.environ.get("RANK", "0")) == 0:
        print(f"checkpoint: {result.checkpoint}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def add_fit_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``fit``."""
    p = subparsers.add_parser(
        "fit", help="train the reconstruction network on rendered objects",
        description="Train the reconstruction network (spec §6). Resumes from the latest checkpoint in --out. "
                    "Several GPUs: torchrun --nproc_per_node G -m training.cli fit ...")
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper",
                   help="settings to start from: paper (the reference's) or tiny (seconds on a CPU)")
    p.add_argument("--data", required=True, help="render root of `one2345-train render` (<folder_id>/<uid>/ objects)")
    p.add_argument("--out", required=True, help="run folder: checkpoints/step_N/, tb/ (TensorBoard), config.json")
    p.add_argument("--steps", type=int, help="iterations to train in total (paper 200000, tiny 40)")
    p.add_argument("--end-iter", type=int, help="iteration where the cosine lr reaches 0.1·lr (default: paper "
                   "200000; tiny: --steps)")
    p.add_argument("--rays", type=int, help="rays per step and process (paper 512)")
    p.add_argument("--lr", type=float, help="base learning rate (paper 2e-4)")
    p.add_argument("--seed", type=int, help="seed of initialisation, item order and rays (default 0)")
    p.add_argument("--prediction-ratio", type=float,
                   help="share of samples whose 32 sources are Zero123 predictions (cached by `predict`) rather than "
                        "GT renders; paper 1, 0 needs no Zero123")
    p.add_argument("--checkpoint-every", type=int, help="iterations between checkpoints (paper 5000)")
    p.add_argument("--val-every", type=int, help="iterations between validation renders, 0 = never (paper 1600)")
    p.add_argument("--log-every", type=int, help="iterations between scalar logs (paper 100)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any config field, dotted for groups: renderer.n_samples=32, losses.depth_weight=1, "
                        "data.val_fraction=0.1 (repeatable)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present, per LOCAL_RANK), cpu or cuda:N")
    p.add_argument("--no-resume", action="store_true", help="start from scratch even if --out has checkpoints")
    add_speed_arguments(p)
    p.set_defaults(handler=run_fit, func=run_fit)
    return p


def add_speed_arguments(p: argparse.ArgumentParser) -> None:
    """``--batch-size``, ``--amp`` and the loader's options (shared with ``training.benchmarks.fit``)."""
    p.add_argument("--batch-size", type=int,
                   help="objects per step and process, gradients averaged (default 1, one per GPU as the reference; "
                        "the paper's 2 GPUs are 2 on one)")
    p.add_argument("--amp", choices=AMP_MODES,
                   help="mixed precision of the 2D and 3D CNNs (rendering and losses stay fp32); default bf16 on CUDA, "
                        "off on the CPU")
    p.add_argument("--workers", type=int,
                   help="DataLoader worker processes (default: 0 on the CPU, min(4, cores - 1) per GPU on CUDA)")
    p.add_argument("--prefetch", type=int, default=LoaderConfig.prefetch,
                   help=f"steps each worker loads ahead (default {LoaderConfig.prefetch})")
    p.add_argument("--cache-mb", type=int, default=0,
                   help="decoded-image cache per loading process in MiB (default 0, off; ~9 MB per 256² object)")
    p.add_argument("--no-pin-memory", action="store_true", help="do not page-lock loaded samples (CUDA)")
