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

Key renaming for the UNet and the VAE is diffusers' own (``diffusers.loaders.single_file_utils``); diffusers has no
mapping for the OpenAI-CLIP *vision* tower (only for CLIP text encoders), so that one is written out here, following
the layout of OpenAI's ``clip/model.py`` (``VisionTransformer``) and transformers' ``CLIPVisionModelWithProjection``.

Every part is checked strictly: a source tensor of the part that lands nowhere, a model tensor that gets no value or a
shape mismatch is a :class:`CheckpointError` listing them, never a silently random-initialised weight.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import struct
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from server.common.errors import CancelledError, CheckpointError, MissingWeightsError
from server.common.fsutil import replace_dir

log = logging.getLogger(__name__)

CONVERTER_VERSION = 2
"""Bump when the output changes; cached folders of another version are converted again (2: file manifest)."""
MARKER_NAME = "one2345_conversion.json"

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
EMA_BOOKKEEPING = frozenset({"decay", "num_updates"})
"""LitEma buffers that are not weights."""
EMA_NAME_ROOT = "diffusion_model."
"""LitEma tracks the DiffusionWrapper, so its flattened names start with ``diffusion_model``."""
VAE_PREFIX = "first_stage_model."
VAE_TRAINING_ONLY_PREFIX = "first_stage_model.loss."
"""Discriminator/LPIPS weights that some autoencoder checkpoints carry; not part of the inference VAE."""
CLIP_VISUAL_PREFIX = "cond_stage_model.model.visual."
CC_PREFIX = "cc_projection."
POSE_DIMS = 4
"""[Δpolar, sin Δazimuth, cos Δazimuth, Δradius] appended to the CLIP embedding before ``cc_projection``."""

_DOWNLOAD_FIX = "run `one2345 weights download --only zero123-xl` (or pass the path of an intact zero123-xl.ckpt)"
_DAMAGED_FIX = ("run `one2345 weights download --only zero123-xl`, which fetches the file again when it is damaged "
                "(also one copied in by hand), or copy an intact zero123-xl.ckpt over it")


@dataclass(frozen=True)
class LdmUNetConfig:
    """The openaimodel UNet of ``sd-objaverse-finetune-c_concat-256.yaml`` (``unet_config.params``), paper values."""

    image_size: int = 32
    """Latent side length (256-px images / 8)."""
    in_channels: int = 8
    """4 noisy-latent channels + 4 channels of the conditioning image's latent."""
    out_channels: int = 4
    """Predicted noise, one latent's channels."""
    model_channels: int = 320
    """Width of the first level."""
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    """Per-level width multipliers."""
    num_res_blocks: int = 2
    """ResBlocks per level on the way down (the way up has one more)."""
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    """Downsampling factors (1 = first level) whose blocks carry a SpatialTransformer."""
    num_heads: int = 8
    """Attention heads (diffusers calls this ``attention_head_dim`` for SD-1.x UNets)."""
    context_dim: int = 768
    """Width of the cross-attention context, i.e. ``cc_projection``'s output."""

    def diffusers_config(self) -> dict[str, Any]:
        """``UNet2DConditionModel`` keyword arguments; the same derivation as diffusers'
        ``create_unet_diffusers_config_from_ldm`` for an SD-1.x layout (no linear projections, depth-1 transformers)."""
        attention = [2**level in self.attention_resolutions for level in range(len(self.channel_mult))]
        return {
            "sample_size": self.image_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
            "block_out_channels": [self.model_channels * m for m in self.channel_mult],
            "layers_per_block": self.num_res_blocks,
            "cross_attention_dim": self.context_dim,
            "attention_head_dim": self.num_heads,
            "use_linear_projection": False,
        }


@dataclass(frozen=True)
class LdmVaeConfig:
    """The ``first_stage_config`` AutoencoderKL (``ddconfig``), paper values."""

    resolution: int = 256
    """Image side length."""
    in_channels: int = 3
    """RGB in."""
    out_ch: int = 3
    """RGB out."""
    ch: int = 128
    """Width of the first level."""
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    """Per-level width multipliers (len − 1 downsamplings: 256 → 32)."""
    num_res_blocks: int = 2
    """ResBlocks per encoder level (decoder levels have one more)."""
    z_channels: int = 4
    """Latent channels (``embed_dim`` is the same, as diffusers' AutoencoderKL requires)."""
    scale_factor: float = 0.18215
    """LatentDiffusion's latent scale (stored in the VAE config as ``scaling_factor``)."""

    def diffusers_config(self) -> dict[str, Any]:
        """``AutoencoderKL`` keyword arguments; mirrors diffusers' ``create_vae_diffusers_config_from_ldm``."""
        n = len(self.ch_mult)
        return {
            "sample_size": self.resolution,
            "in_channels": self.in_channels,
            "out_channels": self.out_ch,
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": [self.ch * m for m in self.ch_mult],
            "latent_channels": self.z_channels,
            "layers_per_block": self.num_res_blocks,
            "scaling_factor": self.scale_factor,
        }


@dataclass(frozen=True)
class OpenAIClipVisionConfig:
    """OpenAI CLIP ViT-L/14 image tower (``FrozenCLIPImageEmbedder``), paper values."""

    image_resolution: int = 224
    """Input side length."""
    patch_size: int = 14
    """Patch side length."""
    width: int = 1024
    """Transformer width."""
    layers: int = 24
    """Residual attention blocks."""
    heads: int = 16
    """Attention heads (OpenAI: width // 64)."""
    embed_dim: int = 768
    """Output of ``visual.proj``, the image embedding that ``cc_projection`` consumes."""

    def transformers_config(self) -> dict[str, Any]:
        """``CLIPVisionConfig`` keyword arguments (OpenAI CLIP uses QuickGELU and a 4× MLP)."""
        return {
            "hidden_size": self.width,
            "intermediate_size": 4 * self.width,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "image_size": self.image_resolution,
            "patch_size": self.patch_size,
            "projection_dim": self.embed_dim,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
        }


@dataclass(frozen=True)
class Zero123Architecture:
    """All architecture parameters the converter needs; the defaults are Zero123-XL's (spec §2.2)."""

    unet: LdmUNetConfig = field(default_factory=LdmUNetConfig)
    """Denoiser."""
    vae: LdmVaeConfig = field(default_factory=LdmVaeConfig)
    """First stage."""
    image_encoder: OpenAIClipVisionConfig = field(default_factory=OpenAIClipVisionConfig)
    """Condition encoder."""
    beta_start: float = 0.00085
    """LDM ``linear_start`` (its "linear" schedule is diffusers' ``scaled_linear``)."""
    beta_end: float = 0.012
    """LDM ``linear_end``."""
    num_train_timesteps: int = 1000
    """LDM ``timesteps``."""

    def scheduler_config(self) -> dict[str, Any]:
        """``DDIMScheduler`` keyword arguments of the training schedule (spec §2.8); sampling uses its own loop."""
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "beta_schedule": "scaled_linear",
            "clip_sample": False,
            "set_alpha_to_one": False,
            "steps_offset": 1,
            "prediction_type": "epsilon",
        }


