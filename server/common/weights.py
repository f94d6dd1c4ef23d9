"""Every model weight file the server uses: where it lives on the hub, where it lives on disk, and how it gets there.

The four files are the ones One-2-3-45's ``download_ckpt.py`` fetches from the hub repo ``One-2-3-45/code`` (spec §1.1).
They are kept under one weights folder with the repo's relative paths, so the folder is a plain mirror of the repo:

    <weights dir>/sam_vit_h_4b8939.pth
    <weights dir>/zero123-xl.ckpt
    <weights dir>/elevation_estimate/utils/weights/indoor_ds_new.ckpt
    <weights dir>/SparseNeuS_demo_v1/exp/lod0/checkpoints/ckpt_215000.pth

The text-to-image model (``SimianLuo/LCM_Dreamshaper_v7``, the diffusers folder ``server.stages.text_to_image``
loads) is a group of optional, on-demand files under ``<weights dir>/text-to-image/`` with that repo's relative paths:
listed with the others, fetched only by name (``--only text-to-image``) or when text input is first used.

Nothing here downloads implicitly: inference code calls :func:`resolve`, which fails with the exact command to run,
and only :func:`download` (behind ``one2345 weights download`` and the server's ``POST /v1/weights/download``) touches
the network.

State of a file (:func:`inspect_weights`): ``present``; ``partial`` (only a resumable ``.incomplete`` download);
``missing``; ``corrupt`` (damaged: its size differs from the exact size, or its SHA-256 from the reference one).

The reference size and SHA-256 are the hub's as recorded when this code downloaded the file (the ETag of an LFS or
Xet file is the SHA-256 of its content), else the table's pins. The pins come from mirrors of the same files; where
the hub disagrees at download time the hub wins and the disagreement is logged. Hashing 15 GB takes about a minute, so
a listing never hashes unasked (it reports ``unchecked``); ``one2345 weights verify --all``, ``weights download``
and :func:`import_weights` do, and every digest computed is kept in ``<weights dir>/.checksums.json`` keyed by the
file's size and modification time (ns), so it is reused until the file changes.

A damaged file is fetched again through a temporary ``.incomplete`` file and replaces the old one only once the new
one is whole and verified. :func:`import_weights` takes the files from an official One-2-3-45 checkout (or a folder
holding them), verifies them and hard-links, reflinks or copies them into place.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import importlib
import json
import logging
import os
import re
import shlex
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
HUB_CARD_LICENCE = "MIT"
"""The licence the hub repo's model card declares for the repo as a whole."""
_records_lock = threading.Lock()
log = logging.getLogger(__name__)


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
    """Licence as declared by the hub repo's card, and that of the project the file comes from where it differs."""
    required: bool = True
    """The paper preset cannot load without it (SAM and LoFTR have weight-free fallbacks)."""
    size_bytes: int | None = None
    """Exact size when known (a pin from a mirror): a file of another size is corrupt. The hub's size, recorded at
    download, wins over it."""
    sha256: str | None = None
    """SHA-256 of the content when known (a pin); the hub's ETag recorded at download wins over it."""
    derived_bytes: int = 0
    """Disk space the first model load writes beside it and keeps (the converted copy of Zero123: the checkpoint
    stays too), counted by the space check and the disk estimate."""
    fallback_filenames: tuple[str, ...] = ()
    """Earlier paths of the file in the hub repo, tried in order when ``filename`` is not there (a free fallback)."""
    import_paths: tuple[str, ...] = ()
    """Where an official One-2-3-45 checkout (or an older layout of it) keeps the file, relative to its root;
    :func:`import_weights` also looks for ``local_name`` and for the bare file name."""
    group: str | None = None
    """Files fetched and loaded together (one diffusers folder, ``<weights dir>/<group>/``): a name that
    :func:`expand_names` turns into all of them (``--only text-to-image``)."""
    on_demand: bool = False
    """Fetched only when its feature is first used (text input): a plain ``weights download`` (no names) and an
    import leave it out; it is listed like every file."""

    @property
    def download_command(self) -> str:
        """The CLI command that fetches exactly this file."""
        return f"one2345 weights download --only {self.name}"

    def source_url(self, endpoint: str | None = None, filename: str | None = None) -> str:
        """Where the file is fetched from: ``<endpoint>/<repo>/resolve/<revision>/<file>`` (``filename``: one of
        :attr:`fallback_filenames` instead)."""
        base = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        return f"{base}/{self.repo_id}/resolve/{quote(HUB_REVISION, safe='')}/{quote(filename or self.filename)}"

    @property
    def import_candidates(self) -> tuple[str, ...]:
        """Relative paths :func:`import_weights` tries, in order: this project's layout (the hub's), the reference's
        local layout and older ones, then the bare file name (a flat folder of the four files)."""
        return tuple(dict.fromkeys((self.local_name, *self.import_paths, self.filename.rsplit("/", 1)[-1])))

    @property
    def expected_size(self) -> int:
        """The exact size when known, else the rough one."""
        return self.size_bytes if self.size_bytes is not None else self.approx_size_bytes


