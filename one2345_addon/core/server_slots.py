"""Which Blender session owns which local server: slot records, the cross-process claim lock, stale-server
clean-up (standard library only).

Several Blenders (or a ``blender -b -c one2345 generate`` batch) on one machine share the user folder. Each live
session owns one *slot*: a record file (``server.pid.json``, ``server-2.pid.json``, …) naming the owner (pid, process
start time, and which manager in that process) and its server (pid, start time, URL), with its own jobs folder
(``server-jobs``, ``server-jobs-2``, …) and log. A slot whose owner is alive is never touched by anyone else; a slot
whose owner is gone (a crashed Blender) is *stale*: the next session stops the server it left running (after checking
the pid still is that server) and reuses the slot. Slots are claimed under :class:`ClaimLock`. The process that uses
the slots is :class:`server_process.ServerManager`.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from . import platform_compat
from .client import Client, ServerError

MAX_SLOTS = 16
"""Concurrent local servers per user folder (one per live Blender session)."""
CLAIM_LOCK_STALE_S = 30.0
"""A claim lock older than this was left by a process that died while holding it."""


def _is_one2345_server(pid: int, url: str) -> bool:
    """Guard against killing an unrelated process that reused a recorded pid (records without a start time)."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        with contextlib.suppress(OSError):
            args = cmdline.read_bytes().decode("utf-8", "replace").split("\0")
            # `python -m server serve …`, `python -m server.service.serve …` (`server.serve` in older checkouts)
            # or the `one2345 serve …` script
            return any(a in ("server.service.serve", "server.serve")
                       or ((a in ("server", "one2345") or a.endswith("/one2345"))
                           and i + 1 < len(args) and args[i + 1] == "serve") for i, a in enumerate(args))
        return False
    if not url:
        return False
    try:  # No /proc (macOS, Windows): trust the pid only if a One2345 server still answers at the recorded URL.
        return Client(url, timeout=2.0).health().get("status") == "ok"
    except ServerError:
        return False



def slot_paths(state_dir: Path, slot: int) -> tuple[Path, Path, Path]:
    """(record file, jobs folder, log file) of a slot; slot 1 keeps the names of a single-Blender set-up."""
    suffix = "" if slot == 1 else f"-{slot}"
    return (state_dir / f"server{suffix}.pid.json", state_dir / f"server-jobs{suffix}",
            state_dir / "logs" / f"server{suffix}.log")


def read_record(path: Path) -> dict[str, Any] | None:
    """A slot's record, or None when missing or unreadable (a half-written record counts as unreadable)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def write_record(path: Path, record: dict[str, Any]) -> None:
    """Replace a record atomically (readers see the old or the new one, never half of one)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(record), encoding="utf-8")
    for attempt in range(20):
        try:
            os.replace(tmp, path)
            return
        except PermissionError:  # Windows: a reader has the target open for a moment
            if attempt == 19:
                raise
            time.sleep(0.05)


def owner_alive(record: dict[str, Any], own_id: str | None = None) -> bool:
    """Whether the session that owns a record still runs.

    A record without an owner (written by an older add-on) counts as gone. A record owned by *this* process but by
    another :class:`ServerManager` is a leftover too: one Blender process uses one manager per user folder (the
    module's singleton), so the other one was replaced without being stopped.
    """
    pid = record.get("owner_pid")
    if not isinstance(pid, int):
        return False
    if pid == os.getpid():
        return own_id is not None and record.get("owner_id") == own_id
    return platform_compat.same_process(pid, record.get("owner_start"))


def stop_recorded_server(record: dict[str, Any]) -> int | None:
    """Stop the server a stale record names, if that process still is it; return its pid when stopped."""
    try:
        pid = int(record["pid"])
    except (KeyError, TypeError, ValueError):
        return None
    if pid == os.getpid() or not platform_compat.pid_alive(pid):
        return None
    started, now = record.get("server_start"), platform_compat.process_start_time(pid)
    if started and now is not None:
        if now != started:
            return None  # the pid now belongs to another process
    elif not _is_one2345_server(pid, str(record.get("url", ""))):
        return None
    platform_compat.terminate_pid(pid)
    launcher = record.get("launcher_pid")
    if isinstance(launcher, int) and launcher != pid and platform_compat.same_process(
            launcher, record.get("launcher_start")):
        platform_compat.terminate_pid(launcher)
    return pid


def stop_stale_server(pid_file: Path) -> int | None:
    """Stop the server of a record whose owner is gone and remove the record; return the stopped pid (or None).

    A record whose owner is alive is left alone."""
    record = read_record(pid_file)
    if record is not None and owner_alive(record):
        return None
    stopped = stop_recorded_server(record) if record is not None else None
    pid_file.unlink(missing_ok=True)
    return stopped


class ClaimLock:
    """A short cross-process mutex (a file created exclusively) around reading and claiming slots."""

    def __init__(self, state_dir: Path, timeout: float = 60.0) -> None:
        self.path = state_dir / ".slots.lock"
        self.timeout = timeout
        self.held = False

    def __enter__(self) -> ClaimLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._holder_gone() or time.monotonic() > deadline:
                    with contextlib.suppress(OSError):
                        self.path.unlink()
                    continue
                time.sleep(0.02)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps({"pid": os.getpid(), "start": platform_compat.process_start_time(os.getpid())}))
            self.held = True
            return self

    def _holder_gone(self) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
            holder = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return False  # being written or just removed: look again
        if age > CLAIM_LOCK_STALE_S:
            return True
        pid = holder.get("pid")
        return (isinstance(pid, int) and pid != os.getpid()
                and not platform_compat.same_process(pid, holder.get("start")))

    def __exit__(self, *exc: object) -> None:
        if self.held:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self.held = False
