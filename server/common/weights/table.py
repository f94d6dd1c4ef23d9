"""The weight-file table: what each file is, where it lives on the hub and on disk, and the lookups over it.

:data:`WEIGHT_FILES` and :data:`REGISTRY` are read at call time by every module of the package (as
``table.WEIGHT_FILES``), so :func:`install_table` (and a test's monkeypatch of this module) changes them everywhere.
The download command and the "file not found" message live here too: :func:`resolve` needs them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from server.common.errors import BadInputError, MissingWeightsError

HUB_REPO_ID = "One-2-3-45/code"
HUB_REVISION = "main"
"""The repo has no tags; ``main`` is what ``download_ckpt.py`` fetches."""

WEIGHTS_DIR_ENV = "ONE2345_WEIGHTS"
PARTIAL_SUFFIX = ".incomplete"
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
"""A SHA-256 as the hub and the checksum records write it: 64 lower-case hex digits."""
HASH_CHUNK_BYTES = 16 * 1024 * 1024
"""Bytes read at a time when a weight file is hashed or copied."""
CHECKSUMS_FILE = ".checksums.json"
"""Digests computed so far, per local name: ``{"size", "mtime_ns", "sha256", "expected_sha256", "expected_size"}``."""
FREE_SPACE_MARGIN_BYTES = 256 * 2**20
"""Kept free on top of what a download needs, so the disk is not left full to the last byte."""
DEFAULT_ENDPOINT = "https://huggingface.co"
STATES = ("present", "partial", "missing", "corrupt")
HUB_CARD_LICENCE = "MIT"
"""The licence the hub repo's model card declares for the repo as a whole."""


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


def select_entries(names: Iterable[str] | None, *, on_demand: bool) -> list[WeightFile]:
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
        f"weight file {entry.name!r} ({entry.local_name}, ~{human_size(entry.approx_size_bytes)}) not found in "
        f"{root} (looked for {path})",
        fix=fix_for([entry], root),
    )


# -- messages --------------------------------------------------------------------------------------------------


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


def fix_for(entries: list[WeightFile], root: Path, *, offline_hint: bool = False, network_hint: bool = False) -> str:
    """One shell command that fetches every file of ``entries`` into ``root``."""
    hint = f"run `{download_command([e.name for e in entries], root)}`"
    if offline_hint:
        hint += " with network access (without --offline and HF_HUB_OFFLINE)"
    if network_hint:
        hint = "check the network (or HF_ENDPOINT), then " + hint
    return hint + (f", or copy the file(s) into {root} under the same relative path (`one2345 weights import "
                   "PATH` takes them from a One-2-3-45 checkout)")


def human_size(n: int) -> str:
    """``n`` bytes, rounded, for messages: ``15.5 GB``, ``46 MB``, ``5 kB``."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"
