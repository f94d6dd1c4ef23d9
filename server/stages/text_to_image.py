"""Text to image: a few candidate pictures of one object, the input of the image-to-3D pipeline (issue #30).

Model: **LCM-Dreamshaper-v7** (``SimianLuo/LCM_Dreamshaper_v7``), Dreamshaper v7 (a Stable Diffusion 1.5 fine-tune)
distilled into a latent consistency model: 4 sampling steps at its native 512², in the diffusers layout (CLIP ViT-L
text encoder + CLIP tokenizer, ``UNet2DConditionModel`` with a guidance embedding, ``AutoencoderKL``,
``LCMScheduler``). Against the issue's criteria:

- licence: the hub card declares MIT; the base model's CreativeML OpenRAIL-M lets users use what they generate,
  commercially included (its use restrictions apply to the model, not ownership of outputs);
- memory: 1.07 B parameters (UNet 860 M, text encoder 123 M, VAE 84 M): 2.1 GB of fp16 weights, well under 8 GB
  with the activations of a batch at 512²; the hub files are fp32, 4.3 GB to download;
- speed: 4 UNet evaluations per image at 64² latents (8 with the negative prompt's guidance), the cost of 4–8
  steps of SD 1.5, which the aim of ≤ 1 s per 512² image on an H200 leaves a wide margin for (not yet measured here:
  no GPU was lent to this change);
- objects: a general-purpose SD-1.5 model; the template below asks for one whole centred object on a plain white
  background in soft light, which Zero123 expects and background removal handles well.

Rejected: SDXL-Turbo and SD-Turbo (Stability's non-commercial community licence); FLUX.1-schnell (Apache-2.0 but
12 B parameters, ~24 GB in fp16); PixArt-α/Σ (the T5-XXL text encoder alone is ~9.5 GB in fp16); SANA-Sprint
(NVIDIA's non-commercial licence); SDXL/SSD-1B/Segmind-Vega with LCM(-LoRA) (commercial licences and under 8 GB, but
SDXL-class models are trained at 1024², so twice the latents' side and several times the compute per image, or worse
pictures at 512² — and a second repo for the LoRA).

Sampling follows diffusers' ``LatentConsistencyModelPipeline`` (the LCM scheduler, the guidance-scale embedding
``w − 1``), with one addition: the LCM paper distils classifier-free guidance into the embedding against the empty
prompt, so a negative prompt can only act through a second, explicit guidance between the prompt and the negative
prompt (``negative_guidance``; 1 turns it off and is exactly diffusers' pipeline). Its default 1.5 follows the
usual advice for LCM models (guidance 1–2); it has not yet been tuned by eye on the full model.

Candidate ``i`` of a set made with seed ``s`` comes from the noise of seed ``s + i`` alone (one CPU generator per
image), so one candidate can be made again without the others (a recipe records the set's seed and the index).

The model is loaded on demand and released when the images are made (:func:`make_candidates`); in low-VRAM mode each
component visits the GPU only for its part (text encoder, UNet, VAE one image at a time), so the peak stays that of
the UNet in fp16 (~2 GB with its activations), within the pipeline's 4 GiB.

Shapes: images are ``[S, S, 3]`` uint8 (S = ``config.size``); latents ``[B, 4, S/f, S/f]`` (f = 8 for the full
VAE, 2 for the tiny one); text embeddings ``[B, 77, D]``.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from server.common.devices import resident
from server.common.errors import BadInputError, CancelledError, CheckpointError
from server.common.fsutil import write_json_atomic

MODEL_ID = "SimianLuo/LCM_Dreamshaper_v7"
"""The hub repo of the full-size model (its diffusers folder is mirrored under the weights folder)."""
WEIGHTS_GROUP = "text-to-image"
"""The name of its weight files as a group in :mod:`server.common.weights` (``one2345 weights download --only
text-to-image``)."""
TINY_NAME = "tiny random LCM (no weights)"
MAX_COUNT = 8
"""Most candidates one call makes."""
COMPONENT_FILES: dict[str, tuple[str, ...]] = {
    "scheduler": ("scheduler_config.json",),
    "text_encoder": ("config.json", "model.safetensors"),
    "tokenizer": ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"),
    "unet": ("config.json", "diffusion_pytorch_model.safetensors"),
    "vae": ("config.json", "diffusion_pytorch_model.safetensors"),
}
"""The files of the diffusers folder the loader reads (the safety checker and its feature extractor are not used)."""


@dataclass(frozen=True)
class TextToImageConfig:
    """How candidates are made. Defaults: the model card's (4 steps, guidance 8, 512²) and this project's template."""

    steps: int = 4
    """LCM sampling steps (1–8; the card recommends 1–8, 4 is its default)."""
    guidance: float = 8.0
    """The guidance scale the UNet's embedding is conditioned on (``w``; the card uses 8)."""
    negative_guidance: float = 1.5
    """Explicit guidance away from the negative prompt; 1 disables it (and halves the UNet's work)."""
    original_steps: int = 50
    """The teacher's step count the LCM schedule is spaced on (diffusers' default for LCM)."""
    size: int = 512
    """Side of the square images (the model's native resolution; a multiple of 8)."""
    template: str = ("{prompt}, a single whole object, centred, full view, isolated on a plain white background, "
                     "soft diffuse studio lighting, product photo")
    """What the text encoder reads; ``{prompt}`` is the user's prompt as typed."""
    negative_prompt: str = ("cropped, cut off, partial view, close-up, multiple objects, cluttered background, scene, "
                            "text, watermark, harsh shadows, dark, blurry, low quality")
    """Used when the user gives none."""

    def check(self) -> TextToImageConfig:
        if not (isinstance(self.steps, int) and 1 <= self.steps <= 8):
            raise BadInputError(f"text-to-image steps={self.steps!r} is not allowed: an integer in [1, 8]")
        for name in ("guidance", "negative_guidance"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and 1.0 <= value <= 20.0):
                raise BadInputError(f"text-to-image {name}={value!r} is not allowed: a number in [1, 20]")
        if not (isinstance(self.size, int) and 32 <= self.size <= 1024 and self.size % 8 == 0):
            raise BadInputError(f"text-to-image size={self.size!r} is not allowed: a multiple of 8 in [32, 1024]")
        if self.template.count("{prompt}") != 1:
            raise BadInputError("the text-to-image template must contain {prompt} exactly once")
        return self


