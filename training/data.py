"""Training data of the reconstruction network: the rendered objects of ``one2345-train render`` (spec §6).

One object is a folder ``<root>/<folder_id>/<uid>/`` (layout of :mod:`training.render.layout`):

* ``view_{k}.png`` (k = 0..7): RGBA ground-truth targets; ``view_{k}_depth_mm.png``: uint16 z-depth in millimetres
  (0 = background, so it is also the mask);
* ``view_{k}_{j}_10.png``: the 32 ground-truth nearby views; ``zero123/view_{k}_{j}_10.png``: Zero123's predictions of
  the same views, cached by ``one2345-train predict`` (:data:`PREDICTION_DIR`);
* ``pose.json``: the inference format. The k-th stage-1 id in file order (``0.png`` …) is ``view_{k}.png`` and its
  nearby id ``<i>_<j>.png`` is ``view_{k}_{j}_10.png`` — derived here from pose.json alone, so the loader needs nothing
  else; ``meta.json`` is the renderer's done marker and is required.

One sample (decisions where spec §6 leaves room):

* **Frame**: the camera of the first stage-1 id (``0.png``), exactly as at inference, so the network always sees the
  layout it will meet (the reference used GT view ``idx mod 8``; ours never varies, which is what inference needs).
* **Query**: GT view ``idx mod 8``; the dataset has 8 items per object, so a shuffled epoch visits every
  (object, view) pair once — a uniformly random query, with full coverage.
* **Sources**: the 32 nearby views, Zero123 predictions with probability ``prediction_ratio`` (paper: 1), else the GT
  renders; the draw is a hash of (seed, epoch, index), so workers and resumed runs agree.
* **Rays** (:func:`training.rays.sample_rays`): ¼ uniform over the image, ¾ inside the mask (spec §6), through integer
  pixel positions (u = column): the network samples source pixel j at u = j too (``project_to_grid``), so the query
  and the sources share one pixel convention.

Loading (:func:`step_loader`): step s of process r is a pure function of (seed, s, r) (:class:`StepSamples`), so
DataLoader workers load steps ahead in any order and hand the loop exactly the samples the main process would have
read (:class:`LoaderConfig`: workers, prefetch, pinned memory, a decoded-image cache).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from server.common.cameras import PoseFile, ReconstructionCameras, normalise_cameras
from server.common.errors import BadInputError
from server.common.views import read_rgb
from training.render.layout import require_full_views

META_NAME = "meta.json"
"""The renderer's done marker; folders without it are unfinished and skipped."""
PREDICTION_DIR = "zero123"
"""Subfolder of an object holding Zero123's predictions of the 32 nearby views (same file names as the GT ones)."""
NUM_TARGETS = 8
NUM_NEARBY = 4
STAGE1_ID = re.compile(r"^(\d+)\.png$")


# ---------------------------------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------------------------------


def target_name(k: int) -> str:
    return f"view_{k}.png"


def depth_name(k: int) -> str:
    return f"view_{k}_depth_mm.png"


def nearby_name(k: int, j: int) -> str:
    return f"view_{k}_{j}_10.png"


@dataclass(frozen=True)
class ObjectViews:
    """Ids and file names of one object, derived from its pose.json."""

    folder: Path
    poses: PoseFile
    target_ids: tuple[str, ...]
    """The 8 stage-1 ids in pose.json order; the k-th is ``view_{k}.png``."""
    nearby_ids: tuple[str, ...]
    """The 32 nearby ids ``<i>_<j>.png``, i-major (k-th target's are entries 4k..4k+3, ``view_{k}_{j}_10.png``)."""

    @property
    def uid(self) -> str:
        return self.folder.name

    @property
    def reference_id(self) -> str:
        return self.target_ids[0]

    def nearby_files(self, predicted: bool) -> list[Path]:
        base = self.folder / PREDICTION_DIR if predicted else self.folder
        return [base / nearby_name(k, j) for k in range(NUM_TARGETS) for j in range(NUM_NEARBY)]

    def has_predictions(self) -> bool:
        return all(p.is_file() for p in self.nearby_files(True))


