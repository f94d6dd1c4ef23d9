"""Tests for server/marching.py: torch marching cubes equals PyMCubes array for array.

PyMCubes itself is the oracle: every test meshes the same volume with both and compares the arrays exactly
(vertices bit for bit, faces index for index), on volumes chosen to reach every rule of the module docstring.
"""

from __future__ import annotations

import mcubes
import numpy as np
import pytest
import torch

from server.common.errors import BadInputError
from server.stages.marching import case_tables, marching_cubes


def assert_same_as_mcubes(volume: np.ndarray, level: float = 0.0, device: str = "cpu") -> int:
    """Mesh ``volume`` both ways and require identical arrays; returns the face count."""
    want_v, want_f = mcubes.marching_cubes(volume, level)
    got_v, got_f = marching_cubes(torch.from_numpy(volume).to(device), level)
    assert got_v.dtype == torch.float64 and got_f.dtype == torch.int64
    assert got_v.shape == want_v.shape and got_f.shape == want_f.shape
    np.testing.assert_array_equal(got_v.cpu().numpy(), want_v)
    np.testing.assert_array_equal(got_f.cpu().numpy(), want_f.astype(np.int64))
    return int(want_f.shape[0])


def sphere(resolution: int, radius: float, centre: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """−SDF of a sphere on linspace(−1, 1, R)³, float32 (largest inside, as extract_surface meshes it)."""
    axis = np.linspace(-1, 1, resolution, dtype=np.float32)
    x, y, z = np.meshgrid(axis - centre[0], axis - centre[1], axis - centre[2], indexing="ij")
    return (radius - np.sqrt(x**2 + y**2 + z**2)).astype(np.float32)


def test_every_case_of_one_cell_matches() -> None:
    # One cell per case: all 256 triangulations, including the ambiguous ones, and corners exactly at the level.
    counts = []
    for case in range(256):
        bits = [(case >> m) & 1 for m in range(8)]
        cell = np.array(bits, np.float32)[[0, 4, 3, 7, 1, 5, 2, 6]].reshape(2, 2, 2)  # corner m at _CORNERS[m]
        counts.append(assert_same_as_mcubes(1.0 - 2.0 * cell))
        assert_same_as_mcubes(np.where(cell > 0, 0.0, 1.0).astype(np.float32))  # "below" is ≤ the level
    assert counts[0] == counts[255] == 0 and max(counts) == 5
    edge_mask, triangles = case_tables()
    assert edge_mask[0] == edge_mask[255] == 0 and (triangles[0] == -1).all()


@pytest.mark.parametrize("shape", [(5, 6, 7), (9, 4, 3), (2, 2, 9), (17, 13, 11)])
def test_random_volumes_match_vertex_for_vertex(shape: tuple[int, int, int]) -> None:
    # Noise crosses the level everywhere: every ownership rule (cells on each boundary face, edge and corner) is hit.
    rng = np.random.default_rng(sum(shape))
    noise = rng.standard_normal(shape).astype(np.float32)
    assert assert_same_as_mcubes(noise) > 0
    assert_same_as_mcubes(np.round(noise))  # many values exactly at the level
    assert_same_as_mcubes(noise.astype(np.float64), level=0.3)
    assert_same_as_mcubes(noise, level=0.1)  # 0.1 is not a float32: rounded to one first, as PyMCubes does
    half = noise.astype(np.float16)
    want = mcubes.marching_cubes(half.astype(np.float32), 0.25)
    got = marching_cubes(torch.from_numpy(half), 0.25)  # half precision: compared and interpolated in float64
    np.testing.assert_array_equal(got[0].numpy(), want[0])
    np.testing.assert_array_equal(got[1].numpy(), want[1].astype(np.int64))


def test_a_sphere_at_the_pipeline_resolution_matches() -> None:
    volume = sphere(128, 0.55, (0.1, -0.05, 0.02))
    assert assert_same_as_mcubes(volume) > 40_000


def test_infinities_and_a_volume_without_surface() -> None:
    volume = sphere(12, 0.5)
    volume[0, :, :] = -np.inf  # outside, infinitely far
    volume[5, 5, 5] = np.inf
    assert_same_as_mcubes(volume)
    vertices, faces = marching_cubes(torch.full((4, 4, 4), -1.0))
    assert vertices.shape == (0, 3) and faces.shape == (0, 3)


@pytest.mark.parametrize("shape", [(3, 3), (1, 4, 4), (2, 2, 2, 2)])
def test_a_volume_of_the_wrong_shape_is_refused(shape: tuple[int, ...]) -> None:
    with pytest.raises(BadInputError, match=r"\[X, Y, Z\] with every side ≥ 2"):
        marching_cubes(torch.zeros(shape))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_cuda_gives_the_same_arrays() -> None:
    volume = sphere(256, 0.5, (0.03, 0.0, -0.1))
    assert_same_as_mcubes(volume, device="cuda")
    rng = np.random.default_rng(3)
    assert_same_as_mcubes(rng.standard_normal((31, 17, 9)).astype(np.float32), device="cuda")
