"""The first-use benchmark's own machinery (issue #25): the streamed checkpoint writer and a ``--tiny`` run.

The full-size run (``python -m server.benchmarks.first_use``) needs ~21 GB of disk and minutes; it is not part of the
test run. These tests exercise the same code on a tiny layout."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

from server.benchmarks import first_use, synthetic_weights
from server.benchmarks.streamed_checkpoint import RandomFill, StreamingCheckpointWriter, TensorSpec
from server.benchmarks.synthetic_weights import ZERO123_XL_BYTES


def test_streamed_checkpoint_loads_like_torch_save(tmp_path: Path) -> None:
    """Nested dicts/lists/tuples of specs and real tensors, padded to an exact size, read back memory-mapped."""
    fill = RandomFill(pool_bytes=4096)
    made: list[torch.Tensor] = []

    def recording_fill(spec: TensorSpec) -> torch.Tensor:
        tensor = fill(spec)
        made.append(tensor.clone())
        return tensor

    real = torch.arange(6, dtype=torch.int64).reshape(2, 3)
    layout = {"state_dict": {"a.weight": TensorSpec((3, 4)), "b.half": TensorSpec((5,), torch.float16),
                             "big": TensorSpec((3000,)), "scalar": torch.tensor(0.5), "real": real},
              "optimizer_states": [{"state": {0: {"exp_avg": TensorSpec((3, 4))}}, "param_groups": [{"lr": 1e-4}]}],
              "pair": (1, "two"), "epoch": 3}
    path = tmp_path / "model.ckpt"
    target = 200_000
    assert StreamingCheckpointWriter(path, recording_fill, target).write(layout) == target
    assert path.stat().st_size == target
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None  # every CRC right
        assert "archive/padding" in archive.namelist()

    loaded = torch.load(path, mmap=True, weights_only=True)
    state = loaded["state_dict"]
    assert torch.equal(state["a.weight"], made[0]) and state["a.weight"].dtype == torch.float32
    assert state["b.half"].dtype == torch.float16 and torch.equal(state["b.half"], made[1])
    assert torch.equal(state["big"], made[2])  # larger than the pool: tiled
    assert torch.equal(state["real"], real) and state["scalar"].item() == 0.5
    assert torch.equal(loaded["optimizer_states"][0]["state"][0]["exp_avg"], made[3])
    assert loaded["optimizer_states"][0]["param_groups"] == [{"lr": 1e-4}]
    assert loaded["pair"] == (1, "two") and loaded["epoch"] == 3
    assert torch.load(path, weights_only=True)["state_dict"].keys() == state.keys()  # the ordinary reader too

    with pytest.raises(ValueError, match="more than the 100 asked for"):
        StreamingCheckpointWriter(tmp_path / "small.ckpt", fill, 100).write(layout)


def test_full_size_layout_is_zero123_xl() -> None:
    """The full layout's key names and sizes: what the converter reads, with the published parameter counts."""
    from server.stages.multiview import convert

    layout = synthetic_weights.zero123_checkpoint(convert.ZERO123_XL)
    state = layout["state_dict"]
    meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") if isinstance(v, TensorSpec) else v
            for k, v in state.items()}
    parts = convert.convert_state_dict(meta, convert.ZERO123_XL)
    assert parts.unet_source == "ema"
    unet = sum(meta[k].numel() for k in state if k.startswith("model.diffusion_model."))
    assert unet == 859_520_964 + 4 * 320 * 9  # SD-1.x's UNet with 8 input channels
    known = sum(v.nbytes for v in _leaves(layout) if isinstance(v, TensorSpec))
    assert 0.95 * ZERO123_XL_BYTES < known < ZERO123_XL_BYTES  # padding is a few per cent
    adam = layout["optimizer_states"][0]["state"]
    assert len(adam) == sum(1 for k in state if k.startswith("model.diffusion_model.")) + 2


def _leaves(obj: object):
    if isinstance(obj, dict):
        for value in obj.values():
            yield from _leaves(value)
    elif isinstance(obj, list | tuple):
        for value in obj:
            yield from _leaves(value)
    else:
        yield obj


def test_tiny_run_prints_one_json_line_and_cleans_up(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert first_use.main(["--tiny", "--dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["mode"] == "tiny"
    assert set(result["phases"]) == {"write", "convert", "load", "generate"}
    for phase in result["phases"].values():
        assert phase["peak_rss_gib"] >= phase["peak_heap_gib"] > 0 and phase["wall_s"] >= 0
    assert result["convert_progress"][0] == "read" and result["convert_progress"][-1] == "done"
    assert result["file_bytes"]["zero123-xl"] > 0 and result["converted_bytes"] > 0
    assert list(tmp_path.iterdir()) == []  # everything it wrote is gone


def test_keep_keeps_the_files(tmp_path: Path) -> None:
    result = first_use.run(tmp_path, tiny=True, keep=True, log=lambda line: None)
    kept = Path(result["kept"])
    assert (kept / "zero123-xl.ckpt").is_file() and (kept / "converted" / "zero123-xl-diffusers").is_dir()
    assert (kept / "sam_vit_h_4b8939.pth").is_file()


def test_refuses_without_enough_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(first_use, "FULL_DISK_BYTES", 10**18)
    with pytest.raises(OSError, match=r"needs 1000000001\.0 GB"):
        first_use.run(tmp_path, log=lambda line: None)
    assert list(tmp_path.iterdir()) == []
