"""Time ``one2345-train fit`` phase by phase and print one JSON line.

    python -m training.benchmarks.fit --preset paper --device cuda --steps 200
    python -m training.benchmarks.fit --preset tiny --device cpu --steps 5          # seconds; how it is tested

Data: ``--data DIR`` is any render root ``fit`` reads (``one2345-train render --out DIR``, or the official layout).
Without it, or when DIR holds no finished object yet, ``--objects`` procedural objects are rendered into it (default
``<out>/data``): the analytic shapes of :mod:`server.common.synthetic` in the training layout, exactly as the tests make
training data (numpy only, no Blender; ~6 s per 256² object and core, in parallel over the cores), so a later run
with the same ``--data`` reuses them. Sources are the GT nearby renders (``prediction_ratio`` 0): Zero123's
predictions are files of the same size, so loading costs the same.

The run is :func:`training.train.fit` itself — same loop, loader, precision and checkpoint — from scratch in
``<out>/run`` with validation off and one checkpoint at the end. Each step's phases are bracketed by
``torch.cuda.synchronize()`` (only here: ``fit`` never waits for the GPU on its own), so the split is exact and the
total is slightly pessimistic. The first ``--warmup`` steps (cuDNN autotuning, allocator growth, loader start) are
left out of the means. JSON fields:

* ``step_s`` and its parts ``data_wait_s`` (loader, rays, host→device copies), ``forward_s``, ``backward_s``,
  ``optimizer_s`` (clip, Adam), ``other_s`` (logging, the final checkpoint): means over the timed steps;
* ``projected_run_h``: ``step_s`` × the preset's full step count (paper: 200 000), in hours;
* ``peak_cuda_allocated_gib`` / ``peak_cuda_reserved_gib`` (null on the CPU), ``peak_host_rss_gib``;
* ``gpu_utilization_pct``: mean of ``torch.cuda.utilization()`` sampled every 0.1 s over the timed steps (null on the
  CPU or without NVML);
* ``loss_start`` / ``loss_end``: mean total loss over the first and last tenth of the steps (at most 10, finite values
  only), ``nonfinite_steps``: steps whose loss or gradient norm was NaN or infinite;
* ``checkpoint``: the final checkpoint's folder (``one2345 reconstruct --checkpoint`` loads it).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import platform
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from server.benchmarks.reconstruct import print_report
from server.common.errors import BadInputError, One2345Error
from training.amp import resolve_precision
from training.data import find_objects
from training.synthetic import write_synthetic_dataset
from training.train import PRESETS, TrainConfig, add_speed_arguments, fit, runtime_from_args

log = logging.getLogger(__name__)
PHASES = ("data", "forward", "backward", "optimizer", "other")
REPORT_NAMES = {"data": "data_wait_s", "forward": "forward_s", "backward": "backward_s", "optimizer": "optimizer_s",
                "other": "other_s"}


class PhaseTimer:
    """A :class:`training.train.StepTimer` that synchronises CUDA at every lap and sums the phases of the timed steps.

    Args:
        cuda: synchronise the current CUDA device before reading the clock.
        warmup: leading steps left out of the sums.
        on_timed: called once, when the first timed step starts.
    """

    def __init__(self, cuda: bool, warmup: int, on_timed: Callable[[], None] | None = None) -> None:
        self.cuda = cuda
        self.warmup = warmup
        self.on_timed = on_timed
        self.step = -1  # the first lap ("other", setup) starts step 0
        self.totals: dict[str, float] = defaultdict(float)
        self.timed_steps = 0
        self._last: float | None = None

    def lap(self, phase: str) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._last is not None and self.step >= self.warmup:
            self.totals[phase] += now - self._last
        self._last = now
        if phase == "other":
            if self.step >= self.warmup:
                self.timed_steps += 1
            self.step += 1
            if self.step == self.warmup and self.on_timed is not None:
                self.on_timed()


class UtilisationSampler(threading.Thread):
    """Samples ``torch.cuda.utilization()`` every ``period`` s from ``start()`` to ``done.set()`` (``mean``: None
    without NVML). Started with the timed steps, after the loader's workers have forked."""

    def __init__(self, period: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.period = period
        self.samples: list[float] = []
        self.available = True
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.samples.append(float(torch.cuda.utilization()))
            except Exception:  # no pynvml / NVML: report null rather than fail the benchmark
                self.available = False
                return
            self.done.wait(self.period)

    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.available and self.samples else None


def prepare_data(root: Path, objects: int, size: int) -> float:
    """Render ``objects`` procedural objects of ``size``² into ``root`` unless it holds finished objects; returns the
    seconds spent rendering (0 when reused)."""
    try:
        found = find_objects(root)
        log.info("using %d object(s) in %s", len(found), root)
        return 0.0
    except BadInputError:
        pass
    if objects < 1:
        raise BadInputError(f"--objects {objects}: render at least 1 object (or give --data with renders)")
    if size < 8 or size % 4:
        raise BadInputError(f"--size {size}: the feature pyramid needs a multiple of 4, at least 8 (paper 256)")
    start = time.perf_counter()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    log.info("rendering %d procedural %d² object(s) into %s", objects, size, root)
    write_synthetic_dataset(root, objects, size=size, seed=0, workers=min(objects, cores))
    return time.perf_counter() - start


def benchmark_config(args: argparse.Namespace) -> TrainConfig:
    """The preset, shortened to ``--steps``: validation off, one checkpoint at the end, GT sources, no hold-out."""
    config = PRESETS[args.preset]
    steps = args.steps
    config = dataclasses.replace(
        config, steps=steps, end_iter=steps if args.preset == "tiny" else config.end_iter, val_every=0,
        checkpoint_every=steps, log_every=min(config.log_every, steps), rays=args.rays or config.rays,
        batch_size=args.batch_size or 1,
        data=dataclasses.replace(config.data, prediction_ratio=0.0, val_fraction=0.0))
    return config


def window_mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return round(sum(finite) / len(finite), 5) if finite else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu")
    parser.add_argument("--steps", type=int, default=200, help="steps to run (default 200)")
    parser.add_argument("--warmup", type=int, help="leading steps left out of the means (default min(10, steps / 4))")
    parser.add_argument("--data", type=Path, help="render root to train on (rendered here first if it holds none)")
    parser.add_argument("--objects", type=int, default=4, help="procedural objects to render (default 4)")
    parser.add_argument("--size", type=int, help="image size of rendered objects (default: paper 256, tiny 32)")
    parser.add_argument("--rays", type=int, help="rays per step and object (default: the preset's)")
    parser.add_argument("--out", type=Path, help="run folder, kept (default: a new temporary folder)")
    add_speed_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")  # stderr: stdout is the JSON line
    try:
        return run(args)
    except One2345Error as err:
        print(f"training.benchmarks.fit: {err}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise BadInputError(f"--steps {args.steps}: run at least 1 step")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise BadInputError(f"--device {args.device}: torch sees no CUDA device here; use --device cpu")
    out = args.out or Path(tempfile.mkdtemp(prefix="one2345-fit-benchmark-"))
    data = args.data or out / "data"
    size = args.size or (256 if args.preset == "paper" else 32)
    render_s = prepare_data(data, args.objects, size)
    config = benchmark_config(args)
    runtime = runtime_from_args(args)
    warmup = args.warmup if args.warmup is not None else min(10, args.steps // 4)
    warmup = max(0, min(warmup, args.steps - 1))
    sampler = UtilisationSampler() if cuda else None
    timer = PhaseTimer(cuda, warmup, on_timed=sampler.start if sampler is not None else None)
    if cuda:
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats()
    try:
        result = fit(config, data, out / "run", device=str(device), resume=False, runtime=runtime, timer=timer)
    finally:
        if sampler is not None and sampler.is_alive():
            sampler.done.set()
            sampler.join()

    timed = max(timer.timed_steps, 1)
    parts = {REPORT_NAMES[p]: round(timer.totals[p] / timed, 4) for p in PHASES}
    step_s = sum(timer.totals.values()) / timed
    losses = [h["loss/total"] for h in result.history]
    window = max(1, min(10, len(losses) // 10))
    nonfinite = sum(not (math.isfinite(h["loss/total"]) and math.isfinite(h["grad_norm"])) for h in result.history)
    report = {
        "benchmark": "fit", "preset": args.preset, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__, "amp": resolve_precision(runtime.amp, device).mode, "batch_size": config.batch_size,
        "workers": runtime.loader.resolved_workers(cuda), "objects": len(find_objects(data)), "image_size": size,
        "rays": config.rays, "steps": args.steps, "timed_steps": timer.timed_steps,
        "step_s": round(step_s, 4), **parts,
        "projected_run_h": round(step_s * PRESETS[args.preset].steps / 3600, 2),
        "gpu_utilization_pct": sampler.mean() if sampler is not None else None,
        "loss_start": window_mean(losses[:window]), "loss_end": window_mean(losses[-window:]),
        "nonfinite_steps": nonfinite, "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "render_s": round(render_s, 2),
        "peak_cuda_allocated_gib": None,
        "peak_cuda_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 2) if cuda else None,
    }
    print_report(report, cuda)
    return 0


if __name__ == "__main__":
    sys.exit(main())
