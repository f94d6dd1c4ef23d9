"""Every model weight file the server uses: where it lives on the hub, where it lives on disk, and how it gets there.

The four files are the ones One-2-3-45's ``download_ckpt.py`` fetches from the hub repo ``One-2-3-45/code`` (spec §1.1).
They are kept under one weights folder with the repo's relative paths, so the folder is a plain mirror of the repo:

    <weights dir>/sam_vit_h_4b8939.pth
    <weights dir>/zero123-xl.ckpt
    <weights dir>/elevation_estimate/utils/weights/indoor_ds_new.ckpt
    <weights dir>/SparseNeuS_demo_v1/exp/lod0/checkpoints/ckpt_215000.pth

Nothing here downloads implicitly: inference code calls :func:`resolve`, which fails with the exact command to run,
and only :func:`download` (behind ``one2345 weights download`` and the server's ``POST /v1/weights/download``) touches
the network.

State of a file (:func:`inspect_weights`): ``present``; ``partial`` (only a resumable ``.incomplete`` download);
``missing``; ``corrupt`` (its size differs from the exact size, or its SHA-256 from the reference one). The reference
SHA-256 is the table's, else the hub's ETag (the SHA-256 of an LFS file) recorded when this code downloaded the file.
Hashing 15 GB takes about a minute, so nothing hashes implicitly: a listing reports ``unchecked`` until
``verify=True``, and every digest computed (by a download or a verify) is kept in ``<weights dir>/.checksums.json``
keyed by the file's size and modification time (ns), so it is reused until the file changes.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import importlib
import json
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

from server.common.errors import BadInputError, CancelledError, CheckpointError, MissingWeightsError, StorageError
from server.common.fsutil import write_json_atomic

HUB_REPO_ID = "One-2-3-45/code"
HUB_REVISION = "main"
"""The repo has no tags; ``main`` is what ``download_ckpt.py`` fetches."""

WEIGHTS_DIR_ENV = "ONE2345_WEIGHTS"
PARTIAL_SUFFIX = ".incomplete"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HASH_CHUNK = 16 * 1024 * 1024
CHECKSUMS_FILE = ".checksums.json"
"""Digests computed so far, per local name: ``{"size", "mtime_ns", "sha256", "expected_sha256", "expected_size"}``."""
FREE_SPACE_MARGIN_BYTES = 256 * 2**20
"""Kept free on top of what a download needs, so the disk is not left full to the last byte."""
DEFAULT_ENDPOINT = "https://huggingface.co"
STATES = ("present", "partial", "missing", "corrupt")
_records_lock = threading.Lock()


@dataclass(frozen=True)
class WeightFile:
    """One weight file of the hub repo and its place in the local weights folder."""

    name: str
    """Short name used by the CLI (``--only <name>``) and by :func:`resolve`."""
    repo_id: str
    """Hub model repo that holds the file."""
    filename: str
    """Path of the file inside the repo (forward slashes)."""
    local_name: str
    """Path under the weights folder; the repo's relative path, so the folder mirrors the repo."""
    approx_size_bytes: int
    """Rough size, for disk-space hints and progress messages only (never used to validate a file)."""
    purpose: str
    """What the file is used for, in one line."""
    licence: str = "unknown"
    """Licence of the project the file comes from, as far as it is known (the hub repo states none)."""
    required: bool = True
    """The paper preset cannot load without it (SAM and LoFTR have weight-free fallbacks)."""
    size_bytes: int | None = None
    """Exact size when known: a file of another size is corrupt. The hub's size is recorded at download."""
    sha256: str | None = None
    """SHA-256 of the content when known; else the hub's ETag recorded at download is the reference."""
    derived_bytes: int = 0
    """Disk space the first model load writes next to it (the converted copy of Zero123), counted by the space
    check."""

    @property
    def download_command(self) -> str:
        """The CLI command that fetches exactly this file."""
        return f"one2345 weights download --only {self.name}"

    def source_url(self, endpoint: str | None = None) -> str:
        """Where the file is fetched from: ``<endpoint>/<repo>/resolve/<revision>/<file>``."""
        base = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        return f"{base}/{self.repo_id}/resolve/{quote(HUB_REVISION, safe='')}/{quote(self.filename)}"

    @property
    def expected_size(self) -> int:
        """The exact size when known, else the rough one."""
        return self.size_bytes if self.size_bytes is not None else self.approx_size_bytes


