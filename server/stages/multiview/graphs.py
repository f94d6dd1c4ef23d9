"""Zero123's UNet replayed from CUDA graphs, one per batch shape (#11: kernel launches bound the small batches).

One UNet call launches about 800 kernels. At the 4-view stages (batch 8 with guidance) the GPU finishes them faster
than Python issues them: 26.6 ms per call eager against 10.9 ms replayed from a graph on an H200 (#11's table).
:class:`UNetGraphs` captures ``unet(x, t, context)`` once per input shape into static buffers and afterwards copies
each call's inputs into them and replays. The graph runs the very kernels eager mode runs, so the output is the same.

Rules that keep a replay correct:

- Inputs are *copied* into the static buffers; the returned tensor is a clone (the graph overwrites its output at
  the next replay).
- A graph holds the addresses of the weights it was captured with, so it must not outlive them on the GPU:
  low-VRAM mode, which moves the model off the GPU between stages, does not use graphs (see the pipeline).
- All graphs of one :class:`UNetGraphs` share one memory pool, so the 4-view and the 28-view graphs cost the memory
  of the larger alone. That is safe because the graphs run one at a time (the server's single worker) and each
  output is cloned right after its replay, before another graph can reuse that memory.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

Capture = Callable[[Callable[[], torch.Tensor]], tuple[Callable[[], None], torch.Tensor]]
"""``capture(fn) -> (replay, output)``: record ``fn`` (which reads only static buffers); ``replay()`` runs it again
and leaves the result in ``output``."""


class UNetGraphs:
    """A drop-in for ``Zero123Model.forward`` (same arguments, same result) that replays CUDA graphs.

    Args:
        model: a :class:`server.stages.multiview.zero123.Zero123Model` on a CUDA device.
        capture: how to record a call; default :func:`cuda_capture` (tests pass an emulation to run on the CPU).
    """

    def __init__(self, model: Any, capture: Capture | None = None) -> None:
        self.model = model
        if capture is None:
            pool = torch.cuda.graph_pool_handle()
            capture = functools.partial(cuda_capture, pool=pool)
        self._capture = capture
        self._graphs: dict[tuple, _Graph] = {}
        self.failure: str | None = None
        """Why capture failed (then every call runs eagerly), or None."""

    @property
    def shapes(self) -> list[tuple]:
        """The input shapes captured so far, as (latents shape, context shape)."""
        return [key[:2] for key in self._graphs]

    def __call__(self, latents: torch.Tensor, t: int, c_crossattn: torch.Tensor,
                 c_concat: torch.Tensor) -> torch.Tensor:
        """ε of the hybrid-conditioned UNet, as :meth:`Zero123Model.forward` (shapes there)."""
        model = self.model
        key = (tuple(latents.shape), tuple(c_crossattn.shape), tuple(c_concat.shape), model.dtype, model.device)
        graph = self._graphs.get(key)
        if graph is None and self.failure is None:
            try:
                graph = self._graphs[key] = _Graph(model, latents, t, c_crossattn, c_concat, self._capture)
            except RuntimeError as e:  # a GPU or driver that cannot capture: eager from now on, slower but right
                self.failure = f"CUDA graph capture failed at batch {latents.shape[0]}, running eagerly: {e}"
                log.warning(self.failure)
        if graph is None:
            return model(latents, t, c_crossattn, c_concat)
        return graph.run(latents, t, c_crossattn, c_concat)


class _Graph:
    """Static input buffers and one recorded UNet call for one input shape."""

    def __init__(self, model: Any, latents: torch.Tensor, t: int, c_crossattn: torch.Tensor,
                 c_concat: torch.Tensor, capture: Capture) -> None:
        batch, latent = latents.shape[0], latents.shape[1]
        self.latent = latent
        self.x = torch.empty((batch, latent + c_concat.shape[1], *latents.shape[2:]), dtype=model.dtype,
                             device=model.device)
        self.t = torch.empty((batch,), dtype=torch.long, device=model.device)
        self.context = torch.empty(c_crossattn.shape, dtype=model.dtype, device=model.device)
        self._fill(latents, t, c_crossattn, c_concat)
        unet = model.unet
        self.replay, self.output = capture(lambda: unet(self.x, self.t, encoder_hidden_states=self.context).sample)

    def _fill(self, latents: torch.Tensor, t: int, c_crossattn: torch.Tensor, c_concat: torch.Tensor) -> None:
        # The same casts and concatenation as Zero123Model.forward, written into the static buffers.
        self.x[:, : self.latent].copy_(latents)
        self.x[:, self.latent :].copy_(c_concat)
        self.t.fill_(int(t))
        self.context.copy_(c_crossattn)

    def run(self, latents: torch.Tensor, t: int, c_crossattn: torch.Tensor, c_concat: torch.Tensor) -> torch.Tensor:
        self._fill(latents, t, c_crossattn, c_concat)
        self.replay()
        return self.output.clone()


def cuda_capture(fn: Callable[[], torch.Tensor], warmup: int = 2,
                 pool: Any = None) -> tuple[Callable[[], None], torch.Tensor]:
    """Record ``fn`` into a CUDA graph after ``warmup`` eager calls on a side stream (which let cuDNN and the
    caching allocator settle, as capture requires), in memory pool ``pool`` (None: a private one). Returns
    ``(graph.replay, output buffer)``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = fn()
    return graph.replay, output
