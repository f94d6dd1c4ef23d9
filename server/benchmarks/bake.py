"""Time the asset stage's texture bake step by step and report peak memory, on the numpy path or on a torch device
(issue #28).

The mesh is the synthetic toy object (:mod:`server.common.synthetic`, a sphere and a box) as a marching-cubes surface
decimated to ``--faces``; the views are its 40 posed renders (8 stage-1 views and 32 nearby views, 256²), as a run's
views folder holds them. One warm-up bake, then ``--repeats`` timed ones; the best is reported.

    python -m server.benchmarks.bake --faces 20000 --size 1024 --device cuda
    python -m server.benchmarks.bake --faces 20000 --size 1024 --device cpu --path torch
    python -m server.benchmarks.bake --faces 20000 --size 1024 --device cuda --compare   # + parity with numpy

Prints one JSON line on stdout: the bake's timings (unwrap, rasterize, views, fill, total), the warm-up's total, peak
host memory during the bakes (VmHWM, reset before them where Linux allows) and peak CUDA memory, and with
``--compare`` how far the texture is from the numpy path's.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from server.common.mesh_io import Mesh
from server.common.synthetic import shape_sdf, write_views_dir
from server.stages.asset import BakeViews, TexturedMesh, bake_texture, decimate, load_bake_views
from server.stages.meshing import extract_surface


def toy_mesh(faces: int) -> Mesh:
    """The toy object's marching-cubes surface decimated to ``faces`` (the raw surface has ~3.9·R² faces at grid R)."""
    resolution = max(32, math.ceil(math.sqrt(2.0 * faces / 3.9)))
    axis = np.linspace(-0.5, 0.5, resolution)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1)
    vertices, triangles = extract_surface(shape_sdf(grid.reshape(-1, 3)).reshape((resolution,) * 3).astype(np.float32))
    mesh = Mesh((vertices * 0.5).astype(np.float32), triangles)
    return decimate(mesh, faces) if len(triangles) > faces else mesh


def reset_host_peak() -> bool:
    """Reset this process's peak resident memory (Linux: write 5 to /proc/self/clear_refs); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def host_peak_gib() -> float:
    """Peak resident memory of this process (VmHWM, since the last reset), in GiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def parity(reference: TexturedMesh, other: TexturedMesh) -> dict[str, float | int]:
    """How far a bake is from the numpy path's (tests/server/test_bake_torch.py states the tolerance)."""
    ref, out = reference.report, other.report
    both = ref.seen & out.seen
    difference = np.abs(reference.texture.astype(np.int64) - other.texture.astype(np.int64)).max(axis=-1)
    return {"charted_differ": int((ref.charted != out.charted).sum()), "seen_differ": int((ref.seen != out.seen).sum()),
            "max_diff_seen": int(difference[both].max()) if both.any() else 0, "max_diff_all": int(difference.max()),
            "texels_over_2": int((difference > 2).sum())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=1024, help="texture side in texels")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--path", choices=["numpy", "torch"], default=None,
                        help="numpy (the CPU path) or torch on --device; default: torch on cuda, numpy on cpu")
    parser.add_argument("--repeats", type=int, default=2, help="timed bakes after one warm-up bake")
    parser.add_argument("--compare", action="store_true", help="also bake with numpy and report the difference")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.path or ("torch" if args.device == "cuda" else "numpy")
    if path == "numpy" and args.device == "cuda":
        parser.error("--path numpy runs on the CPU; allowed with it: --device cpu")
    device = None if path == "numpy" else args.device
    cuda = device == "cuda"

    start = time.perf_counter()
    mesh = toy_mesh(args.faces)
    with tempfile.TemporaryDirectory() as tmp:
        views: BakeViews = load_bake_views(write_views_dir(Path(tmp) / "views"))
    setup = time.perf_counter() - start

    reset_host_peak()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    runs, first = [], None
    for i in range(args.repeats + 1):
        begin = time.perf_counter()
        out = bake_texture(mesh, views, args.size, device=device)
        wall = time.perf_counter() - begin
        print(f"{'warm-up' if i == 0 else f'run {i}':>8}: {wall:6.2f}s  "
              + "  ".join(f"{k} {v:.3f}s" for k, v in out.report.timings.items()), file=sys.stderr)
        if i == 0:
            first = wall
        else:
            runs.append(out.report.timings)
    best = min(runs, key=lambda r: r["total"]) if runs else out.report.timings
    report = {
        "step": "bake", "faces": len(mesh.faces), "size": args.size, "path": path, "device": out.report.device,
        "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "views": len(views.ids),
        "coverage": round(out.report.coverage, 4), "setup_s": round(setup, 2), "first_total_s": round(first, 3),
        "best": {f"{k}_s": round(v, 3) for k, v in best.items()},
        "best_without_unwrap_s": round(best["total"] - best["unwrap"], 3),
        "peak_host_gib": round(host_peak_gib(), 2),
    }
    if cuda:
        report["peak_cuda_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if args.compare and path == "torch":
        report["parity"] = parity(bake_texture(mesh, views, args.size), out)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
