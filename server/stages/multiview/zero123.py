"""Zero123 novel-view synthesis as One-2-3-45 runs it (spec §2.2–§2.6).

The network parts are the diffusers/transformers classes of the hub's ``kxic/zero123-xl`` conversion: an 8-channel
``UNet2DConditionModel``, an ``AutoencoderKL``, a ``CLIPVisionModelWithProjection`` (OpenAI CLIP ViT-L/14 image tower)
and ``cc_projection``, a ``Linear(E + 4, D)`` (772 → 768) mixing the CLIP embedding with the relative pose. The
sampler is the reference's own DDIM loop (:mod:`server.stages.multiview.ddim`), not a diffusers scheduler, so the
schedules
match bit for bit.

One call of :func:`generate_views` is one ``sample_model_batch`` call of the reference: every requested view of one
conditioning image goes through the UNet as a single batch, doubled for classifier-free guidance (uncond first).

Precision: the reference runs everything under ``torch.autocast("cuda")`` (fp16 compute). Here the caller picks the
dtype of the parts (fp16 on CUDA, float32 on CPU); the DDIM latents and update stay float32, as the reference's
sampler buffers and ``x_T`` are float32, and the CLIP resize/normalisation runs in float32 before the cast.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn
from transformers import CLIPVisionModelWithProjection

from server.common.errors import BadInputError, CheckpointError
from server.stages.multiview.ddim import ddim_sample, ddim_timesteps, scaled_linear_alphas_cumprod

IMAGE_SIZE = 256
"""Side of the square RGB images Zero123 takes and returns (latent 4×32×32)."""
CLIP_SIZE = 224
"""Side of the CLIP ViT-L/14 input."""
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BETA_START, BETA_END, NUM_TRAIN_TIMESTEPS = 0.00085, 0.012, 1000
"""The training noise schedule of the Zero123 config (``linear_start``, ``linear_end``, ``timesteps``)."""

Delta = tuple[float, float]
"""A relative camera pose (Δpolar, Δazimuth) in degrees; positive Δpolar moves the camera down (spec §2.7)."""


@dataclass(frozen=True)
class Zero123Config:
    """How One-2-3-45 calls Zero123 (spec §1.3, §2.3–§2.5)."""

    guidance_scale: float = 3.0
    """Classifier-free guidance scale s; 1 switches guidance off (no unconditional branch, as in the reference)."""
    eta: float = 1.0
    """DDIM η; 1 makes sampling stochastic (the reference is unseeded, so its results vary run to run)."""
    steps_stage1: int = 75
    """DDIM "steps" setting for the 8 stage-1 views (the sampler actually runs 76, see ``ddim_timesteps``)."""
    steps_stage2: int = 50
    """DDIM "steps" setting for the stage-2 nearby views and the elevation views (49 effective)."""
    stage1a_deltas: tuple[Delta, ...] = ((0.0, 0.0), (0.0, 90.0), (0.0, 180.0), (0.0, 270.0))
    """(Δpolar, Δazimuth) of stage-1 views 0–3: the input's polar, four azimuths 90° apart."""
    stage1b_azimuths: tuple[float, ...] = (30.0, 120.0, 210.0, 300.0)
    """Δazimuth of stage-1 views 4–7 (or 8–11)."""
    stage1b_polar_offset: float = 30.0
    """|Δpolar| of stage-1 views 4–11."""
    stage1b_lower_max_polar: float = 75.0
    """If the estimated polar p ≤ this, views 4–7 look from 30° lower (Δpolar +30), else views 8–11 from 30° higher."""
    stage2_deltas: tuple[Delta, ...] = ((-10.0, 0.0), (10.0, 0.0), (0.0, -10.0), (0.0, 10.0))
    """(Δpolar, Δazimuth) of the four nearby views ``i_0 … i_3`` around each stage-1 view."""
    stage2_white_threshold: int = 253
    """Stage-2 inputs: every channel value ≥ this is set to 255 before conditioning."""