WEIGHT_FILES: tuple[WeightFile, ...] = (
    # Sizes and SHA-256 pins: the published values of mirrors of the same files (issue #25); the hub's ETag is the
    # authority at download time. ckpt_215000.pth has no public pin: the hub's values are recorded at download.
    WeightFile(
        name="sam",
        repo_id=HUB_REPO_ID,
        filename="sam_vit_h_4b8939.pth",
        local_name="sam_vit_h_4b8939.pth",
        approx_size_bytes=2_564_550_879,
        size_bytes=2_564_550_879,
        sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        purpose="Segment Anything ViT-H: foreground mask of the input image (spec §1.2)",
        licence=f"{HUB_CARD_LICENCE} (the hub repo's card); upstream: Apache-2.0 (Meta Segment Anything)",
        required=False,
        import_paths=("sam_vit_h_4b8939.pth",),
    ),
    WeightFile(
        name="zero123-xl",
        repo_id=HUB_REPO_ID,
        filename="zero123-xl.ckpt",
        local_name="zero123-xl.ckpt",
        approx_size_bytes=15_465_973_531,
        size_bytes=15_465_973_531,
        sha256="bc4ea2f8696ed96495a756e178cab659de807bbae2d2df18987cf61c44070696",
        purpose="Zero123-XL Lightning checkpoint: novel-view diffusion, converted once to diffusers format (spec §2.1)",
        licence=f"{HUB_CARD_LICENCE} (the hub repo's card; the Zero-1-to-3 release too); fine-tuned from Stable "
                "Diffusion, whose model licence may also apply (unconfirmed)",
        derived_bytes=5_000_000_000,  # the diffusers conversion measured 4.99 GB; the checkpoint stays beside it
        import_paths=("zero123-xl.ckpt",),
    ),
    WeightFile(
        name="loftr",
        repo_id=HUB_REPO_ID,
        filename="elevation_estimate/utils/weights/indoor_ds_new.ckpt",
        local_name="elevation_estimate/utils/weights/indoor_ds_new.ckpt",
        approx_size_bytes=46_355_053,
        size_bytes=46_355_053,
        sha256="be9ff88b323ec27889114719f668ae41aff7034b56a4c4acbd46b8b180b87ed3",
        purpose="LoFTR indoor 'ds_new' matcher: elevation estimation (spec §4)",
        licence=f"{HUB_CARD_LICENCE} (the hub repo's card); upstream: Apache-2.0 (zju3dv LoFTR)",
        required=False,
        fallback_filenames=("one2345_elev_est/tools/weights/indoor_ds_new.ckpt",),  # its place before 2024-02
        import_paths=("elevation_estimate/utils/weights/indoor_ds_new.ckpt",
                      "one2345_elev_est/tools/weights/indoor_ds_new.ckpt"),
    ),
    WeightFile(
        name="reconstruction",
        repo_id=HUB_REPO_ID,
        filename="SparseNeuS_demo_v1/exp/lod0/checkpoints/ckpt_215000.pth",
        local_name="SparseNeuS_demo_v1/exp/lod0/checkpoints/ckpt_215000.pth",
        approx_size_bytes=5_310_000,
        purpose="SparseNeuS-variant reconstruction network, iteration 215000 (spec §5.9)",
        licence=f"{HUB_CARD_LICENCE} (the hub repo's card); the One-2-3-45 code is Apache-2.0",
        import_paths=("reconstruction/exp/lod0/checkpoints/ckpt_215000.pth",
                      "SparseNeuS_demo_v1/exp/lod0/checkpoints/ckpt_215000.pth"),
    ),
)
TEXT_TO_IMAGE_REPO = "SimianLuo/LCM_Dreamshaper_v7"
TEXT_TO_IMAGE_GROUP = "text-to-image"
_TEXT_TO_IMAGE_LICENCE = ("MIT (the hub repo's card); fine-tuned from Dreamshaper v7 / Stable Diffusion 1.5, whose "
                          "CreativeML OpenRAIL-M lets users use their outputs, commercially included")
