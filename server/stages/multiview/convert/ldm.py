"""Zero123's architecture, reading its Lightning checkpoint, and the pure conversion of the LDM state dict into
diffusers/transformers state dicts (spec §2.1, §2.2).

Key renaming for the UNet and the VAE is diffusers' own (``diffusers.loaders.single_file_utils``); diffusers has no
mapping for the OpenAI-CLIP *vision* tower (only for CLIP text encoders), so that one is written out here, following
the layout of OpenAI's ``clip/model.py`` (``VisionTransformer``) and transformers' ``CLIPVisionModelWithProjection``.

Every part is checked strictly: a source tensor of the part that lands nowhere, a model tensor that gets no value or a
shape mismatch is a :class:`CheckpointError` listing them, never a silently random-initialised weight.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from server.common.errors import CheckpointError, MissingWeightsError

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

DOWNLOAD_FIX = "run `one2345 weights download --only zero123-xl` (or pass the path of an intact zero123-xl.ckpt)"
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
        raise MissingWeightsError(f"Zero123 checkpoint {path} not found", fix=DOWNLOAD_FIX)
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
            f"{path} holds a {type(obj).__name__}, not a Lightning checkpoint dict", fix=DOWNLOAD_FIX
        )
    if "state_dict" in obj:
        state = obj["state_dict"]
    elif any(isinstance(k, str) and k.startswith(UNET_PREFIX) for k in obj):
        state = obj
    else:
        keys = ", ".join(sorted(map(str, obj))[:8])
        raise CheckpointError(
            f"{path} has no 'state_dict' (top-level keys: {keys}); it is not a Zero123 Lightning checkpoint",
            fix=DOWNLOAD_FIX,
        )
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: 'state_dict' is a {type(state).__name__}, not a mapping", fix=DOWNLOAD_FIX)
    bad = [str(k) for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise CheckpointError(f"{path}: state_dict entries that are not named tensors: {short_list(bad)}")
    if not any(k.startswith(UNET_PREFIX) for k in state):
        raise CheckpointError(
            f"{path} has no {UNET_PREFIX}* weights; it is a checkpoint of another network, not Zero123",
            fix=DOWNLOAD_FIX,
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
    raise_if_problems(
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
    raise_if_problems("the UNet", {"LDM tensors with no diffusers place": _unused(source, converted)})
    return converted


def convert_vae(state: Mapping[str, torch.Tensor], config: LdmVaeConfig) -> dict[str, torch.Tensor]:
    """``first_stage_model.*`` → ``AutoencoderKL`` names, with diffusers' ``convert_ldm_vae_checkpoint``.

    Raises:
        CheckpointError: no VAE in the file, or VAE tensors the mapping left unused.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    source = {k: v for k, v in state.items() if k.startswith(VAE_PREFIX) and not k.startswith(VAE_TRAINING_ONLY_PREFIX)}
    if not source:
        raise CheckpointError(f"the checkpoint has no VAE ({VAE_PREFIX}* weights)", fix=DOWNLOAD_FIX)
    converted = convert_ldm_vae_checkpoint(source, config.diffusers_config())
    raise_if_problems("the VAE", {"LDM tensors with no diffusers place": _unused(source, converted)})
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
    raise_if_problems("the CLIP image tower", {"tensors with no transformers place": sorted(unknown)})
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


def raise_if_problems(part: str, problems: Mapping[str, list[str]]) -> None:
    """CheckpointError naming every non-empty list of ``problems`` (kind → names) found in ``part``."""
    found = {kind: names for kind, names in problems.items() if names}
    if found:
        detail = "; ".join(f"{kind} ({len(names)}): {short_list(names)}" for kind, names in found.items())
        raise CheckpointError(f"{part} does not load strictly: {detail}", fix=DOWNLOAD_FIX)


def short_list(names: list[str], limit: int = 10) -> str:
    """The first ``limit`` names, comma-separated, and how many more there are."""
    return ", ".join(names[:limit]) + (f", … ({len(names) - limit} more)" if len(names) > limit else "")
