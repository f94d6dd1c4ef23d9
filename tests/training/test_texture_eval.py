"""Tests of the texture-bake evaluation (training/texture_eval.py).

The ground truth is analytic and independent of the code under test: a sphere whose colour is a fine checkerboard in
longitude and latitude, ray-cast exactly (box-filtered over 4×4 sub-pixel rays, linear-light averaging, straight
alpha — what the unlit Cycles renders of training/render/texture_views.py hold) at the 40 cameras of the layout and
at held-out cameras. The GT surface is a marching-cubes mesh of the sphere's SDF, as the pipeline's meshes are.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from server.common.cameras import PoseFile, calc_pose
from server.common.errors import BadInputError
from server.common.mesh_io import Mesh, linear_to_srgb, srgb_to_linear
from server.stages.asset import BakeViews
from server.stages.meshing import extract_surface
from training.cli import main
from training.mesh_render import psnr
from training.texture_eval import (
    DENSE,
    TEXTURE,
    VERTEX,
    EvalObject,
    EvalRow,
    HeldOutViews,
    TextureEvalConfig,
    evaluate_object,
    markdown_report,
    summarise,
)

REPO = Path(__file__).resolve().parents[2]
SIZE = 96
CENTRE, RADIUS = np.array([0.02, -0.01, 0.03]), 0.3
CELLS = 24
"""Checker cells around the equator: 15° cells, ~7 px in a 96² view, finer than a 500-face mesh's vertex spacing."""
COLOURS = np.array([[200, 60, 40], [40, 160, 220]], dtype=np.float64)


