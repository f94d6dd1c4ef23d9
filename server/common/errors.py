"""The errors the product raises on purpose.

Every error carries a ``kind`` that the HTTP API and the Blender add-on map to a message and, where one exists, a fix
(see architecture.md, "Seams"). Messages name the offending value and what is allowed, so a user can act on them
without reading a traceback.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from pathlib import Path


class One2345Error(Exception):
    """Base class. ``kind`` is one of ``bad_input``, ``missing_weights``, ``out_of_memory``, ``storage``,
    ``cancelled``, ``internal``."""

    kind: str = "internal"

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix
        """A short instruction that resolves the problem (a command to run, a setting to change), if one exists."""

    def __str__(self) -> str:
        return f"{self.message}\n  fix: {self.fix}" if self.fix else self.message


class BadInputError(One2345Error, ValueError):
    """An input file, option or argument that cannot be used as given."""

    kind = "bad_input"


class MissingWeightsError(One2345Error, FileNotFoundError):
    """A model weight file that is not on disk (the message names the file and the command that fetches it)."""

    kind = "missing_weights"


class CheckpointError(One2345Error):
    """A checkpoint file that exists but cannot be used: truncated, of another network, or with wrong keys/shapes.

    It shares ``missing_weights`` with :class:`MissingWeightsError` because the fix is the same: fetch the file again
    (or point to the right one).
    """

    kind = "missing_weights"


class EmptySurfaceError(One2345Error):
    """Marching cubes found no zero crossing of the SDF: writing an empty mesh file would only hide the failure."""

    kind = "bad_input"


class CancelledError(One2345Error):
    """The job was cancelled by the user; raised between stages or denoising steps."""

    kind = "cancelled"


class StorageError(One2345Error):
    """The disk refused a write or a move: full, read-only, or not permitted. Never a bug of the caller's input, and
    the message names no absolute server path (only paths relative to the folder concerned)."""

    kind = "storage"


_STORAGE_HINTS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the disk is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "the operation is not permitted",
    errno.EIO: "the disk reported an I/O error",
}


def storage_error(e: OSError, doing: str, root: Path | None = None) -> StorageError:
    """An OSError of the filesystem as a :class:`StorageError` whose message says what failed and why, with the path
    (if any) relative to ``root`` — a client must never learn the server's folder layout.

    Args:
        e: the error raised by the write, rename or delete.
        doing: what was being done, e.g. ``"store the new job"``.
        root: the folder that paths are shown relative to (the jobs folder).
    """
    why = _STORAGE_HINTS.get(e.errno, e.strerror or type(e).__name__)
    where = ""
    if e.filename is not None:
        where = f" ({relative_name(e.filename, root)})"
    return StorageError(f"cannot {doing}: {why}{where}",
                        fix="free space on the disk of the server's jobs folder, make it writable, or start the "
                            "server with --jobs-dir on another disk")


def relative_name(path: str | os.PathLike[str] | bytes | int, root: Path | None) -> str:
    """``path`` relative to ``root`` when inside it, else only its last component (never an absolute path)."""
    if isinstance(path, int):
        return f"file descriptor {path}"
    text = os.fsdecode(path)
    if root is not None:
        try:
            return Path(text).relative_to(root).as_posix()
        except ValueError:
            pass
    return Path(text).name


def only_query(params: Iterable[str], *allowed: str) -> None:
    """Refuse query parameters a route does not take (FastAPI ignores them; a typo must not go unnoticed).

    Args:
        params: the request's query parameter names (``request.query_params``).

    Raises:
        BadInputError: naming the unknown parameters and the allowed ones.
    """
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise BadInputError(f"unknown query parameter(s) {[u[:40] for u in unknown[:5]]}; allowed: {list(allowed)}")


def describe_value(value: object) -> str:
    """What a message says a wrong argument was: ``'uint8 array of shape (256, 256, 3)'`` for an array (anything with
    ``dtype`` and ``shape``), else the type name."""
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        return f"{value.dtype} array of shape {tuple(value.shape)}"
    return type(value).__name__