WEIGHT_FILES: tuple[WeightFile, ...] = (
    WeightFile(
        name="sam",
        repo_id=HUB_REPO_ID,
        filename="sam_vit_h_4b8939.pth",
        local_name="sam_vit_h_4b8939.pth",
        approx_size_bytes=2_564_550_879,
        purpose="Segment Anything ViT-H: foreground mask of the input image (spec §1.2)",
        licence="Apache-2.0 (Meta Segment Anything; identity of the hub copy unconfirmed)",
        required=False,
    ),
    WeightFile(
        name="zero123-xl",
        repo_id=HUB_REPO_ID,
        filename="zero123-xl.ckpt",
        local_name="zero123-xl.ckpt",
        approx_size_bytes=15_500_000_000,
        purpose="Zero123-XL Lightning checkpoint: novel-view diffusion, converted once to diffusers format (spec §2.1)",
        licence="MIT (Zero-1-to-3 release); fine-tuned from Stable Diffusion, whose model licence may also apply "
                "(unconfirmed)",
        derived_bytes=5_000_000_000,
    ),
    WeightFile(
        name="loftr",
        repo_id=HUB_REPO_ID,
        filename="elevation_estimate/utils/weights/indoor_ds_new.ckpt",
        local_name="elevation_estimate/utils/weights/indoor_ds_new.ckpt",
        approx_size_bytes=46_000_000,
        purpose="LoFTR indoor 'ds_new' matcher: elevation estimation (spec §4)",
        licence="Apache-2.0 (zju3dv LoFTR)",
        required=False,
    ),
    WeightFile(
        name="reconstruction",
        repo_id=HUB_REPO_ID,
        filename="SparseNeuS_demo_v1/exp/lod0/checkpoints/ckpt_215000.pth",
        local_name="SparseNeuS_demo_v1/exp/lod0/checkpoints/ckpt_215000.pth",
        approx_size_bytes=20_000_000,
        purpose="SparseNeuS-variant reconstruction network, iteration 215000 (spec §5.9); size is a guess",
        licence="Apache-2.0 (One-2-3-45)",
    ),
)
REGISTRY: dict[str, WeightFile] = {w.name: w for w in WEIGHT_FILES}


TABLE_ENV = "ONE2345_WEIGHTS_TABLE"
"""A JSON file replacing :data:`WEIGHT_FILES` in a server process: a test hook, so that clients (the add-on's
download flow) can be tested end to end against a stand-in hub serving small files."""


def install_table(path: Path) -> tuple[WeightFile, ...]:
    """Replace :data:`WEIGHT_FILES` and :data:`REGISTRY` with the table in ``path``: a JSON list of objects with
    ``name``, ``filename``, ``size_bytes`` and optionally ``required``, ``purpose``, ``licence``.

    Raises:
        BadInputError: the file is not such a table (naming the entry and key).
    """
    global WEIGHT_FILES, REGISTRY
    try:
        rows = json.loads(Path(path).read_text())
        files = tuple(WeightFile(name=str(r["name"]), repo_id=HUB_REPO_ID, filename=str(r["filename"]),
                                 local_name=str(r["filename"]), approx_size_bytes=int(r["size_bytes"]),
                                 size_bytes=int(r["size_bytes"]), purpose=str(r.get("purpose", "test file")),
                                 licence=str(r.get("licence", "test")), required=bool(r.get("required", True)))
                      for r in rows)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise BadInputError(f"${TABLE_ENV}={str(path)!r} is not a weights table ({type(e).__name__}: {e}); it must "
                            "be a JSON list of {name, filename, size_bytes[, required]}") from None
    WEIGHT_FILES, REGISTRY = files, {w.name: w for w in files}
    return files


def default_weights_dir() -> Path:
    """The weights folder: ``$ONE2345_WEIGHTS`` if set and non-empty, else ``~/.cache/one2345/weights``."""
    configured = os.environ.get(WEIGHTS_DIR_ENV, "").strip()
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "one2345" / "weights"


