"""Zero123 LDM checkpoint → diffusers conversion, on a tiny checkpoint whose key names this test writes out itself
from the LDM / OpenAI-CLIP naming schemes (never by running the converter backwards)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from server.benchmarks.synthetic_weights import ldm_unet_shapes, ldm_vae_shapes  # the full-size layout's one copy
from server.common.errors import CheckpointError, MissingWeightsError
from server.stages.multiview import convert
from server.stages.multiview.convert import (
    LdmUNetConfig,
    LdmVaeConfig,
    OpenAIClipVisionConfig,
    Zero123Architecture,
    convert_zero123_checkpoint,
    ensure_converted,
    recognise,
)
from server.stages.multiview.convert import folder as convert_folder

TINY = Zero123Architecture(
    unet=LdmUNetConfig(
        image_size=8,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(1,),
        num_heads=2,
        context_dim=16,
    ),
    vae=LdmVaeConfig(resolution=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4),
    image_encoder=OpenAIClipVisionConfig(image_resolution=8, patch_size=4, width=32, layers=2, heads=2, embed_dim=20),
)


# ---------------------------------------------------------------------------------------------------------------------
# The LDM naming schemes, written out from ldm/modules/diffusionmodules/{openaimodel,model}.py and clip/model.py
# ---------------------------------------------------------------------------------------------------------------------


def openai_clip_visual_shapes(c: OpenAIClipVisionConfig) -> dict[str, tuple[int, ...]]:
    """clip.model.VisionTransformer parameter shapes (``visual.`` names without the prefix)."""
    w, grid = c.width, c.image_resolution // c.patch_size
    s: dict[str, tuple[int, ...]] = {
        "conv1.weight": (w, 3, c.patch_size, c.patch_size),
        "class_embedding": (w,),
        "positional_embedding": (grid * grid + 1, w),
        "ln_pre.weight": (w,),
        "ln_pre.bias": (w,),
        "ln_post.weight": (w,),
        "ln_post.bias": (w,),
        "proj": (w, c.embed_dim),
    }
    for i in range(c.layers):
        p = f"transformer.resblocks.{i}"
        s |= {
            f"{p}.attn.in_proj_weight": (3 * w, w),
            f"{p}.attn.in_proj_bias": (3 * w,),
            f"{p}.attn.out_proj.weight": (w, w),
            f"{p}.attn.out_proj.bias": (w,),
            f"{p}.ln_1.weight": (w,),
            f"{p}.ln_1.bias": (w,),
            f"{p}.mlp.c_fc.weight": (4 * w, w),
            f"{p}.mlp.c_fc.bias": (4 * w,),
            f"{p}.mlp.c_proj.weight": (w, 4 * w),
            f"{p}.mlp.c_proj.bias": (w,),
            f"{p}.ln_2.weight": (w,),
            f"{p}.ln_2.bias": (w,),
        }
    return s


def make_state_dict(arch: Zero123Architecture = TINY, *, ema: bool = True, clip: bool = True, seed: int = 0) -> dict:
    """A tiny Zero123 LatentDiffusion state_dict with random values; the EMA UNet differs from the raw one."""
    g = torch.Generator().manual_seed(seed)

    def rand(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=g)

    sd: dict[str, torch.Tensor] = {}
    for name, shape in ldm_unet_shapes(arch.unet).items():
        sd[f"model.diffusion_model.{name}"] = rand(shape)
        if ema:
            sd["model_ema." + f"diffusion_model.{name}".replace(".", "")] = rand(shape)
    if ema:
        sd["model_ema.decay"] = torch.tensor(0.9999)
        sd["model_ema.num_updates"] = torch.tensor(1234, dtype=torch.int32)
    sd |= {f"first_stage_model.{k}": rand(v) for k, v in ldm_vae_shapes(arch.vae).items()}
    if clip:
        # The file keeps the whole CLIP model (fp16, as clip.load builds it on CUDA); only the visual tower is used.
        visual = openai_clip_visual_shapes(arch.image_encoder)
        sd |= {f"cond_stage_model.model.visual.{k}": rand(v).half() for k, v in visual.items()}
        sd["cond_stage_model.model.token_embedding.weight"] = rand((10, 8)).half()
        sd["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] = rand((24, 8)).half()
        sd["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    d = arch.image_encoder.embed_dim
    sd["cc_projection.weight"] = rand((arch.unet.context_dim, d + 4))
    sd["cc_projection.bias"] = rand((arch.unet.context_dim,))
    sd["betas"] = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    sd["alphas_cumprod"] = torch.cumprod(1 - sd["betas"], 0)
    return sd


def write_ckpt(path: Path, state_dict: dict, **extra: object) -> Path:
    torch.save({"state_dict": state_dict, "global_step": 105000, "epoch": 3, **extra}, path)
    return path


def openai_clip_image_embed(
    visual: dict[str, torch.Tensor], c: OpenAIClipVisionConfig, x: torch.Tensor
) -> torch.Tensor:
    """clip.model.VisionTransformer.forward, re-implemented from the OpenAI code (x: [N, 3, R, R] → [N, E])."""
    v = {k: t.float() for k, t in visual.items()}
    w = c.width
    h = F.conv2d(x, v["conv1.weight"], stride=c.patch_size).flatten(2).transpose(1, 2)  # [N, grid², W]
    h = torch.cat([v["class_embedding"].expand(len(x), 1, w), h], dim=1) + v["positional_embedding"]
    h = F.layer_norm(h, (w,), v["ln_pre.weight"], v["ln_pre.bias"]).transpose(0, 1)  # LND, as OpenAI
    for i in range(c.layers):
        p = f"transformer.resblocks.{i}."
        mha = nn.MultiheadAttention(w, c.heads)
        mha.load_state_dict({k.removeprefix(p + "attn."): t for k, t in v.items() if k.startswith(p + "attn.")})
        a = F.layer_norm(h, (w,), v[p + "ln_1.weight"], v[p + "ln_1.bias"])
        h = h + mha(a, a, a, need_weights=False)[0]
        m = F.layer_norm(h, (w,), v[p + "ln_2.weight"], v[p + "ln_2.bias"])
        m = F.linear(m, v[p + "mlp.c_fc.weight"], v[p + "mlp.c_fc.bias"])
        m = m * torch.sigmoid(1.702 * m)  # QuickGELU
        h = h + F.linear(m, v[p + "mlp.c_proj.weight"], v[p + "mlp.c_proj.bias"])
    cls = F.layer_norm(h[0], (w,), v["ln_post.weight"], v["ln_post.bias"])
    return cls @ v["proj"]


def by_value(tensors: dict[str, torch.Tensor]) -> dict[bytes, str]:
    """Random tensors are unique, so their bytes identify them (a 1×1 conv and its squeezed Linear share bytes)."""
    return {t.float().contiguous().numpy().tobytes(): k for k, t in tensors.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("convert")
    sd = make_state_dict()
    ckpt = write_ckpt(root / "tiny.ckpt", sd)
    out = convert_zero123_checkpoint(ckpt, root / "out", architecture=TINY)
    return sd, out


def test_unet_is_the_ema_copy_in_diffusers_layout(converted: tuple[dict, Path]) -> None:
    sd, out = converted
    unet, info = UNet2DConditionModel.from_pretrained(out / "unet", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"))
    assert unet.config.in_channels == 8 and unet.config.cross_attention_dim == 16
    got = unet.state_dict()

    def ema(name: str) -> torch.Tensor:
        return sd["model_ema." + f"diffusion_model.{name}".replace(".", "")]

    assert got["conv_in.weight"].shape == (32, 8, 3, 3)
    torch.testing.assert_close(got["conv_in.weight"], ema("input_blocks.0.0.weight"), rtol=0, atol=0)
    assert not torch.equal(got["conv_in.weight"], sd["model.diffusion_model.input_blocks.0.0.weight"])
    # Hand-checked correspondences between the two naming schemes.
    pairs = {
        "time_embedding.linear_2.weight": "time_embed.2.weight",
        "down_blocks.0.resnets.0.conv1.weight": "input_blocks.1.0.in_layers.2.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": (
            "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
        ),
        "down_blocks.0.downsamplers.0.conv.weight": "input_blocks.2.0.op.weight",
        "down_blocks.1.resnets.0.conv_shortcut.weight": "input_blocks.3.0.skip_connection.weight",
        "mid_block.attentions.0.proj_in.weight": "middle_block.1.proj_in.weight",
        "mid_block.resnets.1.time_emb_proj.weight": "middle_block.2.emb_layers.1.weight",
        "up_blocks.0.upsamplers.0.conv.weight": "output_blocks.1.1.conv.weight",
        "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.0.proj.weight": (
            "output_blocks.3.1.transformer_blocks.0.ff.net.0.proj.weight"
        ),
        "conv_norm_out.weight": "out.0.weight",
        "conv_out.weight": "out.2.weight",
    }
    for diffusers_name, ldm_name in pairs.items():
        torch.testing.assert_close(got[diffusers_name], ema(ldm_name), rtol=0, atol=0, msg=diffusers_name)

    # Every EMA UNet tensor lands in exactly one place, and nothing comes from the raw copy.
    ema_tensors = {k: v for k, v in sd.items() if k.startswith("model_ema.diffusion_model")}
    ema_index = by_value(ema_tensors)
    sources = [ema_index.get(t.contiguous().numpy().tobytes()) for t in got.values()]
    assert None not in sources
    assert sorted(sources) == sorted(ema_tensors)


def test_vae_in_diffusers_layout(converted: tuple[dict, Path]) -> None:
    sd, out = converted
    vae, info = AutoencoderKL.from_pretrained(out / "vae", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"))
    assert vae.config.scaling_factor == pytest.approx(0.18215)
    got = vae.state_dict()
    src = {k.removeprefix("first_stage_model."): v for k, v in sd.items() if k.startswith("first_stage_model.")}
    pairs = {
        "encoder.down_blocks.1.resnets.0.conv_shortcut.weight": "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.down_blocks.0.downsamplers.0.conv.weight": "encoder.down.0.downsample.conv.weight",
        # diffusers counts decoder levels from the bottom, LDM from the top.
        "decoder.up_blocks.0.resnets.1.conv2.weight": "decoder.up.1.block.1.conv2.weight",
        "decoder.up_blocks.0.upsamplers.0.conv.weight": "decoder.up.1.upsample.conv.weight",
        "decoder.up_blocks.1.resnets.0.norm1.weight": "decoder.up.0.block.0.norm1.weight",
        "decoder.mid_block.resnets.1.conv1.weight": "decoder.mid.block_2.conv1.weight",
        "encoder.conv_norm_out.weight": "encoder.norm_out.weight",
        "quant_conv.weight": "quant_conv.weight",
        "post_quant_conv.bias": "post_quant_conv.bias",
    }
    for diffusers_name, ldm_name in pairs.items():
        torch.testing.assert_close(got[diffusers_name], src[ldm_name], rtol=0, atol=0, msg=diffusers_name)
    # 1×1-conv attention projections become Linear weights.
    torch.testing.assert_close(
        got["encoder.mid_block.attentions.0.to_q.weight"], src["encoder.mid.attn_1.q.weight"][:, :, 0, 0]
    )
    torch.testing.assert_close(
        got["decoder.mid_block.attentions.0.to_out.0.weight"], src["decoder.mid.attn_1.proj_out.weight"][:, :, 0, 0]
    )
    index = by_value(src)
    sources = [index.get(t.contiguous().numpy().tobytes()) for t in got.values()]
    assert None not in sources and sorted(sources) == sorted(src)


def test_image_encoder_matches_openai_clip_forward(converted: tuple[dict, Path]) -> None:
    sd, out = converted
    encoder, info = CLIPVisionModelWithProjection.from_pretrained(out / "image_encoder", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert encoder.dtype == torch.float32
    visual = {k.removeprefix("cond_stage_model.model.visual."): v for k, v in sd.items() if ".visual." in k}
    torch.testing.assert_close(encoder.visual_projection.weight, visual["proj"].float().t())

    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = openai_clip_image_embed(visual, TINY.image_encoder, x)
        got = encoder.eval()(pixel_values=x).image_embeds
    assert got.shape == (2, 20)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_cc_projection_scheduler_and_index(converted: tuple[dict, Path]) -> None:
    sd, out = converted
    config = json.loads((out / "cc_projection/config.json").read_text())
    assert (config["in_channel"], config["out_channel"]) == (24, 16)
    tensors = load_file(out / "cc_projection/diffusion_pytorch_model.safetensors")
    assert set(tensors) == {"projection.weight", "projection.bias"}
    torch.testing.assert_close(tensors["projection.weight"], sd["cc_projection.weight"], rtol=0, atol=0)
    torch.testing.assert_close(tensors["projection.bias"], sd["cc_projection.bias"], rtol=0, atol=0)

    scheduler = json.loads((out / "scheduler/scheduler_config.json").read_text())
    assert (scheduler["beta_start"], scheduler["beta_end"], scheduler["beta_schedule"]) == (
        0.00085,
        0.012,
        "scaled_linear",
    )
    index = json.loads((out / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["image_encoder"] == ["transformers", "CLIPVisionModelWithProjection"]
    assert json.loads((out / convert.MARKER_NAME).read_text())["unet_weights"] == "ema"
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []  # no temp folders left


def test_unreadable_and_foreign_files(tmp_path: Path) -> None:
    good = write_ckpt(tmp_path / "good.ckpt", make_state_dict())
    data = good.read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.ckpt") as info:
        convert_zero123_checkpoint(truncated, tmp_path / "out", architecture=TINY)
    assert "one2345 weights download --only zero123-xl" in str(info.value)

    no_state_dict = tmp_path / "sam_like.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(2)}, no_state_dict)
    with pytest.raises(CheckpointError, match=r"sam_like\.pth has no 'state_dict'"):
        convert_zero123_checkpoint(no_state_dict, tmp_path / "out", architecture=TINY)

    other_network = tmp_path / "loftr_like.ckpt"
    torch.save({"state_dict": {"matcher.backbone.conv1.weight": torch.zeros(2)}}, other_network)
    with pytest.raises(CheckpointError, match="another network"):
        convert_zero123_checkpoint(other_network, tmp_path / "out", architecture=TINY)

    with pytest.raises(MissingWeightsError, match=r"absent\.ckpt"):
        convert_zero123_checkpoint(tmp_path / "absent.ckpt", tmp_path / "out", architecture=TINY)
    assert not (tmp_path / "out").exists()


CALLS: list[str] = []


def _record(what: str) -> str:
    CALLS.append(what)
    return what


class TrainerCallbackState:
    """Stands for the Lightning objects a real .ckpt pickles next to the weights."""

    def __reduce__(self) -> tuple:
        return (_record, ("unpickling ran checkpoint code",))


def test_pickled_objects_are_never_executed(tmp_path: Path) -> None:
    ckpt = write_ckpt(
        tmp_path / "lightning.ckpt", make_state_dict(), callbacks={"ModelCheckpoint": TrainerCallbackState()}
    )
    CALLS.clear()
    state = convert.load_lightning_state_dict(ckpt)
    assert CALLS == []
    assert "cc_projection.weight" in state


def test_raw_unet_fallback_and_partial_ema(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sd = make_state_dict(ema=False)
    parts = convert.convert_state_dict(sd, TINY)
    assert parts.unet_source == "raw"
    torch.testing.assert_close(parts.unet["conv_in.weight"], sd["model.diffusion_model.input_blocks.0.0.weight"])

    # Converting such a file says so once in the log, in our words, and no library-style warning with a source line.
    ckpt = write_ckpt(tmp_path / "no-ema.ckpt", sd)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        out = convert_zero123_checkpoint(ckpt, tmp_path / "out", architecture=TINY)
    assert [str(w.message) for w in caught] == []
    notes = [r.getMessage() for r in caplog.records if "EMA" in r.getMessage()]
    assert len(notes) == 1 and "no-ema.ckpt has no EMA copy" in notes[0]
    assert json.loads((out / convert.MARKER_NAME).read_text())["unet_weights"] == "raw"

    sd = make_state_dict()
    del sd["model_ema.diffusion_modelmiddle_block1proj_outweight"]
    sd["model_ema.diffusion_modelsomething_else"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        convert.convert_state_dict(sd, TINY)
    assert "middle_block.1.proj_out.weight" in str(info.value)
    assert "model_ema.diffusion_modelsomething_else" in str(info.value)


def test_strictness(tmp_path: Path) -> None:
    sd = make_state_dict()
    sd["first_stage_model.encoder.down.0.block.0.extra.weight"] = torch.zeros(3)
    ckpt = write_ckpt(tmp_path / "extra.ckpt", sd)
    with pytest.raises(
        CheckpointError, match=r"VAE.*the model lacks.*encoder\.down_blocks\.0\.resnets\.0\.extra\.weight"
    ):
        convert_zero123_checkpoint(ckpt, tmp_path / "out", architecture=TINY)
    ckpt.unlink()

    sd = make_state_dict()
    sd["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(2)
    sd["model_ema.diffusion_modellabel_emb00weight"] = torch.ones(2)
    with pytest.raises(
        CheckpointError, match=r"UNet.*no diffusers place.*model\.diffusion_model\.label_emb\.0\.0\.weight"
    ):
        convert.convert_state_dict(sd, TINY)

    sd = make_state_dict()
    sd["cond_stage_model.model.visual.transformer.resblocks.0.attn.bias_k"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"CLIP.*attn\.bias_k"):
        convert.convert_state_dict(sd, TINY)

    # Architectures that do not fit the file: strict loading names the mismatching tensors.
    ckpt = write_ckpt(tmp_path / "tiny.ckpt", make_state_dict())
    wrong_vae = dataclasses.replace(TINY, vae=dataclasses.replace(TINY.vae, ch=64))
    with pytest.raises(
        CheckpointError,
        match=r"VAE does not load strictly: shapes.*decoder\.conv_in\.bias: checkpoint \(64,\) vs model \(128,\)",
    ):
        convert_zero123_checkpoint(ckpt, tmp_path / "out", architecture=wrong_vae)
    wrong_unet = dataclasses.replace(TINY, unet=dataclasses.replace(TINY.unet, num_res_blocks=2))
    with pytest.raises(CheckpointError, match="UNet"):
        convert_zero123_checkpoint(ckpt, tmp_path / "out", architecture=wrong_unet)
    assert list(tmp_path.iterdir()) == [ckpt]  # the temporary folder is gone too


def test_image_encoder_from_folder_when_checkpoint_has_none(tmp_path: Path) -> None:
    ckpt = write_ckpt(tmp_path / "noclip.ckpt", make_state_dict(clip=False))
    with pytest.raises(MissingWeightsError) as info:
        convert_zero123_checkpoint(ckpt, tmp_path / "out", architecture=TINY)
    assert "cond_stage_model.model.visual" in str(info.value) and "image_encoder_dir" in str(info.value)

    torch.manual_seed(3)
    clip_config = CLIPVisionConfig(**TINY.image_encoder.transformers_config())
    CLIPVisionModelWithProjection(clip_config).save_pretrained(tmp_path / "clip")
    reference = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "clip").state_dict()
    out = convert_zero123_checkpoint(ckpt, tmp_path / "out", image_encoder_dir=tmp_path / "clip", architecture=TINY)
    copied = CLIPVisionModelWithProjection.from_pretrained(out / "image_encoder").state_dict()
    assert copied.keys() == reference.keys()
    assert all(torch.equal(copied[k], reference[k]) for k in reference)


def test_ensure_converted_reuses_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = write_ckpt(tmp_path / "zero123-tiny.ckpt", make_state_dict())
    real = convert_folder._convert
    calls: list[Path] = []

    def counting(*args: object, **kwargs: object) -> Path:
        calls.append(Path(args[0]))  # type: ignore[arg-type]
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(convert_folder, "_convert", counting)
    cache = tmp_path / "cache"
    first = ensure_converted(ckpt, cache, architecture=TINY)
    assert first == cache / "zero123-tiny-diffusers" and (first / "unet/config.json").is_file()
    assert ensure_converted(ckpt, cache, architecture=TINY) == first
    assert len(calls) == 1

    stat = ckpt.stat()
    os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # the source changed
    assert ensure_converted(ckpt, cache, architecture=TINY) == first
    assert len(calls) == 2
    assert [p.name for p in cache.iterdir()] == ["zero123-tiny-diffusers"]  # old copy and temp folders cleaned up


def test_paper_architecture_fits_a_full_size_ldm_layout() -> None:
    """Zero123-XL's sizes (spec §2.2) against full-size LDM key lists, on the meta device (no memory, no values)."""
    arch = convert.ZERO123_XL
    shapes = {f"model.diffusion_model.{k}": v for k, v in ldm_unet_shapes(arch.unet).items()}
    shapes |= {"model_ema." + k.removeprefix("model.").replace(".", ""): v for k, v in shapes.items()}
    shapes |= {f"first_stage_model.{k}": v for k, v in ldm_vae_shapes(arch.vae).items()}
    shapes |= {
        f"cond_stage_model.model.visual.{k}": v for k, v in openai_clip_visual_shapes(arch.image_encoder).items()
    }
    shapes |= {"cc_projection.weight": (768, 772), "cc_projection.bias": (768,)}
    parts = convert.convert_state_dict({k: torch.empty(v, device="meta") for k, v in shapes.items()}, arch)

    unet = recognise._load_strict(lambda: UNet2DConditionModel(**arch.unet.diffusers_config()), parts.unet, "UNet")
    vae = recognise._load_strict(lambda: AutoencoderKL(**arch.vae.diffusers_config()), parts.vae, "VAE")
    clip_config = CLIPVisionConfig(**arch.image_encoder.transformers_config())
    clip = recognise._load_strict(lambda: CLIPVisionModelWithProjection(clip_config), parts.image_encoder, "CLIP")
    # SD-1.x UNet (859 520 964 parameters) plus 4 more input channels of the 320×3×3 conv_in; SD's VAE.
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964 + 4 * 320 * 9
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert unet.conv_in.weight.shape == (320, 8, 3, 3)
    assert clip.visual_projection.weight.shape == (768, 1024)
    assert clip.config.num_hidden_layers == 24 and clip.config.patch_size == 14
