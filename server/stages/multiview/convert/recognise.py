"""Recognising a Zero123 checkpoint from its key names and shapes only, before any tensor is copied.

:func:`plan_conversion` first refuses another network in one message (what was found, what Zero123 has), then maps
every part (views only) and compares it name by name and shape by shape with its model built on the meta device.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from server.common.errors import CheckpointError, MissingWeightsError
from server.stages.multiview.convert.ldm import (
    CC_PREFIX,
    CLIP_VISUAL_PREFIX,
    DOWNLOAD_FIX,
    POSE_DIMS,
    UNET_PREFIX,
    VAE_PREFIX,
    ZERO123_XL,
    Zero123Architecture,
    convert_clip_visual,
    convert_unet,
    convert_vae,
    extract_cc_projection,
    extract_unet,
    raise_if_problems,
    short_list,
)


def stored_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype ``t`` is written in."""
    # float32 everywhere (fp16 CLIP towers are common); the loader casts to the run's precision.
    return torch.float32 if t.is_floating_point() else t.dtype


def stored_nbytes(t: torch.Tensor) -> int:
    """Bytes ``t`` takes once written (in :func:`stored_dtype`)."""
    return t.numel() * torch.empty((), dtype=stored_dtype(t)).element_size()


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
        return sum(stored_nbytes(t) for part in parts for t in part.values())


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
                raise CheckpointError(f"the {part} has no source tensor for {short_list(missing)}; the checkpoint's "
                                      "layout does not fit the config", fix=DOWNLOAD_FIX)
        configs: dict[str, Any] = {
            "unet": _check_strict(lambda: UNet2DConditionModel(**architecture.unet.diffusers_config()), unet, "UNet"),
            "vae": _check_strict(lambda: AutoencoderKL(**architecture.vae.diffusers_config()), vae, "VAE"),
        }
        cc_in, cc_out = cc["projection.weight"].shape[1], cc["projection.weight"].shape[0]
        if cc_out != architecture.unet.context_dim:
            raise CheckpointError(
                f"cc_projection outputs {cc_out} dims but the UNet's context is {architecture.unet.context_dim}",
                fix=DOWNLOAD_FIX)
        if clip is not None:
            clip_config = CLIPVisionConfig(**architecture.image_encoder.transformers_config())
            configs["image_encoder"] = _check_strict(lambda: CLIPVisionModelWithProjection(clip_config), clip,
                                                     "CLIP image tower")
            embed = configs["image_encoder"].config.projection_dim
        else:
            embed = image_encoder_dir_config(image_encoder_dir, name).projection_dim
        if embed + POSE_DIMS != cc_in:
            raise CheckpointError(f"cc_projection expects {cc_in - POSE_DIMS}-dim image embeddings but the image "
                                  f"encoder gives {embed}", fix=DOWNLOAD_FIX)
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
    raise_if_problems(
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


def image_encoder_dir_config(image_encoder_dir: str | os.PathLike[str] | None, name: str) -> Any:
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
