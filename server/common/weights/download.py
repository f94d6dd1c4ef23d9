"""Fetching weight files from the hub: :func:`download` (resumable, verified, with progress), :func:`require` (the
one error listing every unusable file), and the messages that name what is missing and the command that fetches it.

Hashing goes through ``integrity.sha256_file`` looked up at call time, so that a patched one is seen here too.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from server.common.errors import CancelledError, CheckpointError, MissingWeightsError
from server.common.weights import integrity
from server.common.weights.integrity import (
    FileState,
    check_free_space,
    inspect_weights,
    partial_downloads,
    read_records,
    record_digest,
    state_of,
)
from server.common.weights.table import (
    PARTIAL_SUFFIX,
    SHA256_HEX,
    WeightFile,
    default_weights_dir,
    expand_names,
    fix_for,
    human_size,
    select_entries,
    weight_file,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DownloadProgress:
    """One report of :func:`download` or :func:`import_weights` (many per second while bytes flow)."""

    file: str
    """Registry name of the file being fetched (or imported)."""
    phase: str
    """``checking`` (hashing a file already present, to see whether it is whole), ``downloading``, ``verifying``
    (hashing the finished file), ``copying`` (an import), ``done`` (this file is in place)."""
    file_done: int
    """Bytes of this file on disk (the resumed part included)."""
    file_total: int | None
    """Its size on the hub (None when the hub did not say)."""
    done: int
    """Bytes on disk of every file this download fetches."""
    total: int
    """Their total size (a file of unknown size counts with its rough size)."""
    transferred: int
    """Bytes received over the network by this call (what a rate is computed from)."""
    files_done: int
    files_total: int
    hashed: int = 0
    """Bytes of this file hashed so far (phases ``checking`` and ``verifying``; of ``file_total``)."""


ProgressCallback = Callable[[DownloadProgress], None]


def download(
    names: Iterable[str] | None = None,
    weights_dir: str | os.PathLike[str] | None = None,
    *,
    offline: bool = False,
    endpoint: str | None = None,
    progress: bool = True,
    token: str | None = None,
    on_progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    verify: bool = True,
) -> dict[str, Path]:
    """Fetch weight files from the hub into the weights folder, skipping those present and whole.

    Stages: (1) decide what to fetch: absent files and damaged ones (:func:`inspect_weights`; with ``verify`` a
    present file not hashed since it last changed is hashed first, once); (2) one metadata request per file, so that
    sizes are known before any byte moves; (3) the free-space check; (4) the transfers, one file after another.

    Each file is streamed into ``<local path>.<etag>.incomplete``; the whole file (a resumed one too) is then checked
    against the reference size and SHA-256 (the hub's: the ETag of an LFS/Xet file is its SHA-256; else the table's
    pin) and only then renamed into place, replacing a damaged file of that name; the hash is recorded in
    :data:`CHECKSUMS_FILE`. An interrupted or cancelled download leaves the partial file behind and the next call
    resumes it with an HTTP ``Range`` request. A file missing on the hub is looked for at its
    :attr:`WeightFile.fallback_filenames`.

    This uses huggingface_hub's metadata and transfer helpers (``get_hf_file_metadata``, ``http_get``) rather than
    ``hf_hub_download``: recent huggingface_hub releases (the 2.x this project runs on included) make it write to a
    per-process temporary file that is deleted on failure, so a 15 GB download stopped at 90 % would restart at zero.

    Args:
        names: registry names (or group names, see :func:`expand_names`) to fetch; None fetches every file of
            :data:`WEIGHT_FILES` but the on-demand ones (the text-to-image model).
        weights_dir: destination folder; None uses :func:`default_weights_dir`.
        offline: never touch the network (also implied by ``HF_HUB_OFFLINE=1``); absent files raise.
        endpoint: hub base URL (a mirror); None uses ``HF_ENDPOINT`` (read now) or https://huggingface.co.
        progress: show a progress bar per file on stderr (ignored when ``on_progress`` is given).
        token: hub token sent as ``Authorization: Bearer``; None uses ``HF_TOKEN`` or the saved login.
        on_progress: called with a :class:`DownloadProgress` for every chunk received or hashed and at each phase
            change.
        should_cancel: polled for every chunk; when it returns True the download stops with CancelledError and the
            partial file is kept for a resume.
        verify: hash present files whose digest is not known yet (cached by size and mtime), so that a damaged file
            of the right size is fetched again too.

    Returns:
        name → path of every requested file.

    Raises:
        BadInputError: an unknown name.
        MissingWeightsError: offline with files absent or damaged, or the hub could not be reached / does not have
            a file; the message lists every file still to fetch and the one command that fetches them.
        CheckpointError: a downloaded file does not match the reference size or SHA-256 (the partial file is
            deleted; a damaged file it was to replace stays).
        StorageError: the disk has less free space than the files still to fetch need (nothing was downloaded).
        CancelledError: ``should_cancel`` returned True.
    """
    entries = select_entries(names, on_demand=False)
    root = Path(weights_dir).expanduser() if weights_dir is not None else default_weights_dir()
    offline = offline or env_offline()
    cancelled = should_cancel or (lambda: False)

    # 1. What to fetch.
    paths: dict[str, Path] = {}
    todo: list[tuple[WeightFile, FileState]] = []
    records = read_records(root)
    for entry in entries:
        on_hash = None
        if on_progress is not None:
            def on_hash(done: int, total: int, name: str = entry.name) -> None:
                on_progress(DownloadProgress(file=name, phase="checking", file_done=total, file_total=total, done=0,
                                             total=0, transferred=0, files_done=0, files_total=len(entries),
                                             hashed=done))
        state = state_of(entry, root, records, verify=verify, on_hash=on_hash, should_cancel=cancelled)
        if state.state == "present":
            paths[entry.name] = root / entry.local_name
        else:
            todo.append((entry, state))
    if todo and offline:
        raise MissingWeightsError(
            f"offline (--offline or HF_HUB_OFFLINE=1), and weight files are missing or damaged in {root}: "
            f"{describe_states(s for _, s in todo)}",
            fix=fix_for([e for e, _ in todo], root, offline_hint=True),
        )
    if not todo:
        return paths

    # 2. What the hub holds.
    remotes: list[_Remote] = []
    for entry, _ in todo:
        if cancelled():
            raise CancelledError("the weights download was cancelled")
        try:
            remotes.append(_remote(entry, root / entry.local_name, endpoint=endpoint, token=token))
        except MissingWeightsError as e:  # one message with every file still to fetch and one command for all
            raise MissingWeightsError(f"{e.message}; still to fetch: {describe_states(s for _, s in todo)}",
                                      fix=fix_for([e for e, _ in todo], root, network_hint=True)) from e

    # 3. Room for it.
    check_free_space(root, sum(r.needed_bytes for r in remotes))

    # 4. The transfers.
    report = _Tally(remotes, on_progress)
    for i, remote in enumerate(remotes):
        try:
            paths[remote.entry.name] = _transfer(remote, root, token=token, progress=progress, tally=report,
                                                 should_cancel=cancelled)
        except MissingWeightsError as e:
            left = [r.entry for r in remotes[i:]]
            raise MissingWeightsError(e.message, fix=fix_for(left, root, network_hint=True)
                                      + " (it resumes from the partial file)") from e
    return {e.name: paths[e.name] for e in entries}


def require(names: Iterable[str], weights_dir: str | os.PathLike[str] | None = None, *,
            optional: Iterable[str] = (), purpose: str = "this run") -> dict[str, Path]:
    """The paths of the weight files ``names``, each present and not known to be damaged (a stat each, no hash).

    Raises:
        MissingWeightsError: ONE error for every file of ``names`` that is missing, partly downloaded or damaged,
            mentioning the ``optional`` files that are absent too, whose fix is the one command that fetches them
            all.
    """
    root = Path(weights_dir).expanduser() if weights_dir is not None else default_weights_dir()
    needed = expand_names(names)
    extra = [n for n in expand_names(optional) if n not in needed]
    states = inspect_weights(root, names=[*needed, *extra])
    absent = [s for s in states if s.name in needed and s.state != "present"]
    if not absent:
        return {n: root / weight_file(n).local_name for n in needed}
    also = [s for s in states if s.name in extra and s.state != "present"]
    message = f"{purpose} needs weight files that are not usable in {root}: {describe_states(absent)}"
    if also:
        message += f"; also absent (optional, a weight-free fallback is used): {describe_states(also)}"
    raise MissingWeightsError(message, fix=fix_for([weight_file(s.name) for s in (*absent, *also)], root))


@dataclass(frozen=True)
class _Remote:
    """One file as the hub describes it, and the local partial download it continues."""

    entry: WeightFile
    path: Path
    url: str
    location: str
    """Where the bytes are (the resolve URL, or the CDN URL it redirects to)."""
    etag: str
    size: int | None
    partial: Path
    resume: int
    """Bytes already in ``partial``."""
    expected_sha256: str | None = None
    """The reference SHA-256: the hub's ETag when it is one (LFS/Xet files), else the table's pin."""
    expected_size: int | None = None
    """The reference size: the hub's, else the table's pin."""

    @property
    def total(self) -> int:
        return self.size if self.size is not None else self.entry.expected_size

    @property
    def needed_bytes(self) -> int:
        return max(self.total - self.resume, 0) + self.entry.derived_bytes


def _remote(entry: WeightFile, path: Path, *, endpoint: str | None, token: str | None) -> _Remote:
    """Ask the hub about one file (a HEAD request; the fallback paths when it is not there); drop partial downloads
    of another remote version; settle the reference size and hash (the hub's, logging a disagreeing pin)."""
    from huggingface_hub import get_hf_file_metadata
    from huggingface_hub.errors import EntryNotFoundError

    tried: list[str] = []
    meta = None
    for filename in (entry.filename, *entry.fallback_filenames):
        # Built here rather than with hf_hub_url, whose URL template freezes HF_ENDPOINT at import time.
        url = entry.source_url(endpoint, filename)
        try:
            meta = get_hf_file_metadata(url, token=token, endpoint=endpoint)
            break
        except EntryNotFoundError:
            tried.append(url)
        except _transport_errors() as exc:
            raise MissingWeightsError(f"could not get {filename!r} of {entry.repo_id} from {url}: {exc}",
                                      fix=f"check the network (or HF_ENDPOINT), then run `{entry.download_command}`, "
                                          f"or place the file at {path} yourself") from exc
    if meta is None:
        raise MissingWeightsError(f"{entry.repo_id} on the hub has no {entry.filename!r} (looked at "
                                  f"{', '.join(tried)})",
                                  fix=f"check HF_ENDPOINT, or place the file at {path} yourself")
    if tried:
        log.info("%s is not at %s on the hub; using its earlier place %s", entry.name, entry.filename, url)
    if meta.etag is None:
        raise MissingWeightsError(f"{url} answered without an ETag; it does not look like a Hugging Face hub endpoint")

    etag = meta.etag  # already unquoted by huggingface_hub
    hub_sha256 = etag.lower() if SHA256_HEX.match(etag.lower()) else None
    if entry.size_bytes is not None and meta.size is not None and meta.size != entry.size_bytes:
        log.warning("the hub's %s has %d bytes, the table's pin %d: the hub's size is used", entry.filename,
                    meta.size, entry.size_bytes)
    if entry.sha256 is not None and hub_sha256 is not None and hub_sha256 != entry.sha256:
        log.warning("the hub's %s has SHA-256 %s (its ETag), the table's pin %s: the hub's is used", entry.filename,
                    hub_sha256, entry.sha256)
    # A pin describes the file of the pinned size; a hub file of another size is another version.
    pin_applies = entry.size_bytes is None or meta.size is None or meta.size == entry.size_bytes
    expected_sha256 = hub_sha256 or (entry.sha256 if pin_applies else None)
    expected_size = meta.size if meta.size is not None else entry.size_bytes

    partial = path.with_name(f"{path.name}.{re.sub(r'[^0-9A-Za-z_-]', '_', etag)}{PARTIAL_SUFFIX}")
    # A partial file of another remote version cannot be resumed: its bytes belong to a different file.
    for stale in partial_downloads(path):
        if stale != partial:
            stale.unlink()
    resume = partial.stat().st_size if partial.exists() else 0
    if meta.size is not None and resume > meta.size:
        partial.unlink()
        resume = 0
    return _Remote(entry=entry, path=path, url=url, location=meta.location, etag=etag, size=meta.size,
                   partial=partial, resume=resume, expected_sha256=expected_sha256, expected_size=expected_size)


class _Tally:
    """Turns per-chunk byte counts of the file being fetched into :class:`DownloadProgress` reports."""

    def __init__(self, remotes: list[_Remote], callback: ProgressCallback | None) -> None:
        self.callback = callback
        self.totals = {r.entry.name: r.total for r in remotes}
        self.on_disk = {r.entry.name: r.resume for r in remotes}
        self.transferred = 0
        self.files_done = 0

    def add(self, remote: _Remote, n: int, phase: str = "downloading") -> None:
        name = remote.entry.name
        self.on_disk[name] += n
        self.transferred += n
        self.emit(remote, phase)

    def emit(self, remote: _Remote, phase: str, hashed: int = 0) -> None:
        if self.callback is not None:
            self.callback(DownloadProgress(
                file=remote.entry.name, phase=phase, file_done=self.on_disk[remote.entry.name],
                file_total=remote.size, done=sum(self.on_disk.values()), total=sum(self.totals.values()),
                transferred=self.transferred, files_done=self.files_done, files_total=len(self.totals),
                hashed=hashed))


class _ChunkReporter:
    """Stands in for the tqdm bar that ``http_get`` updates once per chunk, just before writing it: a cancellation
    raised here loses only that chunk, and the partial file stays a clean prefix of the remote one."""

    def __init__(self, on_bytes: Callable[[int], None], should_cancel: Callable[[], bool], **_: Any) -> None:
        self.on_bytes = on_bytes
        self.should_cancel = should_cancel

    def __enter__(self) -> _ChunkReporter:
        return self

    def __exit__(self, *_: object) -> None:
        return None

    def update(self, n: int) -> None:
        if self.should_cancel():
            raise CancelledError("the weights download was cancelled")
        self.on_bytes(n)

    def close(self) -> None:
        return None


def _transfer(remote: _Remote, root: Path, *, token: str | None, progress: bool, tally: _Tally,
              should_cancel: Callable[[], bool]) -> Path:
    """Download one file through its resumable ``.incomplete`` file, verify the whole of it, move it into place;
    returns its final path."""
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers
    from tqdm.auto import tqdm

    entry, path, partial = remote.entry, remote.path, remote.partial
    path.parent.mkdir(parents=True, exist_ok=True)
    headers = build_hf_headers(token=token)
    if urlparse(remote.location).netloc != urlparse(remote.url).netloc:
        headers.pop("authorization", None)  # signed CDN URLs reject (and must not receive) the hub token
    if tally.callback is not None:
        tqdm_class: Any = functools.partial(_ChunkReporter, functools.partial(tally.add, remote), should_cancel)
    else:
        tqdm_class = None if progress else functools.partial(tqdm, disable=True)
    tally.emit(remote, "downloading")
    try:
        with partial.open("ab") as sink:
            http_get(
                remote.location,
                sink,
                resume_size=remote.resume,
                headers=headers,
                expected_size=remote.size,
                displayed_filename=entry.filename,
                tqdm_class=tqdm_class,
            )
    except _transport_errors() as exc:
        raise MissingWeightsError(
            f"download of {entry.filename!r} from {remote.location} stopped: {exc}; "
            f"{partial.stat().st_size if partial.exists() else 0} bytes kept in {partial}",
            fix=f"run `{entry.download_command}` again; it resumes from the partial file",
        ) from exc

    # The whole file is checked, not the bytes of this call: a resumed download must be whole too.
    size = partial.stat().st_size
    if remote.expected_size is not None and size != remote.expected_size:
        partial.unlink()
        raise CheckpointError(
            f"downloaded {entry.filename!r} has {size:,} bytes but the hub's file has {remote.expected_size:,}; "
            "partial file deleted", fix=f"run `{entry.download_command}` again")
    digest = None
    if remote.expected_sha256 is not None:
        tally.emit(remote, "verifying")
        digest = integrity.sha256_file(partial, should_cancel, lambda done: tally.emit(remote, "verifying", done))
        if digest != remote.expected_sha256:
            partial.unlink()
            raise CheckpointError(
                f"downloaded {entry.filename!r} has SHA-256 {digest} but the hub says {remote.expected_sha256}; "
                "partial file deleted", fix=f"run `{entry.download_command}` again")
    os.replace(partial, path)  # only now does a damaged file of that name go
    record_digest(root, entry, path, sha256=digest, hub=(remote.expected_size, remote.expected_sha256))
    tally.files_done += 1
    tally.emit(remote, "done")
    return path


def env_offline() -> bool:
    """HF_HUB_OFFLINE read now (huggingface_hub reads it once at import time)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the hub could not deliver": OSError (hub HTTP errors, offline mode, disk) and the HTTP
    client's own base error, which huggingface_hub does not wrap (``httpx2`` in 1.x+, ``httpx`` before)."""
    errors: list[type[BaseException]] = [OSError]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module).HTTPError)
        except ImportError:
            continue
    return tuple(errors)


def describe_states(states: Iterable[FileState]) -> str:
    """``name (file, ~size, what is wrong)`` for each state, comma-separated."""
    words = {"missing": "missing", "partial": "partly downloaded", "corrupt": "damaged"}
    return ", ".join(f"{s.name} ({s.filename}, ~{human_size(s.expected_bytes)}, {words.get(s.state, s.state)}"
                     + (f": {s.problem}" if s.problem else "") + ")" for s in states)
