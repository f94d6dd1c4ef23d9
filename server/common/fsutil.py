"""Filesystem helpers: writes that readers never see half done, reads that never follow a link out of their folder,
and output paths checked before any work is done."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import uuid
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from server.common.errors import BadInputError


def write_json_atomic(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as JSON to ``path`` so that readers see either the old or the new file, never a partial one."""
    return write_bytes_atomic(path, json.dumps(data, indent=2).encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file beside it and one rename: readers see the old file or the
    new one, never a partial one, and a failed write leaves the old file (if any) as it was.

    The file gets the mode an ordinary ``open(path, "w")`` would give (0666 less the user's umask), so results are
    as readable as any other file the user makes; ``tempfile.mkstemp`` would make it 0600, and the rename keeps that.
    """
    path = Path(path)
    fd, tmp = _new_temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """:func:`write_bytes_atomic` of ``text`` as UTF-8."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def _new_temp_file(path: Path) -> tuple[int, Path]:
    """A new empty file ``.<name>.<random>.tmp`` beside ``path``, opened for writing with mode 0666 (the kernel takes
    the umask off), never through a link (``O_EXCL``)."""
    for _ in range(16):
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _BINARY, 0o666), tmp
        except FileExistsError:  # 48 random bits taken: another writer's temporary file
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def make_temp_dir(parent: str | os.PathLike[str], prefix: str) -> Path:
    """A new empty folder ``<prefix><random>`` in ``parent`` with the mode ``mkdir`` gives (0777 less the umask);
    ``tempfile.mkdtemp`` makes it 0700, which a rename into place would keep."""
    for _ in range(16):
        folder = Path(parent) / f"{prefix}{uuid.uuid4().hex[:12]}"
        try:
            folder.mkdir(0o777)
            return folder
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary folder name in {parent}")


def replace_dir(tmp: Path, target: Path) -> Path:
    """Move the finished folder ``tmp`` (a sibling of ``target``) to ``target``. Folders cannot be swapped by one
    rename, so an existing ``target`` is first moved aside under a unique name, then deleted."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    return target


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # so that opening a planted FIFO cannot hang the caller
_BINARY = getattr(os, "O_BINARY", 0)


def open_regular_inside(folder: Path, relative: str) -> BinaryIO:
    """Open the regular file ``folder/relative`` for reading without following any link on the way, symbolic or hard.

    ``relative`` is a forward-slash path of plain names (no ``..``, no absolute path). On POSIX every component,
    ``folder`` itself included, is opened relative to its parent's descriptor with ``O_NOFOLLOW``, so a link planted
    anywhere below ``folder``'s parent — or swapped in while this runs — is refused, not followed. Where ``dir_fd`` is
    unsupported (Windows) each component is checked for being a link or junction before the file is opened. The
    returned file stays readable even if its folder is renamed or removed afterwards (POSIX).

    Raises:
        FileNotFoundError: the path is malformed, a component is missing or a link, or the target is not a regular
            file (a folder, FIFO or device) or has more than one hard link (``/etc/passwd`` linked into the folder
            is a regular file of its own, so only a file with no other name is trusted).
    """
    parts = PurePosixPath(relative).parts
    if not parts or PurePosixPath(relative).is_absolute() or any(p in (".", "..") or "\\" in p for p in parts):
        raise FileNotFoundError(f"not a plain relative path: {relative!r}")
    if _NOFOLLOW and os.open in os.supports_dir_fd:
        fd = _open_no_follow(str(folder), os.O_RDONLY | _DIRECTORY)
        try:
            for part in parts[:-1]:
                parent, fd = fd, _open_no_follow(part, os.O_RDONLY | _DIRECTORY, dir_fd=fd)
                os.close(parent)
            parent, fd = fd, _open_no_follow(parts[-1], os.O_RDONLY | _NONBLOCK, dir_fd=fd)
            os.close(parent)
        except BaseException:
            os.close(fd)
            raise
    else:
        path = Path(folder)
        for part in ("", *parts):
            path = path / part if part else path
            if path.is_symlink() or (hasattr(path, "is_junction") and path.is_junction()):
                raise FileNotFoundError(f"{relative!r} passes through a link")
        fd = os.open(path, os.O_RDONLY | _BINARY)
    file = os.fdopen(fd, "rb")
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        file.close()
        raise FileNotFoundError(f"{relative!r} is not a regular file")
    if info.st_nlink != 1:  # a hard link is a link too: its other name may be any file of the same disk
        file.close()
        raise FileNotFoundError(f"{relative!r} has {info.st_nlink} hard links")
    return file


def _open_no_follow(name: str, flags: int, dir_fd: int | None = None) -> int:
    try:
        return os.open(name, flags | _NOFOLLOW, dir_fd=dir_fd)
    except OSError as e:  # ELOOP (a link), ENOTDIR (a link to a file, or a file where a folder was expected), ENOENT
        raise FileNotFoundError(e.errno, f"cannot open {name!r} without following links: {e.strerror}") from None


def append_text_no_follow(path: Path, text: str) -> None:
    """Append ``text`` (UTF-8) to ``path``, creating it, but never writing through a symbolic link there."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _BINARY, 0o644)
    with os.fdopen(fd, "ab") as f:
        f.write(text.encode("utf-8"))


MESH_SUFFIXES = (".ply", ".glb", ".obj")


def check_output_file(path: str | Path, suffixes: tuple[str, ...] = MESH_SUFFIXES) -> Path:
    """``path`` if a file can be written there: the right suffix, not an existing folder, and no existing file where
    a folder of its parent path should be. Missing parent folders are fine (they are created).

    Raises:
        BadInputError: naming the path and what is wrong with it.
    """
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise BadInputError(f"output {path} must end in {', '.join(suffixes[:-1])} or {suffixes[-1]}")
    if path.is_dir():
        raise BadInputError(f"output {path} is a folder; give a file name (e.g. {path / ('mesh' + suffixes[0])})")
    check_folder_path(path.parent, f"the folder of output {path}")
    return path


def check_folder_path(path: str | Path, what: str) -> Path:
    """``path`` if it is a folder or can be created as one (no existing file on the way).

    Raises:
        BadInputError: ``what`` (e.g. ``"--out-dir"``) names the argument in the message.
    """
    path = Path(path)
    for ancestor in (path, *path.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                raise BadInputError(f"{what} {path}: {ancestor} is a file, not a folder")
            break
    return path


def folder_bytes(folder: Path) -> int:
    """Bytes of the plain files under ``folder`` (links not followed; 0 for what cannot be read)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total