# The files server.stages.text_to_image loads (not the safety checker), with the hub's sizes as rough sizes: the
# hub's exact size and SHA-256 are recorded at download. Repo path → (short name, rough size, what it is).
_TEXT_TO_IMAGE_FILES = {
    "unet/diffusion_pytorch_model.safetensors": ("unet", 3_440_000_000, "the LCM-distilled UNet (860 M parameters)"),
    "text_encoder/model.safetensors": ("text-encoder", 492_000_000, "the CLIP ViT-L/14 text encoder"),
    "vae/diffusion_pytorch_model.safetensors": ("vae", 335_000_000, "the image autoencoder"),
    "unet/config.json": ("unet-config", 2_000, "the UNet's configuration"),
    "text_encoder/config.json": ("text-encoder-config", 1_000, "the text encoder's configuration"),
    "vae/config.json": ("vae-config", 1_000, "the autoencoder's configuration"),
    "scheduler/scheduler_config.json": ("scheduler", 1_000, "the LCM scheduler's configuration"),
    "tokenizer/vocab.json": ("tokenizer-vocab", 1_060_000, "the CLIP tokenizer's vocabulary"),
    "tokenizer/merges.txt": ("tokenizer-merges", 525_000, "the CLIP tokenizer's merges"),
    "tokenizer/tokenizer_config.json": ("tokenizer-config", 1_000, "the CLIP tokenizer's configuration"),
    "tokenizer/special_tokens_map.json": ("tokenizer-special", 1_000, "the CLIP tokenizer's special tokens"),
}
WEIGHT_FILES += tuple(
    WeightFile(name=f"{TEXT_TO_IMAGE_GROUP}/{short}", repo_id=TEXT_TO_IMAGE_REPO, filename=filename,
               local_name=f"{TEXT_TO_IMAGE_GROUP}/{filename}", approx_size_bytes=size,
               purpose=f"text input (LCM-Dreamshaper-v7, 4-step text to image): {what}",
               licence=_TEXT_TO_IMAGE_LICENCE, required=False, group=TEXT_TO_IMAGE_GROUP, on_demand=True)
    for filename, (short, size, what) in _TEXT_TO_IMAGE_FILES.items())
REGISTRY: dict[str, WeightFile] = {w.name: w for w in WEIGHT_FILES}


def weight_group(group: str) -> list[str]:
    """The names of the files of ``group``; BadInputError naming the groups when there is none such."""
    names = [w.name for w in WEIGHT_FILES if w.group == group]
    if not names:
        known = sorted({w.group for w in WEIGHT_FILES if w.group})
        raise BadInputError(f"unknown weights group {group!r}; known groups: {', '.join(known) or 'none'}")
    return names


