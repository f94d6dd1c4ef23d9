"""The job store on disk: one folder per job, its status.json, its log, and the files it serves.

Every job is a folder under the jobs directory, named by its id (32 lowercase hex digits)::

    <jobs_dir>/<id>/input.<ext>    the uploaded image, byte for byte
    <jobs_dir>/<id>/status.json    the job's state (what GET /v1/jobs/<id> answers, plus internal fields)
    <jobs_dir>/<id>/log.txt        what happened: options, stages, the outcome, tracebacks
    <jobs_dir>/<id>/run/           the pipeline's run folder (input_256.png, views/, mesh.<fmt>, meta.json)
    <jobs_dir>/.quarantine/<id>-<time>/   a job folder whose status.json was refused at start-up, set aside

A new job's folder is filled under a hidden temporary name and renamed into place, and ``status.json`` is always
replaced atomically (temporary file + ``os.replace``), so a folder named like an id always holds a readable status.
Nothing in a job folder is trusted: files are opened without following links, and only with one link
(:func:`server.common.fsutil.open_regular_inside`); a status.json read back is checked field by field
(:meth:`.records.Job.from_record`), and one that fails is moved to ``.quarantine/`` with a log line naming the field.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import stat
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from server.common.errors import One2345Error, storage_error
from server.common.fsutil import append_text_no_follow, folder_bytes, open_regular_inside, write_json_atomic
from server.service.jobs.records import (
    FINISHED,
    JOB_ID_RE,
    VIEW_NAME_RE,
    ApiError,
    Job,
    RecordError,
    error_dict,
    now_iso,
)

log = logging.getLogger(__package__)  # one logger for the package: a job's log.txt filters it out (see log_handler)

QUARANTINE = ".quarantine"
"""The folder under the jobs directory where refused job folders are set aside."""


@dataclass
class Loaded:
    """What :meth:`JobStore.load` found: the jobs, and the folders set aside (``quarantined``: their names)."""

    jobs: list[Job] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)


class JobStore:
    """The jobs folder: creating, saving, opening, logging and removing jobs, and reading them back at start-up.

    Args:
        jobs_dir: folder holding one sub-folder per job (created if absent).
    """

    def __init__(self, jobs_dir: str | Path) -> None:
        self.jobs_dir = Path(jobs_dir)
        self.jobs_dir.mkdir(parents=True, exist_ok=True)

    # -- writing ----------------------------------------------------------------------------------------------------

    def create(self, job: Job, fill: Callable[[Path], object]) -> None:
        """Write a new job's folder under a hidden name (``fill`` adds its files) and rename it into place.

        Raises:
            StorageError: the disk refused (nothing is left behind).
        """
        incoming = self.jobs_dir / f".incoming-{job.id}"
        try:
            incoming.mkdir()
            fill(incoming)
            write_json_atomic(incoming / "status.json", job.to_record())
            os.replace(incoming, job.folder)
        except OSError as e:
            shutil.rmtree(incoming, ignore_errors=True)
            raise storage_error(e, "store the new job", self.jobs_dir) from None
        except BaseException:
            shutil.rmtree(incoming, ignore_errors=True)
            raise

    def save(self, job: Job, doing: str) -> None:
        """Write the job's status.json, for state a client was told is kept (a pin, a queued re-roll).

        Raises:
            StorageError: the disk refused; ``doing`` says what failed (``"pin job <id>"``).
        """
        try:
            write_json_atomic(job.folder / "status.json", job.to_record())
        except OSError as e:
            raise storage_error(e, doing, self.jobs_dir) from None

    def save_quietly(self, job: Job) -> bool:
        """Write the job's status.json where a failure must not stop the caller (progress, a finished run): the
        in-memory status stays right, only a restart would see the older file. False if it was not written."""
        try:
            write_json_atomic(job.folder / "status.json", job.to_record())
        except OSError as e:
            log.error("cannot write the status of job %s: %s", job.id, e)
            return False
        return True

    def log(self, job: Job, line: str) -> None:
        """One event of the job, to its log.txt and to the server's log."""
        log.info("job %s: %s", job.id, line.rstrip())
        self.file_log(job, line)

    @staticmethod
    def file_log(job: Job, text: str) -> None:
        """Append to the job's log.txt only (tracebacks: the server's log gets the one-line outcome)."""
        try:
            append_text_no_follow(job.folder / "log.txt", f"{now_iso()} {text.rstrip()}\n")
        except OSError as e:
            log.error("cannot write the log of job %s: %s", job.id, e)

    @staticmethod
    def log_handler(job: Job) -> logging.Handler | None:
        """A handler appending the records of the calling thread (the worker, running one job) to the job's log.txt,
        so the pipeline's own log lines land there; None when the file cannot be opened (a full or read-only disk
        must fail the job, not the worker)."""
        path = job.folder / "log.txt"
        try:
            append_text_no_follow(path, "")  # creates it, refusing a link planted in its place
            handler = logging.FileHandler(path, encoding="utf-8")
        except OSError as e:
            log.error("cannot open the job log %s: %s", path.name, e.strerror)
            return None
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        ident = threading.get_ident()
        handler.addFilter(lambda record: record.thread == ident and record.name != log.name)
        return handler

    def remove(self, job: Job) -> None:
        """Delete a job's folder. One rename makes the deletion durable at once (a restart drops ``.deleted-*``
        folders), so a disk that refuses it loses nothing; removing the files may take a while, and a leftover is
        removed at the next start.

        Raises:
            StorageError: the rename was refused (the folder is as it was).
        """
        trash = self.jobs_dir / f".deleted-{job.id}"
        try:
            os.replace(job.folder, trash)
        except OSError as e:
            raise storage_error(e, f"delete job {job.id}", self.jobs_dir) from None
        shutil.rmtree(trash, ignore_errors=True)

    # -- reading ----------------------------------------------------------------------------------------------------

    def open(self, job: Job, relative: str, missing: str | None = None) -> BinaryIO:
        """The open file ``relative`` of the job's folder (the caller closes it), never through a link.

        Raises:
            ApiError: not_found (``missing``, or a default message) for a file that is absent, a link, has other
                hard links, or is not a plain file.
            StorageError: the disk failed to read it.
        """
        try:
            return open_regular_inside(job.folder, relative)
        except FileNotFoundError:
            raise ApiError("not_found", missing or f"the file {relative} of job {job.id} is missing from its "
                                                   "folder (or is not a plain file)") from None
        except OSError as e:
            raise storage_error(e, f"read {relative} of job {job.id}", self.jobs_dir) from None

    def public(self, text: str) -> str:
        """``text`` fit for a client: the jobs folder's absolute path removed (paths become ``<id>/…``) and the home
        folder shown as ``~``."""
        for root, shown in ((self.jobs_dir, ""), (Path.home(), "~/")):
            text = text.replace(f"{root}{os.sep}", shown)
        return text

    # -- start-up ---------------------------------------------------------------------------------------------------

    def load(self) -> Loaded:
        """Read every job folder back. Leftovers of a crash mid-submit or mid-delete are removed; a folder whose
        status.json is missing, a link or fails :meth:`Job.from_record` is set aside in ``.quarantine/``; jobs that
        were queued or running when the previous server died come back as ``failed`` (kind ``internal``), because
        their run was cut short at an unknown point — in memory only when the disk refuses the write (read-only or
        full), so the server still starts and serves what it can."""
        loaded = Loaded()
        for folder in sorted(self.jobs_dir.iterdir()):
            if folder.name.startswith((".incoming-", ".deleted-")):
                shutil.rmtree(folder, ignore_errors=True)  # left over from a crash mid-submit or mid-delete
                continue
            if not JOB_ID_RE.fullmatch(folder.name) or folder.is_symlink() or not folder.is_dir():
                continue  # a link named like a job is not followed: it could lead anywhere
            job = self._read(folder, loaded)
            if job is None:
                continue
            if job.state not in FINISHED and job.state != "review":  # a review waits on disk; the rest was cut short
                was = job.state
                job.state = "failed"
                job.error = error_dict("internal", f"the server stopped while this job was {was}; its run did not "
                                                   "finish", "submit the image again")
                if not self.save_quietly(job):
                    log.error("job %s was %s when the server stopped: reported failed, but its status.json still "
                              "says %s (the jobs folder refused the write)", job.id, was, was)
                self.log(job, f"found {was} after a restart: marked failed")
            if job.state in FINISHED:
                job.finished.set()
            job.size_bytes = folder_bytes(folder)
            loaded.jobs.append(job)
        if loaded.jobs:
            log.info("%d job(s) found in %s", len(loaded.jobs), self.jobs_dir)
        return loaded

    def _read(self, folder: Path, loaded: Loaded) -> Job | None:
        """The job of ``folder``, or None (a refused record is quarantined, an unreadable one left where it is)."""
        try:
            with open_regular_inside(folder, "status.json") as f:
                data = f.read()
        except FileNotFoundError:
            self._quarantine(folder, "status.json is missing, a link, has other hard links or is not a plain file",
                             loaded)
            return None
        except OSError as e:  # the disk failed to read it: nothing says the record is bad, so it stays in place
            log.warning("ignoring job folder %s: cannot read its status.json (%s)", folder, e)
            return None
        try:
            return Job.from_record(folder, json.loads(data.decode("utf-8")))
        except RecordError as e:
            self._quarantine(folder, f"status.json {e}", loaded)
        except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, or nested too deeply
            self._quarantine(folder, f"status.json is not valid JSON ({type(e).__name__}: {str(e)[:120]})", loaded)
        return None

    def _quarantine(self, folder: Path, why: str, loaded: Loaded) -> None:
        """Move a job folder with a refused record aside, so that it never reaches the worker or a client."""
        loaded.quarantined.append(folder.name)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        target = self.jobs_dir / QUARANTINE / f"{folder.name}-{stamp}"
        try:
            target.parent.mkdir(exist_ok=True)
            os.replace(folder, target)
        except OSError as e:
            log.error("job folder %s is ignored: its %s; it cannot be moved aside (%s)", folder, why, e)
            return
        log.warning("job folder %s set aside to %s: its %s", folder, target, why)

    # -- the size limit ---------------------------------------------------------------------------------------------

    def enforce_size_limit(self, jobs: dict[str, Job], limit: int | None) -> list[str]:
        """Delete the oldest finished, unpinned jobs while the jobs' folders total over ``limit`` bytes (None: no
        limit); the deleted ones leave ``jobs`` too. The newest job is always kept, so a single large result never
        deletes itself. A folder the disk refuses to remove is skipped (and logged). Returns the deleted ids."""
        if limit is None:
            return []
        total = sum(j.size_bytes for j in jobs.values())
        newest = max(jobs.values(), key=_age, default=None)
        deleted = []
        for job in sorted(jobs.values(), key=_age):
            if total <= limit:
                break
            if job.state not in FINISHED or job.pinned or job is newest:
                continue
            try:
                self.remove(job)
            except One2345Error as e:
                log.warning("size limit: cannot delete job %s: %s", job.id, e.message)
                continue
            del jobs[job.id]
            deleted.append(job.id)
            total -= job.size_bytes
            log.info("size limit (%d MB): deleted the oldest finished job %s (%d MB)", limit // 2**20, job.id,
                     job.size_bytes // 2**20)
        return deleted


def _age(job: Job) -> tuple[str, str]:
    return job.created, job.id


def _preview_order(name: str) -> tuple[int, ...]:
    """``input_256.png`` first, then the views by number: ``0.png``, ``0_0.png`` … ``0_3.png``, ``1.png`` …"""
    stem = name.removesuffix(".png")
    return (-1,) if stem == "input_256" else tuple(int(part) for part in stem.split("_"))


def _is_plain_file(path: Path) -> bool:
    """Whether ``path`` is a regular file, not through a link at its end (what :meth:`JobStore.open` would serve)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def preview_path(run_dir: Path, name: str) -> Path:
    """Where preview ``name`` lies in a run folder: ``input_256.png`` in it, the views in its ``views/``."""
    return run_dir / name if name == "input_256.png" else run_dir / "views" / name


def run_previews(run_dir: Path) -> list[str]:
    """The preview names a run folder holds, in order: ``input_256.png`` if present, then every view of
    ``views/`` named like one (:data:`VIEW_NAME_RE`), by number."""
    try:
        names = [n for n in os.listdir(run_dir / "views") if n != "input_256.png" and VIEW_NAME_RE.fullmatch(n)]
    except OSError:
        names = []
    names = [n for n in names if _is_plain_file(run_dir / "views" / n)]
    if _is_plain_file(run_dir / "input_256.png"):
        names.append("input_256.png")
    return sorted(names, key=_preview_order)


def existing_previews(run_dir: Path, names: Iterable[str]) -> list[str]:
    """``names`` less those whose file is gone from the run folder (ring 2 moved: its old views were deleted)."""
    return [n for n in names if _is_plain_file(preview_path(run_dir, n))]


def copy_run(source: Path, dest: Path, input_file: str) -> None:
    """Copy what a re-mesh needs from a job folder: the input, and of ``run/`` the preprocessed input, meta.json and
    the views with pose.json. Only plain files with the pipeline's names are read, never through a link (the source
    folder is not trusted more than any other).

    Raises:
        ApiError: conflict when the source lacks meta.json or pose.json.
    """
    names: Iterable[str] = [input_file, "run/input.png", "run/input_256.png", "run/meta.json", "run/views/pose.json"]
    with contextlib.suppress(OSError):  # no views folder: pose.json is then missing too, which is reported below
        names = [*names, *(f"run/views/{n}" for n in sorted(os.listdir(source / "run" / "views"))
                           if VIEW_NAME_RE.fullmatch(n))]
    for name in names:
        try:
            with open_regular_inside(source, name) as f:
                data = f.read()
        except FileNotFoundError:
            if name in ("run/meta.json", "run/views/pose.json"):
                raise ApiError("conflict", f"job {source.name} has no {name}, so it cannot be re-meshed",
                               fix="submit the image again") from None
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
