"""Evaluation metrics on meshes with known answers, the alignment, renders and the elevation report."""

from __future__ import annotations

import argparse

import cv2
import numpy as np
import pytest
import trimesh

from server.stages.elevation import ElevationEstimator, FlowMatcher, SiftMatcher
from training.elevation_eval import degrade, run_trials, summarise
from training.evaluate import (
    AlignConfig,
    add_evaluate_parser,
    elevation_trials_synthetic,
    markdown_report,
    mesh_metrics,
    rotation_z,
    splat,
)

R = 0.4
POINTS = 40_000


@pytest.fixture(scope="module")
def sphere():
    mesh = trimesh.creation.icosphere(subdivisions=5, radius=R)
    return np.asarray(mesh.vertices), np.asarray(mesh.faces)


def shifted_sphere_expectation(delta: float, tau: float) -> tuple[float, float]:
    """Distance from a point of a sphere shifted by δ to the original sphere: |√(r² + δ² + 2rδt) − r| with t = n_x
    uniform on [−1, 1] (Archimedes). Returns (mean distance = Chamfer, % of points within τ = F-score)."""
    t = np.linspace(-1, 1, 2_000_001)
    d = np.abs(np.sqrt(R**2 + delta**2 + 2 * R * delta * t) - R)
    return float(d.mean()), 100.0 * float((d < tau).mean())


def test_identical_mesh(sphere):
    m = mesh_metrics(*sphere, *sphere, points=POINTS, aligned=False)
    assert m.chamfer == 0.0 and m.fscore == 100.0
    assert m.tau == pytest.approx(0.05 * 2 * R, rel=0.01)
    aligned = mesh_metrics(*sphere, *sphere, points=POINTS)
    assert aligned.fscore == 100.0 and aligned.chamfer < 2e-3


def test_shifted_mesh_known_value_and_alignment(sphere):
    vertices, faces = sphere
    delta = 0.06
    shifted = vertices + np.array([delta, 0.0, 0.0])
    m = mesh_metrics(shifted, faces, vertices, faces, points=POINTS, aligned=False)
    chamfer, fscore = shifted_sphere_expectation(delta, m.tau)
    assert 0 < fscore < 100  # the case is informative: some points closer than τ, some farther
    assert m.chamfer == pytest.approx(chamfer, rel=0.05)
    assert m.fscore == pytest.approx(fscore, abs=2.0)
    recovered = mesh_metrics(shifted, faces, vertices, faces, points=POINTS)
    assert recovered.fscore == 100.0 and recovered.chamfer < 3e-3


def test_alignment_recovers_scale_and_z_rotation():
    box = trimesh.creation.box(extents=(0.6, 0.3, 0.2))
    box = trimesh.Trimesh(*trimesh.remesh.subdivide_to_size(box.vertices, box.faces, 0.05))
    vertices = np.asarray(box.vertices)
    moved = 1.1 * vertices @ rotation_z(37.0).T + [0.05, -0.03, 0.02]
    assert mesh_metrics(moved, box.faces, vertices, box.faces, aligned=False, points=10_000).fscore < 50
    m = mesh_metrics(moved, box.faces, vertices, box.faces, points=10_000, align_config=AlignConfig())
    assert m.fscore > 99.0


def test_splat_and_markdown(sphere):
    colors = np.full((len(sphere[0]), 3), (200, 30, 30), np.uint8)
    image = splat(*sphere, colors, size=64)
    assert image.shape == (64, 64, 3)
    red = (image[..., 0] > 100) & (image[..., 1] < 60)
    assert 0.2 < red.mean() < 0.8 and (image[0, 0] == 255).all()
    report = {"checkpoint": "run/checkpoints/step_0000100", "step": 100, "mean": {"fscore": 50.0, "chamfer": 0.01},
              "objects": [{"uid": "a", "fscore": 50.0, "chamfer": 0.01}]}
    rows = [{"abs_error": e, "uncertain": u} for e, u in ((0.0, False), (2.0, False), (40.0, True))]
    text = markdown_report([report], 0.05, {"matcher": "flow+sift", "settings": {"renders": summarise(rows)}})
    assert "| step_0000100 | 100 | 1 | 50.0 | 0.0100 |" in text
    assert "| renders | 3 | 2.0 | 32.4 | 40.0 | 1 | 2 | 2.0 | 0 | 1 | 1 |" in text


def test_elevation_trials_on_textured_renders_clean_and_degraded():
    trials = elevation_trials_synthetic(2, seed=1)
    estimator = ElevationEstimator([FlowMatcher(), SiftMatcher()])
    for degraded, tolerance in ((False, 1.0), (True, 5.0)):
        rows = run_trials(trials, estimator, degraded=degraded)
        assert [row["polar"] for row in rows] == [t.polar for t in trials]
        assert all(row["abs_error"] <= tolerance or row["uncertain"] for row in rows), rows
    assert not any(row["uncertain"] for row in run_trials(trials, estimator))


def test_degrade_changes_the_object_not_the_background():
    trial = elevation_trials_synthetic(1, seed=3)[0]
    before, after = trial.images[0], degrade(trial.images, np.random.default_rng(0))[0]
    background = (before > 245).all(axis=-1)
    inner = cv2.erode(background.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)  # away from the edge
    assert (after[inner] >= 250).all()
    diff = np.abs(after.astype(int) - before.astype(int))[~background]
    assert 2 < diff.mean() < 40  # visibly changed, still the same object
    assert after.shape == before.shape and after.dtype == np.uint8


def test_evaluate_parser_help():
    parser = argparse.ArgumentParser()
    sub = add_evaluate_parser(parser.add_subparsers())
    assert all(action.help for action in sub._actions)
