"""Time ``reconstruct`` stage by stage and report peak memory.

Uses the full-size (``paper``) network with random weights — run time does not depend on the weight values, and the
geometric initialisation gives a closed surface of realistic size, so meshing and colouring do real work — on the
synthetic views of :mod:`server.common.synthetic`.

    python -m server.benchmarks.reconstruct --preset paper --resolution 256 --device cpu --repeats 2
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from server.common.synthetic import write_views_dir
from server.common.views import load_views
from server.pipeline.reconstruct import reconstruct_mesh
from server.stages.meshing import MeshingConfig
from server.stages.reconstruction.model import build_model


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def print_report(report: dict, cuda: bool) -> None:
    """Add peak host (and CUDA) memory to a benchmark report and print it as one JSON line on stdout."""
    report["peak_host_rss_gib"] = round(peak_rss_gib(), 2)
    if cuda:
        report["peak_cuda_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(report))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="paper", choices=["paper", "tiny"])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs after one warm-up run")
    parser.add_argument("--dense", action="store_true", help="dense SDF grid (the reference's way) for comparison")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        views = load_views(write_views_dir(Path(tmp) / "views", polar=75))
    model = build_model(args.preset, seed=0)
    meshing = MeshingConfig(resolution=args.resolution, coarse_to_fine=not args.dense)
    cuda = args.device.startswith("cuda")

    runs = []
    for i in range(args.repeats + 1):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = reconstruct_mesh(model, views, meshing, device=args.device)
        if cuda:
            torch.cuda.synchronize()
        total = time.perf_counter() - start
        label = "warm-up" if i == 0 else f"run {i}"
        stages = "  ".join(f"{k} {v:6.2f}s" for k, v in out.timings.items())
        print(f"{label:>8}: total {total:6.2f}s  {stages}", file=sys.stderr)
        if i:
            runs.append({"total_s": total, **{f"{k}_s": v for k, v in out.timings.items()}})

    best = min(runs, key=lambda r: r["total_s"])
    report = {
        "preset": args.preset, "resolution": args.resolution, "device": args.device,
        "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(), "coarse_to_fine": not args.dense,
        "vertices": len(out.mesh.vertices), "faces": len(out.mesh.faces),
        "best": {k: round(v, 3) for k, v in best.items()},
    }
    print_report(report, cuda)
    return 0


if __name__ == "__main__":
    sys.exit(main())