def read_object(folder: str | os.PathLike[str]) -> ObjectViews:
    """Read one object's poses and check that its files exist.

    Poses come from the object's own ``pose.json`` (#6's layout) or, in the official training-data layout, from the
    shared ``One2345_training_pose.json`` two folders above ``zero12345_narrow/<folder_id>/<uid>/``.

    Raises:
        BadInputError: an elevation-only render (``--views elevation``), no poses, not 8 stage-1 ids, a stage-1 id
            without its 4 nearby ids, or missing images.
    """
    folder = Path(folder)
    require_full_views(folder)
    own = folder / "pose.json"
    poses = PoseFile.read(own) if own.is_file() else official_poses(folder.parent.parent.parent / OFFICIAL_POSE_FILE)
    targets = tuple(i for i in poses.c2ws if STAGE1_ID.match(i))
    if len(targets) != NUM_TARGETS:
        raise BadInputError(f"{folder}/pose.json lists {len(targets)} stage-1 ids ({', '.join(targets)}); "
                            f"a training object has exactly {NUM_TARGETS}")
    nearby = tuple(f"{t[:-4]}_{j}.png" for t in targets for j in range(NUM_NEARBY))
    poses.require(nearby)
    needed = [target_name(k) for k in range(NUM_TARGETS)] + [depth_name(k) for k in range(NUM_TARGETS)]
    needed += [nearby_name(k, j) for k in range(NUM_TARGETS) for j in range(NUM_NEARBY)]
    missing = [n for n in needed if not (folder / n).is_file()]
    if missing:
        raise BadInputError(f"{folder} lacks {len(missing)} of the training files: {', '.join(missing[:6])}")
    return ObjectViews(folder, poses, targets, nearby)


OFFICIAL_POSE_FILE = "One2345_training_pose.json"
OFFICIAL_IMAGES = "zero12345_narrow"


@functools.lru_cache(maxsize=4)
def official_poses(path: Path) -> PoseFile:
    """The official layout's shared pose file (spec §6), re-keyed into our ids.

    It has pose.json's format with 40 cameras shared by every object; the reference indexes them by position: entry k
    < 8 is target ``view_k.png`` and entry 8 + 4k + j is ``view_k_j_10.png``. Its key names are not relied on, so the
    entries become ``k.png`` and ``k_j.png`` (the ids of a polar ≤ 75 layout, which match those files one to one).
    """
    if not path.is_file():
        raise BadInputError(f"no pose.json in the object folder and no shared {OFFICIAL_POSE_FILE} at {path}; "
                            "give the --out folder of `one2345-train render` or the official training-data root")
    try:
        data = json.loads(path.read_text())
        matrices = list(data["c2ws"].values())
    except (json.JSONDecodeError, KeyError, AttributeError) as e:
        raise BadInputError(f"{path} is not a pose file with intrinsics, near_far and c2ws ({e})") from e
    expected = NUM_TARGETS * (1 + NUM_NEARBY)
    if len(matrices) != expected:
        raise BadInputError(f"{path} has {len(matrices)} cameras; the official layout has {expected} (8 targets "
                            "then 4 nearby views of each)")
    ids = [f"{k}.png" for k in range(NUM_TARGETS)]
    ids += [f"{k}_{j}.png" for k in range(NUM_TARGETS) for j in range(NUM_NEARBY)]
    return PoseFile.from_dict({**data, "c2ws": dict(zip(ids, matrices, strict=True))})


def find_objects(root: str | os.PathLike[str]) -> list[Path]:
    """Finished object folders under ``root``, sorted: #6's ``<folder_id>/<uid>/`` holding meta.json and pose.json,
    or, when ``root`` has the official ``One2345_training_pose.json``, every ``zero12345_narrow/<folder_id>/<uid>/``
    holding its views (objects are then split by the same uid hash as ours, not by ``lvis_split_cc_by.json``).

    Raises:
        BadInputError: ``root`` is not a folder or holds no finished object.
    """
    root = Path(root)
    if not root.is_dir():
        raise BadInputError(f"data folder {root} does not exist; give the --out folder of `one2345-train render`")
    if (root / OFFICIAL_POSE_FILE).is_file():
        found = sorted(p.parent for p in (root / OFFICIAL_IMAGES).glob(f"*/*/{target_name(0)}"))
    else:
        found = sorted(p.parent for p in root.glob(f"*/*/{META_NAME}") if (p.parent / "pose.json").is_file())
    if not found:
        raise BadInputError(f"{root} holds no finished object (<folder_id>/<uid>/ with {META_NAME} and pose.json, or "
                            f"{OFFICIAL_IMAGES}/<folder_id>/<uid>/ beside {OFFICIAL_POSE_FILE})")
    return found