TINY_CONFIG = TextToImageConfig(size=32)
"""The tiny preset's settings: 32² images (the tiny VAE halves the side, so its latents are 16²)."""


@dataclass(frozen=True)
class TextSource:
    """Where a run's input image came from when it was made from text: recorded in the run's ``meta.json`` (as
    ``text`` and in the recipe), so Regenerate and Variation can make the same picture again."""

    FILE = "text.json"

    prompt: str
    """The user's prompt as typed (the template is :attr:`template`)."""
    negative_prompt: str | None
    """The user's negative prompt; None when the default was used."""
    model: str
    seed: int
    """The candidate set's seed; this image came from ``seed + index``."""
    index: int
    count: int
    steps: int
    guidance: float
    negative_guidance: float
    size: int
    template: str
    images_job: str | None = None
    """The server's images job the candidate came from (``image_of``), so a client can name the same picture again
    for Regenerate; None for a run made by the command line."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, run_dir: Path) -> Path:
        return write_json_atomic(Path(run_dir) / self.FILE, self.to_json())

    @classmethod
    def read(cls, run_dir: Path) -> TextSource | None:
        """The record of ``run_dir``; None when the run's input was an image."""
        path = Path(run_dir) / cls.FILE
        if not path.is_file():
            return None
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as e:
            raise BadInputError(f"{cls.FILE} of run {Path(run_dir).name} is damaged ({e})") from None


