"""The One-2-3-45 pipeline: one image → a vertex-coloured 360° mesh, as numbered stages (spec §1.3).

    pipe = One2345Pipeline.from_preset("paper")          # models loaded once, kept warm
    result = pipe("photo.png", "runs/photo", GenerateOptions(format="glb"))

Everything a run makes lands in its run folder, so any run can be inspected and re-meshed
(:mod:`server.pipeline.remesh`):

    run_dir/input.png          the image as given (re-encoded)
    run_dir/input_256.png      the preprocessed model input (object on white, 75 % fill)
    run_dir/views/             stage-1 views <i>.png, the 32 nearby views <i>_<j>.png, pose.json
                               (`one2345 reconstruct run_dir/views -o mesh.ply` re-runs the reconstruction)
    run_dir/mesh.<fmt>         the result (an OBJ with a texture also writes mesh.mtl and mesh_texture.png)
    run_dir/meta.json          options, seed, elevation, timings, versions

Presets: ``paper`` loads the official weights (Zero123-XL, the reconstruction checkpoint; SAM and LoFTR when present,
weight-free fallbacks otherwise); ``tiny`` builds small random models of the same classes — no weights, seconds per
stage on a CPU, a sphere-like coloured mesh — for trying the tool and for tests.

Options and results are :mod:`server.pipeline.options`; the models per preset, :mod:`server.pipeline.models`.
"""


from __future__ import annotations

import contextlib
import hashlib
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from server import __version__
from server.common.cameras import PoseFile
from server.common.devices import resident, resolve_device
from server.common.errors import BadInputError, CancelledError
from server.common.fsutil import write_json_atomic
from server.pipeline.models import PipelineModels, paper_models, tiny_models
from server.pipeline.options import PRESETS, GenerateOptions, GenerateResult, Progress, ViewsRecord
from server.pipeline.reconstruct import reconstruction_fraction
from server.pipeline.remesh import MeshOutcome, find_run, mesh_views, read_run_meta
from server.stages.elevation import ElevationResult
from server.stages.meshing import MeshingConfig
from server.stages.multiview.zero123 import (
    Zero123Config,
    generate_views_batch,
    prepare_stage2_input,
    stage1b_deltas,
)
from server.stages.text_to_image import TextSource

if TYPE_CHECKING:  # the type only: the module itself is imported where a run first needs it
    from server.stages.preprocess import ImageSource


class _Tracker:
    """Turns per-stage steps into an overall fraction, times the stages and relays cancellation.

    Work is counted in UNet image-evaluations (the bulk of the run); preprocessing, elevation, reconstruction, the
    asset stage and export get fixed shares measured on typical runs. A run in parts counts each part against the
    whole: ``phase`` "views" (stages 1–5, then the review pause) ends at their share, "finish" starts there; a
    re-mesh ("remesh") has only the last three stages, a re-roll ("reroll") only itself.
    """

    PHASES = ("all", "views", "finish", "remesh", "reroll")
    _VIEW_STAGES = ("preprocess", "stage1", "stage2", "elevation", "stage1b", "reroll")

    def __init__(self, options: GenerateOptions, progress: Callable[[Progress], None] | None,
                 should_cancel: Callable[[], bool] | None, phase: str = "all", rerolls: int = 0) -> None:
        s1, s2 = options.steps_stage1 + 1, max(options.steps_stage2 - 1, 1)
        diffusion = {"stage1": 4 * s1, "stage2": 4 * s2, "stage1b": 4 * s1, "stage2b": 28 * s2}
        total = sum(diffusion.values())
        # The bake of a ~100 k-face mesh takes about 0.6× the CPU reconstruction (server.stages.asset;
        # docs/benchmarks.md).
        asset = 0.15 * total if options.mesh_settings.asset else 0.0
        self.weights = {"preprocess": 0.01 * total, **diffusion, "elevation": 0.01 * total,
                        "reroll": rerolls * (s1 + s2), "reconstruct": 0.25 * total, "asset": asset,
                        "export": 0.005 * total}
        if phase == "remesh":
            self.weights = {k: 0.0 if k in (*self._VIEW_STAGES, "stage2b") else v for k, v in self.weights.items()}
        elif phase == "reroll":
            self.weights = {k: 1.0 if k == "reroll" else 0.0 for k in self.weights}
        norm = sum(self.weights.values())
        self.weights = {k: v / norm for k, v in self.weights.items()}
        self.done = sum(self.weights[k] for k in self._VIEW_STAGES) if phase == "finish" else 0.0
        self.reported = self.done
        self.progress = progress
        self.should_cancel = should_cancel
        self.timings: dict[str, float] = {}
        self._clock = time.perf_counter()

    def lap(self, stage: str) -> None:
        """End ``stage``: record its time (since the previous lap), count its work done, honour a cancel."""
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - self._clock
        self._clock = now
        self.finish(stage)
        self.check_cancel()

    def check_cancel(self) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise CancelledError("the job was cancelled")

    def report(self, stage: str, step: int, total: int, message: str = "", preview: Path | None = None) -> None:
        if self.progress is not None:
            frac = self.done + self.weights[stage] * (step / max(total, 1))
            # Never backwards: a stage whose total grows as it learns more (coarse-to-fine SDF levels) would dip.
            self.reported = max(self.reported, min(frac, 1.0))
            self.progress(Progress(stage, step, total, self.reported, message, preview))

    def finish(self, stage: str, message: str = "") -> None:
        self.report(stage, 1, 1, message)
        self.done += self.weights[stage]