def split_objects(objects: Sequence[Path], val_fraction: float, salt: str = "val") -> tuple[list[Path], list[Path]]:
    """Deterministic train/validation split by a hash of the uid: adding objects never moves an existing one.

    Returns:
        (train, val); val is non-empty whenever ``val_fraction`` > 0 and there are at least 2 objects.
    """
    if not 0 <= val_fraction < 1:
        raise BadInputError(f"val_fraction {val_fraction} is not usable: need 0 <= fraction < 1")
    scored = sorted(objects, key=lambda p: _hash_unit(f"{salt}:{p.name}"))
    count = math.ceil(val_fraction * len(scored)) if val_fraction > 0 and len(scored) >= 2 else 0
    val = set(scored[:count])
    return [p for p in objects if p not in val], [p for p in objects if p in val]


def _hash_unit(text: str) -> float:
    """A stable number in [0, 1) from a string."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") / 2**64


# ---------------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------------


def read_rgb_on_white(path: Path) -> np.ndarray:
    """[H, W, 3] float32 in [0, 1]: the pixels inference sees (:func:`server.pipeline.reconstruct.read_rgb`: RGBA
    composited on
    white, then 8 bits), so training and inference read every image the same way."""
    return read_rgb(path).astype(np.float32) / 255.0


def read_depth_mm(path: Path) -> np.ndarray:
    """[H, W] float64 z-depth in world units (metres), 0 on the background."""
    with Image.open(path) as im:
        return np.asarray(im, dtype=np.float64) / 1000.0


def _read_depth_raw(path: Path) -> np.ndarray:
    """[H, W] the depth PNG's integers (millimetres) as stored: a quarter of :func:`read_depth_mm`'s bytes."""
    with Image.open(path) as im:
        return np.asarray(im)


class ImageCache:
    """Decoded images of one process, least recently used out first, up to ``max_bytes`` (0: caching off).

    It holds the arrays as decoded (8-bit RGB, 16-bit depth), so a cached read gives exactly what a fresh decode gives.
    Each DataLoader worker holds its own copy: the bound applies per worker. It pays when the training set's images
    fit (a few hundred objects: ~9 MB each at 256²); on the full dataset it only costs memory.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._arrays: OrderedDict[Path, np.ndarray] = OrderedDict()

    def get(self, path: Path, read: Callable[[Path], np.ndarray]) -> np.ndarray:
        """``read(path)``, from the cache when it is there (the array is shared: do not modify it)."""
        if path in self._arrays:
            self._arrays.move_to_end(path)
            return self._arrays[path]
        array = read(path)
        if 0 < array.nbytes <= self.max_bytes:
            self._arrays[path] = array
            self.bytes += array.nbytes
            while self.bytes > self.max_bytes:
                self.bytes -= self._arrays.popitem(last=False)[1].nbytes
        return array


def _rgb_on_white(path: Path, cache: ImageCache | None) -> np.ndarray:
    if cache is None:
        return read_rgb_on_white(path)
    return cache.get(path, read_rgb).astype(np.float32) / 255.0


def _depth_mm(path: Path, cache: ImageCache | None) -> np.ndarray:
    if cache is None:
        return read_depth_mm(path)
    return cache.get(path, _read_depth_raw).astype(np.float64) / 1000.0


# ---------------------------------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    """What a training sample holds; defaults are the paper's recipe."""

    prediction_ratio: float = 1.0
    """Probability that a sample's sources are Zero123 predictions (cached by ``one2345-train predict``) rather than
    the GT nearby renders. Paper: 1 (predicted sources, GT targets); 0 trains without Zero123 weights."""
    val_fraction: float = 0.05
    """Share of objects held out for validation and evaluation (split by uid hash)."""