@dataclass
class Candidates:
    """What one text-to-image call made: ``images[i]`` ([S, S, 3] uint8) came from seed ``seed + i``."""

    images: list[np.ndarray]
    prompt: str
    negative_prompt: str | None
    model: str
    seed: int
    config: TextToImageConfig
    timings: dict[str, float] = field(default_factory=dict)

    def source(self, index: int) -> TextSource:
        """The record of candidate ``index`` for a run's recipe."""
        if not (isinstance(index, int) and 0 <= index < len(self.images)):
            raise BadInputError(f"candidate index {index!r} does not exist: this set has {len(self.images)} "
                                f"(0…{len(self.images) - 1})")
        c = self.config
        return TextSource(prompt=self.prompt, negative_prompt=self.negative_prompt, model=self.model, seed=self.seed,
                          index=index, count=len(self.images), steps=c.steps, guidance=c.guidance,
                          negative_guidance=c.negative_guidance, size=c.size, template=c.template)

    def write(self, out_dir: str | Path) -> list[Path]:
        """``<out_dir>/<i>.png`` for each candidate and ``candidates.json`` (the record of each); returns the PNGs."""
        from PIL import Image

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, image in enumerate(self.images):
            path = out / f"{i}.png"
            tmp = path.with_name(f".{path.name}.tmp")
            Image.fromarray(image).save(tmp, format="PNG")
            tmp.replace(path)
            paths.append(path)
        write_json_atomic(out / "candidates.json", {"images": [p.name for p in paths],
                                                    "sources": [self.source(i).to_json() for i in range(len(paths))],
                                                    "timings": self.timings})
        return paths