def _write_png(path: Path, image: np.ndarray) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def _png_writer(workers: int = 2) -> Iterator[Callable[[Path, np.ndarray], None]]:
    """``write(path, image)`` that encodes the PNG on a worker thread (zlib lets go of the GIL), so the 28 nearby
    views of stage 2b are written while the reconstruction runs. Leaving the block waits for every file, also when
    the block fails (the views are kept), and raises the first write error."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="one2345-png") as pool:
        pending = []
        try:
            yield lambda path, image: pending.append(pool.submit(_write_png, path, image))
        except BaseException:
            for future in pending:
                future.exception()  # wait for it; the block's own error is the one to raise
            raise
        for future in pending:
            future.result()


class One2345Pipeline:
    """Image → mesh. Construct with :meth:`from_preset`; call once per image (models stay loaded)."""

    def __init__(self, models: PipelineModels, preset: str, device: str, zero123_config: Zero123Config | None = None,
                 meshing: MeshingConfig | None = None, low_vram: bool = False, cuda_graphs: bool = True) -> None:
        self.models = models
        self.preset = preset
        self.device = device
        self.low_vram = low_vram
        """Keep the models on the CPU and move each to the GPU only for its stage (:func:`resident`)."""
        self.cuda_graphs = cuda_graphs
        """On CUDA, replay Zero123's UNet from CUDA graphs (:mod:`server.stages.multiview.graphs`); never in low-VRAM
        mode,
        whose moves between CPU and GPU would leave a graph pointing at freed weights."""
        self.unet_graphs: Any = None
        """The UNet's CUDA graphs once a sampler run used them (:meth:`_unet`), else None."""
        self.zero123_config = zero123_config or Zero123Config()
        self.meshing = meshing or MeshingConfig()

    @classmethod
    def from_preset(cls, preset: str = "paper", device: str = "auto", weights_dir: str | Path | None = None,
                    download_missing: bool = False, low_vram: bool = False,
                    cuda_graphs: bool = True) -> One2345Pipeline:
        """Build the pipeline and load its models.

        Args:
            preset: ``paper`` (official weights) or ``tiny`` (small random models, no weights).
            device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
            weights_dir: the weights folder (default: ``$ONE2345_WEIGHTS`` or ``~/.cache/one2345/weights``).
            download_missing: fetch absent weight files first (needs internet; respects ``HF_HUB_OFFLINE``).
            low_vram: on CUDA, keep the models in CPU memory and move each to the GPU only while its stage runs
                (slower: the weights cross the bus every run; the outputs are the same).
            cuda_graphs: on CUDA and not in low-VRAM mode, replay the UNet from CUDA graphs (the same kernels).
        """
        if preset not in PRESETS:
            raise BadInputError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        device = resolve_device(device)
        home = "cpu" if low_vram else device  # where the models rest between stages
        models = tiny_models() if preset == "tiny" else paper_models(device, weights_dir, download_missing, home)
        models.zero123.to(device=home, dtype=torch.float16 if device.startswith("cuda") else torch.float32)
        models.reconstruction.to(home)
        if models.segmenter is not None and low_vram:
            models.segmenter.model.to("cpu")
        return cls(models, preset, device, low_vram=low_vram, cuda_graphs=cuda_graphs)

    def models_loaded(self) -> dict[str, str]:
        return dict(self.models.descriptions)

    def __call__(
        self,
        image: ImageSource,
        run_dir: str | Path,
        options: GenerateOptions | None = None,
        progress: Callable[[Progress], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        outputs: Sequence[str | Path] = (),
        text: TextSource | None = None,
    ) -> GenerateResult:
        """Run every stage on one image; everything is written under ``run_dir`` (module docstring).

        The same as :meth:`generate_views` then :meth:`finish` (the parts a reviewed run is split into), and the
        same files.

        Args:
            image: a path, PIL image, [H, W, 3|4] uint8 array or encoded bytes.
            run_dir: the run folder (created).
            options: see :class:`GenerateOptions`; its ``view_seeds`` are re-rolled before stage 2b.
            progress: called with a :class:`Progress` as work advances.
            should_cancel: polled between steps; True stops the run with CancelledError.
            outputs: further paths to write the mesh at (e.g. the user's ``-o``), each in the format of its suffix.
            text: where the image came from when it was made from a prompt (kept as ``text.json``; ``meta.json``
                and its recipe record it as ``text``). None for an image input: nothing of it is written.
        """
        options = (options or GenerateOptions()).check()
        outputs = [Path(o) for o in outputs]
        for out in outputs:
            options.mesh_settings.check(out.suffix)
        tracker = _Tracker(options, progress, should_cancel, rerolls=len(options.view_seeds or {}))
        self._generate_views(image, Path(run_dir), options, tracker)
        if text is not None:
            text.write(Path(run_dir))
        return self._finish(Path(run_dir), options, tracker, outputs)

    def generate_views(
        self,
        image: ImageSource,
        run_dir: str | Path,
        options: GenerateOptions | None = None,
        progress: Callable[[Progress], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        text: TextSource | None = None,
    ) -> ViewsRecord:
        """Stages 1–5 only: the preprocessed input, the 8 stage-1 views, view 0's nearby views and the elevation,
        recorded in ``run_dir/stage1.json``. Review them, :meth:`reroll` any, then :meth:`finish`. ``text``: as for
        :meth:`__call__` (:meth:`finish` records it)."""
        options = (options or GenerateOptions()).check()
        tracker = _Tracker(options, progress, should_cancel, phase="views", rerolls=len(options.view_seeds or {}))
        record = self._generate_views(image, Path(run_dir), options, tracker)
        if text is not None:
            text.write(Path(run_dir))
        return record

    def reroll(
        self,
        run_dir: str | Path,
        options: GenerateOptions,
        views: Sequence[int],
        seed: int | None = None,
        progress: Callable[[Progress], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> ViewsRecord:
        """Generate the stage-1 ``views`` of a paused run again, each alone with ``seed`` (drawn when None); every
        other view stays byte for byte. Re-rolling view 0 also renews its nearby views and, unless the elevation is
        given, the estimate; should that move the input across polar 75°, ring 2 changes sides and is generated
        anew from the run's seed (its re-rolls are dropped, with a note in the record).

        Raises:
            BadInputError: a view that is not a stage-1 view of this run, or a seed out of range.
        """
        options = options.check()
        run_dir = Path(run_dir)
        record = ViewsRecord.read(run_dir)
        wanted = sorted(set(views)) if isinstance(views, (list, tuple)) else views
        allowed = record.views(self.zero123_config)
        if not wanted or not isinstance(wanted, list) or any(
                isinstance(v, bool) or not isinstance(v, int) or v not in allowed for v in wanted):
            raise BadInputError(f"views {views!r} cannot be re-rolled; allowed: a non-empty list of this run's "
                                f"stage-1 view numbers {allowed}")
        if seed is None:
            seed = random.SystemRandom().randrange(2**32)
        elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise BadInputError(f"seed {seed!r} is not allowed: null (draw one) or an integer in [0, 2**32)")
        tracker = _Tracker(options, progress, should_cancel, phase="reroll", rerolls=len(wanted))
        return self._reroll(run_dir, options, record, {v: seed for v in wanted}, tracker)

    def finish(
        self,
        run_dir: str | Path,
        options: GenerateOptions,
        progress: Callable[[Progress], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        outputs: Sequence[str | Path] = (),
    ) -> GenerateResult:
        """Stages 6–8 of a run whose views :meth:`generate_views` made: the 28 other nearby views, reconstruction,
        the asset stage and export. ``options.elevation``, when given, replaces the estimate (ring 2 is generated
        again if that moves it across polar 75°)."""
        options = options.check()
        tracker = _Tracker(options, progress, should_cancel, phase="finish")
        return self._finish(Path(run_dir), options, tracker, [Path(o) for o in outputs])

    def _generate_views(self, image: Any, run_dir: Path, options: GenerateOptions,
                        tracker: _Tracker) -> ViewsRecord:
        from server.stages.preprocess import load_image, preprocess

        # 0. Check everything that can be checked before any model runs.
        source = load_image(image)
        views_dir = run_dir / "views"
        views_dir.mkdir(parents=True, exist_ok=True)
        seed = options.seed if options.seed is not None else random.SystemRandom().randrange(2**32)
        cfg = self.zero123_config
        lap = tracker.lap

        # 1. Preprocess: segment, recentre to 75 % fill, 256², on white (spec §1.2).
        _write_png(run_dir / "input.png", np.asarray(source))
        segmenter = self.models.segmenter
        with (resident(segmenter.model, self.device, self.low_vram) if segmenter is not None
              else contextlib.nullcontext()):
            pre = preprocess(source, remove_background=options.remove_background, segmenter=segmenter)
        tracker.report("preprocess", 1, 1, preview=_write_png(run_dir / "input_256.png", pre.image))
        lap("preprocess")

        # 2. Stage 1a: views 0–3 of the input, same polar, azimuth +0/90/180/270 (spec §2.5).
        stage1 = self._views("stage1", [pre.image], [list(cfg.stage1a_deltas)], options.steps_stage1, seed, options,
                             tracker)[0]
        for i, view in enumerate(stage1):
            tracker.report("stage1", 1, 1, preview=_write_png(views_dir / f"{i}.png", view))
        lap("stage1")

        # 3. Stage 2 for view 0: its four nearby views, used to estimate the elevation.
        near0 = self._near0(views_dir, stage1[0], seed + 1, options, tracker, "stage2")
        lap("stage2")

        # 4. Elevation: given by the user, or estimated by matching the nearby views (spec §4).
        polar, estimate = self._polar(near0, options)
        lap("elevation")

        # 5. Stage 1b: the second ring, 30° lower (polar ≤ 75) or higher (spec §1.3 step 6).
        self._ring2(views_dir, pre.image, polar, seed, options, tracker, "stage1b")
        lap("stage1b")
        record = ViewsRecord(seed=seed, polar=polar, elevation_source=estimate.source if estimate else "given",
                             estimate=estimate.to_json() if estimate else None, background=pre.method,
                             input_sha256=hashlib.sha256((run_dir / "input.png").read_bytes()).hexdigest(),
                             timings=dict(tracker.timings))
        record.write(run_dir)
        if options.view_seeds:  # a recipe's re-rolls: view 0 first, as its nearby views decide the ring-2 side
            record = self._reroll(run_dir, options, record, {int(k): v for k, v in options.view_seeds.items()},
                                  tracker)
        return record

    def _reroll(self, run_dir: Path, options: GenerateOptions, record: ViewsRecord, seeds: dict[int, int],
                tracker: _Tracker) -> ViewsRecord:
        """Re-roll each view of ``seeds`` alone with its seed (view 0 first); update and write the record."""
        from server.common.views import read_rgb

        cfg = self.zero123_config
        views_dir = run_dir / "views"
        # PNG is lossless: this is the very array stage 1 was conditioned on.
        pre = np.array(read_rgb(run_dir / "input_256.png"))
        for done, view in enumerate(sorted(seeds)):
            deltas = dict(enumerate(cfg.stage1a_deltas)) | dict(zip(*stage1b_deltas(record.polar, cfg), strict=True))
            if view not in deltas:  # ring 2 moved to the other side earlier in this loop
                record.notes.append(f"view {view} was not re-rolled: ring 2 moved to views "
                                    f"{stage1b_deltas(record.polar, cfg)[0]}")
                continue
            seed = seeds[view]
            image = self._views("reroll", [pre], [[deltas[view]]], options.steps_stage1, seed, options, tracker)[0][0]
            tracker.report("reroll", done, len(seeds), preview=_write_png(views_dir / f"{view}.png", image))
            record.view_seeds[str(view)] = seed
            if view == 0:
                near0 = self._near0(views_dir, image, seed + 1, options, tracker, "reroll")
                if options.elevation is None:
                    polar, estimate = self._polar(near0, options)
                    record.estimate, record.elevation_source = estimate.to_json(), estimate.source
                    self._move_polar(run_dir, record, polar, pre, options, tracker)
        before = tracker.timings.get("reroll", 0.0)
        tracker.lap("reroll")
        record.timings["reroll"] = record.timings.get("reroll", 0.0) + tracker.timings["reroll"] - before
        record.revision += 1
        record.write(run_dir)
        return record

    def _move_polar(self, run_dir: Path, record: ViewsRecord, polar: float, pre: np.ndarray,
                    options: GenerateOptions, tracker: _Tracker) -> None:
        """Set the record's polar; when ring 2 changes sides, generate it anew there from the run's seed."""
        cfg = self.zero123_config
        old = stage1b_deltas(record.polar, cfg)[0]
        record.polar = polar
        new = stage1b_deltas(polar, cfg)[0]
        if new != old:
            for view in old:
                (run_dir / "views" / f"{view}.png").unlink(missing_ok=True)
                record.view_seeds.pop(str(view), None)
            self._ring2(run_dir / "views", pre, polar, record.seed, options, tracker, "reroll")
            record.notes.append(f"the elevation moved to {90 - polar:.1f}°, so ring 2 moved from views {old} to {new} "
                                "and was generated anew")

    def _finish(self, run_dir: Path, options: GenerateOptions, tracker: _Tracker,
                outputs: Sequence[Path]) -> GenerateResult:
        from server.common.views import read_rgb

        cfg = self.zero123_config
        views_dir = run_dir / "views"
        record = ViewsRecord.read(run_dir)
        if options.elevation is not None and 90.0 - float(options.elevation) != record.polar:
            # An elevation set during review replaces the estimate (kept in the record for reference).
            pre = np.array(read_rgb(run_dir / "input_256.png"))
            self._move_polar(run_dir, record, 90.0 - float(options.elevation), pre, options, tracker)
            record.elevation_source = "given"
            record.write(run_dir)
        polar, seed = record.polar, record.seed

        # 6. Stage 2 for the other 7 stage-1 views: 28 nearby views in one batch.
        others = [1, 2, 3, *stage1b_deltas(polar, cfg)[0]]
        conds = [prepare_stage2_input(read_rgb(views_dir / f"{k}.png")) for k in others]
        nearby = self._views("stage2b", conds, [list(cfg.stage2_deltas)] * 7, options.steps_stage2, seed + 3, options,
                             tracker)
        arrays = {f"{i}_{j}.png": view for i, views in zip(others, nearby, strict=True) for j, view in enumerate(views)}
        with _png_writer() as write:
            for name, view in arrays.items():
                write(views_dir / name, view)
            PoseFile.for_polar(polar).write(views_dir / "pose.json")
            tracker.lap("stage2b")

            # 7. Reconstruction (cost volume → SDF → marching cubes → vertex colours, spec §5), the asset stage when
            #    asked (clean-up, polygon budget, UV texture) and the mesh files: server.pipeline.remesh, shared with
            #    re-meshing. It takes the new views from memory while their PNGs are still being written.
            outcome = self._mesh(views_dir, [run_dir / f"mesh.{options.format}", *outputs], options, tracker, arrays)

        # 8. The run's record, with the recipe that repeats it (Regenerate) or varies it (a new seed).
        estimate = record.estimate
        recipe_options = {**asdict(options), "seed": seed, "view_seeds": dict(record.view_seeds) or None,
                          "review": False}
        tracker.timings = {**record.timings, **tracker.timings}
        meta = {
            "version": __version__, "preset": self.preset, "device": self.device,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "options": asdict(options), "seed": seed, "polar": polar, "elevation": 90.0 - polar,
            "elevation_source": record.elevation_source, "elevation_estimate": estimate,
            "matcher": estimate["matcher"] if estimate else "none", "background": record.background,
            "seeds": {"stage1": seed, "stage2": seed + 1, "stage1b": seed + 2, "stage2b": seed + 3},
            "view_seeds": dict(record.view_seeds), "notes": list(record.notes),
            "recipe": {"input_sha256": record.input_sha256, "options": recipe_options,
                       "elevation": 90.0 - polar, "elevation_source": record.elevation_source,
                       "models": self.models_loaded(), "version": __version__},
        }
        text = TextSource.read(run_dir)
        if text is not None:  # made from a prompt: the prompt, model, seed and index that make the image again
            meta["text"] = meta["recipe"]["text"] = text.to_json()
        return self._finish_run(run_dir, meta, outcome, tracker)

    def remesh(
        self,
        run_dir: str | Path,
        options: GenerateOptions,
        progress: Callable[[Progress], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> GenerateResult:
        """Mesh a finished run's views again (no Zero123): reconstruction, asset stage and export with ``options``'
        resolution, polygon budget, texture and format.

        Writes ``run_dir/mesh.<format>`` and rewrites ``run_dir/meta.json`` with the new options, counts and timings
        (the elevation, seed and views of the run stay what they were).

        Args:
            run_dir: a run folder (see :func:`server.pipeline.remesh.find_run`) with its meta.json.
            options: the options of the re-mesh; only resolution, target_faces, texture_size and format matter.
        """
        options = options.check()
        run_dir = find_run(run_dir)
        meta = read_run_meta(run_dir, required=("polar", "seed", "background"))  # deep nesting too: bad_input
        tracker = _Tracker(options, progress, should_cancel, phase="remesh")
        outcome = self._mesh(run_dir / "views", [run_dir / f"mesh.{options.format}"], options, tracker)
        meta.update(version=__version__, preset=self.preset, device=self.device, options=asdict(options),
                    remeshed=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        return self._finish_run(run_dir, meta, outcome, tracker)

    def _mesh(self, views_dir: Path, outputs: Sequence[Path], options: GenerateOptions,
              tracker: _Tracker, arrays: dict[str, np.ndarray] | None = None) -> MeshOutcome:
        """Stage 7 for a run or a re-mesh, with its progress: reconstruct, then (timed apart) the asset stage."""
        def on_reconstruct(stage: str, done: int, total: int) -> None:
            # Sub-stages report their own done/total; the run's progress weighs them by their typical cost.
            tracker.check_cancel()
            permille = round(1000 * reconstruction_fraction(stage, done, total, self.device))
            tracker.report("reconstruct", permille, 1000, message=stage)

        def on_asset() -> None:
            tracker.lap("reconstruct")
            tracker.report("asset", 0, 1, message="clean-up, polygon budget, texture")

        settings = replace(options.mesh_settings, meshing=self.meshing)
        with resident(self.models.reconstruction, self.device, self.low_vram) as model:
            outcome = mesh_views(model, views_dir, outputs, settings, self.device, on_reconstruct, on_asset, arrays)
        tracker.lap("asset" if options.mesh_settings.asset else "reconstruct")
        return outcome

    def _finish_run(self, run_dir: Path, meta: dict[str, Any], outcome: MeshOutcome,
                    tracker: _Tracker) -> GenerateResult:
        """Write meta.json (``meta`` plus the mesh's counts, files and timings) and describe the run."""
        mesh_path = outcome.files[0]
        meta.update({
            "vertices": outcome.vertices, "faces": outcome.faces, "mesh": mesh_path.name,
            "files": [f.name for f in outcome.files], "textured": meta["options"]["texture_size"] is not None,
            "asset": outcome.asset,
            "frame": "ply: z-up pose.json world frame; glb/obj: y-up, (x, y, z) -> (x, z, -y)",
            "models": self.models_loaded(),
        })
        meta["timings"] = {**{k: round(v, 3) for k, v in tracker.timings.items()},
                           **{k: round(v, 3) for k, v in outcome.timings.items()}}
        meta_path = write_json_atomic(run_dir / "meta.json", meta)
        tracker.lap("export")
        estimate = (meta.get("elevation_estimate") or {}) if meta["elevation_source"] != "given" else {}
        return GenerateResult(mesh_path=mesh_path, views_dir=run_dir / "views", elevation=float(meta["elevation"]),
                              polar=float(meta["polar"]), elevation_source=meta["elevation_source"],
                              elevation_uncertain=bool(estimate.get("uncertain", False)),
                              elevation_confidence=estimate.get("confidence"),
                              background=meta["background"], timings=dict(tracker.timings), meta_path=meta_path,
                              vertices=outcome.vertices, faces=outcome.faces, seed=int(meta["seed"]),
                              mesh_files=list(outcome.files))

    def _near0(self, views_dir: Path, view0: np.ndarray, seed: int, options: GenerateOptions, tracker: _Tracker,
               stage: str) -> list[np.ndarray]:
        """Stage 2 for view 0: its four nearby views (written as ``0_<j>.png``), from which the elevation is
        estimated."""
        near0 = self._views(stage, [prepare_stage2_input(view0)], [list(self.zero123_config.stage2_deltas)],
                            options.steps_stage2, seed, options, tracker)[0]
        for j, view in enumerate(near0):
            tracker.report(stage, 1, 1, preview=_write_png(views_dir / f"0_{j}.png", view))
        return near0

    def _ring2(self, views_dir: Path, pre: np.ndarray, polar: float, seed: int, options: GenerateOptions,
               tracker: _Tracker, stage: str) -> None:
        """Stage 1b: the second ring of four views, on the side the polar angle decides, from seed + 2."""
        indices, deltas = stage1b_deltas(polar, self.zero123_config)
        ring2 = self._views(stage, [pre], [deltas], options.steps_stage1, seed + 2, options, tracker)[0]
        for i, view in zip(indices, ring2, strict=True):
            tracker.report(stage, 1, 1, preview=_write_png(views_dir / f"{i}.png", view))

    def _views(self, stage: str, images: Sequence[np.ndarray], deltas: Sequence[list[tuple[float, float]]],
               steps: int, seed: int, options: GenerateOptions, tracker: _Tracker) -> list[list[np.ndarray]]:
        """Zero123 views for each conditioning image; all of a stage's views go through the UNet as one batch."""
        def callback(step: int, total: int) -> None:
            tracker.report(stage, step, total)

        with resident(self.models.zero123, self.device, self.low_vram) as model:
            return generate_views_batch(model, images, deltas, num_steps=steps, guidance=options.guidance,
                                        eta=self.zero123_config.eta, seed=seed % 2**63, callback=callback,
                                        should_cancel=tracker.should_cancel, unet=self._unet(model))

    def _unet(self, model: Any) -> Any:
        """What evaluates ε for the sampler: the CUDA graphs of ``model`` when they apply, else None (eager)."""
        if not self.cuda_graphs or self.low_vram or model.device.type != "cuda":
            return None
        from server.stages.multiview.graphs import UNetGraphs

        if self.unet_graphs is None or self.unet_graphs.model is not model:
            self.unet_graphs = UNetGraphs(model)
        return self.unet_graphs

    def _polar(self, near0: list[np.ndarray], options: GenerateOptions) -> tuple[float, ElevationResult | None]:
        """The input's polar angle: given by the user, or estimated with the documented rule for low confidence
        (:class:`server.stages.elevation.ElevationEstimator`: another matcher, then the reference's polar 90)."""
        if options.elevation is not None:
            return 90.0 - float(options.elevation), None
        estimate = self.models.elevation(near0)
        return float(estimate.polar), estimate
