"""The first real run at full size, on this machine: ``python -m server.benchmarks.first_use [--dir DIR] [--keep]``.

What an artist's first Generate does, measured phase by phase with synthetic weights of the real sizes and formats
(random values; nothing is downloaded):

1. ``write``: a synthetic ``zero123-xl.ckpt`` with the official file's key layout and byte size (15,465,973,531 B by
   default: the raw UNet, its EMA copy, the VAE, the whole OpenAI CLIP ViT-L/14 in half precision, AdamW's two moments
   for the UNet and ``cc_projection``, and an unreferenced ``padding`` record for the bytes the known parts do not
   explain), plus SAM ViT-H, LoFTR and reconstruction files in their published formats. Every tensor is written
   straight to disk as it is made (:class:`~server.benchmarks.streamed_checkpoint.StreamingCheckpointWriter`), so
   writing needs about 0.3 GiB of RAM, whatever the file's size; the result reads back with
   ``torch.load(mmap=True)``. The layouts and writers of the files are in :mod:`server.benchmarks.synthetic_weights`.
2. ``convert``: :func:`server.stages.multiview.convert.ensure_converted` on the checkpoint, its pages first dropped
   from the page cache (cold cache, as after a download).
3. ``load``: ``One2345Pipeline.from_preset("paper", device="cpu")``: Zero123, reconstruction, SAM ViT-H and LoFTR.
4. ``generate``: the pipeline on a synthetic photo (SAM segments it) up to the end of stage 1's second DDIM step,
   then cancelled.

It prints one JSON line: per phase the peak RSS, the peak heap (RSS less file-backed pages: ``RssAnon + RssShmem``,
what the kernel cannot drop under pressure), the wall time and the change in disk use; the free RAM and disk before;
and the time from the start of conversion to the end of loading ("ready"). Peaks come from sampling
``/proc/self/status`` every 5 ms on a thread (PyTorch's kernels let go of the GIL), so they may miss a spike shorter
than that. Everything it wrote is deleted at the end unless ``--keep``.

``--tiny`` runs the same code on a tiny layout in seconds (the test suite does); it is not a measurement.
Needs Linux (``/proc``). Not part of the default test run: at full size it needs ~21 GB of disk and minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from server.benchmarks.streamed_checkpoint import RandomFill, StreamingCheckpointWriter
from server.benchmarks.synthetic_weights import (
    ZERO123_XL_BYTES,
    tiny_architecture,
    tiny_sam,
    write_loftr,
    write_reconstruction,
    write_sam,
    zero123_checkpoint,
)
from server.stages.multiview.convert import ZERO123_XL

GIB = 2**30
FULL_DISK_BYTES = 21 * 10**9
"""Disk the full-size run needs at its peak: the checkpoint (15.5 GB), its conversion (5 GB), SAM (2.6 GB) less what
the order of writing frees (nothing: all stay until the end), rounded down from 23.1 GB because nothing else is
written; checked against ``shutil.disk_usage`` with 1 GB to spare."""


# ---------------------------------------------------------------------------------------------------------------------
# Memory


def read_memory() -> dict[str, int]:
    """This process's memory now, in bytes: ``rss`` (VmRSS), ``heap`` (RssAnon + RssShmem: RSS less file-backed
    pages) and ``file`` (RssFile: mapped file pages, e.g. a memory-mapped checkpoint)."""
    fields: dict[str, int] = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                fields[key] = int(value.split()[0]) * 1024
    return {"rss": fields["VmRSS"], "heap": fields["RssAnon"] + fields.get("RssShmem", 0), "file": fields["RssFile"]}


def available_memory() -> int:
    """``MemAvailable`` of ``/proc/meminfo``, bytes: what can be allocated without swapping."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemAvailable line (Linux < 3.14)")


