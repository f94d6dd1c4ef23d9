"""The Zero123 parts on disk, and a tiny model of them.

:func:`load_zero123` reads the diffusers-format folder (the hub's ``kxic/zero123-xl`` layout: ``unet/``, ``vae/``,
``image_encoder/``, ``cc_projection/``) strictly, :func:`save_zero123` writes it, and :func:`tiny_zero123` builds a
randomly initialised model of the same classes at toy width (tests, the ``tiny`` preset). Sampling with the parts is
:mod:`.zero123`'s; converting the reference's checkpoint into this folder is :mod:`.convert`'s.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ModelMixin, UNet2DConditionModel
from diffusers.utils import is_accelerate_available
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from server.common.errors import CheckpointError, MissingWeightsError
from server.stages.multiview.zero123 import CLIP_SIZE, IMAGE_SIZE, Zero123Model

_DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin.index.json",
)
_TRANSFORMERS_WEIGHTS = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
_CC_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_MISSING_FIX = (
    "delete this folder so that the server converts zero123-xl.ckpt again (fetch the checkpoint with `one2345 weights "
    "download --only zero123-xl`), or point to a complete diffusers-format Zero123 folder laid out like the hub's "
    "kxic/zero123-xl"
)


def load_zero123(
    folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Zero123Model:
    """Load a diffusers-format Zero123 folder (``unet/``, ``vae/``, ``image_encoder/``, ``cc_projection/``).

    Every part is loaded strictly: a missing, unexpected or mis-shaped tensor is an error, never a random init.

    Args:
        folder: the folder holding the four part subfolders.
        device: where to put the model.
        dtype: parameter dtype (fp16 on CUDA, float32 on CPU).

    Returns:
        The model in eval mode.

    Raises:
        MissingWeightsError: a part's subfolder, config or weight file is absent (the message names it).
        CheckpointError: a part exists but does not load cleanly or the parts do not fit together.
    """
    folder = Path(folder)
    unet = _load_pretrained(UNet2DConditionModel, folder, "unet", _DIFFUSERS_WEIGHTS)
    vae = _load_pretrained(AutoencoderKL, folder, "vae", _DIFFUSERS_WEIGHTS)
    image_encoder = _load_pretrained(CLIPVisionModelWithProjection, folder, "image_encoder", _TRANSFORMERS_WEIGHTS)
    cc_projection = _load_cc_projection(folder / "cc_projection")
    model = Zero123Model(unet, vae, image_encoder, cc_projection).to(device=device, dtype=dtype)
    # from_pretrained assigns tensors memory-mapped from the safetensors files, at offsets not 64-byte aligned; MKL's
    # CPU GEMM rounds differently for such weights than for torch-allocated (64-byte aligned) ones, so copy them.
    _own_cpu_memory(model)
    return model.eval()


def _own_cpu_memory(module: nn.Module) -> None:
    """Copy every CPU parameter and buffer of ``module`` into fresh torch-allocated (64-byte aligned) memory.

    diffusers 0.42 and transformers 5.24 load safetensors by mmap and *assign* those tensors as parameters, so a
    loaded part lives at the file's data offsets (often only 4-byte aligned) and stays backed by the file. The values
    are exact, but MKL's sgemm takes another code path for misaligned operands: ``visual_projection`` of a loaded CLIP
    differed from the saved model's by 1 ulp, enough to flip a few output pixels after sampling. ``.to()`` copies only
    on a device or dtype change, so CPU tensors are cloned here; tensors on other devices are already fresh copies.
    """
    with torch.no_grad():
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            if tensor.device.type == "cpu":
                tensor.data = tensor.data.clone(memory_format=torch.contiguous_format)


def save_zero123(model: Zero123Model, folder: str | Path) -> None:
    """Write ``model`` in the layout :func:`load_zero123` reads (safetensors, current dtype).

    ``cc_projection/`` gets ``config.json`` (``in_channel``, ``out_channel``) and
    ``diffusion_pytorch_model.safetensors`` with keys ``projection.weight`` / ``projection.bias``, as the diffusers
    community pipeline's ``CCProjection`` writes them.

    Args:
        model: the parts to save.
        folder: destination; created if needed, existing part files are overwritten.
    """
    folder = Path(folder)
    model.unet.save_pretrained(folder / "unet")
    model.vae.save_pretrained(folder / "vae")
    model.image_encoder.save_pretrained(folder / "image_encoder")
    cc_dir = folder / "cc_projection"
    cc_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "_class_name": "CCProjection",
        "in_channel": model.cc_projection.in_features,
        "out_channel": model.cc_projection.out_features,
    }
    (cc_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {f"projection.{k}": v.detach().cpu().contiguous() for k, v in model.cc_projection.state_dict().items()}
    save_file(tensors, str(cc_dir / "diffusion_pytorch_model.safetensors"))


def tiny_zero123(seed: int = 0) -> Zero123Model:
    """A randomly initialised Zero123 of the real classes at toy width, for tests (CPU, float32).

    Same interfaces as the real model: 8-channel UNet input, 4-channel latents with 8× downsampling (256² → 32²),
    CLIP vision tower at 224² with projection dim D = 32, ``cc_projection`` = Linear(36, 32). Attention sits only at
    the UNet's 16² level so a 76-step, 4-view sample takes a few seconds on one CPU core. The global RNG is untouched.

    Args:
        seed: seed of the random initialisation.
    """
    dim = 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=IMAGE_SIZE // 8,
            in_channels=8,
            out_channels=4,
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=dim,
            # diffusers reads this as the number of heads: 2 heads of width 16. Eight heads of width 4 gave the same
            # weights but took 0.33 s instead of 0.20 s per UNet call at stage 2's batch of 56 on 2 CPU cores.
            attention_head_dim=2,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(8, 8, 8, 8),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=IMAGE_SIZE,
        )
        clip_config = CLIPVisionConfig(
            hidden_size=dim,
            intermediate_size=37,
            projection_dim=dim,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=CLIP_SIZE,
            patch_size=32,
        )
        image_encoder = CLIPVisionModelWithProjection(clip_config)
        cc_projection = nn.Linear(dim + 4, dim)
    return Zero123Model(unet, vae, image_encoder, cc_projection).eval()


def _load_pretrained(cls: type, folder: Path, part: str, weight_names: Sequence[str]) -> nn.Module:
    """``cls.from_pretrained(folder / part)`` with existence checks and strict key checking."""
    path = folder / part
    _require_files(path, part, weight_names)
    kwargs: dict[str, object] = {}
    if issubclass(cls, ModelMixin):
        # diffusers defaults to low_cpu_mem_usage=True, which needs `accelerate`; without it diffusers falls back to
        # False and prints an "install accelerate" notice on every load. Ask for what is possible, so nothing prints.
        kwargs["low_cpu_mem_usage"] = is_accelerate_available()
    try:
        module, info = cls.from_pretrained(str(path), output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"Zero123 part '{part}' in {path} cannot be loaded: {e}", fix=_MISSING_FIX) from e
    problems = {
        kind: sorted(str(k) for k in info.get(kind, ()))
        for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if problems:
        detail = "; ".join(f"{kind}: {keys[:5]}{' …' if len(keys) > 5 else ''}" for kind, keys in problems.items())
        raise CheckpointError(
            f"Zero123 part '{part}' in {path} does not match its config ({detail}).", fix=_MISSING_FIX
        )
    return module


def _load_cc_projection(path: Path) -> nn.Linear:
    """Read ``cc_projection/`` (config.json + projection.weight/bias) strictly into an ``nn.Linear``."""
    weights = _require_files(path, "cc_projection", _CC_WEIGHTS)
    try:
        config = json.loads((path / "config.json").read_text())
        in_channel, out_channel = int(config["in_channel"]), int(config["out_channel"])
        if weights.suffix == ".safetensors":
            state = load_file(str(weights))
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"Zero123 part 'cc_projection' in {path} cannot be read: {e!r}", fix=_MISSING_FIX) from e
    expected = {"projection.weight": (out_channel, in_channel), "projection.bias": (out_channel,)}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        raise CheckpointError(
            f"Zero123 part 'cc_projection' in {weights} holds {got}, expected {expected} from its config.json.",
            fix=_MISSING_FIX,
        )
    linear = nn.Linear(in_channel, out_channel)
    linear.load_state_dict({k.removeprefix("projection."): v for k, v in state.items()}, strict=True)
    return linear


def _require_files(path: Path, part: str, weight_names: Sequence[str]) -> Path:
    """Return the first existing weight file of a part folder; MissingWeightsError naming what is absent."""
    if not (path / "config.json").is_file():
        raise MissingWeightsError(f"Zero123 part '{part}' is missing: no {path / 'config.json'}.", fix=_MISSING_FIX)
    for name in weight_names:
        if (path / name).is_file():
            return path / name
    raise MissingWeightsError(
        f"Zero123 part '{part}' is missing its weights: none of {list(weight_names)} in {path}.", fix=_MISSING_FIX
    )