def stage1b_deltas(polar: float, config: Zero123Config | None = None) -> tuple[list[int], list[Delta]]:
    """View indices and deltas of the second stage-1 call, chosen by the estimated polar angle (spec §1.3 step 6).

    Args:
        polar: estimated polar angle p of the input view, degrees (90 = horizon).
        config: the Zero123 call settings (defaults: the paper's).

    Returns:
        (indices, deltas): [4, 5, 6, 7] with Δpolar +30 if p ≤ 75, else [8, 9, 10, 11] with Δpolar −30; Δazimuth
        30, 120, 210, 300.
    """
    config = config or Zero123Config()
    if polar <= config.stage1b_lower_max_polar:
        indices, dpolar = [4, 5, 6, 7], config.stage1b_polar_offset
    else:
        indices, dpolar = [8, 9, 10, 11], -config.stage1b_polar_offset
    return indices, [(dpolar, az) for az in config.stage1b_azimuths]


# ---------------------------------------------------------------------------------------------------------------------
# Pure functions: image conversion and conditioning pieces
# ---------------------------------------------------------------------------------------------------------------------


def prepare_stage2_input(image: np.ndarray, threshold: int = 253) -> np.ndarray:
    """Snap near-white channel values to white, as the reference does to a stage-1 PNG before stage 2 (spec §2.5).

    The test is per channel value (``arr[arr >= 253] = 255``), not per pixel.

    Args:
        image: [H, W, 3] uint8.
        threshold: values ≥ this become 255.

    Returns:
        [H, W, 3] uint8, a new array.
    """
    _check_image(image, "image")
    out = image.copy()
    out[out >= threshold] = 255
    return out


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 RGB → the [−1, 1] tensor Zero123 conditions on.

    Args:
        image: [H, W, 3] uint8.

    Returns:
        [1, 3, H, W] float32 in [−1, 1] (x/255·2 − 1, computed in float32 like the reference).
    """
    x = torch.from_numpy(np.ascontiguousarray(image)).to(torch.float32) / 255.0
    return (x.permute(2, 0, 1)[None] * 2.0 - 1.0).contiguous()


def clip_preprocess(images: torch.Tensor, size: int = CLIP_SIZE) -> torch.Tensor:
    """The reference's CLIP input preparation (``FrozenCLIPImageEmbedder.preprocess``).

    kornia ``resize`` to 224² (bicubic, align_corners=True, antialias=False) — which is exactly
    ``F.interpolate`` with those settings — on the [−1, 1] tensor, then (x + 1)/2, then CLIP mean/std.

    Args:
        images: [B, 3, H, W] in [−1, 1].
        size: output side; 224 for ViT-L/14 (toy encoders may use another ``config.image_size``).

    Returns:
        [B, 3, size, size] normalised CLIP pixel values, same dtype as ``images``.
    """
    x = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=True, antialias=False)
    x = (x + 1.0) / 2.0
    mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def pose_vectors(deltas: Sequence[Delta]) -> torch.Tensor:
    """Zero123's relative-pose input T = [radians(Δpolar), sin(radians(Δaz)), cos(radians(Δaz)), Δradius = 0].

    Args:
        deltas: n pairs (Δpolar, Δazimuth) in degrees.

    Returns:
        [n, 1, 4] float32 (computed in float64, then cast, as the reference's numpy code does).
    """
    rows = [[math.radians(p), math.sin(math.radians(a)), math.cos(math.radians(a)), 0.0] for p, a in deltas]
    return torch.tensor(rows, dtype=torch.float64).to(torch.float32)[:, None, :]


def guided_eps(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance ε = ε_u + s·(ε_c − ε_u).

    Args:
        eps_uncond: [n, C, H, W] ε of the unconditional half.
        eps_cond: [n, C, H, W] ε of the conditional half.
        scale: s.

    Returns:
        [n, C, H, W] guided ε.
    """
    return eps_uncond + scale * (eps_cond - eps_uncond)


def with_unconditional(c_crossattn: torch.Tensor, c_concat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prepend the unconditional branch: zeros for both the projected embedding and the concat latent.

    The zeros replace ``cc_projection``'s *output* (not its input), as in the reference (spec §2.3 step 5).

    Args:
        c_crossattn: [n, 1, D] projected conditioning.
        c_concat: [n, 4, h, w] image latent.

    Returns:
        ([2n, 1, D], [2n, 4, h, w]) with the unconditional half first.
    """
    return (
        torch.cat([torch.zeros_like(c_crossattn), c_crossattn]),
        torch.cat([torch.zeros_like(c_concat), c_concat]),
    )


# ---------------------------------------------------------------------------------------------------------------------
# The model: four parts and a thin forward
# ---------------------------------------------------------------------------------------------------------------------


class Zero123Model(nn.Module):
    """The four Zero123 parts; ``forward`` is one UNet evaluation on [noisy latent, image latent].

    Attributes:
        unet: ``UNet2DConditionModel`` with 8 input channels (4 noisy + 4 image latent), cross-attention dim D.
        vae: ``AutoencoderKL`` with 4 latent channels and 8× downsampling.
        image_encoder: ``CLIPVisionModelWithProjection`` whose ``image_embeds`` have E = projection_dim dims.
        cc_projection: ``nn.Linear(E + 4, D)`` (E = D = 768 in Zero123; toy models may differ).
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        image_encoder: CLIPVisionModelWithProjection,
        cc_projection: nn.Linear,
    ) -> None:
        super().__init__()
        dim = image_encoder.config.projection_dim
        latent = vae.config.latent_channels
        expected = {
            "unet in_channels": (unet.config.in_channels, 2 * latent),
            "unet out_channels": (unet.config.out_channels, latent),
            "cc_projection in_features": (cc_projection.in_features, dim + 4),
            "cc_projection out_features": (cc_projection.out_features, unet.config.cross_attention_dim),
        }
        wrong = [f"{name} is {got}, expected {want}" for name, (got, want) in expected.items() if got != want]
        if wrong:
            raise CheckpointError("Zero123 parts do not fit together: " + "; ".join(wrong) + ".")
        self.unet = unet
        self.vae = vae
        self.image_encoder = image_encoder
        self.cc_projection = cc_projection

    @property
    def device(self) -> torch.device:
        """Where the parameters live."""
        return self.cc_projection.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype, i.e. the compute precision of every part."""
        return self.cc_projection.weight.dtype

    def forward(self, latents: torch.Tensor, t: int, c_crossattn: torch.Tensor, c_concat: torch.Tensor) -> torch.Tensor:
        """ε prediction of the hybrid-conditioned UNet.

        Args:
            latents: [B, 4, h, w] noisy latents (any float dtype; cast to the model's).
            t: integer DDIM timestep, given to the UNet as is (e.g. 976).
            c_crossattn: [B, 1, D] cross-attention context.
            c_concat: [B, 4, h, w] unscaled image latent, concatenated after the noisy latent.

        Returns:
            [B, 4, h, w] ε in the model's dtype.
        """
        x = torch.cat([latents.to(self.dtype), c_concat.to(self.dtype)], dim=1)
        ts = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        return self.unet(x, ts, encoder_hidden_states=c_crossattn.to(self.dtype)).sample


@torch.no_grad()
def encode_conditioning(
    model: Zero123Model, image: torch.Tensor, deltas: Sequence[Delta]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The conditional branch of spec §2.3 (steps 1–4) for n target views of one image.

    Args:
        model: the Zero123 parts.
        image: [1, 3, H, W] float32 in [−1, 1], on the model's device.
        deltas: n pairs (Δpolar, Δazimuth), degrees.

    Returns:
        c_crossattn: [n, 1, D] ``cc_projection(cat(CLIP image_embeds, T))``.
        c_concat: [n, 4, H/8, W/8] VAE posterior mode (mean), *without* the 0.18215 scale factor.
    """
    n = len(deltas)
    pixels = clip_preprocess(image, model.image_encoder.config.image_size).to(model.dtype)
    embeds = model.image_encoder(pixel_values=pixels).image_embeds  # [1, E]
    c = embeds[:, None, :].repeat(n, 1, 1)
    pose = pose_vectors(deltas).to(device=c.device, dtype=c.dtype)
    c_crossattn = model.cc_projection(torch.cat([c, pose], dim=-1))
    c_concat = model.vae.encode(image.to(model.dtype)).latent_dist.mode().repeat(n, 1, 1, 1)
    return c_crossattn, c_concat


@torch.no_grad()
def decode_latents(model: Zero123Model, latents: torch.Tensor) -> np.ndarray:
    """Latents → uint8 images: z/0.18215 → VAE decoder → clamp((x+1)/2, 0, 1) → ×255 → truncation.

    The ×255 runs in the decoder's dtype before the cast to uint8, as the reference's ``255.0 * array`` does.

    Args:
        model: the Zero123 parts.
        latents: [n, 4, h, w] final DDIM latents.

    Returns:
        [n, 8h, 8w, 3] uint8.
    """
    x = model.vae.decode(latents.to(model.dtype) / model.vae.config.scaling_factor).sample
    x = torch.clamp((x + 1.0) / 2.0, min=0.0, max=1.0) * 255.0
    return x.permute(0, 2, 3, 1).float().cpu().numpy().astype(np.uint8)


def generate_views(
    model: Zero123Model,
    image: np.ndarray,
    deltas: Sequence[Delta],
    num_steps: int = Zero123Config.steps_stage1,
    guidance: float = Zero123Config.guidance_scale,
    eta: float = Zero123Config.eta,
    seed: int | None = None,
    callback: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> list[np.ndarray]:
    """Synthesise the views of ``image`` seen from the relative poses ``deltas`` (one reference sampler call).

    Args:
        model: the Zero123 parts (their dtype and device decide the compute precision).
        image: [256, 256, 3] uint8 RGB, object on white.
        deltas: n ≥ 1 pairs (Δpolar, Δazimuth) in degrees; all n views form one UNet batch.
        num_steps: the DDIM "steps" setting (75 → 76 steps, 50 → 49 steps).
        guidance: classifier-free guidance scale; 1 disables the unconditional branch.
        eta: DDIM η in [0, 1].
        seed: seeds x_T and every step's noise (drawn on the CPU, so a seed gives the same noise on every device);
            None draws a fresh seed from the OS.
        callback: ``callback(step, total)`` after each denoising step.
        should_cancel: polled before each denoising step.

    Returns:
        n arrays [256, 256, 3] uint8, in the order of ``deltas``.

    Raises:
        BadInputError: on a wrong image, empty or malformed deltas, or out-of-range settings.
        CancelledError: if ``should_cancel()`` returned True.
    """
    return generate_views_batch(model, [image], [deltas], num_steps, guidance, eta, seed, callback,
                                should_cancel)[0]


def generate_views_batch(
    model: Zero123Model,
    images: Sequence[np.ndarray],
    deltas: Sequence[Sequence[Delta]],
    num_steps: int = Zero123Config.steps_stage1,
    guidance: float = Zero123Config.guidance_scale,
    eta: float = Zero123Config.eta,
    seed: int | None = None,
    callback: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    unet: Callable[[torch.Tensor, int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> list[list[np.ndarray]]:
    """Views of several conditioning images in ONE sampler run: every target view of every image goes through the
    UNet as one batch (stage 2 of the pipeline: 7 images × 4 views = 28, doubled for guidance).

    Each view's conditioning is exactly that of :func:`generate_views` for its own image, so batching changes only
    which noise each view draws, not the model being sampled. Arguments as :func:`generate_views`, with ``images`` a
    list and ``deltas[k]`` the poses for ``images[k]``, and ``unet`` what evaluates ε (``model`` itself when None;
    a :class:`server.stages.multiview.graphs.UNetGraphs` of it replays CUDA graphs).

    Returns:
        For each image, its views in the order of its deltas.
    """
    # 1. Check inputs before any model work.
    if len(images) == 0 or len(images) != len(deltas):
        raise BadInputError(f"give one list of deltas per image: got {len(images)} images and {len(deltas)} lists.")
    for k, image in enumerate(images):
        _check_image(image, f"images[{k}]", size=IMAGE_SIZE)
    deltas = [_check_deltas(d) for d in deltas]
    timesteps = ddim_timesteps(num_steps, NUM_TRAIN_TIMESTEPS)
    if not math.isfinite(guidance) or guidance < 0.0:
        raise BadInputError(f"guidance={guidance} is not allowed: use a finite scale ≥ 0 (the reference uses 3).")
    if not 0.0 <= eta <= 1.0:
        raise BadInputError(f"eta={eta} is not allowed: DDIM's η must lie in [0, 1] (the reference uses 1).")
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise BadInputError(f"seed={seed!r} is not allowed: use an integer from 0 to 2**63 - 1, or None.")
    else:
        generator.manual_seed(seed)

    with torch.no_grad():
        # 2. Conditioning (spec §2.3) per image, concatenated; the zero unconditional branch first when guidance is on.
        parts = [encode_conditioning(model, image_to_tensor(image).to(model.device), d)
                 for image, d in zip(images, deltas, strict=True)]
        c_crossattn = torch.cat([p[0] for p in parts])
        c_concat = torch.cat([p[1] for p in parts])
        use_cfg = guidance != 1.0
        if use_cfg:
            c_crossattn, c_concat = with_unconditional(c_crossattn, c_concat)

        step_fn = unet or model

        def eps_fn(x: torch.Tensor, t: int) -> torch.Tensor:
            eps = step_fn(torch.cat([x, x]) if use_cfg else x, t, c_crossattn, c_concat).float()
            return guided_eps(*eps.chunk(2), guidance) if use_cfg else eps

        # 3. DDIM from plain N(0, I) noise (spec §2.4).
        n = sum(len(d) for d in deltas)
        shape = (n, model.unet.config.out_channels, *c_concat.shape[-2:])
        x_T = torch.randn(shape, generator=generator, dtype=torch.float32).to(model.device)
        alphas_cumprod = scaled_linear_alphas_cumprod(BETA_START, BETA_END, NUM_TRAIN_TIMESTEPS)
        latents = ddim_sample(eps_fn, x_T, timesteps, alphas_cumprod, eta, generator, callback, should_cancel)

        # 4. Decode, and split back per image.
        views = list(decode_latents(model, latents))
    out, start = [], 0
    for d in deltas:
        out.append(views[start: start + len(d)])
        start += len(d)
    return out


def _check_image(image: object, name: str, size: int | None = None) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise BadInputError(f"{name} must be an [H, W, 3] uint8 RGB array, got a {got}.")
    if size is not None and image.shape[:2] != (size, size):
        raise BadInputError(f"{name} must be {size}×{size} pixels, got {image.shape[1]}×{image.shape[0]}.")


def _check_deltas(deltas: Sequence[Delta]) -> list[Delta]:
    try:
        pairs = [(float(p), float(a)) for p, a in deltas]
    except (TypeError, ValueError) as e:
        raise BadInputError(f"deltas={deltas!r} is not a list of (Δpolar, Δazimuth) number pairs.") from e
    if not pairs or not all(math.isfinite(v) for pair in pairs for v in pair):
        raise BadInputError(f"deltas={deltas!r} is not allowed: give at least one pair of finite angles in degrees.")
    return pairs