ZERO123_XL = Zero123Architecture()


@dataclass(frozen=True)
class ConvertedParts:
    """Diffusers/transformers state dicts of one checkpoint (float32, contiguous, owning their memory)."""

    unet: dict[str, torch.Tensor]
    """UNet2DConditionModel weights."""
    vae: dict[str, torch.Tensor]
    """AutoencoderKL weights."""
    image_encoder: dict[str, torch.Tensor] | None
    """CLIPVisionModelWithProjection weights, None when the checkpoint has no CLIP tower."""
    cc_projection: dict[str, torch.Tensor]
    """``projection.weight`` [D, E + 4] and ``projection.bias`` [D]."""
    unet_source: str
    """"ema" (the normal case) or "raw" (no EMA copy in the file)."""


# ---------------------------------------------------------------------------------------------------------------------
# Reading the checkpoint
# ---------------------------------------------------------------------------------------------------------------------


def load_lightning_state_dict(ckpt_path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a Lightning checkpoint, loaded without executing code from the file.

    ``torch.load(weights_only=True)`` (memory-mapped, so a 15 GB file does not need 15 GB of RAM). If the file also
    pickles trainer objects (callbacks, hyper-parameters) that weights_only refuses, those objects are replaced by inert
    stand-ins: nothing but the tensors of ``state_dict`` is ever used. A bare state dict (top level already holding
    ``model.diffusion_model.*`` keys, as pruned checkpoints do) is accepted too.

    Raises:
        MissingWeightsError: the file does not exist.
        CheckpointError: unreadable (truncated, not a torch file) or not a Lightning/LDM checkpoint.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise MissingWeightsError(f"Zero123 checkpoint {path} not found", fix=_DOWNLOAD_FIX)
    try:
        obj = _torch_load(path)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"{path} is damaged: it is not a readable PyTorch checkpoint ({path.stat().st_size:,} bytes"
            f"{_official_size(path)}); it is probably truncated by an interrupted download or copy, or of another "
            f"format ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]})",
            fix=_DAMAGED_FIX,
        ) from exc

    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a Lightning checkpoint dict", fix=_DOWNLOAD_FIX
        )
    if "state_dict" in obj:
        state = obj["state_dict"]
    elif any(isinstance(k, str) and k.startswith(UNET_PREFIX) for k in obj):
        state = obj
    else:
        keys = ", ".join(sorted(map(str, obj))[:8])
        raise CheckpointError(
            f"{path} has no 'state_dict' (top-level keys: {keys}); it is not a Zero123 Lightning checkpoint",
            fix=_DOWNLOAD_FIX,
        )
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: 'state_dict' is a {type(state).__name__}, not a mapping", fix=_DOWNLOAD_FIX)
    bad = [str(k) for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise CheckpointError(f"{path}: state_dict entries that are not named tensors: {_clip_list(bad)}")
    if not any(k.startswith(UNET_PREFIX) for k in state):
        raise CheckpointError(
            f"{path} has no {UNET_PREFIX}* weights; it is a checkpoint of another network, not Zero123",
            fix=_DOWNLOAD_FIX,
        )
    return dict(state)


def _official_size(path: Path) -> str:
    """", the official file has N bytes" when the weights table pins the size of a file of this name."""
    from server.common.weights import WEIGHT_FILES

    sizes = {w.size_bytes for w in WEIGHT_FILES if Path(w.local_name).name == path.name and w.size_bytes}
    return f"; the official {path.name} has {sizes.pop():,}" if len(sizes) == 1 else ""


def _torch_load(path: Path) -> Any:
    # mmap needs the zip container of torch >= 1.6; older (or broken) files are read the ordinary way.
    kwargs: dict[str, Any] = {"map_location": "cpu", "weights_only": True, "mmap": zipfile.is_zipfile(path)}
    try:
        return torch.load(path, **kwargs)
    except pickle.UnpicklingError:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path) if kwargs["mmap"] else []
        if not unsafe:
            raise
        with torch.serialization.safe_globals([(_inert_stand_in(name), name) for name in unsafe]):
            return torch.load(path, **kwargs)


def _inert_stand_in(qualified_name: str) -> type:
    """A class that accepts any constructor arguments and pickled state and keeps none of it."""

    class Inert:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def __setstate__(self, state: object) -> None:
            pass

    Inert.__qualname__ = Inert.__name__ = f"Inert[{qualified_name}]"
    return Inert


# ---------------------------------------------------------------------------------------------------------------------
# Pure conversion: LDM state dict → diffusers state dicts
# ---------------------------------------------------------------------------------------------------------------------


