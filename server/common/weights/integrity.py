"""Is a weight file whole? Its state on disk, the reference size and SHA-256 it must match, the digests remembered
in ``<weights dir>/.checksums.json``, the hashing itself, and the free-space check.

The table is read through :mod:`server.common.weights.table` at call time (``table.REGISTRY``), never copied.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from server.common.errors import CancelledError, StorageError
from server.common.fsutil import write_json_atomic
from server.common.weights import table
from server.common.weights.table import (
    CHECKSUMS_FILE,
    HASH_CHUNK_BYTES,
    PARTIAL_SUFFIX,
    SHA256_HEX,
    WEIGHTS_DIR_ENV,
    WeightFile,
    default_weights_dir,
    human_size,
    select_entries,
    weight_file,
)

_records_lock = threading.Lock()


def check_free_space(root: Path, needed: int) -> None:
    """Refuse (StorageError) when the disk of ``root`` has less than ``needed`` bytes (+ a margin) free.

    ``root`` need not exist yet: the disk is that of its nearest existing parent.
    """
    probe = Path(root).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    margin = table.FREE_SPACE_MARGIN_BYTES
    if needed + margin > free:
        raise StorageError(
            f"not enough free disk space for the weights: {human_size(needed)} ({needed:,} bytes) needed plus a "
            f"{human_size(margin)} margin, {human_size(free)} ({free:,} bytes) free on the disk "
            "of the weights folder",
            fix=f"free at least {human_size(needed + margin - free)} on that disk, or point "
            f"{WEIGHTS_DIR_ENV} (the server's --weights-dir) at a folder on a larger disk",
        )


@dataclass(frozen=True)
class FileState:
    """What :func:`inspect_weights` says about one weight file (``to_json`` is what ``GET /v1/weights`` lists)."""

    name: str
    filename: str
    """Path inside the hub repo (and under the weights folder)."""
    purpose: str
    required: bool
    licence: str
    source: str
    """The URL it is fetched from."""
    state: str
    """present | partial | missing | corrupt (damaged: wrong size or SHA-256)."""
    bytes_on_disk: int
    """Size of the file, or of its partial download; 0 when missing."""
    expected_bytes: int
    size_exact: bool
    """Whether ``expected_bytes`` is the exact size (the hub's, or the table's pin) or a rough one."""
    checksum: str | None
    """verified | mismatch | unchecked (a reference exists, the file was not hashed yet) | unavailable (no
    reference SHA-256 is known); None when the file is not there."""
    problem: str | None = None
    """Why the file is corrupt, in one sentence."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


HashCallback = Callable[[int, int], None]
"""Called with (bytes hashed so far, file size) for every chunk hashed."""


