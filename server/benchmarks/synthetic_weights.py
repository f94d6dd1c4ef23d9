"""Synthetic weight files of the real sizes and formats (random values), for the first-use benchmark
(:mod:`server.benchmarks.first_use`) and the converter's tests.

* The key layouts of a Zero123 Lightning checkpoint, written out from ``ldm/modules/diffusionmodules/
  {openaimodel,model}.py`` and ``clip/model.py``: :func:`ldm_unet_shapes`, :func:`ldm_vae_shapes`,
  :func:`openai_clip_shapes`, and the whole checkpoint with its EMA copy and optimizer state
  (:func:`zero123_checkpoint`; :func:`tiny_architecture` for tests).
* The other weight files in their published formats: SAM ViT-H (:func:`write_sam`; :func:`tiny_sam` for tests),
  LoFTR (:func:`write_loftr`) and the reconstruction network (:func:`write_reconstruction`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from server.benchmarks.streamed_checkpoint import RandomFill, StreamingCheckpointWriter, TensorSpec
from server.stages.multiview.convert import (
    LdmUNetConfig,
    LdmVaeConfig,
    OpenAIClipVisionConfig,
    Zero123Architecture,
)
from server.stages.sam_compat import import_segment_anything

ZERO123_XL_BYTES = 15_465_973_531
"""The pinned size of the official ``zero123-xl.ckpt`` (the outside measurement's copy had 15,465,819,153 B)."""


# ---------------------------------------------------------------------------------------------------------------------
# Key layouts (written out from ldm/modules/diffusionmodules/{openaimodel,model}.py and clip/model.py; the converter's
# tests build their tiny checkpoints from these same lists)


def _add_conv(s: dict[str, tuple[int, ...]], p: str, n_out: int, n_in: int, k: int) -> None:
    """A k×k convolution's weight and bias (both networks use the same layout)."""
    s[f"{p}.weight"], s[f"{p}.bias"] = (n_out, n_in, k, k), (n_out,)


def _add_norm(s: dict[str, tuple[int, ...]], p: str, ch: int) -> None:
    """A GroupNorm's (or LayerNorm's) weight and bias."""
    s[f"{p}.weight"], s[f"{p}.bias"] = (ch,), (ch,)


def ldm_unet_shapes(c: LdmUNetConfig) -> dict[str, tuple[int, ...]]:
    """openaimodel.UNetModel parameter shapes (spatial transformers with conv proj_in/out, GEGLU feed-forward)."""
    s: dict[str, tuple[int, ...]] = {}
    mc, emb = c.model_channels, 4 * c.model_channels

    def linear(p: str, n_out: int, n_in: int, bias: bool = True) -> None:
        s[f"{p}.weight"] = (n_out, n_in)
        if bias:
            s[f"{p}.bias"] = (n_out,)

    conv, norm = functools.partial(_add_conv, s), functools.partial(_add_norm, s)

    def resblock(p: str, cin: int, cout: int) -> None:
        norm(f"{p}.in_layers.0", cin)
        conv(f"{p}.in_layers.2", cout, cin, 3)
        linear(f"{p}.emb_layers.1", cout, emb)
        norm(f"{p}.out_layers.0", cout)
        conv(f"{p}.out_layers.3", cout, cout, 3)
        if cin != cout:
            conv(f"{p}.skip_connection", cout, cin, 1)

    def spatial_transformer(p: str, ch: int) -> None:
        norm(f"{p}.norm", ch)
        conv(f"{p}.proj_in", ch, ch, 1)
        t = f"{p}.transformer_blocks.0"
        for attn, kv_in in (("attn1", ch), ("attn2", c.context_dim)):
            linear(f"{t}.{attn}.to_q", ch, ch, bias=False)
            linear(f"{t}.{attn}.to_k", ch, kv_in, bias=False)
            linear(f"{t}.{attn}.to_v", ch, kv_in, bias=False)
            linear(f"{t}.{attn}.to_out.0", ch, ch)
        linear(f"{t}.ff.net.0.proj", 8 * ch, ch)
        linear(f"{t}.ff.net.2", ch, 4 * ch)
        for n in ("norm1", "norm2", "norm3"):
            norm(f"{t}.{n}", ch)
        conv(f"{p}.proj_out", ch, ch, 1)

    linear("time_embed.0", emb, mc)
    linear("time_embed.2", emb, emb)
    conv("input_blocks.0.0", mc, c.in_channels, 3)
    skip_channels, ch, ds, k = [mc], mc, 1, 1
    for level, mult in enumerate(c.channel_mult):
        for _ in range(c.num_res_blocks):
            resblock(f"input_blocks.{k}.0", ch, mult * mc)
            ch = mult * mc
            if ds in c.attention_resolutions:
                spatial_transformer(f"input_blocks.{k}.1", ch)
            skip_channels.append(ch)
            k += 1
        if level != len(c.channel_mult) - 1:
            conv(f"input_blocks.{k}.0.op", ch, ch, 3)
            skip_channels.append(ch)
            k, ds = k + 1, ds * 2
    resblock("middle_block.0", ch, ch)
    spatial_transformer("middle_block.1", ch)
    resblock("middle_block.2", ch, ch)
    k = 0
    for level, mult in reversed(list(enumerate(c.channel_mult))):
        for i in range(c.num_res_blocks + 1):
            resblock(f"output_blocks.{k}.0", ch + skip_channels.pop(), mult * mc)
            ch, n = mult * mc, 1
            if ds in c.attention_resolutions:
                spatial_transformer(f"output_blocks.{k}.1", ch)
                n = 2
            if level and i == c.num_res_blocks:
                conv(f"output_blocks.{k}.{n}.conv", ch, ch, 3)
                ds //= 2
            k += 1
    norm("out.0", ch)
    conv("out.2", c.out_channels, mc, 3)
    return s


def ldm_vae_shapes(c: LdmVaeConfig) -> dict[str, tuple[int, ...]]:
    """ldm AutoencoderKL parameter shapes (Encoder/Decoder with mid attention only), without the prefix."""
    s: dict[str, tuple[int, ...]] = {}

    conv, norm = functools.partial(_add_conv, s), functools.partial(_add_norm, s)

    def resblock(p: str, cin: int, cout: int) -> None:
        norm(f"{p}.norm1", cin)
        conv(f"{p}.conv1", cout, cin, 3)
        norm(f"{p}.norm2", cout)
        conv(f"{p}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{p}.nin_shortcut", cout, cin, 1)

    def mid(p: str, ch: int) -> None:
        resblock(f"{p}.mid.block_1", ch, ch)
        norm(f"{p}.mid.attn_1.norm", ch)
        for n in ("q", "k", "v", "proj_out"):
            conv(f"{p}.mid.attn_1.{n}", ch, ch, 1)
        resblock(f"{p}.mid.block_2", ch, ch)

    last = len(c.ch_mult) - 1
    conv("encoder.conv_in", c.ch, c.in_channels, 3)
    ch = c.ch
    for i, mult in enumerate(c.ch_mult):
        for j in range(c.num_res_blocks):
            resblock(f"encoder.down.{i}.block.{j}", ch, c.ch * mult)
            ch = c.ch * mult
        if i != last:
            conv(f"encoder.down.{i}.downsample.conv", ch, ch, 3)
    mid("encoder", ch)
    norm("encoder.norm_out", ch)
    conv("encoder.conv_out", 2 * c.z_channels, ch, 3)
    conv("quant_conv", 2 * c.z_channels, 2 * c.z_channels, 1)
    conv("post_quant_conv", c.z_channels, c.z_channels, 1)
    ch = c.ch * c.ch_mult[-1]
    conv("decoder.conv_in", ch, c.z_channels, 3)
    mid("decoder", ch)
    for i in reversed(range(len(c.ch_mult))):
        for j in range(c.num_res_blocks + 1):
            resblock(f"decoder.up.{i}.block.{j}", ch, c.ch * c.ch_mult[i])
            ch = c.ch * c.ch_mult[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", ch, ch, 3)
    norm("decoder.norm_out", ch)
    conv("decoder.conv_out", c.out_ch, ch, 3)
    return s


def openai_clip_shapes(c: OpenAIClipVisionConfig, text_width: int = 768, text_layers: int = 12,
                       vocab: int = 49408, context: int = 77) -> dict[str, tuple[int, ...]]:
    """clip.model.CLIP parameter shapes: the VisionTransformer under ``visual.`` and the text transformer (which the
    checkpoint carries and the converter ignores)."""

    def resblocks(prefix: str, w: int, layers: int) -> dict[str, tuple[int, ...]]:
        s: dict[str, tuple[int, ...]] = {}
        for i in range(layers):
            p = f"{prefix}.resblocks.{i}"
            s |= {f"{p}.attn.in_proj_weight": (3 * w, w), f"{p}.attn.in_proj_bias": (3 * w,),
                  f"{p}.attn.out_proj.weight": (w, w), f"{p}.attn.out_proj.bias": (w,),
                  f"{p}.ln_1.weight": (w,), f"{p}.ln_1.bias": (w,), f"{p}.mlp.c_fc.weight": (4 * w, w),
                  f"{p}.mlp.c_fc.bias": (4 * w,), f"{p}.mlp.c_proj.weight": (w, 4 * w), f"{p}.mlp.c_proj.bias": (w,),
                  f"{p}.ln_2.weight": (w,), f"{p}.ln_2.bias": (w,)}
        return s

    w, grid = c.width, c.image_resolution // c.patch_size
    shapes = {"positional_embedding": (context, text_width), "text_projection": (text_width, c.embed_dim),
              "logit_scale": (), "token_embedding.weight": (vocab, text_width), "ln_final.weight": (text_width,),
              "ln_final.bias": (text_width,)}
    shapes |= resblocks("transformer", text_width, text_layers)
    shapes |= {"visual.class_embedding": (w,), "visual.positional_embedding": (grid * grid + 1, w),
               "visual.proj": (w, c.embed_dim), "visual.conv1.weight": (w, 3, c.patch_size, c.patch_size),
               "visual.ln_pre.weight": (w,), "visual.ln_pre.bias": (w,), "visual.ln_post.weight": (w,),
               "visual.ln_post.bias": (w,)}
    shapes |= {f"visual.{k}": v for k, v in resblocks("transformer", w, c.layers).items()}
    return shapes


def zero123_checkpoint(arch: Zero123Architecture, *, text_width: int = 768, text_layers: int = 12,
                       vocab: int = 49408) -> dict[str, Any]:
    """The Lightning checkpoint of a Zero123 LatentDiffusion, leaves as :class:`TensorSpec` (real tensors for the
    schedule): ``state_dict`` (raw UNet, EMA copy, VAE, CLIP in fp16, ``cc_projection``, schedule buffers) and
    ``optimizer_states`` (AdamW's ``exp_avg`` and ``exp_avg_sq`` for every trained parameter: UNet + cc_projection)."""
    unet = {f"model.diffusion_model.{k}": v for k, v in ldm_unet_shapes(arch.unet).items()}
    cc = {"cc_projection.weight": (arch.unet.context_dim, arch.image_encoder.embed_dim + 4),
          "cc_projection.bias": (arch.unet.context_dim,)}
    state: dict[str, Any] = {k: TensorSpec(v) for k, v in unet.items()}
    state |= {"model_ema." + k.removeprefix("model.").replace(".", ""): TensorSpec(v) for k, v in unet.items()}
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(105000, dtype=torch.int32)
    state |= {f"first_stage_model.{k}": TensorSpec(v) for k, v in ldm_vae_shapes(arch.vae).items()}
    clip = openai_clip_shapes(arch.image_encoder, text_width, text_layers, vocab)
    state |= {f"cond_stage_model.model.{k}": TensorSpec(v, torch.float16) for k, v in clip.items()}
    state |= {k: TensorSpec(v) for k, v in cc.items()}
    betas = torch.linspace(arch.beta_start**0.5, arch.beta_end**0.5, arch.num_train_timesteps, dtype=torch.float64)
    state["betas"] = (betas**2).float()
    state["alphas_cumprod"] = torch.cumprod(1 - betas**2, 0).float()
    trained = [*unet.values(), *cc.values()]
    adam = {i: {"step": torch.tensor(105000.0), "exp_avg": TensorSpec(shape), "exp_avg_sq": TensorSpec(shape)}
            for i, shape in enumerate(trained)}
    groups = [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "amsgrad": False,
               "params": list(range(len(trained)))}]
    return {"epoch": 3, "global_step": 105000, "pytorch-lightning_version": "1.4.2", "state_dict": state,
            "optimizer_states": [{"state": adam, "param_groups": groups}], "lr_schedulers": []}


def tiny_architecture() -> Zero123Architecture:
    """A Zero123 small enough for a test (the converter's tests use the same sizes)."""
    return Zero123Architecture(
        unet=LdmUNetConfig(image_size=8, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                           attention_resolutions=(1,), num_heads=2, context_dim=16),
        vae=LdmVaeConfig(resolution=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4),
        image_encoder=OpenAIClipVisionConfig(image_resolution=8, patch_size=4, width=32, layers=2, heads=2,
                                             embed_dim=20))


# ---------------------------------------------------------------------------------------------------------------------
# The other weight files


def _spec_state(model: torch.nn.Module) -> dict[str, TensorSpec]:
    return {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def write_sam(path: Path, fill: RandomFill, tiny: bool) -> int:
    """``sam_vit_h_4b8939.pth``: a plain state dict of SAM ViT-H (built on the meta device: shapes only)."""
    registry = import_segment_anything().sam_model_registry
    with torch.device("meta"):
        model = tiny_sam() if tiny else registry["vit_h"](checkpoint=None)
    return StreamingCheckpointWriter(path, fill).write(_spec_state(model))


def tiny_sam() -> torch.nn.Module:
    """SAM with a 64-px, 2-block ViT (one windowed, one global attention block)."""
    modeling = import_segment_anything().modeling
    dim = 16
    return modeling.Sam(
        image_encoder=modeling.ImageEncoderViT(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2,
                                               out_chans=dim, use_rel_pos=True, window_size=2,
                                               global_attn_indexes=(1,)),
        prompt_encoder=modeling.PromptEncoder(embed_dim=dim, image_embedding_size=(4, 4), input_image_size=(64, 64),
                                              mask_in_chans=4),
        mask_decoder=modeling.MaskDecoder(
            transformer_dim=dim, transformer=modeling.TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=32,
                                                                        num_heads=2),
            num_multimask_outputs=3, iou_head_depth=1, iou_head_hidden_dim=16))


def write_loftr(path: Path, fill: RandomFill) -> int:
    """``indoor_ds_new.ckpt``: a Lightning checkpoint with LoFTR under ``state_dict``, keys prefixed ``matcher.``."""
    from kornia.feature import LoFTR

    from server.stages.elevation.matchers import loftr_config

    with torch.device("meta"):
        model = LoFTR(pretrained=None, config=loftr_config())
    state = {f"matcher.{k}": v for k, v in _spec_state(model).items()}
    return StreamingCheckpointWriter(path, fill).write({"epoch": 29, "global_step": 0, "state_dict": state})


def write_reconstruction(path: Path, fill: RandomFill) -> int:
    """``ckpt_215000.pth``: the four networks' state dicts at the top level, plus ``iter_step``."""
    from server.stages.reconstruction.checkpoint import OFFICIAL_NETWORKS
    from server.stages.reconstruction.model import build_model

    with torch.device("meta"):
        model = build_model("paper", seed=0)
    nets: dict[str, Any] = {name: {} for name in OFFICIAL_NETWORKS}
    for key, spec in _spec_state(model).items():
        net, _, rest = key.partition(".")
        nets[net][rest] = spec
    return StreamingCheckpointWriter(path, fill).write({**nets, "iter_step": 215000, "val_step": 0})
