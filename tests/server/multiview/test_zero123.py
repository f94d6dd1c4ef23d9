"""Zero123 conditioning, sampling wiring and checkpoint folders, on a tiny random model of the real classes."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import kornia
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from server.common.errors import BadInputError, CancelledError, CheckpointError, MissingWeightsError
from server.stages.multiview.checkpoint import load_zero123, save_zero123
from server.stages.multiview.zero123 import (
    Zero123Config,
    Zero123Model,
    clip_preprocess,
    decode_latents,
    encode_conditioning,
    generate_views,
    guided_eps,
    image_to_tensor,
    pose_vectors,
    prepare_stage2_input,
    stage1b_deltas,
    with_unconditional,
)

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])
FOUR_VIEWS = [(0.0, 0.0), (0.0, 90.0), (0.0, 180.0), (0.0, 270.0)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(model: Zero123Model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("zero123")
    save_zero123(model, folder)
    return folder


def _unet_calls(model: Zero123Model) -> tuple[list[dict], torch.utils.hooks.RemovableHandle]:
    calls: list[dict] = []

    def hook(module, args, kwargs):
        sample, timestep = args[:2]
        calls.append({"sample": sample.clone(), "t": timestep.clone(), "context": kwargs["encoder_hidden_states"]})

    return calls, model.unet.register_forward_pre_hook(hook, with_kwargs=True)


# ------------------------------------------------------------------------------------------------------- pure parts


def test_config_defaults_are_the_papers() -> None:
    config = Zero123Config()
    assert (config.guidance_scale, config.eta, config.steps_stage1, config.steps_stage2) == (3.0, 1.0, 75, 50)
    assert config.stage2_deltas == ((-10, 0), (10, 0), (0, -10), (0, 10))


def test_stage1b_deltas_switch_at_polar_75() -> None:
    assert stage1b_deltas(75) == ([4, 5, 6, 7], [(30, 30), (30, 120), (30, 210), (30, 300)])
    assert stage1b_deltas(76) == ([8, 9, 10, 11], [(-30, 30), (-30, 120), (-30, 210), (-30, 300)])


def test_pose_vectors_numbers() -> None:
    got = pose_vectors([(30, 90), (0, 0), (-10, 270)])
    want = torch.tensor(
        [
            [[0.5235987755982988, 1.0, 0.0, 0.0]],  # π/6, sin 90°, cos 90°
            [[0.0, 0.0, 1.0, 0.0]],
            [[-0.17453292519943295, -1.0, 0.0, 0.0]],
        ]
    )
    assert got.shape == (3, 1, 4) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


def test_clip_preprocess_equals_kornia() -> None:
    x = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 2 - 1
    resized = kornia.geometry.transform.resize(
        x, (224, 224), interpolation="bicubic", align_corners=True, antialias=False
    )
    want = kornia.enhance.normalize((resized + 1.0) / 2.0, CLIP_MEAN, CLIP_STD)
    torch.testing.assert_close(clip_preprocess(x), want, rtol=0, atol=1e-6)


def test_clip_preprocess_maps_minus_one_to_normalised_black() -> None:
    out = clip_preprocess(-torch.ones(1, 3, 256, 256))
    torch.testing.assert_close(out[0, :, 100, 7], -CLIP_MEAN / CLIP_STD)


def test_image_to_tensor_range_and_layout() -> None:
    img = np.zeros((256, 256, 3), dtype=np.uint8)
    img[0, 1] = (255, 0, 51)
    x = image_to_tensor(img)
    assert x.shape == (1, 3, 256, 256) and x.dtype == torch.float32
    torch.testing.assert_close(x[0, :, 0, 1], torch.tensor([1.0, -1.0, -0.6]))
    assert x[0, :, 5, 5].tolist() == [-1.0, -1.0, -1.0]


def test_guided_eps_and_unconditional_branch() -> None:
    assert guided_eps(torch.tensor([1.0]), torch.tensor([2.0]), 3.0).item() == 4.0
    cross, concat = torch.randn(3, 1, 8), torch.randn(3, 4, 2, 2)
    cross2, concat2 = with_unconditional(cross, concat)
    assert cross2.shape == (6, 1, 8) and concat2.shape == (6, 4, 2, 2)
    assert not cross2[:3].any() and not concat2[:3].any()
    assert torch.equal(cross2[3:], cross) and torch.equal(concat2[3:], concat)


def test_prepare_stage2_input_snaps_channel_values_from_253() -> None:
    img = np.array([[[252, 253, 254], [255, 0, 128]]], dtype=np.uint8)
    out = prepare_stage2_input(img)
    assert out.tolist() == [[[252, 255, 255], [255, 0, 128]]]
    assert img[0, 0, 1] == 253  # input untouched


# ------------------------------------------------------------------------------------------------ model-level parts


def test_conditioning_matches_independent_computation(model: Zero123Model, image: np.ndarray) -> None:
    x = torch.from_numpy(image).float().permute(2, 0, 1)[None] / 255.0 * 2 - 1
    deltas = [(30.0, 90.0), (-10.0, 0.0)]
    cross, concat = encode_conditioning(model, x, deltas)

    with torch.no_grad():
        resized = kornia.geometry.transform.resize(
            x, (224, 224), interpolation="bicubic", align_corners=True, antialias=False
        )
        pixels = kornia.enhance.normalize((resized + 1) / 2, CLIP_MEAN, CLIP_STD)
        embeds = model.image_encoder(pixel_values=pixels).image_embeds[0]  # [D]
        w, b = model.cc_projection.weight, model.cc_projection.bias
        poses = [torch.tensor([math.pi / 6, 1.0, 0.0, 0.0]), torch.tensor([-math.pi / 18, 0.0, 1.0, 0.0])]
        want_cross = torch.stack([w @ torch.cat([embeds, p]) + b for p in poses])[:, None, :]
        want_concat = model.vae.encode(x).latent_dist.mean  # posterior mean, no 0.18215 scaling

    assert cross.shape == (2, 1, 32) and concat.shape == (2, 4, 32, 32)
    torch.testing.assert_close(cross, want_cross, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(concat, want_concat.expand(2, -1, -1, -1), rtol=1e-6, atol=1e-6)


def test_decode_scales_clamps_and_truncates(model: Zero123Model) -> None:
    z = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = model.vae.decode(z / 0.18215).sample.numpy()
    want = np.floor(np.clip((x + 1) / 2, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    got = decode_latents(model, z)
    assert got.dtype == np.uint8 and got.shape == (2, 256, 256, 3)
    np.testing.assert_array_equal(got, want)


def test_unet_sees_one_batch_of_all_views_uncond_first(model: Zero123Model, image: np.ndarray) -> None:
    calls, handle = _unet_calls(model)
    try:
        generate_views(model, image, FOUR_VIEWS, num_steps=4, guidance=3.0, seed=0)
    finally:
        handle.remove()
    cross, concat = encode_conditioning(model, image_to_tensor(image), FOUR_VIEWS)
    first = calls[0]
    assert first["sample"].shape == (8, 8, 32, 32)  # 4 views × (uncond, cond) in one UNet batch
    assert torch.equal(first["sample"][:4, :4], first["sample"][4:, :4])  # same noisy latent in both halves
    assert not first["sample"][:4, 4:].any() and not first["context"][:4].any()  # uncond: zeros, first
    torch.testing.assert_close(first["sample"][4:, 4:], concat)
    torch.testing.assert_close(first["context"][4:], cross)
    # 4 steps: entries 1, 251, 501, 751 (stride 250), 751 dropped.
    assert [c["t"].tolist() for c in calls] == [[501] * 8, [251] * 8, [1] * 8]


def test_guidance_one_has_no_unconditional_branch(model: Zero123Model, image: np.ndarray) -> None:
    calls, handle = _unet_calls(model)
    try:
        generate_views(model, image, FOUR_VIEWS[:3], num_steps=4, guidance=1.0, seed=0)
    finally:
        handle.remove()
    assert calls[0]["sample"].shape == (3, 8, 32, 32) and calls[0]["context"].abs().sum() > 0


# ------------------------------------------------------------------------------------------------------ generate_views


def test_generate_views_75_steps_runs_76_unet_steps(model: Zero123Model, image: np.ndarray) -> None:
    progress: list[tuple[int, int]] = []
    calls, handle = _unet_calls(model)
    try:
        views = generate_views(
            model, image, [(30.0, 120.0)], num_steps=75, seed=1, callback=lambda i, n: progress.append((i, n))
        )
    finally:
        handle.remove()
    assert progress == [(i, 76) for i in range(1, 77)]
    assert [c["t"].tolist() for c in calls] == [[t, t] for t in range(976, 0, -13)]
    assert len(views) == 1 and views[0].shape == (256, 256, 3) and views[0].dtype == np.uint8


def test_generate_views_is_deterministic_per_seed(model: Zero123Model, image: np.ndarray) -> None:
    def run(seed: int | None) -> np.ndarray:
        views = generate_views(model, image, FOUR_VIEWS, num_steps=4, seed=seed)
        assert len(views) == 4 and all(v.shape == (256, 256, 3) and v.dtype == np.uint8 for v in views)
        return np.stack(views)

    a, b, c = run(7), run(7), run(8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(run(None), run(None))


def test_generate_views_cancels_within_one_step(model: Zero123Model, image: np.ndarray) -> None:
    progress: list[tuple[int, int]] = []
    with pytest.raises(CancelledError):
        generate_views(
            model,
            image,
            FOUR_VIEWS,
            num_steps=50,
            seed=0,
            callback=lambda i, n: progress.append((i, n)),
            should_cancel=lambda: len(progress) >= 2,
        )
    assert progress == [(1, 49), (2, 49)]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image": np.zeros((128, 128, 3), np.uint8)}, "256×256"),
        ({"image": np.zeros((256, 256, 3), np.float32)}, "uint8"),
        ({"image": np.zeros((256, 256, 4), np.uint8)}, r"\[H, W, 3\]"),
        ({"deltas": []}, "at least one pair"),
        ({"deltas": [(0.0, float("nan"))]}, "finite"),
        ({"num_steps": 1}, "num_steps=1"),
        ({"eta": 1.5}, "eta=1.5"),
        ({"guidance": -1.0}, "guidance=-1.0"),
        ({"seed": -3}, "seed=-3"),
    ],
)
def test_generate_views_rejects_bad_input(model: Zero123Model, image: np.ndarray, kwargs: dict, match: str) -> None:
    args = {"image": image, "deltas": FOUR_VIEWS, "num_steps": 10} | kwargs
    with pytest.raises(BadInputError, match=match):
        generate_views(model, **args)


# ------------------------------------------------------------------------------------------------------ load / save


def test_save_writes_the_hub_layout(saved: Path) -> None:
    assert (saved / "unet" / "config.json").is_file() and (saved / "vae" / "config.json").is_file()
    assert (saved / "image_encoder" / "config.json").is_file()
    config = json.loads((saved / "cc_projection" / "config.json").read_text())
    assert (config["in_channel"], config["out_channel"]) == (36, 32)
    tensors = load_file(str(saved / "cc_projection" / "diffusion_pytorch_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"projection.weight": (32, 36), "projection.bias": (32,)}


def test_load_round_trips_every_weight(model: Zero123Model, saved: Path, image: np.ndarray) -> None:
    loaded = load_zero123(saved, "cpu", torch.float32)
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    assert not loaded.training
    a = generate_views(model, image, FOUR_VIEWS[:1], num_steps=4, seed=5)
    b = generate_views(loaded, image, FOUR_VIEWS[:1], num_steps=4, seed=5)
    np.testing.assert_array_equal(a[0], b[0])


def test_loaded_tensors_own_aligned_memory(saved: Path) -> None:
    # from_pretrained hands out tensors mmap'd at the safetensors data offsets; misaligned weights make MKL's GEMM
    # round differently, so a loaded model must hold torch-allocated (64-byte aligned) copies.
    loaded = load_zero123(saved, "cpu", torch.float32)
    tensors = dict(loaded.named_parameters()) | dict(loaded.named_buffers())
    assert [name for name, t in tensors.items() if t.data_ptr() % 64] == []


def test_load_cc_projection_from_bin(saved: Path, tmp_path: Path) -> None:
    folder = tmp_path / "z"
    shutil.copytree(saved, folder)
    cc = folder / "cc_projection"
    torch.save(load_file(str(cc / "diffusion_pytorch_model.safetensors")), cc / "diffusion_pytorch_model.bin")
    (cc / "diffusion_pytorch_model.safetensors").unlink()
    loaded = load_zero123(folder)
    assert torch.equal(
        loaded.cc_projection.weight,
        load_file(str(saved / "cc_projection" / "diffusion_pytorch_model.safetensors"))["projection.weight"],
    )


@pytest.mark.parametrize(
    ("remove", "part"),
    [
        ("vae", "vae"),
        ("unet/diffusion_pytorch_model.safetensors", "unet"),
        ("image_encoder/config.json", "image_encoder"),
        ("cc_projection/diffusion_pytorch_model.safetensors", "cc_projection"),
    ],
)
def test_load_names_the_missing_part(saved: Path, tmp_path: Path, remove: str, part: str) -> None:
    folder = tmp_path / "z"
    shutil.copytree(saved, folder)
    target = folder / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(MissingWeightsError, match=f"'{part}'"):
        load_zero123(folder)


def test_load_is_strict_about_keys(saved: Path, tmp_path: Path) -> None:
    folder = tmp_path / "z"
    shutil.copytree(saved, folder)
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    del tensors["conv_in.weight"]
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"'unet'.*conv_in\.weight"):
        load_zero123(folder)


def test_load_rejects_cc_projection_of_wrong_shape(saved: Path, tmp_path: Path) -> None:
    folder = tmp_path / "z"
    shutil.copytree(saved, folder)
    path = folder / "cc_projection" / "diffusion_pytorch_model.safetensors"
    save_file({"projection.weight": torch.zeros(32, 35), "projection.bias": torch.zeros(32)}, str(path))
    with pytest.raises(CheckpointError, match="cc_projection"):
        load_zero123(folder)


def test_model_rejects_parts_that_do_not_fit(model: Zero123Model) -> None:
    with pytest.raises(CheckpointError, match="cc_projection in_features is 10, expected 36"):
        Zero123Model(model.unet, model.vae, model.image_encoder, torch.nn.Linear(10, 32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_half_precision_on_cuda(image: np.ndarray, saved: Path) -> None:
    cuda = load_zero123(saved, "cuda", torch.float16)
    cpu = load_zero123(saved, "cpu", torch.float32)
    a = np.stack(generate_views(cuda, image, FOUR_VIEWS, num_steps=10, seed=2)).astype(int)
    b = np.stack(generate_views(cpu, image, FOUR_VIEWS, num_steps=10, seed=2)).astype(int)
    assert np.abs(a - b).mean() < 2.0  # same seed → same noise on both devices; only fp16 rounding differs
