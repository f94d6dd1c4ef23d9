"""Zero123 Lightning checkpoint (LDM layout) → diffusers-format folder, done once and cached (spec §2.1, §2.2).

The output folder is laid out like the hub's ``kxic/zero123-xl``::

    unet/            UNet2DConditionModel, 8 input channels, weights from the EMA copy (what sampling uses)
    vae/             AutoencoderKL from ``first_stage_model.*``
    image_encoder/   CLIPVisionModelWithProjection from ``cond_stage_model.model.visual.*`` (OpenAI CLIP layout)
    cc_projection/   config.json {"in_channel": 772, "out_channel": 768} + projection.{weight,bias} in safetensors
    scheduler/       DDIMScheduler config of the LDM schedule (0.00085 → 0.012, "scaled_linear", 1000 steps)
    model_index.json
    one2345_conversion.json   manifest, written last: source size + mtime, converter version, architecture, and the
                              size and SHA-256 of every file above

Conversion is an install step (:func:`ensure_converted`): the checkpoint is recognised from its key names and shapes
before anything is copied (a wrong file is refused in seconds, naming what was found and what Zero123 has); progress
is reported per step and every 64 MiB written; it can be cancelled between tensors; it writes into a hidden temporary
sibling (``.<name>.tmp-*``) renamed into place at the end, under a lock file beside it, so an interrupted conversion
leaves at most that temporary folder, which the next conversion (or :func:`remove_interrupted_conversions` at
start-up) deletes — never one a live process is writing. A reused folder is checked against its manifest's sizes
every time (fast) and by hash on request (:func:`verify_converted`).

The modules, each importing only those before it:

* :mod:`~server.stages.multiview.convert.ldm` — the architecture configs (:data:`ZERO123_XL`), reading the
  checkpoint, and the pure conversion of the LDM state dict into diffusers/transformers state dicts.
* :mod:`~server.stages.multiview.convert.recognise` — :func:`plan_conversion`: the checkpoint checked by names and
  shapes against models built on the meta device, copying nothing.
* :mod:`~server.stages.multiview.convert.progress` — :class:`ConversionProgress` reports, cancellation, the lock
  beside the folder and the leftovers of interrupted conversions.
* :mod:`~server.stages.multiview.convert.folder` — writing the folder and its manifest:
  :func:`convert_zero123_checkpoint`, :func:`ensure_converted`, :func:`verify_converted`.

The names below are re-exported so that ``from server.stages.multiview.convert import X`` keeps working; code that
patches a name must patch it in the module that looks it up (e.g. ``convert.folder.ZERO123_XL``). A name one module
takes from another is public (no leading underscore); the private ones stay inside their module.

Part of a stage: imports :mod:`server.common` only.
"""

from server.stages.multiview.convert.folder import (
    ConvertedVerification,
    FileRecord,
    convert_zero123_checkpoint,
    ensure_converted,
    verify_converted,
)
from server.stages.multiview.convert.ldm import (
    CC_PREFIX,
    CLIP_VISUAL_PREFIX,
    CONVERTER_VERSION,
    EMA_BOOKKEEPING,
    EMA_NAME_ROOT,
    EMA_PREFIX,
    MARKER_NAME,
    POSE_DIMS,
    UNET_PREFIX,
    VAE_PREFIX,
    VAE_TRAINING_ONLY_PREFIX,
    ZERO123_XL,
    ConvertedParts,
    LdmUNetConfig,
    LdmVaeConfig,
    OpenAIClipVisionConfig,
    Zero123Architecture,
    convert_clip_visual,
    convert_state_dict,
    convert_unet,
    convert_vae,
    extract_cc_projection,
    extract_unet,
    load_lightning_state_dict,
)
from server.stages.multiview.convert.progress import (
    CancelCheck,
    ConversionLock,
    ConversionProgress,
    ProgressCallback,
    Reporter,
    remove_interrupted_conversions,
)
from server.stages.multiview.convert.recognise import ConversionPlan, plan_conversion

__all__ = [
    "CC_PREFIX",
    "CLIP_VISUAL_PREFIX",
    "CONVERTER_VERSION",
    "EMA_BOOKKEEPING",
    "EMA_NAME_ROOT",
    "EMA_PREFIX",
    "MARKER_NAME",
    "POSE_DIMS",
    "UNET_PREFIX",
    "VAE_PREFIX",
    "VAE_TRAINING_ONLY_PREFIX",
    "ZERO123_XL",
    "CancelCheck",
    "ConversionLock",
    "ConversionPlan",
    "ConversionProgress",
    "ConvertedParts",
    "ConvertedVerification",
    "FileRecord",
    "LdmUNetConfig",
    "LdmVaeConfig",
    "OpenAIClipVisionConfig",
    "ProgressCallback",
    "Reporter",
    "Zero123Architecture",
    "convert_clip_visual",
    "convert_state_dict",
    "convert_unet",
    "convert_vae",
    "convert_zero123_checkpoint",
    "ensure_converted",
    "extract_cc_projection",
    "extract_unet",
    "load_lightning_state_dict",
    "plan_conversion",
    "remove_interrupted_conversions",
    "verify_converted",
]