class PeakMemory:
    """Samples :func:`read_memory` on a thread while the ``with`` block runs; ``rss`` / ``heap`` are the peaks."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.rss = self.heap = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        now = read_memory()
        self.rss, self.heap = max(self.rss, now["rss"]), max(self.heap, now["heap"])

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


@dataclass
class Phase:
    """One measured phase."""

    peak_rss_gib: float = 0.0
    peak_heap_gib: float = 0.0
    wall_s: float = 0.0
    disk_delta_gb: float = 0.0
    """Change of the used bytes of the file system holding the work folder, GB (10⁹ B)."""


@dataclass
class Measurement:
    phases: dict[str, Phase] = dataclasses.field(default_factory=dict)

    def phase(self, name: str, disk_of: Path) -> _PhaseContext:
        return _PhaseContext(self, name, disk_of)


class _PhaseContext:
    def __init__(self, measurement: Measurement, name: str, disk_of: Path) -> None:
        self.measurement, self.name, self.disk_of = measurement, name, disk_of

    def __enter__(self) -> None:
        self.disk = _disk_used(self.disk_of)
        self.start = time.perf_counter()
        self.peak = PeakMemory().__enter__()

    def __exit__(self, *exc: object) -> None:
        self.peak.__exit__(*exc)
        self.measurement.phases[self.name] = Phase(
            peak_rss_gib=round(self.peak.rss / GIB, 2), peak_heap_gib=round(self.peak.heap / GIB, 2),
            wall_s=round(time.perf_counter() - self.start, 1),
            disk_delta_gb=round((_disk_used(self.disk_of) - self.disk) / 1e9, 2))
        print(f"  {self.name}: {dataclasses.asdict(self.measurement.phases[self.name])}", file=sys.stderr, flush=True)


def _disk_used(path: Path) -> int:
    usage = shutil.disk_usage(path)
    return usage.total - usage.free


# ---------------------------------------------------------------------------------------------------------------------
# The run


def _drop_from_page_cache(path: Path) -> None:
    """Ask the kernel to forget ``path``'s cached pages (a cold read, as after a download on a busy machine)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _photo(size: int = 512) -> np.ndarray:
    """[size, size, 3] uint8: a shaded red ball on a plain light-grey background (what SAM's box prompt needs)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    inside = (x - 0.5) ** 2 + (y - 0.52) ** 2 < 0.3**2
    shade = np.clip(1.2 - 1.5 * np.hypot(x - 0.42, y - 0.42), 0.3, 1.0)
    image = np.full((size, size, 3), 235, np.uint8)
    image[inside] = (np.stack([200 * shade, 40 * shade, 30 * shade], -1)[inside]).astype(np.uint8)
    return image


class _NonEmptyMask:
    """SAM as loaded (its time and memory are what is measured), but random weights segment at random: an empty mask
    is replaced by the prompt box so that the run goes on to the diffusion steps."""

    def __init__(self, segmenter: Any) -> None:
        self.segmenter, self.model = segmenter, segmenter.model

    def __call__(self, rgb: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        mask = self.segmenter(rgb, box)
        if not mask.any():
            x0, y0, x1, y1 = box
            mask[y0 : y1 + 1, x0 : x1 + 1] = True
        return mask


def run(directory: Path, *, tiny: bool = False, keep: bool = False, steps: int = 2,
        log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> dict[str, Any]:
    """Write, convert, load and start generating in ``directory`` (a fresh folder is made inside it); returns the
    JSON-ready result. With ``tiny`` the layout is small and the pipeline is not loaded (no paper-sized models).

    An exception in a phase ends the run with ``"error"`` in the result (the phases measured so far are kept).

    Raises:
        OSError: not enough free disk for the full-size run (``FULL_DISK_BYTES`` + 1 GB), or no ``/proc``.
    """
    from server.common.weights import weight_file
    from server.stages.multiview.convert import ensure_converted

    directory.mkdir(parents=True, exist_ok=True)
    free_disk = shutil.disk_usage(directory).free
    needed = 10**8 if tiny else FULL_DISK_BYTES + 10**9
    if free_disk < needed:
        raise OSError(f"{directory} has {free_disk / 1e9:.1f} GB free; the first-use benchmark needs "
                      f"{needed / 1e9:.1f} GB; pass --dir on a larger disk")
    work = Path(tempfile.mkdtemp(prefix="one2345-first-use-", dir=directory))
    result: dict[str, Any] = {"mode": "tiny" if tiny else "full", "cpus": os.cpu_count(),
                              "mem_available_gib": round(available_memory() / GIB, 1),
                              "disk_free_gb": round(free_disk / 1e9, 1), "torch": torch.__version__}
    measure = Measurement()
    try:
        arch = tiny_architecture() if tiny else ZERO123_XL
        checkpoint = work / weight_file("zero123-xl").local_name
        fill = RandomFill(pool_bytes=2**20 if tiny else 128 * 2**20)
        log(f"writing the synthetic weights in {work} …")
        with measure.phase("write", work):
            layout = zero123_checkpoint(arch, **({"text_width": 16, "text_layers": 1, "vocab": 50} if tiny else {}))
            size = StreamingCheckpointWriter(checkpoint, fill, None if tiny else ZERO123_XL_BYTES).write(layout)
            sizes = {"zero123-xl": size,
                     "sam": write_sam(work / weight_file("sam").local_name, fill, tiny)}
            if not tiny:
                sizes["loftr"] = write_loftr(work / weight_file("loftr").local_name, fill)
                sizes["reconstruction"] = write_reconstruction(work / weight_file("reconstruction").local_name, fill)
            del layout
        result["file_bytes"] = sizes
        _drop_from_page_cache(checkpoint)

        log("converting …")
        events: list[str] = []

        def on_progress(event: Any) -> None:
            if event.phase != "write":  # many byte-count reports per part
                events.append(event.phase)
                log(f"  convert: {event.phase} {event.step}/{event.total}")

        started = time.perf_counter()
        with measure.phase("convert", work):
            converted = ensure_converted(checkpoint, work / "converted", architecture=arch, progress=on_progress)
        result["convert_progress"] = events
        result["converted_bytes"] = sum(p.stat().st_size for p in converted.rglob("*") if p.is_file())
        if tiny:
            from server.stages.preprocess import SamSegmenter

            with measure.phase("load", work):
                segmenter = SamSegmenter.from_checkpoint(work / weight_file("sam").local_name, build=tiny_sam)
            with measure.phase("generate", work):
                mask = segmenter(_photo(64), (16, 16, 47, 47))
            result["mask_pixels"] = int(mask.sum())
        else:
            from server.pipeline import GenerateOptions, One2345Pipeline

            log("loading the paper preset on the CPU …")
            with measure.phase("load", work):
                pipe = One2345Pipeline.from_preset("paper", device="cpu", weights_dir=work, download_missing=False)
            result["ready_s"] = round(time.perf_counter() - started, 1)
            if pipe.models.segmenter is not None:
                pipe.models.segmenter = _NonEmptyMask(pipe.models.segmenter)
            log(f"generating up to stage 1's DDIM step {steps} …")
            seen: list[tuple[str, int]] = []

            def progress(p: Any) -> None:
                seen.append((p.stage, p.step))
                log(f"  {p.stage} {p.step}/{p.total}")

            def should_cancel() -> bool:
                return any(stage == "stage1" and step >= steps for stage, step in seen)

            from server.common.errors import CancelledError

            with measure.phase("generate", work):
                try:
                    pipe(_photo(), work / "run", GenerateOptions(), progress=progress, should_cancel=should_cancel)
                except CancelledError:
                    pass
                else:
                    raise RuntimeError("the run was expected to be cancelled after stage 1's DDIM steps")
            result["models"] = pipe.models.descriptions
            del pipe
    except Exception as error:  # the phases measured so far still come out, with what went wrong
        result["error"] = f"{type(error).__name__}: {error}"
    finally:
        result["phases"] = {k: dataclasses.asdict(v) for k, v in measure.phases.items()}
        result["disk_peak_gb"] = round(sum(p.stat().st_size for p in work.rglob("*") if p.is_file()) / 1e9, 2)
        if keep:
            result["kept"] = str(work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.benchmarks.first_use", description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where to write the synthetic weights (a new folder inside; default: the temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the files written (default: delete them)")
    parser.add_argument("--tiny", action="store_true", help="a tiny layout in seconds (for tests), not a measurement")
    parser.add_argument("--steps", type=int, default=2, help="stage-1 DDIM steps to run before cancelling (default 2)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    result = run(args.dir, tiny=args.tiny, keep=args.keep, steps=args.steps)
    print(json.dumps(result), flush=True)
    return 1 if "error" in result else 0


if __name__ == "__main__":
    raise SystemExit(main())