def inspect_weights(
    weights_dir: str | os.PathLike[str] | None = None,
    *,
    verify: bool = False,
    endpoint: str | None = None,
    names: Iterable[str] | None = None,
    on_hash: Callable[[str, int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> list[FileState]:
    """The state of every weight file (or of ``names``) in the weights folder, in table order.

    Only ``stat`` calls unless ``verify``: then every present file with a reference SHA-256 and no digest for its
    current size and modification time is hashed (streamed; about a minute for 15 GB) and the digest recorded, so a
    second call hashes nothing. ``on_hash(name, done, total)`` reports each chunk hashed.
    """
    root = Path(weights_dir).expanduser() if weights_dir is not None else default_weights_dir()
    entries = select_entries(names, on_demand=True)
    records = read_records(root)
    return [state_of(entry, root, records, verify=verify, endpoint=endpoint, should_cancel=should_cancel,
                      on_hash=None if on_hash is None else functools.partial(on_hash, entry.name))
            for entry in entries]


def missing_bytes(states: Iterable[FileState]) -> int:
    """Bytes still to download for the files that are not present (partial downloads count what is left): what a
    plain ``weights download`` fetches, so the on-demand files (text to image) are left out."""
    total = 0
    for s in states:
        if _on_demand(s.name):
            continue
        if s.state == "partial":
            total += max(s.expected_bytes - s.bytes_on_disk, 0)
        elif s.state != "present":
            total += s.expected_bytes
    return total


def disk_needed_bytes(states: Iterable[FileState]) -> int:
    """Disk space still needed for the files that are not present: their bytes left to fetch plus what the first
    model load writes beside them and keeps (Zero123's 5 GB conversion next to its 15.5 GB checkpoint: ≈ 23 GB for
    an empty folder)."""
    states = list(states)
    return missing_bytes(states) + sum(weight_file(s.name).derived_bytes for s in states if s.state != "present")


def _on_demand(name: str) -> bool:
    entry = table.REGISTRY.get(name)
    return entry is not None and entry.on_demand


def reference_of(entry: WeightFile, record: dict[str, Any]) -> tuple[int | None, str | None]:
    """The exact size and SHA-256 a file must have: the hub's, recorded when this code downloaded it, else the
    table's pins."""
    size, sha = record.get("expected_size"), record.get("expected_sha256")
    size = size if isinstance(size, int) and not isinstance(size, bool) else entry.size_bytes
    sha = sha if isinstance(sha, str) and SHA256_HEX.match(sha) else entry.sha256
    return size, sha


def state_of(entry: WeightFile, root: Path, records: dict[str, Any], *, verify: bool,
             endpoint: str | None = None, on_hash: HashCallback | None = None,
             should_cancel: Callable[[], bool] | None = None) -> FileState:
    """The :class:`FileState` of ``entry`` in ``root``, given the checksum ``records`` (:func:`read_records`);
    with ``verify`` a present file whose digest is not recorded for its size and mtime is hashed and recorded."""
    path = root / entry.local_name
    record = records.get(entry.local_name)
    record = record if isinstance(record, dict) else {}
    exact, reference = reference_of(entry, record)
    base = {"name": entry.name, "filename": entry.filename, "purpose": entry.purpose, "required": entry.required,
            "licence": entry.licence, "source": entry.source_url(endpoint),
            "expected_bytes": exact if exact is not None else entry.approx_size_bytes, "size_exact": exact is not None}
    try:
        st = path.stat()
    except OSError:
        st = None
    if st is None or not path.is_file():  # a FIFO or a folder in its place is no weight file (and is never read)
        partial = max((p.stat().st_size for p in partial_downloads(path)), default=None)
        if partial is None:
            return FileState(**base, state="missing", bytes_on_disk=0, checksum=None)
        return FileState(**base, state="partial", bytes_on_disk=partial, checksum=None)

    if exact is not None and st.st_size != exact:
        return FileState(**base, state="corrupt", bytes_on_disk=st.st_size, checksum="mismatch",
                         problem=f"it has {st.st_size:,} bytes, the hub's file has {exact:,}")
    if reference is None:
        return FileState(**base, state="present", bytes_on_disk=st.st_size, checksum="unavailable")
    fresh = record.get("size") == st.st_size and record.get("mtime_ns") == st.st_mtime_ns
    digest = record.get("sha256") if fresh else None
    if digest is None and verify:
        digest = sha256_file(path, should_cancel, None if on_hash is None else lambda done: on_hash(done, st.st_size))
        record_digest(root, entry, path, sha256=digest)
    if digest is None:
        return FileState(**base, state="present", bytes_on_disk=st.st_size, checksum="unchecked")
    if digest != reference:
        return FileState(**base, state="corrupt", bytes_on_disk=st.st_size, checksum="mismatch",
                         problem=f"its SHA-256 is {digest}, the reference is {reference}")
    return FileState(**base, state="present", bytes_on_disk=st.st_size, checksum="verified")


def verify_all(weights_dir: str | os.PathLike[str] | None = None, *,
               on_hash: Callable[[str, int, int], None] | None = None,
               should_cancel: Callable[[], bool] | None = None) -> list[FileState]:
    """Check every present weight file against its reference size and SHA-256 (``one2345 weights verify --all``):
    :func:`inspect_weights` with ``verify``; a file hashed before and unchanged since (size and mtime) is not hashed
    again."""
    return inspect_weights(weights_dir, verify=True, on_hash=on_hash, should_cancel=should_cancel)


def partial_downloads(path: Path) -> list[Path]:
    """Partial downloads of ``path`` (one per remote version it was fetched from)."""
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(f"{glob.escape(path.name)}.*{PARTIAL_SUFFIX}"))


def read_records(root: Path) -> dict[str, Any]:
    """The checksum records of ``root`` (empty when absent or unreadable: they are a cache, never the truth)."""
    try:
        data = json.loads((root / CHECKSUMS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record_digest(root: Path, entry: WeightFile, path: Path, *, sha256: str | None,
                  hub: tuple[int | None, str | None] | None = None) -> None:
    """Remember the digest of ``path`` for its current size and mtime, and ``hub`` (the hub's size and SHA-256 seen
    at download; None keeps those recorded before). A cache that cannot be written costs only a re-hash later."""
    st = path.stat()
    with _records_lock:
        records = read_records(root)
        old = records.get(entry.local_name)
        old = old if isinstance(old, dict) else {}
        size, sha = hub if hub is not None else (old.get("expected_size"), old.get("expected_sha256"))
        records[entry.local_name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256,
                                     "expected_sha256": sha, "expected_size": size}
        with contextlib.suppress(OSError):
            write_json_atomic(root / CHECKSUMS_FILE, records)


def sha256_file(path: Path, should_cancel: Callable[[], bool] | None = None,
                on_bytes: Callable[[int], None] | None = None) -> str:
    """SHA-256 of ``path``, streamed in 16 MiB chunks; ``on_bytes(done)`` after each."""
    digest = hashlib.sha256()
    done = 0
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            if should_cancel is not None and should_cancel():
                raise CancelledError("cancelled while a weight file was being verified")
            digest.update(chunk)
            done += len(chunk)
            if on_bytes is not None:
                on_bytes(done)
    return digest.hexdigest()
