"""Taking the weight files from an existing One-2-3-45 checkout (or a folder holding them): :func:`import_weights`
puts each one in place by a hard link, a reflink or a copy, and keeps it only once it is verified.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from server.common.errors import BadInputError, CancelledError
from server.common.weights import integrity
from server.common.weights.download import DownloadProgress, ProgressCallback
from server.common.weights.integrity import check_free_space, read_records, record_digest, reference_of, state_of
from server.common.weights.table import HASH_CHUNK_BYTES, WeightFile, default_weights_dir, select_entries

IMPORT_OUTCOMES = ("imported", "already present", "damaged", "not found")


@dataclass(frozen=True)
class ImportResult:
    """What :func:`import_weights` did with one weight file."""

    name: str
    outcome: str
    """imported | already present | damaged (refused: wrong size or SHA-256) | not found."""
    how: str | None = None
    """For ``imported``: ``hard link``, ``reflink`` or ``copy``."""
    source: str | None = None
    """The file used, relative to the folder imported from."""
    checksum: str | None = None
    """verified | unavailable (no reference SHA-256 is known: taken on its name) | mismatch."""
    detail: str | None = None
    """Why it was refused, or what was looked for when not found."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def import_weights(source: str | os.PathLike[str], weights_dir: str | os.PathLike[str] | None = None, *,
                   names: Iterable[str] | None = None, on_progress: ProgressCallback | None = None,
                   should_cancel: Callable[[], bool] | None = None) -> list[ImportResult]:
    """Take the weight files from an official One-2-3-45 checkout, an older layout of it, another weights folder or a
    flat folder holding them, into the weights folder (``one2345 weights import PATH``).

    Each file is looked for at :attr:`WeightFile.import_candidates` under ``source`` (the reference keeps
    ``reconstruction/exp/lod0/checkpoints/ckpt_215000.pth`` and ``elevation_estimate/utils/weights/...`` where the hub
    has ``SparseNeuS_demo_v1/...``). A file found is put under a temporary name in the weights folder, by a hard link
    where the file system allows, else a reflink (``FICLONE``, e.g. btrfs/XFS), else a copy (after the free-space
    check); it is then hashed and checked against the reference size and SHA-256 and only then renamed into place
    (replacing a damaged file), so a damaged source is refused and nothing of it stays. A file already present and
    whole is left alone.

    Raises:
        BadInputError: ``source`` is not a folder.
        StorageError: the disk lacks the space for a copy.
        CancelledError: ``should_cancel`` returned True (the temporary file is removed).
    """
    src = Path(source).expanduser()
    if not src.is_dir():
        what = "does not exist" if not src.exists() else "is not a folder"
        raise BadInputError(f"{str(src)!r} {what}; give the folder of an official One-2-3-45 checkout, or a folder "
                            "holding the weight files")
    root = Path(weights_dir).expanduser() if weights_dir is not None else default_weights_dir()
    cancelled = should_cancel or (lambda: False)
    entries = select_entries(names, on_demand=False)
    found: dict[str, Path] = {}
    for entry in entries:
        for rel in entry.import_candidates:
            candidate = src / rel
            if candidate.is_file():  # follows a symlink; a FIFO or a folder is passed over
                found[entry.name] = candidate
                break
    sizes = {n: p.stat().st_size for n, p in found.items()}
    total, done_before = sum(sizes.values()), 0
    results: list[ImportResult] = []
    for i, entry in enumerate(entries):
        path = found.get(entry.name)
        if path is None:
            results.append(ImportResult(entry.name, "not found",
                                        detail=f"looked for {', '.join(entry.import_candidates)}"))
            continue
        rel = path.relative_to(src).as_posix()

        def report(phase: str, n: int, hashed: int = 0, name: str = entry.name, size: int = sizes[entry.name],
                   before: int = done_before, files_done: int = i) -> None:
            if on_progress is not None:
                on_progress(DownloadProgress(file=name, phase=phase, file_done=n, file_total=size, done=before + n,
                                             total=total, transferred=before + n, files_done=files_done,
                                             files_total=len(entries), hashed=hashed))

        results.append(_import_one(entry, path, rel, root, report, cancelled))
        done_before += sizes[entry.name]
        report("done", sizes[entry.name])
    return results