@dataclass
class TextToImageModel:
    """The components of the LCM pipeline (the classes of the full-size model, any size)."""

    tokenizer: Any
    """``transformers.CLIPTokenizer`` (``model_max_length`` tokens, start and end included)."""
    text_encoder: Any
    """``transformers.CLIPTextModel``: token ids [B, 77] → hidden states [B, 77, D]."""
    unet: Any
    """``diffusers.UNet2DConditionModel`` with ``time_cond_proj_dim`` (the guidance embedding)."""
    vae: Any
    """``diffusers.AutoencoderKL``."""
    scheduler: Any
    """``diffusers.LCMScheduler``."""
    name: str
    config: TextToImageConfig = field(default_factory=TextToImageConfig)

    @property
    def max_tokens(self) -> int:
        return int(self.tokenizer.model_max_length)

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def modules(self) -> tuple[torch.nn.Module, ...]:
        return (self.text_encoder, self.unet, self.vae)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> TextToImageModel:
        for module in self.modules():
            module.to(device=device, dtype=dtype)
        return self

    def save(self, folder: str | Path) -> Path:
        """Write the hub's diffusers layout (``model_index.json`` and one folder per component); the tokenizer as
        ``vocab.json`` + ``merges.txt`` like the hub's (not transformers 5's single ``tokenizer.json``)."""
        root = Path(folder)
        root.mkdir(parents=True, exist_ok=True)
        self.scheduler.save_pretrained(root / "scheduler")
        self.text_encoder.save_pretrained(root / "text_encoder", safe_serialization=True)
        self.unet.save_pretrained(root / "unet", safe_serialization=True)
        self.vae.save_pretrained(root / "vae", safe_serialization=True)
        _write_tokenizer(root / "tokenizer", self.tokenizer)
        import diffusers

        write_json_atomic(root / "model_index.json", {
            "_class_name": "LatentConsistencyModelPipeline", "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
            "scheduler": ["diffusers", "LCMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]})
        return root


# -- prompts ----------------------------------------------------------------------------------------------------------


def check_request(prompt: Any, count: Any, seed: Any) -> None:
    """What can be checked before a model loads: a non-empty prompt, ``count`` in 1…8, a seed such that every
    candidate's seed (``seed + i``) is in [0, 2**32). Raises BadInputError naming the value and what is allowed."""
    check_text(prompt)
    if not (isinstance(count, int) and not isinstance(count, bool) and 1 <= count <= MAX_COUNT):
        raise BadInputError(f"count={count!r} is not allowed: an integer in [1, {MAX_COUNT}]")
    if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0
                                 and seed + count <= 2**32):
        raise BadInputError(f"seed={seed!r} is not allowed: null or an integer in [0, 2**32 - count]")


def check_text(text: Any, what: str = "prompt") -> str:
    """``text`` if it is a non-empty string without NUL; BadInputError otherwise."""
    if not isinstance(text, str):
        raise BadInputError(f"the {what} must be text, got {type(text).__name__}")
    if not text.strip():
        hint = ("leave it out to use the default one" if what == "negative prompt"
                else "describe the object, e.g. \"a rusty fire hydrant\"")
        raise BadInputError(f"the {what} is empty: {hint}")
    if "\x00" in text:
        raise BadInputError(f"the {what} contains a NUL character")
    return text


def check_prompt(text: Any, tokenizer: Any, *, what: str = "prompt", template: str = "{prompt}") -> str:
    """``template`` filled with ``text``, checked: a non-empty string whose tokens (start and end included) fit the
    text encoder. Raises BadInputError naming the limit and how much of it the template leaves to the user."""
    check_text(text, what)
    full = template.format(prompt=text.strip())
    limit = int(tokenizer.model_max_length)
    used = len(tokenizer(full, truncation=False).input_ids)
    if used > limit:
        fixed = len(tokenizer(template.format(prompt=""), truncation=False).input_ids)
        own = len(tokenizer(text.strip(), truncation=False).input_ids) - 2  # without the start and end tokens
        left = limit - fixed
        raise BadInputError(f"the {what} is too long: {own} tokens, and the text encoder takes {limit} tokens in all, "
                            f"of which the template uses {fixed}, leaving {left} for the {what}",
                            fix=f"shorten the {what} to at most {left} tokens (about {int(left * 0.75)} words)")
    return full


def encode_texts(model: TextToImageModel, texts: list[str], device: str | torch.device) -> torch.Tensor:
    """Texts (already checked) → text-encoder hidden states [B, 77, D] on ``device``."""
    ids = model.tokenizer(texts, padding="max_length", max_length=model.max_tokens, truncation=True,
                          return_tensors="pt").input_ids
    with torch.no_grad():
        return model.text_encoder(ids.to(model.text_encoder.device))[0].to(device)


def guidance_embedding(w: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The LCM guidance-scale embedding of ``w`` [B] → [B, dim] (sinusoidal, as diffusers'
    ``LatentConsistencyModelPipeline.get_guidance_scale_embedding``)."""
    w = w.to(dtype) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=dtype) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


# -- sampling ---------------------------------------------------------------------------------------------------------


def generate_images(model: TextToImageModel, prompt: str, *, count: int = 4, seed: int = 0,
                    negative_prompt: str | None = None, device: str = "cpu", low_vram: bool = False,
                    progress: Callable[[int, int], None] | None = None,
                    should_cancel: Callable[[], bool] | None = None) -> Candidates:
    """``count`` candidate images of ``prompt`` (candidate ``i`` from seed ``seed + i``).

    Args:
        model: on ``device`` (or on the CPU in low-VRAM mode), in the precision to compute in.
        prompt: the user's prompt as typed; the config's template wraps it.
        negative_prompt: None uses the config's.
        progress: called with (steps done, steps in all) after the text encoder, each UNet step and each decode.
        should_cancel: polled between steps; True raises CancelledError.

    Raises:
        BadInputError: an empty or over-long prompt (naming the limit), a count outside 1…8, a bad seed.
    """
    from diffusers.utils.torch_utils import randn_tensor

    config = model.config.check()
    check_request(prompt, count, seed)
    if seed is None:
        raise BadInputError("seed=None is not allowed here: give the integer the candidates are made from")
    text = check_prompt(prompt, model.tokenizer, template=config.template)
    negative = check_prompt(config.negative_prompt if negative_prompt is None else negative_prompt, model.tokenizer,
                            what="negative prompt")
    cancelled = should_cancel or (lambda: False)
    total = 1 + config.steps + count
    report = progress or (lambda done, total: None)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    dtype = model.unet.dtype
    cfg = config.negative_guidance > 1.0

    # 1. Text: the prompt (and the negative prompt, for the explicit guidance).
    with resident(model.text_encoder, device, low_vram):
        embeddings = encode_texts(model, [text, negative] if cfg else [text], device).to(dtype)
    cond = embeddings[:1].expand(count, -1, -1)
    uncond = embeddings[1:].expand(count, -1, -1) if cfg else None
    timings["text_encoder"] = time.perf_counter() - started
    report(1, total)

    # 2. LCM sampling: noise per image from its own seed (CPU generators: the same on every device).
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(count)]
    side = config.size // model.vae_scale
    shape = (count, model.unet.config.in_channels, side, side)
    latents = randn_tensor(shape, generator=generators, device=torch.device(device), dtype=dtype)
    scheduler = model.scheduler
    scheduler.set_timesteps(config.steps, device=device, original_inference_steps=config.original_steps)
    latents = latents * scheduler.init_noise_sigma
    w = guidance_embedding(torch.full((count,), config.guidance - 1.0), model.unet.config.time_cond_proj_dim)
    w = w.to(device, dtype)
    denoised = latents
    t0 = time.perf_counter()
    with resident(model.unet, device, low_vram), torch.no_grad():
        for step, t in enumerate(scheduler.timesteps):
            if cancelled():
                raise CancelledError("the text-to-image call was cancelled")
            if cfg:
                pred_cond, pred_uncond = model.unet(torch.cat([latents, latents]), t, timestep_cond=torch.cat([w, w]),
                                                    encoder_hidden_states=torch.cat([cond, uncond]),
                                                    return_dict=False)[0].chunk(2)
                pred = pred_uncond + config.negative_guidance * (pred_cond - pred_uncond)
            else:
                pred = model.unet(latents, t, timestep_cond=w, encoder_hidden_states=cond, return_dict=False)[0]
            # The noise added between steps: one draw per image from its own generator (randn_tensor per list item).
            latents, denoised = scheduler.step(pred, t, latents, generator=generators, return_dict=False)
            report(2 + step, total)
    timings["unet"] = time.perf_counter() - t0

    # 3. Decode one image at a time (the VAE's activations at 512² dominate the memory of this stage).
    t0 = time.perf_counter()
    images = []
    with resident(model.vae, device, low_vram), torch.no_grad():
        for i in range(count):
            if cancelled():
                raise CancelledError("the text-to-image call was cancelled")
            pixels = model.vae.decode(denoised[i:i + 1] / model.vae.config.scaling_factor, return_dict=False)[0]
            pixels = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            images.append(pixels.permute(1, 2, 0).cpu().numpy())
            report(2 + config.steps + i, total)
    timings["vae"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started
    return Candidates(images=images, prompt=prompt, negative_prompt=negative_prompt, model=model.name, seed=seed,
                      config=config, timings={k: round(v, 3) for k, v in timings.items()})


# -- models -----------------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins of the byte values that byte-level BPE (GPT-2, CLIP) uses."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


def tiny_vocabulary(words: str = TextToImageConfig.template + " " + TextToImageConfig.negative_prompt
                    ) -> tuple[dict[str, int], list[str]]:
    """A byte-level BPE vocabulary and merges in CLIP's format: every byte (alone and word-final), the special
    tokens, and the words of ``words`` (by default the template and the negative prompt, so that they take about as
    many tokens as with the real vocabulary and leave the user the same room)."""
    chars = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for token in [*chars, *(c + "</w>" for c in chars)]:
        vocab.setdefault(token, len(vocab))
    merges: list[str] = []
    seen: set[str] = set()
    for word in dict.fromkeys("".join(c if c.isalpha() else " " for c in words.lower()).split()):
        parts = [*word[:-1], word[-1] + "</w>"]
        current = parts[0]
        for part in parts[1:]:
            merge = f"{current} {part}"
            current += part
            if merge not in seen:
                seen.add(merge)
                merges.append(merge)
                vocab.setdefault(current, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    return vocab, merges


_TOKENIZER_CONFIG = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
                     "errors": "replace", "add_prefix_space": False, "bos_token": "<|startoftext|>",
                     "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}


def _write_tokenizer(folder: Path, tokenizer: Any) -> None:
    """The hub's four tokenizer files of the tiny tokenizer (the only one this code writes: the real one is
    downloaded)."""
    vocab, merges = tiny_vocabulary()
    if tokenizer.get_vocab() != vocab:
        raise CheckpointError("only the tiny tokenizer can be written in the hub's layout by this code")
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "vocab.json", dict(sorted(vocab.items(), key=lambda kv: kv[1])))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    write_json_atomic(folder / "tokenizer_config.json", {**_TOKENIZER_CONFIG,
                                                         "model_max_length": int(tokenizer.model_max_length)})
    write_json_atomic(folder / "special_tokens_map.json", {k: _TOKENIZER_CONFIG[k] for k in
                                                           ("bos_token", "eos_token", "unk_token", "pad_token")})


def tiny_tokenizer() -> Any:
    """A CLIPTokenizer over :func:`tiny_vocabulary`, built from files written here (no download), 77 tokens."""
    from transformers import CLIPTokenizer

    vocab, merges = tiny_vocabulary()
    with tempfile.TemporaryDirectory(prefix="one2345-tokenizer-") as tmp:
        folder = Path(tmp)
        (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
        (folder / "tokenizer_config.json").write_text(json.dumps(_TOKENIZER_CONFIG), encoding="utf-8")
        return CLIPTokenizer.from_pretrained(folder)


def tiny_text_to_image(seed: int = 0) -> TextToImageModel:
    """A random LCM pipeline of the full model's classes and key layout at toy size (CPU, fp32): CLIP text encoder
    (2 layers, width 32) and tokenizer (77 tokens), a two-level UNet with cross-attention and the guidance
    embedding, a two-level VAE, the LCM scheduler with the full model's schedule. 32² images."""
    from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=32)).eval()
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32, time_cond_proj_dim=32).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 64), latent_channels=4, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=32).eval()
    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                             num_train_timesteps=1000, original_inference_steps=50, clip_sample=False,
                             set_alpha_to_one=True, steps_offset=1, timestep_spacing="leading",
                             prediction_type="epsilon", timestep_scaling=10.0)
    return TextToImageModel(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, vae=vae, scheduler=scheduler,
                            name=TINY_NAME, config=TINY_CONFIG)


