"""Writing the diffusers folder: :func:`convert_zero123_checkpoint`, :func:`ensure_converted` (convert once, reuse
while the manifest matches) and :func:`verify_converted` (hash every file against the manifest).

Weight files are streamed into safetensors one tensor at a time, hashed as they are written; the manifest
(``one2345_conversion.json``, written last) keeps the source's size and mtime, the converter version, the
architecture, and the size and SHA-256 of every file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from server.common.errors import CancelledError, CheckpointError
from server.common.fsutil import replace_dir
from server.stages.multiview.convert.ldm import (
    CONVERTER_VERSION,
    MARKER_NAME,
    ZERO123_XL,
    Zero123Architecture,
    load_lightning_state_dict,
    raise_if_problems,
)
from server.stages.multiview.convert.progress import (
    PART_TITLES,
    CancelCheck,
    ConversionLock,
    ProgressCallback,
    Reporter,
    as_cancel_check,
    find_leftovers,
    human_bytes,
    remove_interrupted_conversions,
    remove_leftovers,
)
from server.stages.multiview.convert.recognise import (
    image_encoder_dir_config,
    plan_conversion,
    stored_dtype,
    stored_nbytes,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileRecord:
    """What the manifest keeps of one written file."""

    size: int
    sha256: str


_SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], on_bytes: Callable[[int], None]) -> FileRecord:
    """Write ``tensors`` (float32 for floating ones) as a safetensors file one tensor at a time, hashing as it goes.

    Streaming keeps the extra memory to one tensor (the source stays memory-mapped), lets ``on_bytes`` report and
    cancel between tensors, and gives the SHA-256 without reading 5 GB back. Format: u64-LE header length, the JSON
    header (padded with spaces to 8 bytes, as safetensors does), then the tensors' bytes back to back.
    """
    if sys.byteorder != "little":  # pragma: no cover - safetensors is little-endian
        raise RuntimeError("writing safetensors needs a little-endian machine")
    names = sorted(tensors)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key in names:
        t = tensors[key]
        dtype = stored_dtype(t)
        if dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor {key!r} has dtype {t.dtype}, which the converter cannot store")
        n = stored_nbytes(t)
        header[key] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(blob)), blob):
            f.write(chunk)
            digest.update(chunk)
        for key in names:
            t = tensors[key].detach()
            data = t.to(dtype=stored_dtype(t)).contiguous().reshape(-1).view(torch.uint8).numpy()
            f.write(memoryview(data))
            digest.update(memoryview(data))
            del data
            on_bytes(stored_nbytes(tensors[key]))
        f.flush()
        os.fsync(f.fileno())
    return FileRecord(size=path.stat().st_size, sha256=digest.hexdigest())


def _file_record(path: Path) -> FileRecord:
    return FileRecord(size=path.stat().st_size, sha256=_sha256(path))


def _sha256(path: Path, on_bytes: Callable[[int], None] | None = None, chunk: int = 8 * 2**20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
            if on_bytes is not None:
                on_bytes(len(block))
    return digest.hexdigest()


def convert_zero123_checkpoint(
    ckpt_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    image_encoder_dir: str | os.PathLike[str] | None = None,
    architecture: Zero123Architecture | None = None,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
) -> Path:
    """Convert a Zero123 Lightning checkpoint into a diffusers-format folder at ``out_dir`` (replaced atomically).

    The checkpoint is recognised from its key names and shapes first (:func:`plan_conversion`); only then are the
    parts written, one tensor at a time, into a temporary sibling folder that is renamed into place at the end, with
    a manifest (size and SHA-256 of every file) written last. The whole conversion holds a lock beside ``out_dir``,
    so two processes never convert into the same place at once, and the leftovers of interrupted conversions are
    removed first. Memory: the source is memory-mapped and at most one tensor is copied at a time.

    Args:
        ckpt_path: ``zero123-xl.ckpt`` or another checkpoint of the same layout.
        out_dir: destination folder; an existing one is replaced.
        image_encoder_dir: a saved ``CLIPVisionModelWithProjection`` (``config.json`` + weights), used only when the
            checkpoint has no ``cond_stage_model.model.visual.*`` tensors.
        architecture: model sizes; Zero123-XL's (:data:`ZERO123_XL`) by default.
        progress: called with a :class:`ConversionProgress` at each step and every 64 MiB written.
        should_cancel: a callable or ``threading.Event``, checked between steps and between tensors.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        MissingWeightsError: the checkpoint is absent, or it has no CLIP tower and no usable ``image_encoder_dir``.
        CheckpointError: the checkpoint is damaged, of another network, or any part fails the strict checks.
        CancelledError: ``should_cancel`` became true; nothing of the conversion is left on disk.
    """
    out_dir = Path(out_dir)
    report = Reporter(progress, as_cancel_check(should_cancel))
    lock = ConversionLock(out_dir)
    lock.acquire(report)
    try:
        remove_leftovers(find_leftovers(out_dir.parent, out_dir.name).get(out_dir.name, []), report)
        return _convert(Path(ckpt_path), out_dir, image_encoder_dir, architecture or ZERO123_XL, report)
    finally:
        lock.release()


def _convert(ckpt_path: Path, out_dir: Path, image_encoder_dir: str | os.PathLike[str] | None,
             architecture: Zero123Architecture, report: Reporter) -> Path:
    from diffusers import DDIMScheduler

    started = time.monotonic()
    if not ckpt_path.is_file():
        load_lightning_state_dict(ckpt_path)  # raises MissingWeightsError naming the file and the fix
    source_stat = ckpt_path.stat()
    report("read", f"One-time set-up: converting Zero123-XL from {ckpt_path.name} "
                   f"({human_bytes(source_stat.st_size)}), about a minute…")
    state = load_lightning_state_dict(ckpt_path)
    report("check", f"recognising {ckpt_path.name} from its key names and shapes")
    plan = plan_conversion(state, architecture, source=ckpt_path, image_encoder_dir=image_encoder_dir)
    if plan.unet_source == "raw":
        log.warning("%s has no EMA copy of the UNet (model_ema.*); converting its raw weights, which are not the ones "
                    "the reference samples with: views may be noisier than the paper's", ckpt_path.name)
    report.bytes_total = plan.bytes_to_write()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp: Path | None = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        records: dict[str, FileRecord] = {}

        def write_part(part: str, tensors: Mapping[str, torch.Tensor], weights_name: str) -> None:
            relative = f"{part}/{weights_name}"
            title = f"writing {relative} ({human_bytes(sum(stored_nbytes(t) for t in tensors.values()))})"
            (tmp / part).mkdir(exist_ok=True)
            report("write", title, step=part, part=part)
            records[relative] = _write_safetensors(tmp / relative, tensors,
                                                   lambda n: report.wrote(n, part, title))

        for part, weights_name in (("unet", "diffusion_pytorch_model.safetensors"),
                                   ("vae", "diffusion_pytorch_model.safetensors")):
            tensors = getattr(plan, part)
            report("convert", f"converting {PART_TITLES[part]} "
                              f"({human_bytes(sum(stored_nbytes(t) for t in tensors.values()))})", step=part, part=part)
            plan.configs[part].save_config(tmp / part)
            write_part(part, tensors, weights_name)

        report("convert", f"converting {PART_TITLES['image_encoder']}", step="image_encoder", part="image_encoder")
        if plan.image_encoder is not None:
            encoder, encoder_tensors, origin = plan.configs["image_encoder"], plan.image_encoder, "checkpoint"
        else:
            encoder, folder = _load_image_encoder_dir(image_encoder_dir, ckpt_path)
            encoder_tensors, origin = encoder.state_dict(), str(folder.resolve())
        (tmp / "image_encoder").mkdir()
        encoder.config.architectures = [type(encoder).__name__]  # what save_pretrained records
        encoder.config.dtype = torch.float32
        encoder.config.save_pretrained(tmp / "image_encoder")
        write_part("image_encoder", encoder_tensors, "model.safetensors")
        del encoder, encoder_tensors

        report("convert", "converting cc_projection", step="cc_projection", part="cc_projection")
        cc_out, cc_in = plan.cc_projection["projection.weight"].shape
        (tmp / "cc_projection").mkdir()
        _write_json(tmp / "cc_projection" / "config.json",
                    {"_class_name": "CCProjection", "in_channel": int(cc_in), "out_channel": int(cc_out)})
        write_part("cc_projection", plan.cc_projection, "diffusion_pytorch_model.safetensors")

        report("finish", "writing the scheduler, the index and the manifest")
        DDIMScheduler(**architecture.scheduler_config()).save_pretrained(tmp / "scheduler")
        _write_json(tmp / "model_index.json", _model_index())
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            relative = path.relative_to(tmp).as_posix()
            if relative not in records:
                records[relative] = _file_record(path)
        # Written last: a folder with a manifest is a complete one.
        _write_json(tmp / MARKER_NAME, {
            **_marker_identity(source_stat, architecture),
            "source": str(ckpt_path.resolve()),
            "unet_weights": plan.unet_source,
            "image_encoder": origin,
            "files": {k: asdict(v) for k, v in sorted(records.items())},
        })
        report.check_cancel()
        replace_dir(tmp, out_dir)
        tmp = None
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        del state, plan
    elapsed = time.monotonic() - started
    log.info("converted %s into %s (%s) in %.0f s", ckpt_path.name, out_dir, human_bytes(report.bytes_done), elapsed)
    report("done", f"Zero123-XL is ready ({human_bytes(report.bytes_done)} in {elapsed:.0f} s)")
    return out_dir


def ensure_converted(
    ckpt_path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    *,
    image_encoder_dir: str | os.PathLike[str] | None = None,
    architecture: Zero123Architecture | None = None,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
) -> Path:
    """The diffusers folder of ``ckpt_path`` under ``cache_dir``, converting only when needed.

    The folder is ``<cache_dir>/<checkpoint stem>-diffusers``. It is reused when its manifest records the same
    source size and modification time (ns), converter version and architecture, and every file it lists has the
    recorded size (a fast check, every time; hashes are checked by :func:`verify_converted`). Otherwise it is
    (re)built, with the reason logged. Leftovers of interrupted conversions are removed either way (never those of
    a conversion another process is running).

    Args:
        ckpt_path, image_encoder_dir, architecture: as :func:`convert_zero123_checkpoint`.
        cache_dir: where converted folders live (``<weights dir>/converted``).
        progress: called with :class:`ConversionProgress` reports; never called when the folder is reused.
        should_cancel: a callable or ``threading.Event``; see :func:`convert_zero123_checkpoint`.

    Raises:
        Same as :func:`convert_zero123_checkpoint`.
    """
    ckpt_path, cache_dir = Path(ckpt_path), Path(cache_dir)
    architecture = architecture or ZERO123_XL
    out_dir = cache_dir / f"{ckpt_path.stem}-diffusers"
    if ckpt_path.is_file() and _cache_problem(out_dir, ckpt_path, architecture) is None:
        if find_leftovers(cache_dir, out_dir.name):
            remove_interrupted_conversions(cache_dir)
        return out_dir
    report = Reporter(progress, as_cancel_check(should_cancel))
    lock = ConversionLock(out_dir)
    lock.acquire(report)
    try:
        remove_leftovers(find_leftovers(cache_dir, out_dir.name).get(out_dir.name, []), report)
        # Another process may have finished the conversion while this one waited for the lock.
        problem = _cache_problem(out_dir, ckpt_path, architecture) if ckpt_path.is_file() else "no checkpoint"
        if problem is None:
            return out_dir
        if out_dir.exists():
            log.warning("converting %s again: %s", ckpt_path.name, problem)
        return _convert(ckpt_path, out_dir, image_encoder_dir, architecture, report)
    finally:
        lock.release()


def _cache_problem(out_dir: Path, ckpt_path: Path, architecture: Zero123Architecture) -> str | None:
    """Why ``out_dir`` cannot be reused for ``ckpt_path`` (None: it can). Sizes only, no hashing."""
    marker = _read_json(out_dir / MARKER_NAME)
    if marker is None:
        return f"{out_dir} has no manifest ({MARKER_NAME}); it is incomplete or was made by another version"
    identity = _marker_identity(ckpt_path.stat(), architecture)
    changed = [k for k, v in identity.items() if marker.get(k) != v]
    if changed:
        return f"{out_dir} was made from another file, version or architecture ({', '.join(changed)} differ)"
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return f"{out_dir}'s manifest lists no files"
    for relative, record in files.items():
        path = out_dir / relative
        expected = record.get("size") if isinstance(record, dict) else None
        try:
            size = path.stat().st_size
        except OSError:
            return f"{relative} is missing from {out_dir}"
        if size != expected:
            return f"{relative} in {out_dir} is {size:,} bytes, the manifest says {expected:,}: it is damaged"
    return None


@dataclass(frozen=True)
class ConvertedVerification:
    """The result of :func:`verify_converted`."""

    folder: Path
    problems: list[str]
    """One line per bad file (missing, wrong size, wrong SHA-256) or a missing manifest; empty when all is well."""
    files: int
    """Files checked."""
    bytes_checked: int

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_converted(
    folder: str | os.PathLike[str],
    *,
    progress: Callable[[int, int], None] | None = None,
    should_cancel: CancelCheck | None = None,
) -> ConvertedVerification:
    """Check every file of a converted folder against its manifest: size, then SHA-256 (streamed, 8 MiB at a time).

    For ``one2345 weights verify --all``. A folder that fails is rebuilt by :func:`ensure_converted` once it is
    deleted or when a size differs; the fix for a hash mismatch is to delete the folder (or run
    ``one2345 weights prepare``, which rebuilds it).

    Args:
        folder: ``<weights dir>/converted/zero123-xl-diffusers``.
        progress: ``progress(bytes_done, bytes_total)`` while hashing.
        should_cancel: checked every 8 MiB.

    Raises:
        CancelledError: ``should_cancel`` became true.
    """
    folder = Path(folder)
    cancel = as_cancel_check(should_cancel)
    marker = _read_json(folder / MARKER_NAME)
    files = marker.get("files") if marker is not None else None
    if not isinstance(files, dict) or not files:
        return ConvertedVerification(folder, [f"{folder} has no manifest ({MARKER_NAME}) listing its files"], 0, 0)
    problems: list[str] = []
    todo: list[tuple[str, Path, str]] = []
    for relative, record in sorted(files.items()):
        path = folder / relative
        if not isinstance(record, dict) or not path.is_file():
            problems.append(f"{relative}: missing")
        elif path.stat().st_size != record.get("size"):
            problems.append(f"{relative}: {path.stat().st_size:,} bytes, expected {record.get('size'):,}")
        else:
            todo.append((relative, path, str(record.get("sha256"))))
    total = sum(path.stat().st_size for _, path, _ in todo)
    done = 0

    def on_bytes(n: int) -> None:
        nonlocal done
        done += n
        if cancel():
            raise CancelledError("verifying the converted Zero123 folder was cancelled")
        if progress is not None:
            progress(done, total)

    for relative, path, expected in todo:
        if _sha256(path, on_bytes) != expected:
            problems.append(f"{relative}: SHA-256 differs from the manifest (the file is damaged)")
    return ConvertedVerification(folder, problems, len(files), done)


def _load_image_encoder_dir(
    image_encoder_dir: str | os.PathLike[str] | None, ckpt_path: Path
) -> tuple[nn.Module, Path]:
    """The saved CLIPVisionModelWithProjection in ``image_encoder_dir``, loaded strictly, and that folder."""
    from transformers import CLIPVisionModelWithProjection

    image_encoder_dir_config(image_encoder_dir, ckpt_path.name)
    folder = Path(image_encoder_dir)  # type: ignore[arg-type]  # checked just above
    try:
        encoder, info = CLIPVisionModelWithProjection.from_pretrained(folder, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"image_encoder_dir {folder} does not load as CLIPVisionModelWithProjection: {exc}"
        ) from exc
    raise_if_problems(
        f"the image encoder in {folder}",
        {
            "missing": sorted(info.get("missing_keys", [])),
            # Old transformers saved the position_ids buffer; it is recomputed, not a weight.
            "unexpected": sorted(k for k in info.get("unexpected_keys", []) if not k.endswith("position_ids")),
            "shapes": [str(m) for m in info.get("mismatched_keys", [])],
        },
    )
    return encoder, folder


def _model_index() -> dict[str, Any]:
    import diffusers

    return {
        "_class_name": "Zero1to3StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "cc_projection": ["pipeline_zero1to3", "CCProjection"],
        "feature_extractor": [None, None],
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _marker_identity(source_stat: os.stat_result | None, architecture: Zero123Architecture) -> dict[str, Any]:
    """What must match for a cached conversion to be reused (JSON-normalised so it compares with a read marker)."""
    identity = {
        "converter_version": CONVERTER_VERSION,
        "source_size": None if source_stat is None else source_stat.st_size,
        "source_mtime_ns": None if source_stat is None else source_stat.st_mtime_ns,
        "architecture": asdict(architecture),
    }
    return json.loads(json.dumps(identity))


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
