"""Fixtures shared by the Zero123 tests: the tiny model of the real classes, a conditioning image, one thread."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from server.stages.multiview.checkpoint import tiny_zero123
from server.stages.multiview.zero123 import Zero123Model


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """The tiny model is latency-bound; on a shared 2-core machine one intra-op thread is several times faster and far
    steadier than two threads spinning against other processes (modules opt in with ``usefixtures``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> Zero123Model:
    return tiny_zero123(seed=0)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """A white canvas with a coloured square, like a preprocessed input."""
    img = np.full((256, 256, 3), 255, dtype=np.uint8)
    img[64:192, 80:176] = (200, 40, 90)
    return img