def weight_file(name: str) -> WeightFile:
    """The registry entry called ``name``; an unknown name raises BadInputError listing the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise BadInputError(
            f"unknown weight file {name!r}; known names: {', '.join(REGISTRY)}",
        ) from None


def resolve(name: str, weights_dir: str | os.PathLike[str] | None = None) -> Path:
    """The on-disk path of weight file ``name``, which must already be downloaded.

    Raises:
        BadInputError: ``name`` is not in the registry.
        MissingWeightsError: the file is absent; the message names the file and the folder searched, the fix is the
            download command.
    """
    entry = weight_file(name)
    root = Path(weights_dir).expanduser() if weights_dir is not None else default_weights_dir()
    path = root / entry.local_name
    if path.is_file():
        return path
    raise MissingWeightsError(
        f"weight file {entry.name!r} ({entry.local_name}, ~{_human_size(entry.approx_size_bytes)}) not found in "
        f"{root} (looked for {path})",
        fix=_fix_for([entry], root),
    )


@dataclass(frozen=True)
class DownloadProgress:
    """One report of :func:`download` (many per second while bytes flow)."""

    file: str
    """Registry name of the file being fetched."""
    phase: str
    """``downloading`` or ``verifying`` (hashing the finished file)."""
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
) -> dict[str, Path]:
    """Fetch weight files from the hub into the weights folder, skipping those already present.

    Stages: (1) decide what to fetch: absent files and files known to be corrupt (:func:`inspect_weights` without
    hashing); (2) one metadata request per file, so that sizes are known before any byte moves; (3) the free-space
    check; (4) the transfers, one file after another.

    Each file is streamed into ``<local path>.<etag>.incomplete`` and renamed into place only when complete and, for
    LFS files (whose ETag is the SHA-256 of the content), only when the hash matches; the hash is then recorded in
    :data:`CHECKSUMS_FILE`. An interrupted or cancelled download leaves the partial file behind and the next call
    resumes it with an HTTP ``Range`` request.

    This uses huggingface_hub's metadata and transfer helpers (``get_hf_file_metadata``, ``http_get``) rather than
    ``hf_hub_download``: recent huggingface_hub releases (the 2.x this project runs on included) make it write to a
    per-process temporary file that is deleted on failure, so a 15 GB download stopped at 90 % would restart at zero.

    Args:
        names: registry names to fetch; None fetches all of :data:`WEIGHT_FILES`.
        weights_dir: destination folder; None uses :func:`default_weights_dir`.
        offline: never touch the network (also implied by ``HF_HUB_OFFLINE=1``); absent files raise.
        endpoint: hub base URL (a mirror); None uses ``HF_ENDPOINT`` (read now) or https://huggingface.co.
        progress: show a progress bar per file on stderr (ignored when ``on_progress`` is given).
        token: hub token sent as ``Authorization: Bearer``; None uses ``HF_TOKEN`` or the saved login.
        on_progress: called with a :class:`DownloadProgress` for every chunk received and at each phase change.
        should_cancel: polled for every chunk; when it returns True the download stops with CancelledError and the
            partial file is kept for a resume.

    Returns:
        name → path of every requested file.

    Raises:
        BadInputError: an unknown name.
        MissingWeightsError: offline with files absent, or the hub could not be reached / does not have the file.
        CheckpointError: a downloaded file does not match the hub's size or SHA-256 (the partial file is deleted).
        StorageError: the disk has less free space than the files still to fetch need (nothing was downloaded).
        CancelledError: ``should_cancel`` returned True.
    """
    entries = [weight_file(n) for n in names] if names is not None else list(WEIGHT_FILES)
    root = Path(weights_dir).expanduser() if weights_dir is not None else default_weights_dir()
    offline = offline or _env_offline()
    cancelled = should_cancel or (lambda: False)

    # 1. What to fetch.
    paths: dict[str, Path] = {}
    todo: list[WeightFile] = []
    records = _read_records(root)
    for entry in entries:
        path = root / entry.local_name
        if path.is_file() and _state_of(entry, root, records, verify=False).state != "corrupt":
            paths[entry.name] = path
        else:
            todo.append(entry)
    if todo and offline:
        listing = ", ".join(f"{e.name!r} ({e.local_name})" for e in todo)
        raise MissingWeightsError(
            f"offline mode (offline=True or HF_HUB_OFFLINE=1) and weight files missing from {root}: {listing}",
            fix=_fix_for(todo, root, offline_hint=True),
        )
    if not todo:
        return paths

    # 2. What the hub holds.
    remotes: list[_Remote] = []
    for entry in todo:
        if cancelled():
            raise CancelledError("the weights download was cancelled")
        remotes.append(_remote(entry, root / entry.local_name, endpoint=endpoint, token=token))

    # 3. Room for it.
    check_free_space(root, sum(r.needed_bytes for r in remotes))

    # 4. The transfers.
    report = _Tally(remotes, on_progress)
    for remote in remotes:
        paths[remote.entry.name] = _transfer(remote, root, token=token, progress=progress, tally=report,
                                             should_cancel=cancelled)
    return {e.name: paths[e.name] for e in entries}


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

    @property
    def total(self) -> int:
        return self.size if self.size is not None else self.entry.expected_size

    @property
    def needed_bytes(self) -> int:
        return max(self.total - self.resume, 0) + self.entry.derived_bytes


def _remote(entry: WeightFile, path: Path, *, endpoint: str | None, token: str | None) -> _Remote:
    """Ask the hub about one file (a HEAD request); drop partial downloads of another remote version."""
    from huggingface_hub import get_hf_file_metadata

    # Built here rather than with hf_hub_url, whose URL template freezes HF_ENDPOINT at import time.
    url = entry.source_url(endpoint)
    try:
        meta = get_hf_file_metadata(url, token=token, endpoint=endpoint)
    except _transport_errors() as exc:
        raise MissingWeightsError(
            f"could not get {entry.filename!r} of {entry.repo_id} from {url}: {exc}",
            fix=f"check the network (or HF_ENDPOINT), then run `{entry.download_command}`, "
            f"or place the file at {path} yourself",
        ) from exc
    if meta.etag is None:
        raise MissingWeightsError(f"{url} answered without an ETag; it does not look like a Hugging Face hub endpoint")

    etag = meta.etag  # already unquoted by huggingface_hub
    partial = path.with_name(f"{path.name}.{re.sub(r'[^0-9A-Za-z_-]', '_', etag)}{PARTIAL_SUFFIX}")
    # A partial file of another remote version cannot be resumed: its bytes belong to a different file.
    for stale in _partials(path):
        if stale != partial:
            stale.unlink()
    resume = partial.stat().st_size if partial.exists() else 0
    if meta.size is not None and resume > meta.size:
        partial.unlink()
        resume = 0
    return _Remote(entry=entry, path=path, url=url, location=meta.location, etag=etag, size=meta.size,
                   partial=partial, resume=resume)


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

    def emit(self, remote: _Remote, phase: str) -> None:
        if self.callback is not None:
            self.callback(DownloadProgress(
                file=remote.entry.name, phase=phase, file_done=self.on_disk[remote.entry.name],
                file_total=remote.size, done=sum(self.on_disk.values()), total=sum(self.totals.values()),
                transferred=self.transferred, files_done=self.files_done, files_total=len(self.totals)))


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
    """Download one file through its resumable ``.incomplete`` file; returns its final path."""
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

    expected = entry.sha256 or (remote.etag if _SHA256.match(remote.etag) else None)
    digest = None
    if expected is not None:
        tally.emit(remote, "verifying")
        digest = _sha256(partial, should_cancel)
        if digest != expected:
            partial.unlink()
            raise CheckpointError(
                f"downloaded {entry.filename!r} has SHA-256 {digest} but the hub says {expected}; partial file deleted",
                fix=f"run `{entry.download_command}` again",
            )
    os.replace(partial, path)
    _record(root, entry, path, sha256=digest, expected_sha256=expected, expected_size=remote.size)
    tally.files_done += 1
    tally.emit(remote, "done")
    return path


def check_free_space(root: Path, needed: int) -> None:
    """Refuse (StorageError) when the disk of ``root`` has less than ``needed`` bytes (+ a margin) free.

    ``root`` need not exist yet: the disk is that of its nearest existing parent.
    """
    probe = Path(root).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed + FREE_SPACE_MARGIN_BYTES > free:
        raise StorageError(
            f"not enough free disk space for the weights: {_human_size(needed)} ({needed:,} bytes) needed plus a "
            f"{_human_size(FREE_SPACE_MARGIN_BYTES)} margin, {_human_size(free)} ({free:,} bytes) free on the disk "
            "of the weights folder",
            fix=f"free at least {_human_size(needed + FREE_SPACE_MARGIN_BYTES - free)} on that disk, or point "
            f"{WEIGHTS_DIR_ENV} (the server's --weights-dir) at a folder on a larger disk",
        )


# -- inspection ---------------------------------------------------------------------------------------------------


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
    """present | partial | missing | corrupt."""
    bytes_on_disk: int
    """Size of the file, or of its partial download; 0 when missing."""
    expected_bytes: int
    size_exact: bool
    """Whether ``expected_bytes`` is the exact size (from the table or the hub) or a rough one."""
    checksum: str | None
    """verified | mismatch | unchecked (a reference exists, the file was not hashed yet) | unavailable (no
    reference SHA-256 is known); None when the file is not there."""
    problem: str | None = None
    """Why the file is corrupt, in one sentence."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def inspect_weights(
    weights_dir: str | os.PathLike[str] | None = None,
    *,
    verify: bool = False,
    endpoint: str | None = None,
    names: Iterable[str] | None = None,
) -> list[FileState]:
    """The state of every weight file (or of ``names``) in the weights folder, in table order.

    Only ``stat`` calls unless ``verify``: then every present file with a reference SHA-256 and no digest for its
    current size and modification time is hashed (about a minute for 15 GB) and the digest recorded.
    """
    root = Path(weights_dir).expanduser() if weights_dir is not None else default_weights_dir()
    entries = [weight_file(n) for n in names] if names is not None else list(WEIGHT_FILES)
    records = _read_records(root)
    return [_state_of(entry, root, records, verify=verify, endpoint=endpoint) for entry in entries]