def load_text_to_image(folder: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                       name: str = MODEL_ID, config: TextToImageConfig | None = None) -> TextToImageModel:
    """The LCM pipeline of a diffusers folder in the hub's layout (:data:`COMPONENT_FILES`), on ``device`` in
    ``dtype``; never touches the network.

    Raises:
        CheckpointError: a component file is missing or does not load (naming the component and file).
    """
    from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = Path(folder)
    missing = [f"{c}/{f}" for c, files in COMPONENT_FILES.items() for f in files if not (root / c / f).is_file()]
    if missing:
        raise CheckpointError(f"the text-to-image folder {root} lacks {', '.join(missing)}",
                              fix=f"run `one2345 weights download --only {WEIGHTS_GROUP}`")
    loaders: dict[str, Callable[[Path], Any]] = {
        "scheduler": LCMScheduler.from_pretrained,
        "tokenizer": CLIPTokenizer.from_pretrained,
        "text_encoder": lambda p: CLIPTextModel.from_pretrained(p, torch_dtype=dtype, local_files_only=True),
        "unet": lambda p: UNet2DConditionModel.from_pretrained(p, torch_dtype=dtype, local_files_only=True),
        "vae": lambda p: AutoencoderKL.from_pretrained(p, torch_dtype=dtype, local_files_only=True),
    }
    parts: dict[str, Any] = {}
    for component, load in loaders.items():
        try:
            parts[component] = load(root / component)
        except (OSError, ValueError, RuntimeError, KeyError, json.JSONDecodeError) as e:
            raise CheckpointError(f"the text-to-image {component} in {root / component} does not load: "
                                  f"{type(e).__name__}: {str(e)[:300]}",
                                  fix=f"run `one2345 weights download --only {WEIGHTS_GROUP}` (damaged files are "
                                      "fetched again)") from None
    if parts["unet"].config.get("time_cond_proj_dim") is None:
        raise CheckpointError(f"the UNet in {root / 'unet'} has no guidance embedding (time_cond_proj_dim): it is "
                              "not a latent consistency model")
    model = TextToImageModel(**parts, name=name, config=config or TextToImageConfig())
    for module in model.modules():
        module.eval()
    return model.to(device)