def group_folder(group: str, weights_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder the files of ``group`` are kept in (a diffusers folder): ``<weights dir>/<group>``."""
    weight_group(group)
    root = Path(weights_dir).expanduser() if weights_dir is not None else default_weights_dir()
    return root / group


def expand_names(names: Iterable[str]) -> list[str]:
    """``names`` with each group name replaced by its files, without repeats; BadInputError for an unknown name."""
    groups = {w.group for w in WEIGHT_FILES if w.group}
    out: list[str] = []
    for name in names:
        out.extend(weight_group(name) if name in groups and name not in REGISTRY else [weight_file(name).name])
    return list(dict.fromkeys(out))


def _entries(names: Iterable[str] | None, *, on_demand: bool) -> list[WeightFile]:
    """The table entries of ``names`` (groups expanded); None: every entry, the on-demand ones only if asked."""
    if names is None:
        return [w for w in WEIGHT_FILES if on_demand or not w.on_demand]
    return [weight_file(n) for n in expand_names(names)]


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
            f"unknown weight file {name!r}; known names: {', '.join(REGISTRY)}"
            + "".join(f", {g} (its files)" for g in dict.fromkeys(w.group for w in REGISTRY.values() if w.group)),
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
    entries = _entries(names, on_demand=False)
    root = Path(weights_dir).expanduser() if weights_dir is not None else default_weights_dir()
    offline = offline or _env_offline()
    cancelled = should_cancel or (lambda: False)

    # 1. What to fetch.
    paths: dict[str, Path] = {}
    todo: list[tuple[WeightFile, FileState]] = []
    records = _read_records(root)
    for entry in entries:
        on_hash = None
        if on_progress is not None:
            def on_hash(done: int, total: int, name: str = entry.name) -> None:
                on_progress(DownloadProgress(file=name, phase="checking", file_done=total, file_total=total, done=0,
                                             total=0, transferred=0, files_done=0, files_total=len(entries),
                                             hashed=done))
        state = _state_of(entry, root, records, verify=verify, on_hash=on_hash, should_cancel=cancelled)
        if state.state == "present":
            paths[entry.name] = root / entry.local_name
        else:
            todo.append((entry, state))
    if todo and offline:
        raise MissingWeightsError(
            f"offline (--offline or HF_HUB_OFFLINE=1), and weight files are missing or damaged in {root}: "
            f"{_listing(s for _, s in todo)}",
            fix=_fix_for([e for e, _ in todo], root, offline_hint=True),
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
            raise MissingWeightsError(f"{e.message}; still to fetch: {_listing(s for _, s in todo)}",
                                      fix=_fix_for([e for e, _ in todo], root, network_hint=True)) from e

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
            raise MissingWeightsError(e.message, fix=_fix_for(left, root, network_hint=True)
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
    message = f"{purpose} needs weight files that are not usable in {root}: {_listing(absent)}"
    if also:
        message += f"; also absent (optional, a weight-free fallback is used): {_listing(also)}"
    raise MissingWeightsError(message, fix=_fix_for([weight_file(s.name) for s in (*absent, *also)], root))


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
    hub_sha256 = etag.lower() if _SHA256.match(etag.lower()) else None
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
    for stale in _partials(path):
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
        digest = _sha256(partial, should_cancel, lambda done: tally.emit(remote, "verifying", done))
        if digest != remote.expected_sha256:
            partial.unlink()
            raise CheckpointError(
                f"downloaded {entry.filename!r} has SHA-256 {digest} but the hub says {remote.expected_sha256}; "
                "partial file deleted", fix=f"run `{entry.download_command}` again")
    os.replace(partial, path)  # only now does a damaged file of that name go
    _record(root, entry, path, sha256=digest, hub=(remote.expected_size, remote.expected_sha256))
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
    entries = _entries(names, on_demand=True)
    records = _read_records(root)
    return [_state_of(entry, root, records, verify=verify, endpoint=endpoint, should_cancel=should_cancel,
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
    entry = REGISTRY.get(name)
    return entry is not None and entry.on_demand


def _reference(entry: WeightFile, record: dict[str, Any]) -> tuple[int | None, str | None]:
    """The exact size and SHA-256 a file must have: the hub's, recorded when this code downloaded it, else the
    table's pins."""
    size, sha = record.get("expected_size"), record.get("expected_sha256")
    size = size if isinstance(size, int) and not isinstance(size, bool) else entry.size_bytes
    sha = sha if isinstance(sha, str) and _SHA256.match(sha) else entry.sha256
    return size, sha


def _state_of(entry: WeightFile, root: Path, records: dict[str, Any], *, verify: bool,
              endpoint: str | None = None, on_hash: HashCallback | None = None,
              should_cancel: Callable[[], bool] | None = None) -> FileState:
    path = root / entry.local_name
    record = records.get(entry.local_name)
    record = record if isinstance(record, dict) else {}
    exact, reference = _reference(entry, record)
    base = {"name": entry.name, "filename": entry.filename, "purpose": entry.purpose, "required": entry.required,
            "licence": entry.licence, "source": entry.source_url(endpoint),
            "expected_bytes": exact if exact is not None else entry.approx_size_bytes, "size_exact": exact is not None}
    try:
        st = path.stat()
    except OSError:
        st = None
    if st is None or not path.is_file():  # a FIFO or a folder in its place is no weight file (and is never read)
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
        digest = _sha256(path, should_cancel, None if on_hash is None else lambda done: on_hash(done, st.st_size))
        _record(root, entry, path, sha256=digest)
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


def _record(root: Path, entry: WeightFile, path: Path, *, sha256: str | None,
            hub: tuple[int | None, str | None] | None = None) -> None:
    """Remember the digest of ``path`` for its current size and mtime, and ``hub`` (the hub's size and SHA-256 seen
    at download; None keeps those recorded before). A cache that cannot be written costs only a re-hash later."""
    st = path.stat()
    with _records_lock:
        records = _read_records(root)
        old = records.get(entry.local_name)
        old = old if isinstance(old, dict) else {}
        size, sha = hub if hub is not None else (old.get("expected_size"), old.get("expected_sha256"))
        records[entry.local_name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256,
                                     "expected_sha256": sha, "expected_size": size}
        with contextlib.suppress(OSError):
            write_json_atomic(root / CHECKSUMS_FILE, records)


def _sha256(path: Path, should_cancel: Callable[[], bool] | None = None,
            on_bytes: Callable[[int], None] | None = None) -> str:
    """SHA-256 of ``path``, streamed in 16 MiB chunks; ``on_bytes(done)`` after each."""
    digest = hashlib.sha256()
    done = 0
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            if should_cancel is not None and should_cancel():
                raise CancelledError("cancelled while a weight file was being verified")
            digest.update(chunk)
            done += len(chunk)
            if on_bytes is not None:
                on_bytes(done)
    return digest.hexdigest()


# -- import from an existing checkout -----------------------------------------------------------------------------


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
    entries = _entries(names, on_demand=False)
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
    records = _read_records(root)
    record = records.get(entry.local_name)
    exact, reference = _reference(entry, record if isinstance(record, dict) else {})
    size = src.stat().st_size
    if exact is not None and size != exact:
        return ImportResult(entry.name, "damaged", source=rel, checksum="mismatch",
                            detail=f"it has {size:,} bytes, the hub's file has {exact:,}")
    if dest.is_file():
        if dest.exists() and os.path.samefile(dest, src):
            state = _state_of(entry, root, records, verify=True, should_cancel=cancelled,
                              on_hash=lambda done, total: report("verifying", done, done))
            outcome = "already present" if state.state == "present" else "damaged"
            return ImportResult(entry.name, outcome, source=rel, checksum=state.checksum, detail=state.problem)
        state = _state_of(entry, root, records, verify=True, should_cancel=cancelled,
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
            digest = _sha256(tmp, cancelled, lambda done: report("verifying", done, done))
        if reference is not None and digest != reference:
            return ImportResult(entry.name, "damaged", source=rel, checksum="mismatch",
                                detail=f"its SHA-256 is {digest}, the reference is {reference}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    _record(root, entry, dest, sha256=digest)
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
        while chunk := fin.read(_HASH_CHUNK):
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


def download_command(names: Iterable[str], weights_dir: str | os.PathLike[str] | None = None) -> str:
    """The one CLI command that fetches ``names`` into ``weights_dir`` (``--dir`` only when it is not the
    default; no ``--only`` when it is every file)."""
    names = expand_names(names)
    command = "one2345 weights download"
    if set(names) != {w.name for w in REGISTRY.values() if not w.on_demand}:
        # A whole group is named by its group name (one flag, not one per file of a diffusers folder).
        shown: list[str] = []
        for n in names:
            group = REGISTRY[n].group
            whole = group is not None and set(weight_group(group)) <= set(names)
            shown.append(group if whole else n)
        command += "".join(f" --only {n}" for n in dict.fromkeys(shown))
    if weights_dir is not None and Path(weights_dir).expanduser() != default_weights_dir():
        command += f" --dir {shlex.quote(str(weights_dir))}"
    return command


def _fix_for(entries: list[WeightFile], root: Path, *, offline_hint: bool = False, network_hint: bool = False) -> str:
    """One shell command that fetches every file of ``entries`` into ``root``."""
    hint = f"run `{download_command([e.name for e in entries], root)}`"
    if offline_hint:
        hint += " with network access (without --offline and HF_HUB_OFFLINE)"
    if network_hint:
        hint = "check the network (or HF_ENDPOINT), then " + hint
    return hint + (f", or copy the file(s) into {root} under the same relative path (`one2345 weights import "
                   "PATH` takes them from a One-2-3-45 checkout)")


def _listing(states: Iterable[FileState]) -> str:
    """``name (file, ~size, what is wrong)`` for each state, comma-separated."""
    words = {"missing": "missing", "partial": "partly downloaded", "corrupt": "damaged"}
    return ", ".join(f"{s.name} ({s.filename}, ~{_human_size(s.expected_bytes)}, {words.get(s.state, s.state)}"
                     + (f": {s.problem}" if s.problem else "") + ")" for s in states)


def _human_size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"