def missing_bytes(states: Iterable[FileState]) -> int:
    """Bytes still to download for the files that are not present (partial downloads count what is left)."""
    total = 0
    for s in states:
        if s.state == "partial":
            total += max(s.expected_bytes - s.bytes_on_disk, 0)
        elif s.state != "present":
            total += s.expected_bytes
    return total


def _state_of(entry: WeightFile, root: Path, records: dict[str, Any], *, verify: bool,
              endpoint: str | None = None) -> FileState:
    path = root / entry.local_name
    record = records.get(entry.local_name) or {}
    exact = entry.size_bytes if entry.size_bytes is not None else record.get("expected_size")
    reference = entry.sha256 or record.get("expected_sha256")
    base = {"name": entry.name, "filename": entry.filename, "purpose": entry.purpose, "required": entry.required,
            "licence": entry.licence, "source": entry.source_url(endpoint),
            "expected_bytes": exact if exact is not None else entry.approx_size_bytes, "size_exact": exact is not None}
    try:
        st = path.stat()
    except FileNotFoundError:
        st = None
    if st is None or not path.is_file():
        partial = max((p.stat().st_size for p in _partials(path)), default=None)
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
        digest = _sha256(path)
        _record(root, entry, path, sha256=digest, expected_sha256=record.get("expected_sha256"),
                expected_size=record.get("expected_size"))
    if digest is None:
        return FileState(**base, state="present", bytes_on_disk=st.st_size, checksum="unchecked")
    if digest != reference:
        return FileState(**base, state="corrupt", bytes_on_disk=st.st_size, checksum="mismatch",
                         problem=f"its SHA-256 is {digest}, the reference is {reference}")
    return FileState(**base, state="present", bytes_on_disk=st.st_size, checksum="verified")