def load_for_preset(preset: str, device: str, *, weights_dir: str | Path | None = None, low_vram: bool = False,
                    download_missing: bool = False) -> TextToImageModel:
    """The text-to-image model of a preset: ``tiny`` (random, no weights) or ``paper`` (the weights group, fetched
    first when ``download_missing``), resting on ``device`` (on the CPU in low-VRAM mode) in fp16 on CUDA.

    Raises:
        MissingWeightsError: the weights are absent (with the one command that fetches them).
    """
    from server.common.weights import default_weights_dir, download, group_folder, require, weight_group

    if preset == "tiny":
        return tiny_text_to_image()
    if preset != "paper":
        raise BadInputError(f"unknown preset {preset!r}; choose one of paper, tiny")
    root = Path(weights_dir).expanduser() if weights_dir else default_weights_dir()
    names = weight_group(WEIGHTS_GROUP)
    if download_missing:
        download(names, root)
    else:
        require(names, root, purpose="text input")
    dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    return load_text_to_image(group_folder(WEIGHTS_GROUP, root), "cpu" if low_vram else device, dtype)


def release(model: TextToImageModel) -> None:
    """Free what ``model`` holds on the GPU now (the caller drops its reference too)."""
    model.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def make_candidates(prompt: str, *, count: int = 4, seed: int | None = None, negative_prompt: str | None = None,
                    preset: str = "paper", device: str = "cpu", weights_dir: str | Path | None = None,
                    low_vram: bool = False, download_missing: bool = False,
                    progress: Callable[[int, int], None] | None = None,
                    should_cancel: Callable[[], bool] | None = None) -> Candidates:
    """Load the preset's text-to-image model, make ``count`` candidates, release the model (module docstring).

    The prompt, count and seed are checked before anything loads. ``seed`` None draws one (recorded).
    """
    import random

    check_request(prompt, count, seed)
    if negative_prompt is not None:
        check_text(negative_prompt, "negative prompt")
    if seed is None:
        seed = random.SystemRandom().randrange(2**32 - MAX_COUNT)
    t0 = time.perf_counter()
    model = load_for_preset(preset, device, weights_dir=weights_dir, low_vram=low_vram,
                            download_missing=download_missing)
    loaded = time.perf_counter() - t0
    try:
        candidates = generate_images(model, prompt, count=count, seed=seed, negative_prompt=negative_prompt,
                                     device=device, low_vram=low_vram, progress=progress, should_cancel=should_cancel)
    finally:
        release(model)
        del model
    candidates.timings = {"load": round(loaded, 3), **candidates.timings}
    return candidates
