"""Progress reports, cancellation, the conversion lock and the leftovers of interrupted conversions.

A conversion writes into a hidden temporary sibling (``.<name>.tmp-*``) under a lock file beside it
(``.<name>.lock``), so an interrupted one leaves at most that temporary folder, which the next conversion (or
:func:`remove_interrupted_conversions` at start-up) deletes — never one a live process is writing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from server.common.errors import CancelledError
from server.common.fsutil import folder_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConversionProgress:
    """One report of a conversion (:func:`ensure_converted`'s ``progress`` callback)."""

    phase: str
    """``wait`` (another process converts the same file), ``clean`` (leftovers removed), ``read``, ``check``,
    ``convert`` (a part begins), ``write`` (bytes of a part's weight file; many reports), ``finish`` and ``done``."""
    step: int
    """1…``total`` for read … done; 0 for wait and clean."""
    total: int
    message: str
    """A line for people, e.g. "converting the UNet (3.4 GB)"."""
    part: str | None = None
    """unet, vae, image_encoder or cc_projection while a part is converted."""
    bytes_done: int = 0
    """Weight bytes written so far, of ``bytes_total`` (0 until the checkpoint is recognised)."""
    bytes_total: int = 0

    @property
    def fraction(self) -> float:
        """The conversion's fraction done in [0, 1] (by bytes written once writing starts)."""
        if self.phase == "done":
            return 1.0
        if self.bytes_total:
            return min(0.05 + 0.9 * self.bytes_done / self.bytes_total, 0.95)
        return 0.0


ProgressCallback = Callable[[ConversionProgress], None]
CancelCheck = Callable[[], bool] | threading.Event

_STEPS = ("read", "check", "unet", "vae", "image_encoder", "cc_projection", "finish", "done")
PART_TITLES = {"unet": "the UNet", "vae": "the VAE", "image_encoder": "the CLIP image encoder",
                "cc_projection": "cc_projection"}
_WRITE_REPORT_BYTES = 64 * 2**20
"""A ``write`` report at most every this many bytes."""
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)-[^/]+")
"""Hidden folders of an unfinished conversion (``mkdtemp``) or of a replaced one (``replace_dir``)."""


class Reporter:
    """A conversion's progress: ``report(phase, message)`` sends a :class:`ConversionProgress` (and checks for
    cancellation first); :meth:`wrote` counts bytes written and reports every 64 MiB."""

    def __init__(self, callback: ProgressCallback | None, cancel: Callable[[], bool]) -> None:
        self.callback = callback
        self.cancel = cancel
        self.bytes_done = 0
        self.bytes_total = 0
        self._last_write_report = 0

    def __call__(self, phase: str, message: str, *, step: str | None = None, part: str | None = None) -> None:
        if phase != "done":  # once the folder is in place, a late cancel changes nothing
            self.check_cancel()
        if self.callback is not None:
            number = _STEPS.index(step or phase) + 1 if (step or phase) in _STEPS else 0
            self.callback(ConversionProgress(phase, number, len(_STEPS), message, part, self.bytes_done,
                                             self.bytes_total))

    def wrote(self, n: int, part: str, message: str) -> None:
        self.bytes_done += n
        if self.bytes_done - self._last_write_report >= _WRITE_REPORT_BYTES:
            self._last_write_report = self.bytes_done
            self("write", message, step=part, part=part)
        else:
            self.check_cancel()

    def check_cancel(self) -> None:
        if self.cancel():
            raise CancelledError("the Zero123 conversion was cancelled; nothing of it was kept",
                                 fix="start it again (one2345 weights prepare, or the next Generate)")


def as_cancel_check(should_cancel: CancelCheck | None) -> Callable[[], bool]:
    """``should_cancel`` (None, an Event or a function) as a function."""
    if should_cancel is None:
        return lambda: False
    if isinstance(should_cancel, threading.Event):
        return should_cancel.is_set
    return should_cancel


class ConversionLock:
    """An exclusive lock on ``.<folder name>.lock`` beside the converted folder, held for a whole conversion.

    Only the holder writes temporary folders, so any temporary folder found by the holder belongs to a process that
    died (the kernel drops a dead process's lock, whatever killed it). The file keeps the holder's pid for messages.
    """

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir.parent / f".{out_dir.name}.lock"
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock if no live process holds it; False otherwise."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd):
                os.close(fd)
                return False
            # The holder before us unlinks the file on release; a lock taken on that unlinked file guards nothing,
            # so it only counts if the path still names the file locked.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self.fd = fd
                return True
            os.close(fd)
        return False

    def acquire(self, report: Reporter, poll_s: float = 0.5) -> None:
        """Wait for the lock, reporting the holder once and honouring cancellation."""
        told = False
        while not self.try_acquire():
            if not told:
                told = True
                report("wait", f"waiting for process {self.holder() or '?'}, which is converting the same checkpoint")
            report.check_cancel()
            time.sleep(poll_s)

    def holder(self) -> str | None:
        try:
            return self.path.read_text().strip() or None
        except OSError:
            return None

    def release(self) -> None:
        """Remove the lock file (while still holding it, see :meth:`try_acquire`) and drop the lock."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            if sys.platform != "win32":  # an open file cannot be deleted on Windows; it stays, empty of meaning
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
            os.close(fd)  # closing the only descriptor drops the lock


def _try_lock(fd: int) -> bool:
    if sys.platform == "win32":  # pragma: no cover - Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def find_leftovers(cache_dir: Path, name: str | None = None) -> dict[str, list[Path]]:
    """Hidden temporary/replaced folders in ``cache_dir``, by the converted folder's name they belong to."""
    found: dict[str, list[Path]] = {}
    try:
        entries = list(cache_dir.iterdir())
    except OSError:
        return found
    for entry in entries:
        match = _LEFTOVER.fullmatch(entry.name)
        if match and (name is None or match["name"] == name) and entry.is_dir() and not entry.is_symlink():
            found.setdefault(match["name"], []).append(entry)
    return found


def remove_leftovers(paths: list[Path], report: Reporter | None = None) -> list[Path]:
    """Delete the leftover folders ``paths`` (the caller holds their lock), logging each; returns those removed."""
    removed = []
    for path in sorted(paths):
        size = folder_bytes(path)
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
            log.info("removed %s (%s) left by an interrupted Zero123 conversion", path, human_bytes(size))
            if report is not None:
                report("clean", f"removed {path.name} ({human_bytes(size)}) left by an interrupted conversion")
    return removed


def remove_interrupted_conversions(cache_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete the leftovers of interrupted conversions in ``cache_dir`` (hidden ``.<name>.tmp-*`` / ``.old-*``
    folders), never one whose conversion is running: each name's lock is tried without waiting and skipped when a
    live process holds it. Cheap when there is nothing to remove (one directory listing). Call it at start-up.

    Returns:
        The folders removed.
    """
    removed: list[Path] = []
    for name in find_leftovers(Path(cache_dir)):
        lock = ConversionLock(Path(cache_dir) / name)
        if not lock.try_acquire():
            continue
        try:
            removed += remove_leftovers(find_leftovers(Path(cache_dir), name).get(name, []))
        finally:
            lock.release()
    return removed


def human_bytes(n: int) -> str:
    """``n`` bytes in GB, MB or kB with one decimal (or in bytes below 1 kB)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