def _partials(path: Path) -> list[Path]:
    """Partial downloads of ``path`` (one per remote version it was fetched from)."""
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(f"{glob.escape(path.name)}.*{PARTIAL_SUFFIX}"))


def _read_records(root: Path) -> dict[str, Any]:
    """The checksum records of ``root`` (empty when absent or unreadable: they are a cache, never the truth)."""
    try:
        data = json.loads((root / CHECKSUMS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _record(root: Path, entry: WeightFile, path: Path, *, sha256: str | None, expected_sha256: str | None,
            expected_size: int | None) -> None:
    """Remember what is known of ``path`` now (its digest for its current size and mtime, the hub's hash and size).
    A cache that cannot be written costs only a re-hash later."""
    st = path.stat()
    with _records_lock:
        records = _read_records(root)
        records[entry.local_name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256,
                                     "expected_sha256": expected_sha256, "expected_size": expected_size}
        with contextlib.suppress(OSError):
            write_json_atomic(root / CHECKSUMS_FILE, records)


def _sha256(path: Path, should_cancel: Callable[[], bool] | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            if should_cancel is not None and should_cancel():
                raise CancelledError("the weights download was cancelled while its last file was being verified")
            digest.update(chunk)
    return digest.hexdigest()


def _env_offline() -> bool:
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


def _fix_for(entries: list[WeightFile], root: Path, *, offline_hint: bool = False) -> str:
    """The shell command that fetches ``entries`` into ``root`` (env prefix only when ``root`` is not the default)."""
    command = " && ".join(e.download_command for e in entries)
    if root != default_weights_dir():
        command = " && ".join(f"{WEIGHTS_DIR_ENV}={root} {e.download_command}" for e in entries)
    hint = f"run `{command}`"
    if offline_hint:
        hint += " with network access (unset HF_HUB_OFFLINE)"
    return hint + f", or copy the file(s) into {root} under the same relative path"


def _human_size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"