def _import_one(entry: WeightFile, src: Path, rel: str, root: Path, report: Callable[..., None],
                cancelled: Callable[[], bool]) -> ImportResult:
    dest = root / entry.local_name
    records = read_records(root)
    record = records.get(entry.local_name)
    exact, reference = reference_of(entry, record if isinstance(record, dict) else {})
    size = src.stat().st_size
    if exact is not None and size != exact:
        return ImportResult(entry.name, "damaged", source=rel, checksum="mismatch",
                            detail=f"it has {size:,} bytes, the hub's file has {exact:,}")
    if dest.is_file():
        if dest.exists() and os.path.samefile(dest, src):
            state = state_of(entry, root, records, verify=True, should_cancel=cancelled,
                              on_hash=lambda done, total: report("verifying", done, done))
            outcome = "already present" if state.state == "present" else "damaged"
            return ImportResult(entry.name, outcome, source=rel, checksum=state.checksum, detail=state.problem)
        state = state_of(entry, root, records, verify=True, should_cancel=cancelled,
                          on_hash=lambda done, total: report("checking", 0, done))
        if state.state == "present":
            return ImportResult(entry.name, "already present", source=rel, checksum=state.checksum)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_imports(dest)
    tmp = dest.with_name(f".{dest.name}.import-{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        how, digest = _place(src, tmp, size, root, report, cancelled)
        if digest is None:
            report("verifying", 0)
            digest = integrity.sha256_file(tmp, cancelled, lambda done: report("verifying", done, done))
        if reference is not None and digest != reference:
            return ImportResult(entry.name, "damaged", source=rel, checksum="mismatch",
                                detail=f"its SHA-256 is {digest}, the reference is {reference}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    record_digest(root, entry, dest, sha256=digest)
    return ImportResult(entry.name, "imported", how=how, source=rel,
                        checksum="verified" if reference is not None else "unavailable")


def _remove_dead_imports(dest: Path) -> None:
    """Remove the temporary files of imports into ``dest`` whose process is gone (killed mid-copy: up to 15 GB)."""
    for stale in dest.parent.glob(f".{glob.escape(dest.name)}.import-*.tmp"):
        pid = stale.name.rsplit(".import-", 1)[-1].removesuffix(".tmp")
        try:
            os.kill(int(pid), 0)
            continue  # a live import (another process) owns it
        except (ValueError, ProcessLookupError):
            pass
        except PermissionError:  # a live process of another user
            continue
        with contextlib.suppress(OSError):
            stale.unlink()


def _place(src: Path, tmp: Path, size: int, root: Path, report: Callable[..., None],
           cancelled: Callable[[], bool]) -> tuple[str, str | None]:
    """Put ``src``'s bytes at ``tmp``: a hard link, else a reflink, else a copy (hashed as it is written). Returns
    how, and the digest when the copy computed it."""
    try:
        os.link(src, tmp)
        return "hard link", None
    except OSError:
        pass  # another file system, or one without hard links (EXDEV, EPERM, ENOTSUP…)
    if _reflink(src, tmp):
        return "reflink", None
    check_free_space(root, size)
    digest = hashlib.sha256()
    done = 0
    with src.open("rb") as fin, tmp.open("wb") as fout:
        while chunk := fin.read(HASH_CHUNK_BYTES):
            if cancelled():
                raise CancelledError("the weights import was cancelled")
            fout.write(chunk)
            digest.update(chunk)
            done += len(chunk)
            report("copying", done, done)
        fout.flush()
        os.fsync(fout.fileno())
    return "copy", digest.hexdigest()


_FICLONE = 0x40049409
"""Linux ioctl: make the destination share the source's extents (btrfs, XFS, bcachefs…): instant, no extra space."""


def _reflink(src: Path, tmp: Path) -> bool:
    """Clone ``src`` into a new ``tmp`` with ``ioctl FICLONE``; False (``tmp`` removed) where that is impossible."""
    try:
        import fcntl
    except ImportError:  # Windows
        return False
    try:
        with src.open("rb") as fin, tmp.open("wb") as fout:
            fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
        return True
    except OSError:
        tmp.unlink(missing_ok=True)
        return False
