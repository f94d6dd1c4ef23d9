"""``one2345-train render``: plan this shard's objects, run one Blender process over them, report progress.

Runs in the main environment (no ``bpy``, no torch needed). The work itself happens in the ``bpy`` 4.2 interpreter
(``.venv-bpy42/bin/python``; ``--blender-python`` or ``$ONE2345_BPY42_PYTHON`` override it), which runs the BlenderProc
script :mod:`training.render.render_views` in-process through :mod:`training.render.launch_inprocess`. One process per
shard renders all its objects, so Blender's start-up is paid once.

Resumability: an object whose final folder holds ``meta.json`` is done and never planned again (an elevation-only
object is not done for ``--views all``: it is rendered again in full); objects recorded as failed in a manifest are
skipped too unless ``--retry-failed``. If the Blender process dies (a crash inside Blender on a pathological file),
the object it was rendering is recorded as failed and a new process continues with the rest. The Blender process's
own output goes to ``<out>/logs/shard-<i>-of-<N>.log``.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from server.common.errors import BadInputError
from training.render import layout, sources
from training.render.layout import ObjectJob

logger = logging.getLogger("training.render")

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The repository root (holds ``server/``, ``training/`` and, after ``.ci/blender-envs``, ``.venv-bpy42/``)."""

BPY_PYTHON_ENV = "ONE2345_BPY42_PYTHON"
"""Environment variable naming the bpy 4.2 interpreter."""

SCRIPT = Path(__file__).resolve().with_name("render_views.py")
LAUNCHER = Path(__file__).resolve().with_name("launch_inprocess.py")

MAX_CRASHES = 20
"""Blender process deaths tolerated per run (each skips the object in flight) before the driver gives up."""


def bpy_python(explicit: str | None = None) -> Path:
    """The bpy 4.2 interpreter: ``explicit``, else ``$ONE2345_BPY42_PYTHON``, else ``<repo>/.venv-bpy42/bin/python``.

    Raises:
        BadInputError: it does not exist (the fix says to run ``.ci/blender-envs``).
    """
    path = Path(explicit or os.environ.get(BPY_PYTHON_ENV) or REPO_ROOT / ".venv-bpy42" / "bin" / "python")
    if not path.exists():
        raise BadInputError(
            f"the bpy 4.2 interpreter {path} does not exist",
            fix=f"run .ci/blender-envs in {REPO_ROOT} (it builds .venv-bpy42 with bpy 4.2.0 and BlenderProc 2.8.0), "
            f"or pass --blender-python / set {BPY_PYTHON_ENV}",
        )
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """The objects this shard still has to render, and how many of its share were skipped."""

    jobs: list[ObjectJob]
    """To render, in source order."""
    done: int = 0
    """Already finished (``meta.json`` present)."""
    failed_before: int = 0
    """Recorded as failed by an earlier run and not retried."""


def plan_jobs(args: argparse.Namespace, objaverse: sources.ObjaverseSource | None = None) -> Plan:
    """Resolve ``--source``, keep this shard's objects, drop finished (and previously failed) ones.

    Args:
        args: parsed ``render`` options.
        objaverse: the Objaverse wrapper to use (default: the real package, with ``--objaverse-cache``).
    """
    out = Path(args.out)
    shard_index, shard_count = layout.parse_shard(args.shard)
    failed = {uid for uid, rec in layout.read_manifests(out).items() if rec.get("status") == "failed"}
    counts = {"done": 0, "failed": 0}

    def keep(job: ObjectJob) -> bool:
        if layout.shard_of(job.uid, shard_count) != shard_index:
            return False
        if layout.is_done(out, job, args.views):
            counts["done"] += 1
            return False
        if job.uid in failed and not args.retry_failed:
            counts["failed"] += 1
            return False
        return True

    if args.count is not None and args.count < 0:
        raise BadInputError(f"--count {args.count} must be ≥ 0")
    if args.source == "procedural":
        count = 8 if args.count is None else args.count
        jobs = [job for job in sources.procedural_jobs(count, args.first_seed) if keep(job)]
    elif args.source == "objaverse":
        selection = sources.LvisSelection(
            categories=tuple(c.strip() for c in args.categories.split(",") if c.strip()) if args.categories else (),
            split=args.split,
            split_file=args.split_file,
            val_fraction=args.val_fraction,
        )
        objaverse = objaverse or sources.ObjaverseSource(args.objaverse_cache, args.download_processes)
        jobs = sources.objaverse_jobs(objaverse, selection, args.count, keep)
    else:
        jobs = [job for job in sources.directory_jobs(args.source, args.count) if keep(job)]
    return Plan(jobs, counts["done"], counts["failed"])


# ---------------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Counts of one run, and the uid the Blender process is working on."""

    done: int = 0
    failed: int = 0
    in_flight: str | None = None
    started: float = field(default_factory=time.time)

    def per_hour(self) -> float:
        """Objects finished (done or failed) per hour so far."""
        return (self.done + self.failed) * 3600.0 / max(time.time() - self.started, 1e-6)


