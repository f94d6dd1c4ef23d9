"""Every model weight file the server uses: where it lives on the hub, where it lives on disk, and how it gets there.

The four files are the ones One-2-3-45's ``download_ckpt.py`` fetches from the hub repo ``One-2-3-45/code`` (spec §1.1).
They are kept under one weights folder with the repo's relative paths, so the folder is a plain mirror of the repo:

    <weights dir>/sam_vit_h_4b8939.pth
    <weights dir>/zero123-xl.ckpt
    <weights dir>/elevation_estimate/utils/weights/indoor_ds_new.ckpt
    <weights dir>/SparseNeuS_demo_v1/exp/lod0/checkpoints/ckpt_215000.pth

Nothing here downloads implicitly: inference code calls :func:`resolve`, which fails with the exact command to run,
and only :func:`download` (behind ``one2345 weights download``) touches the network.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlparse

from server.errors import BadInputError, CheckpointError, MissingWeightsError

HUB_REPO_ID = "One-2-3-45/code"
HUB_REVISION = "main"
"""The repo has no tags; ``main`` is what ``download_ckpt.py`` fetches."""

WEIGHTS_DIR_ENV = "ONE2345_WEIGHTS"
PARTIAL_SUFFIX = ".incomplete"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HASH_CHUNK = 16 * 1024 * 1024


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

    @property
    def download_command(self) -> str:
        """The CLI command that fetches exactly this file."""
        return f"one2345 weights download --only {self.name}"


WEIGHT_FILES: tuple[WeightFile, ...] = (
    WeightFile(
        name="sam",
        repo_id=HUB_REPO_ID,
        filename="sam_vit_h_4b8939.pth",
        local_name="sam_vit_h_4b8939.pth",
        approx_size_bytes=2_564_550_879,
        purpose="Segment Anything ViT-H: foreground mask of the input image (spec §1.2)",
    ),
    WeightFile(
        name="zero123-xl",
        repo_id=HUB_REPO_ID,
        filename="zero123-xl.ckpt",
        local_name="zero123-xl.ckpt",
        approx_size_bytes=15_500_000_000,
        purpose="Zero123-XL Lightning checkpoint: novel-view diffusion, converted once to diffusers format (spec §2.1)",
    ),
    WeightFile(
        name="loftr",
        repo_id=HUB_REPO_ID,
        filename="elevation_estimate/utils/weights/indoor_ds_new.ckpt",
        local_name="elevation_estimate/utils/weights/indoor_ds_new.ckpt",
        approx_size_bytes=46_000_000,
        purpose="LoFTR indoor 'ds_new' matcher: elevation estimation (spec §4)",
    ),
    WeightFile(
        name="reconstruction",
        repo_id=HUB_REPO_ID,
        filename="SparseNeuS_demo_v1/exp/lod0/checkpoints/ckpt_215000.pth",
        local_name="SparseNeuS_demo_v1/exp/lod0/checkpoints/ckpt_215000.pth",
        approx_size_bytes=20_000_000,
        purpose="SparseNeuS-variant reconstruction network, iteration 215000 (spec §5.9); size is a guess",
    ),
)
REGISTRY: dict[str, WeightFile] = {w.name: w for w in WEIGHT_FILES}


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


def download(
    names: Iterable[str] | None = None,
    weights_dir: str | os.PathLike[str] | None = None,
    *,
    offline: bool = False,
    endpoint: str | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Fetch weight files from the hub into the weights folder, skipping those already present.

    Each file is streamed into ``<local path>.<etag>.incomplete`` and renamed into place only when complete and, for
    LFS files (whose ETag is the SHA-256 of the content), only when the hash matches. An interrupted download leaves the
    partial file behind and the next call resumes it with an HTTP ``Range`` request.

    This uses huggingface_hub's metadata and transfer helpers (``get_hf_file_metadata``, ``http_get``) rather than
    ``hf_hub_download``: recent huggingface_hub releases (the 2.x this project runs on included) make it write to a
    per-process temporary file that is deleted on failure, so a 15 GB download stopped at 90 % would restart at zero.

    Args:
        names: registry names to fetch; None fetches all of :data:`WEIGHT_FILES`.
        weights_dir: destination folder; None uses :func:`default_weights_dir`.
        offline: never touch the network (also implied by ``HF_HUB_OFFLINE=1``); absent files raise.
        endpoint: hub base URL (a mirror); None uses ``HF_ENDPOINT`` or https://huggingface.co.
        progress: show a progress bar per file.

    Returns:
        name → path of every requested file.

    Raises:
        BadInputError: an unknown name.
        MissingWeightsError: offline with files absent, or the hub could not be reached / does not have the file.
        CheckpointError: a downloaded file does not match the hub's size or SHA-256 (the partial file is deleted).
    """
    entries = [weight_file(n) for n in names] if names is not None else list(WEIGHT_FILES)
    root = Path(weights_dir).expanduser() if weights_dir is not None else default_weights_dir()
    offline = offline or _env_offline()

    paths: dict[str, Path] = {}
    absent: list[WeightFile] = []
    for entry in entries:
        path = root / entry.local_name
        if path.is_file():
            paths[entry.name] = path
        elif offline:
            absent.append(entry)
        else:
            paths[entry.name] = _fetch(entry, path, endpoint=endpoint, progress=progress)
    if absent:
        listing = ", ".join(f"{e.name!r} ({e.local_name})" for e in absent)
        raise MissingWeightsError(
            f"offline mode (offline=True or HF_HUB_OFFLINE=1) and weight files missing from {root}: {listing}",
            fix=_fix_for(absent, root, offline_hint=True),
        )
    return paths


