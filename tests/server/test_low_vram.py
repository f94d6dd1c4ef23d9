"""Low-VRAM mode (#11): only the model in use sits on the GPU. The moves are checked with a recording module (no GPU
here); the flag reaches the pipeline from `one2345 generate` and `one2345 serve`."""

from __future__ import annotations

import torch

from server import pipeline
from server.pipeline import One2345Pipeline, resident
from server.service.cli import build_parser
from server.service.serve import ServeSettings


class Recording(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.moves: list[str] = []

    def to(self, *args, **kwargs):  # records instead of moving
        self.moves.append(str(args[0] if args else kwargs.get("device")))
        return self


def test_a_model_visits_the_gpu_only_for_its_stage_in_low_vram_mode(monkeypatch):
    freed = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed.append(True))
    model = Recording()
    with resident(model, "cuda:0", low_vram=True) as inside:
        assert inside is model and model.moves == ["cuda:0"]
    assert model.moves == ["cuda:0", "cpu"] and freed == [True]
    try:  # also when the stage fails (an out-of-memory error, a cancel)
        with resident(model, "cuda", low_vram=True):
            raise RuntimeError("CUDA out of memory")
    except RuntimeError:
        pass
    assert model.moves[-1] == "cpu" and len(freed) == 2


def test_without_low_vram_or_on_the_cpu_nothing_moves(monkeypatch):
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: (_ for _ in ()).throw(AssertionError("freed")))
    model = Recording()
    for device, low_vram in (("cuda", False), ("cpu", True), ("cpu", False)):
        with resident(model, device, low_vram):
            pass
    assert model.moves == []


def test_the_flag_reaches_the_pipeline_from_the_cli_and_the_server():
    args = build_parser().parse_args(["generate", "in.png", "-o", "out.glb", "--low-vram"])
    assert args.low_vram is True
    assert build_parser().parse_args(["generate", "in.png", "-o", "out.glb"]).low_vram is False
    serve = build_parser().parse_args(["serve", "--low-vram"])
    assert ServeSettings.from_args(serve).low_vram is True
    pipe = One2345Pipeline.from_preset("tiny", device="cpu", low_vram=True)
    assert pipe.low_vram and next(pipe.models.zero123.parameters()).device.type == "cpu"
    assert pipeline.One2345Pipeline.from_preset("tiny", device="cpu").low_vram is False


def test_cuda_graphs_are_used_on_cuda_only_and_never_in_low_vram_mode(monkeypatch):
    from types import SimpleNamespace

    from server.stages.multiview import graphs

    monkeypatch.setattr(graphs, "UNetGraphs", lambda model: SimpleNamespace(model=model))  # no GPU here to capture on
    pipe = One2345Pipeline.from_preset("tiny", device="cpu")
    on_gpu = SimpleNamespace(device=torch.device("cuda", 0))
    first = pipe._unet(on_gpu)
    assert first.model is on_gpu and pipe._unet(on_gpu) is first and pipe.unet_graphs is first  # kept across runs
    assert pipe._unet(pipe.models.zero123) is None  # on the CPU: eager
    pipe.low_vram = True  # the model leaves the GPU between stages: a graph would point at freed weights
    assert pipe._unet(on_gpu) is None
    pipe.low_vram, pipe.cuda_graphs = False, False
    assert pipe._unet(on_gpu) is None