def extract_unet(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """The UNet weights under their LDM names (without ``model.diffusion_model.``), taken from the EMA copy.

    LitEma stores ``model.diffusion_model.input_blocks.0.0.weight`` as ``model_ema.diffusion_modelinput_blocks00weight``
    (dots removed). Each raw name is flattened the same way and looked up, so the raw key list defines the names and
    every EMA tensor must match exactly one of them. Sampling runs inside ``ema_scope()`` (spec §2.1), which is why
    EMA is the right source; without any EMA tensor the raw weights are used (the converter logs it in its words).

    Returns:
        (LDM-named UNet tensors, "ema" or "raw").

    Raises:
        CheckpointError: EMA names that match no UNet tensor, UNet tensors without EMA value, or shape differences.
    """
    raw = {k.removeprefix(UNET_PREFIX): v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    ema = {
        k.removeprefix(EMA_PREFIX): v
        for k, v in state.items()
        if k.startswith(EMA_PREFIX) and k.removeprefix(EMA_PREFIX) not in EMA_BOOKKEEPING
    }
    if not ema:
        return raw, "raw"

    flat_to_name: dict[str, str] = {}
    for name in raw:
        flat = (EMA_NAME_ROOT + name).replace(".", "")
        if flat in flat_to_name:
            raise CheckpointError(f"UNet names {flat_to_name[flat]!r} and {name!r} flatten to the same EMA name")
        flat_to_name[flat] = name
    missing = sorted(name for flat, name in flat_to_name.items() if flat not in ema)
    unexpected = sorted(EMA_PREFIX + flat for flat in ema if flat not in flat_to_name)
    mismatched = sorted(
        f"{name}: raw {tuple(raw[name].shape)} vs EMA {tuple(ema[flat].shape)}"
        for flat, name in flat_to_name.items()
        if flat in ema and ema[flat].shape != raw[name].shape
    )
    _raise_if_problems(
        "the EMA copy of the UNet",
        {"UNet weights without EMA value": missing, "EMA tensors of no UNet weight": unexpected, "shapes": mismatched},
    )
    return {name: ema[flat] for flat, name in flat_to_name.items()}, "ema"


def convert_unet(ldm_unet: Mapping[str, torch.Tensor], config: LdmUNetConfig) -> dict[str, torch.Tensor]:
    """LDM openaimodel names (no prefix) → ``UNet2DConditionModel`` names (diffusers' ``convert_ldm_unet_checkpoint``).

    Raises:
        CheckpointError: UNet tensors the mapping left unused (an architecture that does not fit ``config``).
    """
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    source = {UNET_PREFIX + k: v for k, v in ldm_unet.items()}
    converted = convert_ldm_unet_checkpoint(source, config.diffusers_config())
    _raise_if_problems("the UNet", {"LDM tensors with no diffusers place": _unused(source, converted)})
    return converted


def convert_vae(state: Mapping[str, torch.Tensor], config: LdmVaeConfig) -> dict[str, torch.Tensor]:
    """``first_stage_model.*`` → ``AutoencoderKL`` names, with diffusers' ``convert_ldm_vae_checkpoint``.

    Raises:
        CheckpointError: no VAE in the file, or VAE tensors the mapping left unused.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    source = {k: v for k, v in state.items() if k.startswith(VAE_PREFIX) and not k.startswith(VAE_TRAINING_ONLY_PREFIX)}
    if not source:
        raise CheckpointError(f"the checkpoint has no VAE ({VAE_PREFIX}* weights)", fix=_DOWNLOAD_FIX)
    converted = convert_ldm_vae_checkpoint(source, config.diffusers_config())
    _raise_if_problems("the VAE", {"LDM tensors with no diffusers place": _unused(source, converted)})
    return converted


_CLIP_FIXED = {
    "class_embedding": "vision_model.embeddings.class_embedding",
    "conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic: transformers' attribute name
    "ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "ln_post.weight": "vision_model.post_layernorm.weight",
    "ln_post.bias": "vision_model.post_layernorm.bias",
}
_CLIP_BLOCK_MODULES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")


def convert_clip_visual(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """OpenAI CLIP ``visual.*`` (under ``cond_stage_model.model.``) → ``CLIPVisionModelWithProjection`` names.

    ``attn.in_proj_{weight,bias}`` [3W(, W)] splits into q, k, v in that order (``nn.MultiheadAttention``);
    ``proj`` [W, E] is applied as ``x @ proj``, so the Linear weight is its transpose.

    Returns:
        The converted tensors, or None when the checkpoint holds no CLIP vision tower.

    Raises:
        CheckpointError: visual tensors this mapping does not know.
    """
    visual = {k.removeprefix(CLIP_VISUAL_PREFIX): v for k, v in state.items() if k.startswith(CLIP_VISUAL_PREFIX)}
    if not visual:
        return None
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in visual.items():
        block = _RESBLOCK.fullmatch(key)
        mapped = _clip_block_tensors(block[1], block[2], value) if block else None
        if key in _CLIP_FIXED:
            out[_CLIP_FIXED[key]] = value
        elif key == "proj":
            out["visual_projection.weight"] = value.t()
        elif mapped is not None:
            out.update(mapped)
        else:
            unknown.append(CLIP_VISUAL_PREFIX + key)
    _raise_if_problems("the CLIP image tower", {"tensors with no transformers place": sorted(unknown)})
    return out


def _clip_block_tensors(layer: str, name: str, value: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """Transformers names of one tensor of residual block ``layer`` (``name`` as in OpenAI's block), None if unknown."""
    prefix = f"vision_model.encoder.layers.{layer}."
    if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
        if value.shape[0] % 3:
            return None
        kind = name.rsplit("_", 1)[1]
        q, k, v = value.chunk(3, dim=0)
        return {f"{prefix}self_attn.{p}_proj.{kind}": t for p, t in zip("qkv", (q, k, v), strict=True)}
    module, _, param = name.rpartition(".")
    if module not in _CLIP_BLOCK_MODULES:
        return None
    return {f"{prefix}{_CLIP_BLOCK_MODULES[module]}.{param}": value}


def extract_cc_projection(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``cc_projection.{weight,bias}`` → ``projection.{weight,bias}`` (weight [D, E + 4], bias [D]).

    E is the CLIP embedding width and D the UNet's context width (both 768 in Zero123; the converter checks each
    against its own part rather than assuming E = D).

    Raises:
        CheckpointError: absent, or shapes that are not those of a ``Linear(E + 4, D)``.
    """
    weight, bias = state.get(CC_PREFIX + "weight"), state.get(CC_PREFIX + "bias")
    if weight is None or bias is None:
        raise CheckpointError("the checkpoint has no cc_projection.weight/bias; it is not a Zero123 checkpoint")
    extra = sorted(k for k in state if k.startswith(CC_PREFIX) and k not in (CC_PREFIX + "weight", CC_PREFIX + "bias"))
    if weight.ndim != 2 or bias.shape != (weight.shape[0],) or weight.shape[1] <= POSE_DIMS or extra:
        raise CheckpointError(
            f"cc_projection must be a Linear(E + {POSE_DIMS}, D); found weight {tuple(weight.shape)}, bias "
            f"{tuple(bias.shape)}" + (f", extra tensors {extra}" if extra else "")
        )
    return {"projection.weight": weight, "projection.bias": bias}


def convert_state_dict(
    state: Mapping[str, torch.Tensor], architecture: Zero123Architecture = ZERO123_XL
) -> ConvertedParts:
    """Every part of a Zero123 LDM state dict under diffusers/transformers names (float32 copies).

    Raises:
        CheckpointError: any part that does not convert cleanly (see the part functions).
    """
    ldm_unet, unet_source = extract_unet(state)
    clip = convert_clip_visual(state)
    return ConvertedParts(
        unet=_owned_float32(convert_unet(ldm_unet, architecture.unet)),
        vae=_owned_float32(convert_vae(state, architecture.vae)),
        image_encoder=None if clip is None else _owned_float32(clip),
        cc_projection=_owned_float32(extract_cc_projection(state)),
        unet_source=unet_source,
    )


def _unused(source: Mapping[str, torch.Tensor], converted: Mapping[str, torch.Tensor | None]) -> list[str]:
    """Source keys whose tensor ended up in no converted tensor.

    diffusers' converters only rename and take views (``w[:, :, 0, 0]``), and a view's ``_base`` is the tensor it was
    taken from, so identity tells which source tensors were used (also for meta tensors, which have no storage).
    """
    used = {id(t if t._base is None else t._base) for t in converted.values() if t is not None}
    return sorted(k for k, t in source.items() if id(t) not in used)


def _owned_float32(tensors: Mapping[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """Float32 (fp16 CLIP towers are common), contiguous copies: safetensors refuses shared or strided storage, and
    copies detach the result from the memory-mapped checkpoint."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if value is None:  # diffusers' converters write None for a name they expected but did not find
            raise CheckpointError(f"no source tensor for {key!r}; the checkpoint's layout does not fit the config")
        dtype = torch.float32 if value.is_floating_point() else value.dtype
        out[key] = value.detach().to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------------------------------
# Recognising the checkpoint: names and shapes only, before any tensor is copied
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ConversionPlan:
    """A checkpoint checked against the architecture: every part under its diffusers/transformers names, as views of
    the (memory-mapped) source tensors. Nothing has been copied yet."""

    unet: dict[str, torch.Tensor]
    vae: dict[str, torch.Tensor]
    image_encoder: dict[str, torch.Tensor] | None
    """None when the tower comes from ``image_encoder_dir``."""
    cc_projection: dict[str, torch.Tensor]
    unet_source: str
    """"ema" or "raw"."""
    configs: dict[str, Any] = field(default_factory=dict)
    """Part name → the meta-device module whose config is written beside the weights."""

    def bytes_to_write(self) -> int:
        """Size of the weight files to write (float32 for every floating tensor)."""
        parts = (self.unet, self.vae, self.image_encoder or {}, self.cc_projection)
        return sum(_stored_nbytes(t) for part in parts for t in part.values())


def plan_conversion(
    state: Mapping[str, torch.Tensor],
    architecture: Zero123Architecture = ZERO123_XL,
    *,
    source: str | os.PathLike[str] = "the checkpoint",
    image_encoder_dir: str | os.PathLike[str] | None = None,
) -> ConversionPlan:
    """Recognise a Zero123 checkpoint from its key names and shapes and map every part, copying nothing.

    First a signature check (UNet input channels, ``cc_projection``, VAE, image tower) that refuses another network
    in one message naming what was found and what Zero123 has; then each part is renamed (views only) and compared
    name by name and shape by shape with its model built on the meta device.

    Args:
        state: the LDM state dict (tensors may be memory-mapped or on the meta device).
        architecture: the sizes expected.
        source: the file's name, for messages.
        image_encoder_dir: a saved CLIPVisionModelWithProjection, used when the checkpoint has no CLIP tower.

    Raises:
        CheckpointError: not a Zero123 checkpoint of this architecture (names the file, the findings and the fix).
        MissingWeightsError: no CLIP tower in the file and no usable ``image_encoder_dir``.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    name = Path(source).name if source != "the checkpoint" else str(source)
    _check_signature(state, architecture, name)
    try:
        ldm_unet, unet_source = extract_unet(state)
        unet = convert_unet(ldm_unet, architecture.unet)
        vae = convert_vae(state, architecture.vae)
        clip = convert_clip_visual(state)
        cc = extract_cc_projection(state)
        for part, tensors in (("unet", unet), ("vae", vae), ("image_encoder", clip or {})):
            missing = sorted(k for k, v in tensors.items() if v is None)
            if missing:  # diffusers' converters write None for a name they expected but did not find
                raise CheckpointError(f"the {part} has no source tensor for {_clip_list(missing)}; the checkpoint's "
                                      "layout does not fit the config", fix=_DOWNLOAD_FIX)
        configs: dict[str, Any] = {
            "unet": _check_strict(lambda: UNet2DConditionModel(**architecture.unet.diffusers_config()), unet, "UNet"),
            "vae": _check_strict(lambda: AutoencoderKL(**architecture.vae.diffusers_config()), vae, "VAE"),
        }
        cc_in, cc_out = cc["projection.weight"].shape[1], cc["projection.weight"].shape[0]
        if cc_out != architecture.unet.context_dim:
            raise CheckpointError(
                f"cc_projection outputs {cc_out} dims but the UNet's context is {architecture.unet.context_dim}",
                fix=_DOWNLOAD_FIX)
        if clip is not None:
            clip_config = CLIPVisionConfig(**architecture.image_encoder.transformers_config())
            configs["image_encoder"] = _check_strict(lambda: CLIPVisionModelWithProjection(clip_config), clip,
                                                     "CLIP image tower")
            embed = configs["image_encoder"].config.projection_dim
        else:
            embed = _image_encoder_dir_config(image_encoder_dir, name).projection_dim
        if embed + POSE_DIMS != cc_in:
            raise CheckpointError(f"cc_projection expects {cc_in - POSE_DIMS}-dim image embeddings but the image "
                                  f"encoder gives {embed}", fix=_DOWNLOAD_FIX)
    except CheckpointError as exc:
        raise CheckpointError(f"{name}: {exc.message}", fix=exc.fix) from None
    return ConversionPlan(unet=unet, vae=vae, image_encoder=clip, cc_projection=cc, unet_source=unet_source,
                          configs=configs)


def _check_signature(state: Mapping[str, torch.Tensor], arch: Zero123Architecture, name: str) -> None:
    """Refuse, in one message, a checkpoint whose key names and a few shapes are not Zero123's."""
    conv_in = state.get(UNET_PREFIX + "input_blocks.0.0.weight")
    cc_w, cc_b = state.get(CC_PREFIX + "weight"), state.get(CC_PREFIX + "bias")
    want_conv_in = (arch.unet.model_channels, arch.unet.in_channels, 3, 3)
    want_cc = (arch.unet.context_dim, arch.image_encoder.embed_dim + POSE_DIMS)
    found: list[str] = []
    wrong: list[str] = []
    if conv_in is None:
        wrong.append(f"no {UNET_PREFIX}input_blocks.0.0.weight (the UNet's first convolution)")
    else:
        shape = tuple(conv_in.shape)
        found.append(f"a UNet whose first convolution is {_shape(shape)}")
        if shape != want_conv_in:
            channels = f"{shape[1]} input channels" if len(shape) == 4 else f"shape {_shape(shape)}"
            wrong.append(f"the UNet takes {channels}, Zero123 takes {arch.unet.in_channels} (noisy latent + the "
                         f"input view's latent): expected {_shape(want_conv_in)}")
    if cc_w is None or cc_b is None:
        wrong.append("no cc_projection.weight/bias (the layer that mixes the CLIP image embedding with the camera "
                     "pose)")
    elif tuple(cc_w.shape) != want_cc or tuple(cc_b.shape) != (want_cc[0],):
        wrong.append(f"cc_projection is {_shape(cc_w.shape)} (bias {_shape(cc_b.shape)}), expected {_shape(want_cc)} "
                     f"(bias {want_cc[0]})")
    else:
        found.append(f"cc_projection {_shape(cc_w.shape)}")
    if not any(k.startswith(VAE_PREFIX) for k in state):
        wrong.append(f"no VAE ({VAE_PREFIX}*)")
    if any(k.startswith(CLIP_VISUAL_PREFIX) for k in state):
        found.append("a CLIP image tower")
    text = sorted({k.split(".")[1] for k in state if k.startswith("cond_stage_model.") and
                   not k.startswith("cond_stage_model.model.")})
    if text:
        found.append("a text encoder (cond_stage_model." + "/".join(text) + ".*)")
    if not wrong:
        return
    looks_like = ""
    if conv_in is not None and tuple(conv_in.shape[1:2]) == (4,) and cc_w is None:
        looks_like = " It looks like a Stable Diffusion 1.x (text-to-image) checkpoint."
    raise CheckpointError(
        f"{name} is not a Zero123 checkpoint: " + "; ".join(wrong) + "."
        + (f" Found: {', '.join(found)}." if found else "") + looks_like
        + f" Expected Zero123-XL: a UNet with first convolution {_shape(want_conv_in)}, cc_projection "
          f"{_shape(want_cc)}, a VAE and a CLIP image tower.",
        fix=f"put the official zero123-xl.ckpt in place of {name} (`one2345 weights download --only zero123-xl` "
            "fetches it)")


def _shape(shape: Any) -> str:
    return "×".join(str(int(s)) for s in shape)


def _check_strict(factory: Callable[[], nn.Module], state: Mapping[str, torch.Tensor], part: str) -> nn.Module:
    """Build the module on the meta device (no memory) and check that names and shapes match ``state`` one to one;
    return the meta module (its config is what gets written)."""
    with torch.device("meta"):
        module = factory()
    expected = module.state_dict()
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(state.keys() & expected.keys())
        if state[k].shape != expected[k].shape
    ]
    _raise_if_problems(
        f"the {part}",
        {
            "model tensors the checkpoint lacks": sorted(expected.keys() - state.keys()),
            "checkpoint tensors the model lacks": sorted(state.keys() - expected.keys()),
            "shapes": shapes,
        },
    )
    return module


def _load_strict(factory: Callable[[], nn.Module], state: dict[str, torch.Tensor], part: str) -> nn.Module:
    """:func:`_check_strict`, then adopt ``state`` as the module's tensors."""
    module = _check_strict(factory, state, part)
    module.load_state_dict(state, strict=True, assign=True)
    return module


# ---------------------------------------------------------------------------------------------------------------------
# Progress, cancellation, the lock and leftovers
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConversionProgress:
    """One report of a conversion (:func:`ensure_converted`'s ``progress`` callback)."""

    phase: str
    """``wait`` (another process converts the same file), ``clean`` (leftovers removed), ``read``, ``check``,
    ``convert`` (a part begins), ``write`` (bytes of a part's weight file; many reports), ``finish`` and ``done``."""
    step: int
    """1…``total`` for read … done; 0 for wait and clean."""
    total: int
    message: str
    """A line for people, e.g. "converting the UNet (3.4 GB)"."""
    part: str | None = None
    """unet, vae, image_encoder or cc_projection while a part is converted."""
    bytes_done: int = 0
    """Weight bytes written so far, of ``bytes_total`` (0 until the checkpoint is recognised)."""
    bytes_total: int = 0

    @property
    def fraction(self) -> float:
        """The conversion's fraction done in [0, 1] (by bytes written once writing starts)."""
        if self.phase == "done":
            return 1.0
        if self.bytes_total:
            return min(0.05 + 0.9 * self.bytes_done / self.bytes_total, 0.95)
        return 0.0


ProgressCallback = Callable[[ConversionProgress], None]
CancelCheck = Callable[[], bool] | threading.Event

_STEPS = ("read", "check", "unet", "vae", "image_encoder", "cc_projection", "finish", "done")
_PART_TITLES = {"unet": "the UNet", "vae": "the VAE", "image_encoder": "the CLIP image encoder",
                "cc_projection": "cc_projection"}
_WRITE_REPORT_BYTES = 64 * 2**20
"""A ``write`` report at most every this many bytes."""
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)-[^/]+")
"""Hidden folders of an unfinished conversion (``mkdtemp``) or of a replaced one (``replace_dir``)."""


class _Reporter:
    def __init__(self, callback: ProgressCallback | None, cancel: Callable[[], bool]) -> None:
        self.callback = callback
        self.cancel = cancel
        self.bytes_done = 0
        self.bytes_total = 0
        self._last_write_report = 0

    def __call__(self, phase: str, message: str, *, step: str | None = None, part: str | None = None) -> None:
        if phase != "done":  # once the folder is in place, a late cancel changes nothing
            self.check_cancel()
        if self.callback is not None:
            number = _STEPS.index(step or phase) + 1 if (step or phase) in _STEPS else 0
            self.callback(ConversionProgress(phase, number, len(_STEPS), message, part, self.bytes_done,
                                             self.bytes_total))

    def wrote(self, n: int, part: str, message: str) -> None:
        self.bytes_done += n
        if self.bytes_done - self._last_write_report >= _WRITE_REPORT_BYTES:
            self._last_write_report = self.bytes_done
            self("write", message, step=part, part=part)
        else:
            self.check_cancel()

    def check_cancel(self) -> None:
        if self.cancel():
            raise CancelledError("the Zero123 conversion was cancelled; nothing of it was kept",
                                 fix="start it again (one2345 weights prepare, or the next Generate)")


def _cancel_fn(should_cancel: CancelCheck | None) -> Callable[[], bool]:
    if should_cancel is None:
        return lambda: False
    if isinstance(should_cancel, threading.Event):
        return should_cancel.is_set
    return should_cancel


class _ConversionLock:
    """An exclusive lock on ``.<folder name>.lock`` beside the converted folder, held for a whole conversion.

    Only the holder writes temporary folders, so any temporary folder found by the holder belongs to a process that
    died (the kernel drops a dead process's lock, whatever killed it). The file keeps the holder's pid for messages.
    """

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir.parent / f".{out_dir.name}.lock"
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock if no live process holds it; False otherwise."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd):
                os.close(fd)
                return False
            # The holder before us unlinks the file on release; a lock taken on that unlinked file guards nothing,
            # so it only counts if the path still names the file locked.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self.fd = fd
                return True
            os.close(fd)
        return False

    def acquire(self, report: _Reporter, poll_s: float = 0.5) -> None:
        """Wait for the lock, reporting the holder once and honouring cancellation."""
        told = False
        while not self.try_acquire():
            if not told:
                told = True
                report("wait", f"waiting for process {self.holder() or '?'}, which is converting the same checkpoint")
            report.check_cancel()
            time.sleep(poll_s)

    def holder(self) -> str | None:
        try:
            return self.path.read_text().strip() or None
        except OSError:
            return None

    def release(self) -> None:
        """Remove the lock file (while still holding it, see :meth:`try_acquire`) and drop the lock."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            if sys.platform != "win32":  # an open file cannot be deleted on Windows; it stays, empty of meaning
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
            os.close(fd)  # closing the only descriptor drops the lock


def _try_lock(fd: int) -> bool:
    if sys.platform == "win32":  # pragma: no cover - Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _leftovers(cache_dir: Path, name: str | None = None) -> dict[str, list[Path]]:
    """Hidden temporary/replaced folders in ``cache_dir``, by the converted folder's name they belong to."""
    found: dict[str, list[Path]] = {}
    try:
        entries = list(cache_dir.iterdir())
    except OSError:
        return found
    for entry in entries:
        match = _LEFTOVER.fullmatch(entry.name)
        if match and (name is None or match["name"] == name) and entry.is_dir() and not entry.is_symlink():
            found.setdefault(match["name"], []).append(entry)
    return found


def _remove(paths: list[Path], report: _Reporter | None = None) -> list[Path]:
    removed = []
    for path in sorted(paths):
        size = _tree_bytes(path)
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
            log.info("removed %s (%s) left by an interrupted Zero123 conversion", path, _human(size))
            if report is not None:
                report("clean", f"removed {path.name} ({_human(size)}) left by an interrupted conversion")
    return removed


def remove_interrupted_conversions(cache_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete the leftovers of interrupted conversions in ``cache_dir`` (hidden ``.<name>.tmp-*`` / ``.old-*``
    folders), never one whose conversion is running: each name's lock is tried without waiting and skipped when a
    live process holds it. Cheap when there is nothing to remove (one directory listing). Call it at start-up.

    Returns:
        The folders removed.
    """
    removed: list[Path] = []
    for name in _leftovers(Path(cache_dir)):
        lock = _ConversionLock(Path(cache_dir) / name)
        if not lock.try_acquire():
            continue
        try:
            removed += _remove(_leftovers(Path(cache_dir), name).get(name, []))
        finally:
            lock.release()
    return removed


# ---------------------------------------------------------------------------------------------------------------------
# Writing the diffusers folder
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileRecord:
    """What the manifest keeps of one written file."""

    size: int
    sha256: str


_SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _stored_dtype(t: torch.Tensor) -> torch.dtype:
    # float32 everywhere (fp16 CLIP towers are common); the loader casts to the run's precision.
    return torch.float32 if t.is_floating_point() else t.dtype


def _stored_nbytes(t: torch.Tensor) -> int:
    return t.numel() * torch.empty((), dtype=_stored_dtype(t)).element_size()


def _write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], on_bytes: Callable[[int], None]) -> FileRecord:
    """Write ``tensors`` (float32 for floating ones) as a safetensors file one tensor at a time, hashing as it goes.

    Streaming keeps the extra memory to one tensor (the source stays memory-mapped), lets ``on_bytes`` report and
    cancel between tensors, and gives the SHA-256 without reading 5 GB back. Format: u64-LE header length, the JSON
    header (padded with spaces to 8 bytes, as safetensors does), then the tensors' bytes back to back.
    """
    if sys.byteorder != "little":  # pragma: no cover - safetensors is little-endian
        raise RuntimeError("writing safetensors needs a little-endian machine")
    names = sorted(tensors)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key in names:
        t = tensors[key]
        dtype = _stored_dtype(t)
        if dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor {key!r} has dtype {t.dtype}, which the converter cannot store")
        n = _stored_nbytes(t)
        header[key] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(blob)), blob):
            f.write(chunk)
            digest.update(chunk)
        for key in names:
            t = tensors[key].detach()
            data = t.to(dtype=_stored_dtype(t)).contiguous().reshape(-1).view(torch.uint8).numpy()
            f.write(memoryview(data))
            digest.update(memoryview(data))
            del data
            on_bytes(_stored_nbytes(tensors[key]))
        f.flush()
        os.fsync(f.fileno())
    return FileRecord(size=path.stat().st_size, sha256=digest.hexdigest())


def _file_record(path: Path) -> FileRecord:
    return FileRecord(size=path.stat().st_size, sha256=_sha256(path))


def _sha256(path: Path, on_bytes: Callable[[int], None] | None = None, chunk: int = 8 * 2**20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
            if on_bytes is not None:
                on_bytes(len(block))
    return digest.hexdigest()


def convert_zero123_checkpoint(
    ckpt_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    image_encoder_dir: str | os.PathLike[str] | None = None,
    architecture: Zero123Architecture | None = None,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
) -> Path:
    """Convert a Zero123 Lightning checkpoint into a diffusers-format folder at ``out_dir`` (replaced atomically).

    The checkpoint is recognised from its key names and shapes first (:func:`plan_conversion`); only then are the
    parts written, one tensor at a time, into a temporary sibling folder that is renamed into place at the end, with
    a manifest (size and SHA-256 of every file) written last. The whole conversion holds a lock beside ``out_dir``,
    so two processes never convert into the same place at once, and the leftovers of interrupted conversions are
    removed first. Memory: the source is memory-mapped and at most one tensor is copied at a time.

    Args:
        ckpt_path: ``zero123-xl.ckpt`` or another checkpoint of the same layout.
        out_dir: destination folder; an existing one is replaced.
        image_encoder_dir: a saved ``CLIPVisionModelWithProjection`` (``config.json`` + weights), used only when the
            checkpoint has no ``cond_stage_model.model.visual.*`` tensors.
        architecture: model sizes; Zero123-XL's (:data:`ZERO123_XL`) by default.
        progress: called with a :class:`ConversionProgress` at each step and every 64 MiB written.
        should_cancel: a callable or ``threading.Event``, checked between steps and between tensors.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        MissingWeightsError: the checkpoint is absent, or it has no CLIP tower and no usable ``image_encoder_dir``.
        CheckpointError: the checkpoint is damaged, of another network, or any part fails the strict checks.
        CancelledError: ``should_cancel`` became true; nothing of the conversion is left on disk.
    """
    out_dir = Path(out_dir)
    report = _Reporter(progress, _cancel_fn(should_cancel))
    lock = _ConversionLock(out_dir)
    lock.acquire(report)
    try:
        _remove(_leftovers(out_dir.parent, out_dir.name).get(out_dir.name, []), report)
        return _convert(Path(ckpt_path), out_dir, image_encoder_dir, architecture or ZERO123_XL, report)
    finally:
        lock.release()


def _convert(ckpt_path: Path, out_dir: Path, image_encoder_dir: str | os.PathLike[str] | None,
             architecture: Zero123Architecture, report: _Reporter) -> Path:
    from diffusers import DDIMScheduler

    started = time.monotonic()
    if not ckpt_path.is_file():
        load_lightning_state_dict(ckpt_path)  # raises MissingWeightsError naming the file and the fix
    source_stat = ckpt_path.stat()
    report("read", f"One-time set-up: converting Zero123-XL from {ckpt_path.name} ({_human(source_stat.st_size)}), "
                   "about a minute…")
    state = load_lightning_state_dict(ckpt_path)
    report("check", f"recognising {ckpt_path.name} from its key names and shapes")
    plan = plan_conversion(state, architecture, source=ckpt_path, image_encoder_dir=image_encoder_dir)
    if plan.unet_source == "raw":
        log.warning("%s has no EMA copy of the UNet (model_ema.*); converting its raw weights, which are not the ones "
                    "the reference samples with: views may be noisier than the paper's", ckpt_path.name)
    report.bytes_total = plan.bytes_to_write()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp: Path | None = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        records: dict[str, FileRecord] = {}

        def write_part(part: str, tensors: Mapping[str, torch.Tensor], weights_name: str) -> None:
            relative = f"{part}/{weights_name}"
            title = f"writing {relative} ({_human(sum(_stored_nbytes(t) for t in tensors.values()))})"
            (tmp / part).mkdir(exist_ok=True)
            report("write", title, step=part, part=part)
            records[relative] = _write_safetensors(tmp / relative, tensors,
                                                   lambda n: report.wrote(n, part, title))

        for part, weights_name in (("unet", "diffusion_pytorch_model.safetensors"),
                                   ("vae", "diffusion_pytorch_model.safetensors")):
            tensors = getattr(plan, part)
            report("convert", f"converting {_PART_TITLES[part]} "
                              f"({_human(sum(_stored_nbytes(t) for t in tensors.values()))})", step=part, part=part)
            plan.configs[part].save_config(tmp / part)
            write_part(part, tensors, weights_name)

        report("convert", f"converting {_PART_TITLES['image_encoder']}", step="image_encoder", part="image_encoder")
        if plan.image_encoder is not None:
            encoder, encoder_tensors, origin = plan.configs["image_encoder"], plan.image_encoder, "checkpoint"
        else:
            encoder, folder = _load_image_encoder_dir(image_encoder_dir, ckpt_path)
            encoder_tensors, origin = encoder.state_dict(), str(folder.resolve())
        (tmp / "image_encoder").mkdir()
        encoder.config.architectures = [type(encoder).__name__]  # what save_pretrained records
        encoder.config.dtype = torch.float32
        encoder.config.save_pretrained(tmp / "image_encoder")
        write_part("image_encoder", encoder_tensors, "model.safetensors")
        del encoder, encoder_tensors

        report("convert", "converting cc_projection", step="cc_projection", part="cc_projection")
        cc_out, cc_in = plan.cc_projection["projection.weight"].shape
        (tmp / "cc_projection").mkdir()
        _write_json(tmp / "cc_projection" / "config.json",
                    {"_class_name": "CCProjection", "in_channel": int(cc_in), "out_channel": int(cc_out)})
        write_part("cc_projection", plan.cc_projection, "diffusion_pytorch_model.safetensors")

        report("finish", "writing the scheduler, the index and the manifest")
        DDIMScheduler(**architecture.scheduler_config()).save_pretrained(tmp / "scheduler")
        _write_json(tmp / "model_index.json", _model_index())
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            relative = path.relative_to(tmp).as_posix()
            if relative not in records:
                records[relative] = _file_record(path)
        # Written last: a folder with a manifest is a complete one.
        _write_json(tmp / MARKER_NAME, {
            **_marker_identity(source_stat, architecture),
            "source": str(ckpt_path.resolve()),
            "unet_weights": plan.unet_source,
            "image_encoder": origin,
            "files": {k: asdict(v) for k, v in sorted(records.items())},
        })
        report.check_cancel()
        replace_dir(tmp, out_dir)
        tmp = None
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        del state, plan
    elapsed = time.monotonic() - started
    log.info("converted %s into %s (%s) in %.0f s", ckpt_path.name, out_dir, _human(report.bytes_done), elapsed)
    report("done", f"Zero123-XL is ready ({_human(report.bytes_done)} in {elapsed:.0f} s)")
    return out_dir


def ensure_converted(
    ckpt_path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    *,
    image_encoder_dir: str | os.PathLike[str] | None = None,
    architecture: Zero123Architecture | None = None,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
) -> Path:
    """The diffusers folder of ``ckpt_path`` under ``cache_dir``, converting only when needed.

    The folder is ``<cache_dir>/<checkpoint stem>-diffusers``. It is reused when its manifest records the same
    source size and modification time (ns), converter version and architecture, and every file it lists has the
    recorded size (a fast check, every time; hashes are checked by :func:`verify_converted`). Otherwise it is
    (re)built, with the reason logged. Leftovers of interrupted conversions are removed either way (never those of
    a conversion another process is running).

    Args:
        ckpt_path, image_encoder_dir, architecture: as :func:`convert_zero123_checkpoint`.
        cache_dir: where converted folders live (``<weights dir>/converted``).
        progress: called with :class:`ConversionProgress` reports; never called when the folder is reused.
        should_cancel: a callable or ``threading.Event``; see :func:`convert_zero123_checkpoint`.

    Raises:
        Same as :func:`convert_zero123_checkpoint`.
    """
    ckpt_path, cache_dir = Path(ckpt_path), Path(cache_dir)
    architecture = architecture or ZERO123_XL
    out_dir = cache_dir / f"{ckpt_path.stem}-diffusers"
    if ckpt_path.is_file() and _cache_problem(out_dir, ckpt_path, architecture) is None:
        if _leftovers(cache_dir, out_dir.name):
            remove_interrupted_conversions(cache_dir)
        return out_dir
    report = _Reporter(progress, _cancel_fn(should_cancel))
    lock = _ConversionLock(out_dir)
    lock.acquire(report)
    try:
        _remove(_leftovers(cache_dir, out_dir.name).get(out_dir.name, []), report)
        # Another process may have finished the conversion while this one waited for the lock.
        problem = _cache_problem(out_dir, ckpt_path, architecture) if ckpt_path.is_file() else "no checkpoint"
        if problem is None:
            return out_dir
        if out_dir.exists():
            log.warning("converting %s again: %s", ckpt_path.name, problem)
        return _convert(ckpt_path, out_dir, image_encoder_dir, architecture, report)
    finally:
        lock.release()


def _cache_problem(out_dir: Path, ckpt_path: Path, architecture: Zero123Architecture) -> str | None:
    """Why ``out_dir`` cannot be reused for ``ckpt_path`` (None: it can). Sizes only, no hashing."""
    marker = _read_json(out_dir / MARKER_NAME)
    if marker is None:
        return f"{out_dir} has no manifest ({MARKER_NAME}); it is incomplete or was made by another version"
    identity = _marker_identity(ckpt_path.stat(), architecture)
    changed = [k for k, v in identity.items() if marker.get(k) != v]
    if changed:
        return f"{out_dir} was made from another file, version or architecture ({', '.join(changed)} differ)"
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return f"{out_dir}'s manifest lists no files"
    for relative, record in files.items():
        path = out_dir / relative
        expected = record.get("size") if isinstance(record, dict) else None
        try:
            size = path.stat().st_size
        except OSError:
            return f"{relative} is missing from {out_dir}"
        if size != expected:
            return f"{relative} in {out_dir} is {size:,} bytes, the manifest says {expected:,}: it is damaged"
    return None


@dataclass(frozen=True)
class ConvertedVerification:
    """The result of :func:`verify_converted`."""

    folder: Path
    problems: list[str]
    """One line per bad file (missing, wrong size, wrong SHA-256) or a missing manifest; empty when all is well."""
    files: int
    """Files checked."""
    bytes_checked: int

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_converted(
    folder: str | os.PathLike[str],
    *,
    progress: Callable[[int, int], None] | None = None,
    should_cancel: CancelCheck | None = None,
) -> ConvertedVerification:
    """Check every file of a converted folder against its manifest: size, then SHA-256 (streamed, 8 MiB at a time).

    For ``one2345 weights verify --all``. A folder that fails is rebuilt by :func:`ensure_converted` once it is
    deleted or when a size differs; the fix for a hash mismatch is to delete the folder (or run
    ``one2345 weights prepare``, which rebuilds it).

    Args:
        folder: ``<weights dir>/converted/zero123-xl-diffusers``.
        progress: ``progress(bytes_done, bytes_total)`` while hashing.
        should_cancel: checked every 8 MiB.

    Raises:
        CancelledError: ``should_cancel`` became true.
    """
    folder = Path(folder)
    cancel = _cancel_fn(should_cancel)
    marker = _read_json(folder / MARKER_NAME)
    files = marker.get("files") if marker is not None else None
    if not isinstance(files, dict) or not files:
        return ConvertedVerification(folder, [f"{folder} has no manifest ({MARKER_NAME}) listing its files"], 0, 0)
    problems: list[str] = []
    todo: list[tuple[str, Path, str]] = []
    for relative, record in sorted(files.items()):
        path = folder / relative
        if not isinstance(record, dict) or not path.is_file():
            problems.append(f"{relative}: missing")
        elif path.stat().st_size != record.get("size"):
            problems.append(f"{relative}: {path.stat().st_size:,} bytes, expected {record.get('size'):,}")
        else:
            todo.append((relative, path, str(record.get("sha256"))))
    total = sum(path.stat().st_size for _, path, _ in todo)
    done = 0

    def on_bytes(n: int) -> None:
        nonlocal done
        done += n
        if cancel():
            raise CancelledError("verifying the converted Zero123 folder was cancelled")
        if progress is not None:
            progress(done, total)

    for relative, path, expected in todo:
        if _sha256(path, on_bytes) != expected:
            problems.append(f"{relative}: SHA-256 differs from the manifest (the file is damaged)")
    return ConvertedVerification(folder, problems, len(files), done)


def _image_encoder_dir_config(image_encoder_dir: str | os.PathLike[str] | None, name: str) -> Any:
    """The CLIPVisionConfig of ``image_encoder_dir`` (the checkpoint has no CLIP tower); read, not loaded."""
    from transformers import CLIPVisionConfig

    if image_encoder_dir is None:
        raise MissingWeightsError(f"{name} has no CLIP image tower and no image_encoder_dir was given",
                                  fix=_IMAGE_ENCODER_OPTIONS)
    folder = Path(image_encoder_dir)
    if not (folder / "config.json").is_file():
        raise MissingWeightsError(f"image_encoder_dir {folder} has no config.json", fix=_IMAGE_ENCODER_OPTIONS)
    try:
        return CLIPVisionConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"image_encoder_dir {folder}: unreadable config.json ({exc})") from exc


_IMAGE_ENCODER_OPTIONS = (
    "either use a checkpoint that contains the CLIP image tower (cond_stage_model.model.visual.*), or pass "
    "image_encoder_dir= a saved CLIPVisionModelWithProjection of OpenAI CLIP ViT-L/14 (config.json + weights, e.g. "
    "the image_encoder/ folder of lambdalabs/sd-image-variations-diffusers)"
)


def _load_image_encoder_dir(
    image_encoder_dir: str | os.PathLike[str] | None, ckpt_path: Path
) -> tuple[nn.Module, Path]:
    """The saved CLIPVisionModelWithProjection in ``image_encoder_dir``, loaded strictly, and that folder."""
    from transformers import CLIPVisionModelWithProjection

    _image_encoder_dir_config(image_encoder_dir, ckpt_path.name)
    folder = Path(image_encoder_dir)  # type: ignore[arg-type]  # checked just above
    try:
        encoder, info = CLIPVisionModelWithProjection.from_pretrained(folder, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"image_encoder_dir {folder} does not load as CLIPVisionModelWithProjection: {exc}"
        ) from exc
    _raise_if_problems(
        f"the image encoder in {folder}",
        {
            "missing": sorted(info.get("missing_keys", [])),
            # Old transformers saved the position_ids buffer; it is recomputed, not a weight.
            "unexpected": sorted(k for k in info.get("unexpected_keys", []) if not k.endswith("position_ids")),
            "shapes": [str(m) for m in info.get("mismatched_keys", [])],
        },
    )
    return encoder, folder


def _model_index() -> dict[str, Any]:
    import diffusers

    return {
        "_class_name": "Zero1to3StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "cc_projection": ["pipeline_zero1to3", "CCProjection"],
        "feature_extractor": [None, None],
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _marker_identity(source_stat: os.stat_result | None, architecture: Zero123Architecture) -> dict[str, Any]:
    """What must match for a cached conversion to be reused (JSON-normalised so it compares with a read marker)."""
    identity = {
        "converter_version": CONVERTER_VERSION,
        "source_size": None if source_stat is None else source_stat.st_size,
        "source_mtime_ns": None if source_stat is None else source_stat.st_mtime_ns,
        "architecture": asdict(architecture),
    }
    return json.loads(json.dumps(identity))


def _raise_if_problems(part: str, problems: Mapping[str, list[str]]) -> None:
    found = {kind: names for kind, names in problems.items() if names}
    if found:
        detail = "; ".join(f"{kind} ({len(names)}): {_clip_list(names)}" for kind, names in found.items())
        raise CheckpointError(f"{part} does not load strictly: {detail}", fix=_DOWNLOAD_FIX)


def _clip_list(names: list[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


def _human(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _tree_bytes(path: Path) -> int:
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