@dataclass
class Sample:
    """One object seen from one query view, in the network's normalised frame."""

    uid: str
    images: torch.Tensor
    """[32, 3, H, W] source views in [0, 1]."""
    proj: torch.Tensor
    """[32, 4, 4] K · w2c_norm of the sources."""
    centres: torch.Tensor
    """[32, 3] source camera centres, normalised."""
    query_rgb: torch.Tensor
    """[H, W, 3] the GT target composited on white."""
    query_mask: torch.Tensor
    """[H, W] float, 1 on the object (depth > 0)."""
    query_depth: torch.Tensor
    """[H, W] distance along the unit ray from the query camera to the surface, normalised units (0 = background)."""
    query_c2w: torch.Tensor
    """[4, 4] OpenCV camera-to-world of the query, normalised frame."""
    query_K: torch.Tensor
    """[3, 3] intrinsics of the query (pixels)."""
    near_far: tuple[float, float]
    """Ray range of the query camera (spec §3.4: [0.95·(d − 1), 1.05·(d + 1)], near clamped to stay positive)."""
    cameras: ReconstructionCameras
    """The normalisation, to map results back to the pose.json world."""
    predicted: bool
    """Whether the sources are Zero123 predictions."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Sample:
        """The sample on ``device``; ``non_blocking`` copies from pinned memory without waiting for the GPU."""
        moved = {k: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v)
                 for k, v in self.__dict__.items()}
        return Sample(**moved)

    def pin_memory(self) -> Sample:
        """A page-locked copy (what DataLoader's ``pin_memory`` calls), so copies to the GPU can be asynchronous."""
        return Sample(**{k: (v.pin_memory() if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()})


def load_sample(obj: ObjectViews, query: int, predicted: bool, cache: ImageCache | None = None) -> Sample:
    """Read one (object, query view) sample; see the module docstring for the choices.

    Args:
        obj: the object.
        query: index 0..7 of the GT target view.
        predicted: take the sources from the Zero123 cache instead of the GT nearby renders.
        cache: decoded images to reuse (None: decode every file).

    Raises:
        BadInputError: predictions requested but not cached, or images of different sizes.
    """
    if predicted and not obj.has_predictions():
        raise BadInputError(f"{obj.folder} has no cached Zero123 predictions ({PREDICTION_DIR}/); run "
                            "`one2345-train predict` first, or train on GT sources with --prediction-ratio 0")
    sources = np.stack([_rgb_on_white(p, cache) for p in obj.nearby_files(predicted)])
    rgb = _rgb_on_white(obj.folder / target_name(query), cache)
    depth = _depth_mm(obj.folder / depth_name(query), cache)
    size = sources.shape[1:3]
    if rgb.shape[:2] != size or depth.shape != size:
        raise BadInputError(f"{obj.folder}: target {query} is {rgb.shape[1]}×{rgb.shape[0]}, sources "
                            f"{size[1]}×{size[0]}; all images of an object must share one size")
    cams = normalise_cameras(obj.poses, obj.nearby_ids, obj.reference_id, size)
    w2c = cams.normalised_w2c(obj.poses.c2ws[obj.target_ids[query]])
    c2w = np.linalg.inv(w2c)
    k = obj.poses.intrinsics.copy()
    # z-depth (world) → distance along the unit ray (normalised): × ‖K⁻¹(u, v, 1)‖ / s, at the pixel positions rays use.
    rows, cols = np.meshgrid(np.arange(size[0]), np.arange(size[1]), indexing="ij")
    stretch = np.sqrt(((cols - k[0, 2]) / k[0, 0]) ** 2 + ((rows - k[1, 2]) / k[1, 1]) ** 2 + 1.0)
    distance = np.linalg.norm(c2w[:3, 3])
    near = max(0.95 * (distance - 1.0), 0.05)
    return Sample(
        uid=obj.uid,
        images=torch.from_numpy(sources).permute(0, 3, 1, 2).contiguous(),
        proj=torch.from_numpy(cams.proj).float(),
        centres=torch.from_numpy(cams.centres).float(),
        query_rgb=torch.from_numpy(rgb),
        query_mask=torch.from_numpy((depth > 0).astype(np.float32)),
        query_depth=torch.from_numpy((depth * stretch / cams.scale).astype(np.float32)),
        query_c2w=torch.from_numpy(c2w).float(),
        query_K=torch.from_numpy(k).float(),
        near_far=(near, 1.05 * (distance + 1.0)),
        cameras=cams,
        predicted=predicted,
    )


class ObjectDataset(torch.utils.data.Dataset):
    """8 items per object: item i is object i // 8 seen from GT view i mod 8.

    Args:
        objects: object folders (see :func:`find_objects`).
        config: the data recipe.
        seed: with :meth:`set_epoch`, decides which items get predicted sources.
        cache_mb: decoded-image cache of this process (:class:`ImageCache`), MiB; 0 decodes every file every time.
    """

    def __init__(self, objects: Sequence[Path], config: DataConfig = DataConfig(), seed: int = 0,
                 cache_mb: int = 0) -> None:
        if not objects:
            raise BadInputError("the dataset has no objects")
        self.objects = [read_object(p) for p in objects]
        self.config = config
        self.seed = seed
        self.epoch = 0
        self.cache = ImageCache(cache_mb * 2**20) if cache_mb > 0 else None
        if config.prediction_ratio > 0:
            lacking = [o.uid for o in self.objects if not o.has_predictions()]
            if lacking:
                raise BadInputError(f"{len(lacking)} object(s) lack cached Zero123 predictions ({lacking[:4]}); run "
                                    "`one2345-train predict`, or use --prediction-ratio 0 for GT sources")

    def __len__(self) -> int:
        return NUM_TARGETS * len(self.objects)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> Sample:
        return self.load(index, self.epoch)

    def load(self, index: int, epoch: int) -> Sample:
        """Item ``index`` as epoch ``epoch`` draws it (a pure function of its arguments, unlike ``dataset[index]``,
        which reads the epoch set last)."""
        obj = self.objects[index // NUM_TARGETS]
        predicted = _hash_unit(f"{self.seed}:{epoch}:{index}") < self.config.prediction_ratio
        return load_sample(obj, index % NUM_TARGETS, predicted, self.cache)


def epoch_order(length: int, seed: int, epoch: int) -> list[int]:
    """The shuffled item order of one epoch (a pure function of its arguments, so a resumed run continues it)."""
    return list(_epoch_order(length, seed, epoch))


@functools.lru_cache(maxsize=4)
def _epoch_order(length: int, seed: int, epoch: int) -> tuple[int, ...]:
    # Cached: every step of an epoch reads the same permutation (370 000 items on the full dataset).
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return tuple(torch.randperm(length, generator=generator).tolist())


def item_for_step(step: int, length: int, seed: int, rank: int = 0, world_size: int = 1) -> tuple[int, int]:
    """(epoch, dataset index) that process ``rank`` trains on at ``step``: every step consumes ``world_size`` items."""
    position = step * world_size + rank
    epoch, offset = divmod(position, length)
    return epoch, _epoch_order(length, seed, epoch)[offset]


# ---------------------------------------------------------------------------------------------------------------------
# Loading ahead
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoaderConfig:
    """How samples reach the training loop. It changes speed, never the samples, so it is not checkpointed."""

    workers: int | None = None
    """DataLoader worker processes; None: 0 (load in the loop's process) on the CPU, on CUDA min(4, CPU cores per
    local process − 1), at least 1 — a 256² sample loads in ~70 ms on one core, several per paper step."""
    prefetch: int = 4
    """Steps each worker loads ahead."""
    pin_memory: bool = True
    """Page-locked host copies, so copies to the GPU are asynchronous (CUDA only)."""
    cache_mb: int = 0
    """Decoded-image cache per loading process, MiB (0: off; see :class:`ImageCache`)."""

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 0:
            raise BadInputError(f"--workers {self.workers}: need 0 (load in the training process) or more")
        if self.prefetch < 1:
            raise BadInputError(f"--prefetch {self.prefetch}: each worker must load at least 1 step ahead")
        if self.cache_mb < 0:
            raise BadInputError(f"--cache-mb {self.cache_mb}: need a size in MiB >= 0 (0 turns the cache off)")

    def resolved_workers(self, cuda: bool) -> int:
        """The worker count to use: :attr:`workers`, or its device default."""
        if self.workers is not None:
            return self.workers
        if not cuda:
            return 0
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, min(4, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - 1))


class StepSamples(torch.utils.data.Dataset):
    """Item s: the ``per_step`` samples process ``rank`` of ``world_size`` trains on at step s.

    Sample b of the step is the item of :func:`item_for_step` for rank ``rank·per_step + b`` of
    ``world_size·per_step``, so B objects per process on G processes read exactly what one object per process on
    G·B processes would. Every item is a pure function of the step, so any worker may load any step.
    """

    def __init__(self, dataset: ObjectDataset, seed: int, rank: int = 0, world_size: int = 1,
                 per_step: int = 1) -> None:
        self.dataset = dataset
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.per_step = per_step

    def __getitem__(self, step: int) -> list[Sample]:
        samples = []
        for b in range(self.per_step):
            epoch, index = item_for_step(step, len(self.dataset), self.seed, self.rank * self.per_step + b,
                                         self.world_size * self.per_step)
            samples.append(self.dataset.load(index, epoch))
        return samples


def step_loader(samples: StepSamples, steps: range, config: LoaderConfig = LoaderConfig(),
                cuda: bool = False) -> Iterator[list[Sample]]:
    """The samples of ``steps`` in order, loaded ahead by ``config.resolved_workers(cuda)`` workers.

    One pass covers the whole run, so the (persistent) workers start once and never restart. With ``cuda`` and
    ``config.pin_memory`` the samples arrive in page-locked memory, ready for ``Sample.to(device, non_blocking=True)``.
    """
    workers = config.resolved_workers(cuda)
    loader = torch.utils.data.DataLoader(
        samples, batch_size=None, sampler=steps, num_workers=workers, pin_memory=cuda and config.pin_memory,
        persistent_workers=workers > 0, prefetch_factor=config.prefetch if workers else None)
    return iter(loader)