def _progress_bar(total: int) -> Callable[[int, float], None]:
    """A tqdm bar on stderr (a plain log line per object when tqdm is missing); returns ``update(n, per_hour)``."""
    try:
        from tqdm import tqdm
    except ImportError:
        return lambda n, rate: logger.info("rendered %d object(s), %.1f objects/hour", n, rate)
    bar = tqdm(total=total, unit="obj", desc="render", dynamic_ncols=True, file=sys.stderr)

    def update(n: int, rate: float) -> None:
        bar.set_postfix_str(f"{rate:.1f} obj/h", refresh=False)
        bar.update(n)
        if bar.n >= total:
            bar.close()

    return update


def _run_process(command: list[str], log_path: Path, progress: Progress, update: Callable[[int, float], None]) -> int:
    """Run one Blender process, follow its events, append its output to the log; returns its exit status."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", env=env
        )
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            event = layout.parse_event(line)
            if event is None:
                continue
            kind = event.get("event")
            if kind == "begin":
                progress.in_flight = event.get("uid")
            elif kind in ("done", "failed"):
                progress.in_flight = None
                if kind == "done":
                    progress.done += 1
                else:
                    progress.failed += 1
                    logger.warning("skipped object %s (%s): %s", event.get("uid"), event.get("source"), event["error"])
                update(1, progress.per_hour())
        return process.wait()


def run_render(args: argparse.Namespace) -> int:
    """The ``render`` subcommand; returns the exit status (0 also when some objects failed: they are in the log)."""
    settings = layout.settings_from_args(args)
    python = bpy_python(args.blender_python)
    shard = layout.parse_shard(args.shard)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_jobs(args)
    logger.info(
        "shard %d/%d: %d object(s) to render, %d already done, %d failed before%s",
        *shard,
        len(plan.jobs),
        plan.done,
        plan.failed_before,
        "" if args.retry_failed or not plan.failed_before else " (pass --retry-failed to try them again)",
    )
    if not plan.jobs:
        return 0
    name = f"shard-{shard[0]:05d}-of-{shard[1]:05d}"
    log_path = out / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    progress = Progress()
    update = _progress_bar(len(plan.jobs))
    remaining, crashes = plan.jobs, 0
    while remaining:
        jobs_path = layout.write_jobs(out / "logs" / f"{name}.jobs.jsonl", remaining)
        command = [str(python), str(LAUNCHER), str(SCRIPT), "--out", str(out), "--jobs", str(jobs_path)]
        command += ["--shard", f"{shard[0]}/{shard[1]}", *settings.to_argv()]
        status = _run_process(command, log_path, progress, update)
        if status == 0:
            break
        uids = [job.uid for job in remaining]
        if progress.in_flight not in uids:
            logger.error("the Blender process exited with status %d outside any object; see %s", status, log_path)
            return status
        # The script handles objects in order: everything before the one in flight is finished or recorded.
        position = uids.index(progress.in_flight)
        job = remaining[position]
        error = f"the Blender process died (exit status {status}) while rendering it"
        record = {"uid": job.uid, "folder_id": job.folder_id, "status": "failed", "source": job.path, "error": error}
        layout.append_record(layout.manifest_path(out, shard), record)
        progress.in_flight, progress.failed = None, progress.failed + 1
        logger.warning("skipped object %s (%s): %s; see %s", job.uid, job.path, error, log_path)
        update(1, progress.per_hour())
        crashes += 1
        if crashes > MAX_CRASHES:
            logger.error("the Blender process died %d times; stopping (see %s)", crashes, log_path)
            return 1
        remaining = remaining[position + 1 :]
    logger.info(
        "shard %d/%d: %d rendered, %d failed, %.1f objects/hour; output in %s",
        *shard,
        progress.done,
        progress.failed,
        progress.per_hour(),
        out,
    )
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``render`` subcommand on ``one2345-train``'s subparsers."""
    parser = subparsers.add_parser(
        "render",
        help="render ground-truth training views with BlenderProc",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument(
        "--source", required=True, help="'procedural', 'objaverse', or a folder of GLB/GLTF/OBJ/PLY/FBX files"
    )
    parser.add_argument("--count", type=int, help="number of objects of the source (procedural default 8; else all)")
    parser.add_argument("--out", required=True, help="output root: <out>/<folder_id>/<uid>/")
    parser.add_argument("--shard", default="0/1", help="i/N: render only shard i of N (hash of the uid); default 0/1")
    parser.add_argument("--retry-failed", action="store_true", help="try objects a previous run recorded as failed")
    parser.add_argument("--blender-python", help=f"bpy 4.2 interpreter (default ${BPY_PYTHON_ENV} or .venv-bpy42)")
    group = parser.add_argument_group("procedural source")
    group.add_argument("--first-seed", type=int, default=0, help="seed of the first procedural object (default 0)")
    group = parser.add_argument_group("objaverse source")
    group.add_argument("--categories", help="comma-separated LVIS categories (default: all)")
    group.add_argument("--split", default="train", choices=sources.SPLITS, help="LVIS split (default train)")
    group.add_argument("--split-file", help="the reference's lvis_split_cc_by.json (else a hash split)")
    group.add_argument("--val-fraction", type=float, default=0.02, help="hash split: share of val (default 0.02)")
    group.add_argument("--objaverse-cache", help="download cache (default ~/.objaverse); share it between shards")
    group.add_argument("--download-processes", type=int, default=4, help="parallel downloads (default 4)")
    layout.add_settings_arguments(parser)
    parser.set_defaults(handler=run_render)
    return parser