def checker(points: np.ndarray) -> np.ndarray:
    """[N, 3] sRGB 0–255 of sphere points [N, 3]: a checkerboard in longitude (CELLS) and latitude (CELLS / 2)."""
    n = (points - CENTRE) / RADIUS
    longitude = np.arctan2(n[:, 1], n[:, 0])
    latitude = np.arccos(np.clip(n[:, 2], -1.0, 1.0))
    cell = np.floor(longitude / (2 * np.pi / CELLS)) + np.floor(latitude / (np.pi / (CELLS // 2)))
    return COLOURS[(cell % 2).astype(int)]


def ray_cast(c2w: np.ndarray, k: np.ndarray, size: int, sub: int = 4) -> np.ndarray:
    """[size, size, 4] uint8 straight-alpha render of the sphere: sub×sub rays per pixel (a 1-pixel box filter),
    colours averaged in linear light over the rays that hit, alpha = the share that hit. OpenGL c2w."""
    offsets = (np.arange(sub) + 0.5) / sub
    x = (np.arange(size)[:, None] + offsets).reshape(-1)
    col, row = np.meshgrid(x, x)
    camera = np.stack([(col - k[0, 2]) / k[0, 0], -(row - k[1, 2]) / k[1, 1], -np.ones_like(col)], axis=-1)
    d = camera.reshape(-1, 3) @ c2w[:3, :3].T
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    oc = c2w[:3, 3] - CENTRE
    b = d @ oc
    disc = b * b - (oc @ oc - RADIUS**2)
    hit = disc >= 0
    t = -b[hit] - np.sqrt(disc[hit])
    linear = np.zeros((d.shape[0], 3))
    linear[hit] = srgb_to_linear(checker(c2w[:3, 3] + t[:, None] * d[hit]) / 255.0)
    linear = linear.reshape(size, sub, size, sub, 3).sum(axis=(1, 3))
    coverage = hit.reshape(size, sub, size, sub).mean(axis=(1, 3))
    rgb = linear_to_srgb(linear / np.maximum(coverage * sub * sub, 1e-12)[..., None]) * 255.0
    return np.concatenate([np.rint(rgb), np.rint(coverage * 255.0)[..., None]], axis=-1).astype(np.uint8)


def on_white(rgba: np.ndarray) -> np.ndarray:
    alpha = rgba[..., 3:4] / 255.0
    return np.rint(rgba[..., :3] * alpha + 255.0 * (1 - alpha)).astype(np.uint8)


@pytest.fixture(scope="module")
def sphere_object() -> EvalObject:
    axis = np.linspace(-0.5, 0.5, 48)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1)
    vertices, faces = extract_surface((np.linalg.norm(grid - CENTRE, axis=-1) - RADIUS).astype(np.float32))
    poses = PoseFile.for_polar(75)
    k = np.diag([SIZE / 256, SIZE / 256, 1.0]) @ poses.intrinsics
    views = BakeViews.from_pose_file(poses, {i: on_white(ray_cast(c2w, k, SIZE)) for i, c2w in poses.c2ws.items()})
    held = {f"h{n}.png": calc_pose(polar, azimuth) for n, (polar, azimuth) in enumerate([(70, 10), (95, 140),
                                                                                          (110, 250)])}
    held_poses = PoseFile(poses.intrinsics, poses.near_far, held)
    heldout = HeldOutViews.from_pose_file(held_poses, {i: ray_cast(c2w, k, SIZE) for i, c2w in held.items()})
    return EvalObject("sphere", Mesh((vertices * 0.5).astype(np.float32), faces), views, heldout)


@pytest.fixture(scope="module")
def rows(sphere_object: EvalObject) -> list:
    return evaluate_object(sphere_object, TextureEvalConfig(face_counts=(500, 2000), texture_size=128,
                                                            supersample=2))


def test_the_evaluation_of_a_tiny_object_gives_finite_numbers(rows: list) -> None:
    assert [(r.method, r.budget) for r in rows] == [(DENSE, None), (TEXTURE, 500), (VERTEX, 500), (TEXTURE, 2000),
                                                    (VERTEX, 2000)]
    for r in rows:
        assert math.isfinite(r.psnr) and r.psnr > 8, r
        # The evaluation's rasteriser and the ray caster agree on the silhouette: cameras and pixel centres match.
        assert r.iou > 0.97, r
        assert r.seconds > 0
    assert [r.faces for r in rows[1:]] == [500, 500, 2000, 2000]
    assert rows[1].coverage > 0.9 and set(rows[1].timings) >= {"unwrap", "rasterize", "views", "fill"}
    summary = summarise(rows)
    assert [s["budget"] for s in summary] == [500, 2000]
    report = markdown_report(rows, TextureEvalConfig(face_counts=(500, 2000), texture_size=128), "test host")
    assert "texture 128²" in report and "| 2000 | 1 |" in report


def test_the_texture_beats_vertex_colours_on_fine_detail_at_a_low_face_count(rows: list) -> None:
    """15° checker cells on a 500-face sphere: a vertex every ~16°, so per-vertex colours blur the board into mush,
    while a 128² texture holds it. A broken bake (wrong UVs, projection or visibility) loses this margin."""
    by = {(r.method, r.budget): r.psnr for r in rows}
    assert by[(TEXTURE, 500)] >= by[(VERTEX, 500)] + 6.0, by
    assert by[(TEXTURE, 2000)] >= by[(VERTEX, 2000)] + 3.0, by
    assert by[(TEXTURE, 500)] >= 18.0, by  # ~21 dB; a texture with flipped UVs scores ~10
    # More faces help vertex colours; the texture does not depend on them.
    assert by[(VERTEX, 2000)] > by[(VERTEX, 500)]
    assert abs(by[(TEXTURE, 2000)] - by[(TEXTURE, 500)]) < 2.0


def test_psnr_known_values_masks_and_refusals() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (8, 8, 3)).astype(np.float64)
    assert psnr(a, a) == math.inf
    assert psnr(a, a + 16.0) == pytest.approx(20 * math.log10(255 / 16))
    b = a.copy()
    mask = np.zeros((8, 8), dtype=bool)
    mask[:4] = True
    b[4:] += 100.0  # outside the mask: ignored
    b[:4] += 4.0
    assert psnr(a, b, mask) == pytest.approx(20 * math.log10(255 / 4))
    with pytest.raises(BadInputError, match="shapes"):
        psnr(a, a[:4])
    with pytest.raises(BadInputError, match="no pixel"):
        psnr(a, b, np.zeros((8, 8), dtype=bool))


def test_config_refuses_bad_values() -> None:
    for kwargs, match in (({"face_counts": ()}, "face counts"), ({"face_counts": (2,)}, "face counts"),
                          ({"texture_size": 4}, "texture size"), ({"supersample": 0}, "supersample"),
                          ({"jitter": -1.0}, "jitter")):
        with pytest.raises(BadInputError, match=match):
            TextureEvalConfig(**kwargs)


def test_the_command_renders_with_blender_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """One procedural object through the whole command, in both shadings (the default): the Blender script (unlit and
    lit views, held-out cameras, the dense GT surface), the evaluation and the report files, at toy sizes. The lit
    scene, as Blender held it when rendering (meta.json "scene", read back from bpy), has a sun and glossy parts."""
    bpy42 = Path(os.environ.get("ONE2345_BPY42_PYTHON") or REPO / ".venv-bpy42" / "bin" / "python")
    if not bpy42.exists():
        pytest.fail(f"{bpy42} is missing: run .ci/blender-envs (CI always has it)")
    out = tmp_path / "report"
    args = ["evaluate-texture", "--out", str(out), "--count", "1", "--first-seed", "3", "--size", "48",
            "--samples", "4", "--held-out", "2", "--dense-voxel", "0.012", "--faces", "2000", "--texture-size", "128",
            "--supersample", "2", "--threads", "2", "--export-glb", "2000"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    # One report, both shadings side by side: per object and in the summary, lit first.
    for shading in ("lit", "unlit"):
        assert f"| texeval-000003 | 2000 | texture 128² | {shading} |" in printed
        assert f"| 2000 | 1 | {shading} |" in printed
    assert printed.index("| 2000 | 1 | lit |") < printed.index("| 2000 | 1 | unlit |")
    assert (out / "report.md").read_text() == printed
    scenes = {}
    for shading in ("lit", "unlit"):
        folder = out / "renders" / shading / "000-000" / "texeval-000003"
        assert sorted(p.name for p in (folder / "heldout").iterdir()) == ["h0.png", "h1.png", "pose.json"]
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["texture_eval"]["shading"] == shading
        scenes[shading] = meta["scene"]
    lights = {light["type"]: light for light in scenes["lit"]["lights"]}
    assert lights["SUN"]["energy"] > 0 and lights["SUN"]["angle_degrees"] > 0
    assert lights["SUN"]["direction"][2] < 0  # from the upper hemisphere, shining down
    assert lights["AREA"]["energy"] == 0  # the renderer's area light is replaced by the sun
    assert scenes["lit"]["world_strength"] > 0  # the renderer's soft environment
    roughness = [m["roughness"] for m in scenes["lit"]["materials"]]
    assert all(m["shader"] == "BSDF_PRINCIPLED" for m in scenes["lit"]["materials"])
    assert min(roughness) <= 0.2 and max(roughness) >= 0.3, roughness  # glossy parts beside rough ones
    assert max(m["specular"] for m in scenes["lit"]["materials"]) > 0.5
    # Unlit: no light at all, every material an emission shader.
    assert all(light["energy"] == 0 for light in scenes["unlit"]["lights"])
    assert scenes["unlit"]["world_strength"] == 0
    assert all(m["shader"] == "EMISSION" for m in scenes["unlit"]["materials"])
    assert {p.name for p in (out / "glb").iterdir()} == {
        "texeval-000003-2000-texture.glb", "texeval-000003-2000-vertex-colours.glb",
        "texeval-000003-2000-lit-texture.glb", "texeval-000003-2000-lit-vertex-colours.glb"}
    record = json.loads((out / "report.json").read_text())
    assert {r["shading"] for r in record["rows"]} == {"lit", "unlit"} and record["config"]["shadings"] == ["lit",
                                                                                                          "unlit"]
    assert all(math.isfinite(r["psnr"]) and r["iou"] > 0.9 for r in record["rows"]), record["rows"]
    # The lit GT differs from the unlit one (shading), on the same silhouette.
    lit = np.asarray(Image.open(out / "renders" / "lit" / "000-000" / "texeval-000003" / "heldout" / "h0.png"))
    unlit = np.asarray(Image.open(out / "renders" / "unlit" / "000-000" / "texeval-000003" / "heldout" / "h0.png"))
    assert np.abs(lit[..., :3].astype(int) - unlit[..., :3]).mean() > 5
    # Evaluating the renders again, one shading, finds them in their shading's folder.
    assert main([*args[:3], "--no-render", "--shading", "lit", *args[3:]]) == 0
    assert "| unlit |" not in capsys.readouterr().out


def test_vertex_colours_come_from_the_asset_stage_public_function() -> None:
    # One sampler for the bake, the bake endpoint's vertex-coloured output and this evaluation (issue #26).
    import server.stages.asset
    import training.texture_eval

    assert training.texture_eval.vertex_colors_from_views is server.stages.asset.vertex_colors_from_views


def _pair(name: str, budget: int, shading: str, texture: float, vertex: float) -> list[EvalRow]:
    return [EvalRow(name, budget, budget, TEXTURE, texture, 1.0, 1.0, shading=shading),
            EvalRow(name, budget, budget, VERTEX, vertex, 1.0, 1.0, shading=shading)]


def test_the_summary_sets_lit_and_unlit_side_by_side_against_their_goals() -> None:
    # Lit at 20 k: 4 dB on average and 1 dB on every object (#26); unlit: #13's 3 dB mean.
    rows = (_pair("a", 20_000, "unlit", 30.0, 20.0) + _pair("b", 20_000, "unlit", 30.0, 29.5)
            + _pair("a", 20_000, "lit", 30.0, 20.0) + _pair("b", 20_000, "lit", 30.0, 29.5)
            + _pair("a", 100_000, "lit", 30.0, 29.0) + _pair("b", 100_000, "lit", 30.0, 29.0))
    summary = summarise(rows)
    assert [(s["budget"], s["shading"]) for s in summary] == [(20_000, "lit"), (20_000, "unlit"), (100_000, "lit")]
    lit, unlit, lit_100k = summary
    assert lit["gain_mean"] == pytest.approx(5.25) and lit["gain_min"] == pytest.approx(0.5)
    assert (lit["goal"], lit["goal_min"], lit["met"]) == (4.0, 1.0, False)  # the mean is met, one object is not
    assert (unlit["goal"], unlit["goal_min"], unlit["met"]) == (3.0, None, True)
    assert lit_100k["met"] is True
    rows += _pair("c", 20_000, "lit", 30.0, 28.0)  # now every lit object gains ≥ 1 dB... but "b" still does not
    assert summarise(rows)[0]["met"] is False
    fixed = [r if (r.object, r.budget, r.shading, r.method) != ("b", 20_000, "lit", VERTEX)
             else EvalRow("b", 20_000, 20_000, VERTEX, 28.5, 1.0, 1.0, shading="lit") for r in rows]
    assert summarise(fixed)[0]["met"] is True
    report = markdown_report(rows, TextureEvalConfig(face_counts=(20_000, 100_000)), "test host")
    assert "| 20000 | 3 | lit | 30.00 |" in report and "≥ 4 dB, min ≥ 1 dB | **no** |" in report
    assert "| 20000 | 2 | unlit | 30.00 | 24.75 | +5.25 | +0.50 | ≥ 3 dB | yes |" in report
    assert report.index("| a | 20000 | texture 1024² | lit |") < report.index("| a | 20000 | texture 1024² | unlit |")


def _fake_render(folder: Path, record: dict | None) -> Path:
    (folder / "heldout").mkdir(parents=True)
    (folder / "heldout" / "pose.json").write_text("{}")
    meta = {"uid": folder.name} if record is None else {"uid": folder.name, "texture_eval": record}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_renders_are_found_per_shading_and_old_lit_renders_are_refused(tmp_path: Path) -> None:
    from training.texture_eval import find_objects_by_shading, load_rendered_object

    lit = _fake_render(tmp_path / "lit" / "000-000" / "texeval-000000", {"shading": "lit", "lit": {"sun": 1}})
    unlit = _fake_render(tmp_path / "unlit" / "000-000" / "texeval-000000", {"shading": "unlit"})
    # Rendered by the command before #26: one shading, straight under the render root.
    flat = _fake_render(tmp_path / "000-000" / "texeval-000001", {"shading": "unlit"})
    old_lit = _fake_render(tmp_path / "000-000" / "texeval-000002", {"shading": "lit"})
    found = find_objects_by_shading(tmp_path, ("lit", "unlit"))
    assert found == {"lit": [lit, old_lit], "unlit": [unlit, flat]}
    assert find_objects_by_shading(tmp_path / "unlit", ("lit",)) == {}
    (old_lit / "mesh_dense.ply").write_text("")
    with pytest.raises(BadInputError, match="older texture evaluation"):
        load_rendered_object(old_lit)  # an area light and no glossy parts: not the lit variant


def test_the_command_refuses_a_missing_shading_without_rendering(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    _fake_render(tmp_path / "renders" / "unlit" / "000-000" / "texeval-000000", {"shading": "unlit"})
    assert main(["evaluate-texture", "--out", str(tmp_path), "--no-render"]) == 2  # both by default: lit is missing
    assert "holds no lit rendered objects" in capsys.readouterr().err