def _fetch(entry: WeightFile, path: Path, *, endpoint: str | None, progress: bool) -> Path:
    """Download one file to ``path`` through a resumable ``.incomplete`` file; returns ``path``."""
    from huggingface_hub import constants, get_hf_file_metadata
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers
    from tqdm.auto import tqdm

    # Built here rather than with hf_hub_url, whose URL template freezes HF_ENDPOINT at import time.
    base = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    url = f"{base}/{entry.repo_id}/resolve/{quote(HUB_REVISION, safe='')}/{quote(entry.filename)}"
    try:
        meta = get_hf_file_metadata(url, endpoint=endpoint)
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
    path.parent.mkdir(parents=True, exist_ok=True)
    # A partial file of another remote version cannot be resumed: its bytes belong to a different file.
    for stale in path.parent.glob(f"{glob.escape(path.name)}.*{PARTIAL_SUFFIX}"):
        if stale != partial:
            stale.unlink()
    resume_size = partial.stat().st_size if partial.exists() else 0
    if meta.size is not None and resume_size > meta.size:
        partial.unlink()
        resume_size = 0

    headers = build_hf_headers()
    if urlparse(meta.location).netloc != urlparse(url).netloc:
        headers.pop("authorization", None)  # signed CDN URLs reject (and must not receive) the hub token
    tqdm_class = None if progress else functools.partial(tqdm, disable=True)
    try:
        with partial.open("ab") as sink:
            http_get(
                meta.location,
                sink,
                resume_size=resume_size,
                headers=headers,
                expected_size=meta.size,
                displayed_filename=entry.filename,
                tqdm_class=tqdm_class,
            )
    except _transport_errors() as exc:
        raise MissingWeightsError(
            f"download of {entry.filename!r} from {meta.location} stopped: {exc}; "
            f"{partial.stat().st_size if partial.exists() else 0} bytes kept in {partial}",
            fix=f"run `{entry.download_command}` again; it resumes from the partial file",
        ) from exc

    if _SHA256.match(etag):
        digest = _sha256(partial)
        if digest != etag:
            partial.unlink()
            raise CheckpointError(
                f"downloaded {entry.filename!r} has SHA-256 {digest} but the hub says {etag}; partial file deleted",
                fix=f"run `{entry.download_command}` again",
            )
    os.replace(partial, path)
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
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
