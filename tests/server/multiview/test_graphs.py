"""UNetGraphs: static buffers, one graph per shape, clones, fallback; on the CPU through an emulated capture.

The emulation records nothing: ``replay`` recomputes the function into the one output buffer, which is exactly the
contract a CUDA graph keeps (same buffers in, same buffer out, overwritten at every replay). A wrapper that forgot to
copy an input, reused a stale timestep or handed out the output buffer itself fails these tests the same way it
would fail on a GPU. The real capture runs in the GPU test at the end.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from server.stages.multiview.checkpoint import tiny_zero123
from server.stages.multiview.graphs import UNetGraphs
from server.stages.multiview.zero123 import Zero123Model, generate_views_batch

FOUR_VIEWS = [(0.0, 0.0), (0.0, 90.0), (0.0, 180.0), (0.0, 270.0)]

pytestmark = pytest.mark.usefixtures("one_thread")


def emulated_capture(fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
    output = fn()
    return (lambda: output.copy_(fn())), output


def inputs(model: Zero123Model, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dim = model.unet.config.cross_attention_dim
    return (torch.randn((batch, 4, 32, 32), generator=g), torch.randn((batch, 1, dim), generator=g),
            torch.randn((batch, 4, 32, 32), generator=g))


def test_each_call_equals_the_eager_model_and_keeps_its_result(model: Zero123Model) -> None:
    graphs = UNetGraphs(model, capture=emulated_capture)
    results, wanted = [], []
    with torch.no_grad():
        for seed, (batch, t) in enumerate([(2, 976), (2, 963), (6, 500), (2, 13), (6, 1)]):
            latents, context, concat = inputs(model, batch, seed)
            results.append(graphs(latents, t, context, concat))
            wanted.append(model(latents, t, context, concat))
    assert graphs.shapes == [((2, 4, 32, 32), (2, 1, 32)), ((6, 4, 32, 32), (6, 1, 32))]  # one graph per shape
    for got, want in zip(results, wanted, strict=True):  # all compared at the end: no result was overwritten
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_sampling_through_the_graphs_gives_the_same_views(model: Zero123Model, image: np.ndarray) -> None:
    graphs = UNetGraphs(model, capture=emulated_capture)
    kwargs = {"num_steps": 4, "seed": 11}
    eager = generate_views_batch(model, [image, image[::-1].copy()], [FOUR_VIEWS, FOUR_VIEWS[:2]], **kwargs)
    graphed = generate_views_batch(model, [image, image[::-1].copy()], [FOUR_VIEWS, FOUR_VIEWS[:2]], unet=graphs,
                                   **kwargs)
    for views_a, views_b in zip(eager, graphed, strict=True):
        for a, b in zip(views_a, views_b, strict=True):
            np.testing.assert_array_equal(a, b)
    assert graphs.shapes == [((12, 4, 32, 32), (12, 1, 32))]  # 6 views, doubled for guidance


def test_a_failed_capture_falls_back_to_eager_for_good(model: Zero123Model) -> None:
    captures = []

    def failing_capture(fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        captures.append(fn)
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs = UNetGraphs(model, capture=failing_capture)
    latents, context, concat = inputs(model, 2, 0)
    with torch.no_grad():
        got = graphs(latents, 976, context, concat)
        torch.testing.assert_close(got, model(latents, 976, context, concat), rtol=0, atol=0)
        graphs(*inputs(model, 4, 1)[:1], 500, *inputs(model, 4, 1)[1:])
    assert len(captures) == 1 and graphs.shapes == []
    assert "capture failed at batch 2, running eagerly" in graphs.failure
    assert "operation not permitted" in graphs.failure


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_cuda_graphs_replay_the_eager_result(image: np.ndarray) -> None:
    for dtype, tolerance in ((torch.float32, 0), (torch.float16, 1)):
        cuda = tiny_zero123(seed=0).to("cuda", dtype)
        graphs = UNetGraphs(cuda)
        kwargs = {"num_steps": 6, "seed": 3}
        eager = np.stack(generate_views_batch(cuda, [image], [FOUR_VIEWS], **kwargs)[0]).astype(int)
        graphed = np.stack(generate_views_batch(cuda, [image], [FOUR_VIEWS], unet=graphs, **kwargs)[0]).astype(int)
        again = np.stack(generate_views_batch(cuda, [image], [FOUR_VIEWS], unet=graphs, **kwargs)[0]).astype(int)
        assert graphs.failure is None and len(graphs.shapes) == 1, graphs.failure
        assert np.abs(graphed - eager).max() <= tolerance, dtype  # the same kernels, replayed
        np.testing.assert_array_equal(graphed, again)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_the_pipeline_on_cuda_replays_one_graph_per_batch(image: np.ndarray, tmp_path) -> None:
    from server.pipeline import GenerateOptions, One2345Pipeline

    options = GenerateOptions(elevation=15, seed=0, steps_stage1=2, steps_stage2=3, resolution=32, format="ply")
    views = {}
    for graphs in (True, False):
        pipe = One2345Pipeline.from_preset("tiny", device="cuda", cuda_graphs=graphs)
        run = pipe(image, tmp_path / str(graphs), options)
        views[graphs] = np.stack([np.asarray(Image.open(p)) for p in sorted(run.views_dir.glob("*.png"))]).astype(int)
        if graphs:
            assert pipe.unet_graphs.failure is None, pipe.unet_graphs.failure
            assert sorted(shape[0][0] for shape in pipe.unet_graphs.shapes) == [8, 56]  # 4 views, 28 views (×2)
        else:
            assert pipe.unet_graphs is None
    assert np.abs(views[True] - views[False]).max() <= 1  # fp16, the same kernels
