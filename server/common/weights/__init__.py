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

The package, each module importing only those before it (and only ``server.common``, the ground layer):

- :mod:`~server.common.weights.table`: the constants, :class:`WeightFile`, :data:`WEIGHT_FILES` and
  :data:`REGISTRY`, the lookups (:func:`weight_file`, :func:`resolve`, :func:`expand_names`, groups), the download
  command and :func:`install_table`;
- :mod:`~server.common.weights.integrity`: :class:`FileState`, :func:`inspect_weights`, :func:`verify_all`, the
  checksum records and hashing, :func:`check_free_space`;
- :mod:`~server.common.weights.download`: :func:`download`, :func:`require`, the hub transfers and their messages;
- :mod:`~server.common.weights.importing`: :func:`import_weights`.

Every module reads the table through ``table.WEIGHT_FILES`` / ``table.REGISTRY`` at call time, and so does
``weights.WEIGHT_FILES`` here (a module ``__getattr__``): :func:`install_table` and a monkeypatch of
:mod:`~server.common.weights.table` reach every function. Patch the module that holds a name, never this package.
The names below are re-exported so that ``weights.X`` keeps working; ``weights.download`` is the function (the
module is ``server.common.weights.download`` in ``sys.modules``).
"""

from __future__ import annotations

from typing import Any

from server.common.errors import CheckpointError, MissingWeightsError
from server.common.weights import table
from server.common.weights.download import (
    DownloadProgress,
    ProgressCallback,
    describe_states,
    download,
    env_offline,
    require,
)
from server.common.weights.importing import IMPORT_OUTCOMES, ImportResult, import_weights
from server.common.weights.integrity import (
    FileState,
    HashCallback,
    check_free_space,
    disk_needed_bytes,
    inspect_weights,
    missing_bytes,
    sha256_file,
    verify_all,
)
from server.common.weights.table import (
    CHECKSUMS_FILE,
    DEFAULT_ENDPOINT,
    HUB_CARD_LICENCE,
    HUB_REPO_ID,
    HUB_REVISION,
    PARTIAL_SUFFIX,
    STATES,
    TABLE_ENV,
    TEXT_TO_IMAGE_GROUP,
    TEXT_TO_IMAGE_REPO,
    WEIGHTS_DIR_ENV,
    WeightFile,
    default_weights_dir,
    download_command,
    expand_names,
    fix_for,
    group_folder,
    human_size,
    install_table,
    resolve,
    weight_file,
    weight_group,
)

_LIVE = ("WEIGHT_FILES", "REGISTRY", "FREE_SPACE_MARGIN_BYTES")
"""Names read from :mod:`~server.common.weights.table` on each access: install_table (or a test) rebinds them."""


def __getattr__(name: str) -> Any:
    if name in _LIVE:
        return getattr(table, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CHECKSUMS_FILE", "DEFAULT_ENDPOINT", "FREE_SPACE_MARGIN_BYTES", "HUB_CARD_LICENCE", "HUB_REPO_ID", "HUB_REVISION",
    "IMPORT_OUTCOMES", "PARTIAL_SUFFIX", "REGISTRY", "STATES", "TABLE_ENV", "TEXT_TO_IMAGE_GROUP", "TEXT_TO_IMAGE_REPO",
    "WEIGHTS_DIR_ENV", "WEIGHT_FILES", "CheckpointError", "DownloadProgress", "FileState", "HashCallback",
    "ImportResult", "MissingWeightsError", "ProgressCallback", "WeightFile", "check_free_space", "default_weights_dir",
    "describe_states", "disk_needed_bytes", "download", "download_command", "env_offline", "expand_names", "fix_for",
    "group_folder", "human_size", "import_weights", "inspect_weights", "install_table", "missing_bytes", "require",
    "resolve", "sha256_file", "table", "verify_all", "weight_file", "weight_group",
]
