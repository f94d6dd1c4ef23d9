"""The text-to-image stage (issue #30): the tiny LCM pipeline of the full model's classes, the sampler against
diffusers' own LCM pipeline, the loader on a checkpoint in the hub's layout (fetched through the weights service from
a stand-in hub), prompt checks, the CLI (``imagine``, ``generate --prompt``) and the run's recipe.

No network: the tiny tokenizer is built from a vocabulary written locally, the hub is ``tests.server.fake_hub``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from server.common import weights
from server.common.errors import BadInputError, CheckpointError, MissingWeightsError
from server.service.cli import main
from server.stages import text_to_image as t2i
from tests.server.fake_hub import serve_hub


@pytest.fixture(scope="module")
def tiny() -> t2i.TextToImageModel:
    return t2i.tiny_text_to_image(seed=0)


@pytest.fixture(scope="module")
def made(tiny: t2i.TextToImageModel) -> t2i.Candidates:
    return t2i.generate_images(tiny, "a rusty fire hydrant", count=2, seed=5)


@pytest.fixture(scope="module")
def checkpoint(tiny: t2i.TextToImageModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.save(tmp_path_factory.mktemp("hub") / "LCM_Dreamshaper_v7")


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# -- the model ----------------------------------------------------------------------------------------------------


def test_the_tiny_model_has_the_full_models_classes_and_limits(tiny: t2i.TextToImageModel) -> None:
    from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(tiny.tokenizer, CLIPTokenizer) and isinstance(tiny.text_encoder, CLIPTextModel)
    assert isinstance(tiny.unet, UNet2DConditionModel) and isinstance(tiny.vae, AutoencoderKL)
    assert isinstance(tiny.scheduler, LCMScheduler)
    assert tiny.max_tokens == 77 == tiny.text_encoder.config.max_position_embeddings  # as CLIP ViT-L
    assert tiny.unet.config.time_cond_proj_dim is not None  # the LCM guidance embedding
    assert tiny.unet.config.cross_attention_dim == tiny.text_encoder.config.hidden_size
    # The template's words are whole tokens, as in the real vocabulary, so the user keeps most of the 77.
    template_tokens = len(tiny.tokenizer(tiny.config.template.format(prompt="")).input_ids)
    assert template_tokens < 40


def test_the_guidance_embedding_is_diffusers_one() -> None:
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([7.0, 0.5])
    ours = t2i.guidance_embedding(w, 33)
    theirs = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=33)
    torch.testing.assert_close(ours, theirs)


def test_without_negative_guidance_the_sampler_is_diffusers_lcm_pipeline(tiny: t2i.TextToImageModel) -> None:
    from diffusers import LatentConsistencyModelPipeline

    model = dataclasses.replace(tiny, config=dataclasses.replace(tiny.config, negative_guidance=1.0))
    ours = t2i.generate_images(model, "a red mug", count=1, seed=11).images[0]
    pipe = LatentConsistencyModelPipeline(vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer,
                                          unet=tiny.unet, scheduler=tiny.scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    text = tiny.config.template.format(prompt="a red mug")
    theirs = pipe(text, height=32, width=32, num_inference_steps=tiny.config.steps, guidance_scale=8.0,
                  generator=[torch.Generator().manual_seed(11)], output_type="np").images[0]
    diff = np.abs(ours.astype(int) - np.round(theirs * 255).astype(int))
    assert ours.shape == (32, 32, 3) and diff.max() <= 1


def test_the_same_seed_makes_the_same_candidates_and_each_comes_from_its_own_seed(
        tiny: t2i.TextToImageModel, made: t2i.Candidates) -> None:
    assert len(made.images) == 2 and all(i.shape == (32, 32, 3) and i.dtype == np.uint8 for i in made.images)
    again = t2i.generate_images(tiny, "a rusty fire hydrant", count=1, seed=6)  # candidate 1 alone: seed 5 + 1
    np.testing.assert_array_equal(again.images[0], made.images[1])
    assert not np.array_equal(made.images[0], made.images[1])
    source = made.source(1)
    assert (source.prompt, source.seed, source.index, source.count, source.model) == (
        "a rusty fire hydrant", 5, 1, 2, t2i.TINY_NAME)
    with pytest.raises(BadInputError, match=r"index 2 does not exist: this set has 2 \(0…1\)"):
        made.source(2)


@pytest.mark.parametrize(("prompt", "kwargs", "message"), [
    ("", {}, "the prompt is empty"),
    ("   ", {}, "the prompt is empty"),
    (None, {}, "must be text"),
    ("mug " * 60, {}, r"too long: \d+ tokens, and the text encoder takes 77 tokens in all, of which the template "
                      r"uses \d+, leaving \d+"),
    ("a mug", {"negative_prompt": "blur " * 80}, "negative prompt is too long"),
    ("a mug", {"negative_prompt": " "}, "negative prompt is empty: leave it out"),
    ("a mug", {"count": 0}, r"count=0 is not allowed: an integer in \[1, 8\]"),
    ("a mug", {"count": 9}, "count=9"),
    ("a mug", {"seed": -1}, "seed=-1"),
    ("a mug", {"seed": 2**32 - 1, "count": 2}, "seed=4294967295"),
])
def test_bad_prompts_and_settings_are_refused_by_name(tiny: t2i.TextToImageModel, prompt, kwargs, message) -> None:
    args = {"count": 1, "seed": 0, **kwargs}
    with pytest.raises(BadInputError, match=message):
        t2i.generate_images(tiny, prompt, **args)


def test_an_over_long_prompt_says_how_many_tokens_are_left_and_a_prompt_at_the_limit_passes(
        tiny: t2i.TextToImageModel) -> None:
    with pytest.raises(BadInputError) as e:
        t2i.check_prompt("mug " * 60, tiny.tokenizer, template=tiny.config.template)
    left = int(e.value.message.rsplit("leaving ", 1)[1].split()[0])
    assert f"at most {left} tokens" in e.value.fix
    # "x" is one token: exactly ``left`` of them fit, one more does not.
    t2i.check_prompt(" ".join(["x"] * left), tiny.tokenizer, template=tiny.config.template)
    with pytest.raises(BadInputError, match="too long"):
        t2i.check_prompt(" ".join(["x"] * (left + 1)), tiny.tokenizer, template=tiny.config.template)


# -- the checkpoint and the weights service -----------------------------------------------------------------------


def test_the_loader_reads_a_checkpoint_in_the_hubs_layout(tiny: t2i.TextToImageModel, made: t2i.Candidates,
                                                          checkpoint: Path) -> None:
    for component, files in t2i.COMPONENT_FILES.items():
        for name in files:
            assert (checkpoint / component / name).is_file(), f"{component}/{name}"
    assert json.loads((checkpoint / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DConditionModel"]
    loaded = t2i.load_text_to_image(checkpoint, name=t2i.TINY_NAME, config=tiny.config)
    for ours, theirs in zip(tiny.modules(), loaded.modules(), strict=True):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.tokenizer.get_vocab() == tiny.tokenizer.get_vocab() and loaded.max_tokens == 77
    again = t2i.generate_images(loaded, "a rusty fire hydrant", count=1, seed=5)
    np.testing.assert_array_equal(again.images[0], made.images[0])


def test_a_checkpoint_lacking_a_file_or_with_a_damaged_one_is_refused_by_name(checkpoint: Path,
                                                                              tmp_path: Path) -> None:
    import shutil

    broken = Path(shutil.copytree(checkpoint, tmp_path / "broken"))
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"lacks unet/diffusion_pytorch_model\.safetensors") as e:
        t2i.load_text_to_image(broken)
    assert "--only text-to-image" in e.value.fix
    shutil.copy(checkpoint / "unet" / "diffusion_pytorch_model.safetensors", broken / "unet")
    (broken / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match=r"the text-to-image vae .* does not load"):
        t2i.load_text_to_image(broken)


def test_the_text_model_is_an_optional_on_demand_group_of_the_weights_table(tmp_path: Path) -> None:
    group = weights.weight_group(t2i.WEIGHTS_GROUP)
    files = {weights.weight_file(n).filename for n in group}
    assert files == {f"{c}/{f}" for c, names in t2i.COMPONENT_FILES.items() for f in names}
    states = {s.name: s for s in weights.inspect_weights(tmp_path)}
    for name in group:  # listed (GET /v1/weights), optional, with its size and licence
        assert states[name].state == "missing" and not states[name].required
        assert states[name].licence.startswith("MIT") and "OpenRAIL-M" in states[name].licence
        assert states[name].source.startswith(f"{weights.DEFAULT_ENDPOINT}/{t2i.MODEL_ID}/resolve/")
    assert 4.2e9 < sum(weights.weight_file(n).approx_size_bytes for n in group) < 4.4e9
    # A plain download (and its size) leaves it out; its own command names it once.
    with pytest.raises(MissingWeightsError) as e:
        weights.download(None, tmp_path, offline=True)
    assert "text-to-image" not in e.value.message and "`one2345 weights download " in e.value.fix
    assert "text-to-image" not in weights.download_command(["sam", "zero123-xl", "loftr", "reconstruction"])
    assert weights.download_command([t2i.WEIGHTS_GROUP]) == "one2345 weights download --only text-to-image"
    assert weights.missing_bytes(states.values()) < 18.2e9
    with pytest.raises(MissingWeightsError) as e:
        t2i.load_for_preset("paper", "cpu", weights_dir=tmp_path)
    assert "text input needs" in e.value.message and "--only text-to-image" in e.value.fix
    with pytest.raises(BadInputError, match="known groups: text-to-image"):
        weights.weight_group("nope")


@pytest.fixture
def text_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, checkpoint: Path) -> Iterator[object]:
    files = {weights.weight_file(n).filename: (checkpoint / weights.weight_file(n).filename).read_bytes()
             for n in weights.weight_group(t2i.WEIGHTS_GROUP)}
    with serve_hub(monkeypatch, tmp_path, files, lfs={"unet/diffusion_pytorch_model.safetensors"}) as hub:
        hub.repo_id = t2i.MODEL_ID
        yield hub


def test_the_group_is_fetched_by_the_weights_service_and_loads(text_hub, tmp_path: Path,
                                                               made: t2i.Candidates) -> None:
    root = tmp_path / "weights"
    paths = weights.download(["text-to-image"], root, progress=False)
    assert set(paths) == set(weights.weight_group(t2i.WEIGHTS_GROUP))
    assert weights.group_folder(t2i.WEIGHTS_GROUP, root) == root / "text-to-image"
    assert all(s.state == "present" for s in weights.inspect_weights(root, names=["text-to-image"]))
    model = t2i.load_for_preset("paper", "cpu", weights_dir=root)
    assert model.name == t2i.MODEL_ID and model.config == t2i.TextToImageConfig()
    model.config = t2i.TINY_CONFIG  # the tiny checkpoint's size: the same pictures as the tiny preset
    np.testing.assert_array_equal(t2i.generate_images(model, "a rusty fire hydrant", count=1, seed=5).images[0],
                                  made.images[0])


# -- the CLI and the recipe -----------------------------------------------------------------------------------------


def test_imagine_writes_the_candidates_and_their_record(tmp_path: Path, made: t2i.Candidates,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "candidates"
    code, stdout, err = run(["imagine", "a rusty fire hydrant", "--count", "2", "--seed", "5", "--out-dir", str(out),
                             "--preset", "tiny", "--device", "cpu"], capsys)
    assert code == 0, err
    assert stdout.split() == [str(out / "0.png"), str(out / "1.png")]
    for i in range(2):
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{i}.png")), made.images[i])
    record = json.loads((out / "candidates.json").read_text())
    assert [s["index"] for s in record["sources"]] == [0, 1] and record["sources"][1]["seed"] == 5
    assert record["sources"][0]["prompt"] == "a rusty fire hydrant"


@pytest.mark.parametrize(("argv", "message"), [
    (["imagine", "", "--out-dir", "{tmp}/c"], "the prompt is empty"),
    (["imagine", "a mug", "--count", "9", "--out-dir", "{tmp}/c"], "count=9"),
    (["imagine", "a mug " * 40, "--out-dir", "{tmp}/c"], "too long"),
    (["generate", "--prompt", "a mug", "--count", "2", "--pick", "2", "-o", "{tmp}/m.glb"], "--pick 2 is not among"),
    (["generate", "--prompt", "a mug", "--out-dir", "{tmp}/d"], "say where it goes with -o"),
    (["generate", "{tmp}/x.png", "--prompt", "a mug", "-o", "{tmp}/m.glb"], "either input images or --prompt"),
    (["generate", "-o", "{tmp}/m.glb"], "give the input image"),
])
def test_bad_text_commands_are_refused_before_any_model_loads(argv, message, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--preset", "tiny", "--device", "cpu"]
    code, _, err = run(argv, capsys)
    assert code == 2 and re.search(message, err), err
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob("*.one2345"))


class RecordingPipe:
    """Stands in for the image-to-3D pipeline: keeps what it was given, writes what a finished run writes."""

    def __init__(self) -> None:
        self.calls: list[dict[str, object]] = []

    def __call__(self, image, run_dir, options, progress=None, outputs=(), text=None):
        self.calls.append({"image": image, "options": options, "text": text})
        Path(run_dir).mkdir(parents=True)
        (Path(run_dir) / "meta.json").write_text("{}")
        for out in outputs:
            Path(out).write_bytes(b"mesh")
        return SimpleNamespace(elevation=15.0, elevation_source="given", background="none", vertices=3,
                               elevation_uncertain=False, elevation_confidence=None)


def test_generate_from_a_prompt_meshes_the_picked_candidate_and_keeps_them_all(
        tmp_path: Path, made: t2i.Candidates, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    pipe = RecordingPipe()
    monkeypatch.setattr("server.pipeline.One2345Pipeline.from_preset", lambda *a, **k: pipe)
    code, stdout, err = run(["generate", "--prompt", "a rusty fire hydrant", "--count", "2", "--pick", "1", "--seed",
                             "5", "-o", str(tmp_path / "hydrant.glb"), "--preset", "tiny", "--device", "cpu"], capsys)
    assert code == 0, err
    assert stdout.strip().splitlines()[-1] == str(tmp_path / "hydrant.glb")
    (call,) = pipe.calls
    np.testing.assert_array_equal(call["image"], made.images[1])
    assert call["text"] == made.source(1) and call["options"].seed == 5
    assert call["options"].remove_background is False and "background is kept" in err  # tiny: noise, no object
    kept = tmp_path / "hydrant.one2345" / "candidates"
    assert sorted(p.name for p in kept.iterdir()) == ["0.png", "1.png", "candidates.json"]


def test_the_run_records_the_prompt_in_its_recipe_and_an_image_run_is_unchanged(tmp_path: Path,
                                                                                made: t2i.Candidates) -> None:
    from server.pipeline import GenerateOptions, One2345Pipeline

    pipe = One2345Pipeline.from_preset("tiny", device="cpu")
    options = GenerateOptions(seed=3, steps_stage1=2, steps_stage2=2, resolution=32, elevation=20.0, format="ply",
                              remove_background=False)  # a random picture has no object to cut out
    image = np.asarray(Image.fromarray(made.images[1]).resize((64, 64)))
    pipe(image, tmp_path / "text_run", options, text=made.source(1))
    meta = json.loads((tmp_path / "text_run" / "meta.json").read_text())
    assert meta["text"] == meta["recipe"]["text"] == made.source(1).to_json()
    assert (meta["text"]["prompt"], meta["text"]["seed"], meta["text"]["index"]) == ("a rusty fire hydrant", 5, 1)

    pipe(image, tmp_path / "image_run", options)
    plain = json.loads((tmp_path / "image_run" / "meta.json").read_text())
    assert "text" not in plain and "text" not in plain["recipe"]
    assert not (tmp_path / "image_run" / "text.json").exists()
    assert set(plain) == set(meta) - {"text"}
