"""Tests of the render pieces that need no Blender: layout rules, procedural shapes, sources, planning, the CLI."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from server.common.errors import BadInputError
from training.cli import build_parser
from training.render import driver, layout, procedural, sources
from training.render.layout import ObjectJob, PolarSpec


def _render_args(*extra: str) -> argparse.Namespace:
    return build_parser().parse_args(["render", *extra])


# ---------------------------------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------------------------------


def test_view_file_names_follow_the_stage1_order() -> None:
    low = layout.view_file_names(60)
    assert list(low.items())[:8] == [(f"{i}.png", f"view_{i}.png") for i in range(8)]
    assert low["0_1.png"] == "view_0_1_10.png" and low["7_3.png"] == "view_7_3_10.png"
    high = layout.view_file_names(90)
    assert list(high)[:8] == ["0.png", "1.png", "2.png", "3.png", "8.png", "9.png", "10.png", "11.png"]
    assert high["8.png"] == "view_4.png" and high["11_2.png"] == "view_7_2_10.png"
    assert len(set(high.values())) == 40


def test_intrinsics_scale_with_the_size() -> None:
    np.testing.assert_allclose(layout.intrinsics_for_size(256), [[280, 0, 128], [0, 280, 128], [0, 0, 1]])
    np.testing.assert_allclose(layout.intrinsics_for_size(64), [[70, 0, 32], [0, 70, 32], [0, 0, 1]])


def test_reconcile_alpha_depth_known_case() -> None:
    alpha = np.zeros((5, 6), np.uint8)
    depth = np.full((5, 6), 1e10)
    alpha[1:4, 1:4], depth[1:4, 1:4] = 255, [[1.0, 1.1, 1.2], [1.3, 1.4, 1.5], [1.6, 1.7, 1.8]]
    alpha[2, 4] = 40  # antialiased edge pixel whose single depth sample missed: takes the nearest neighbour's depth
    alpha[0, 5] = 3  # faint filter tail far from any depth: becomes transparent
    alpha[3, 3] = 0  # depth without coverage: loses its depth
    new_alpha, new_depth = layout.reconcile_alpha_depth(alpha, depth)
    np.testing.assert_array_equal(new_alpha > 0, new_depth > 0)
    assert new_depth[2, 4] == pytest.approx(1.2)  # min of 1.2, 1.5 (and 1.8 now dropped) among its neighbours
    assert new_alpha[2, 4] == 40 and new_alpha[0, 5] == 0 and new_depth[3, 3] == 0
    assert new_depth[2, 2] == pytest.approx(1.4)
    np.testing.assert_array_equal(layout.depth_to_mm(np.array([[0.0, 1.2344, 1.2346]])), [[0, 1234, 1235]])
    with pytest.raises(BadInputError, match=r"65\.535"):
        layout.depth_to_mm(np.array([70.0]))


def test_polar_spec() -> None:
    assert PolarSpec.parse("75").for_uid("anything") == 75
    spec = PolarSpec.parse("45:105")
    values = [spec.for_uid(f"obj-{i}") for i in range(400)]
    assert min(values) == 45 and max(values) == 105  # inclusive, spread over the range
    assert values == [spec.for_uid(f"obj-{i}") for i in range(400)]  # deterministic
    assert str(spec) == "45:105" and str(PolarSpec.parse("75")) == "75"
    for bad in ["", "abc", "5", "90:60", "10:175", "1:2:3"]:
        with pytest.raises(BadInputError, match="--polar"):
            PolarSpec.parse(bad)


def test_shards_partition_the_objects() -> None:
    assert layout.parse_shard("3/10") == (3, 10)
    for bad in ["10/10", "-1/2", "1", "a/b"]:
        with pytest.raises(BadInputError, match="--shard"):
            layout.parse_shard(bad)
    uids = [f"uid-{i}" for i in range(2000)]
    shards = [layout.shard_of(uid, 8) for uid in uids]
    counts = np.bincount(shards, minlength=8)
    assert counts.sum() == 2000 and counts.min() > 180  # each uid in exactly one shard, roughly balanced
    assert shards == [layout.shard_of(uid, 8) for uid in uids]
    # The hash is sha256's first 8 bytes, so every machine and Python version agrees (unlike hash()).
    assert layout.stable_hash("shard:abc") == int.from_bytes(hashlib.sha256(b"shard:abc").digest()[:8], "little")


def test_folder_ids_and_uids() -> None:
    assert layout.folder_id_for_index(0) == "000-000"
    assert layout.folder_id_for_index(999) == "000-000"
    assert layout.folder_id_for_index(1000) == "000-001"
    assert layout.folder_id_for_index(1_234_567) == "001-234"
    for bad in ["", "..", "a/b", "x y", "-lead"]:
        with pytest.raises(BadInputError):
            ObjectJob(bad, "000-000", seed=1)
    with pytest.raises(BadInputError, match="exactly one"):
        ObjectJob("a", "000-000")


def test_ply_round_trip(tmp_path: Path) -> None:
    import trimesh

    vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float64)
    faces = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    path = layout.write_ply(tmp_path / "m.ply", vertices, faces)
    mesh = trimesh.load(path, process=False)  # an independent reader
    np.testing.assert_allclose(mesh.vertices, vertices)
    np.testing.assert_array_equal(mesh.faces, faces)
    read_vertices, read_faces = layout.read_ply(path)
    np.testing.assert_allclose(read_vertices, vertices)
    np.testing.assert_array_equal(read_faces, faces)


def test_manifest_tolerates_a_torn_last_line(tmp_path: Path) -> None:
    path = layout.manifest_path(tmp_path, (0, 2))
    assert path.name == "manifest-00000-of-00002.jsonl"
    layout.append_record(path, {"uid": "a", "status": "failed"})
    layout.append_record(path, {"uid": "a", "status": "done"})
    with open(path, "a") as file:
        file.write('{"uid": "b", "sta')  # a kill in the middle of a write
    assert layout.read_manifests(tmp_path) == {"a": {"uid": "a", "status": "done"}}
    event = layout.parse_event("noise " + layout.format_event({"event": "done", "uid": "a"}))
    assert event == {"event": "done", "uid": "a"} and layout.parse_event("Fra:1 Mem:2M") is None


def test_settings_round_trip_through_the_command_line() -> None:
    settings = layout.RenderSettings(size=64, polar=PolarSpec(60, 60), samples=8, denoise=False, exr_depth=True)
    parser = argparse.ArgumentParser()
    layout.add_settings_arguments(parser)
    assert layout.settings_from_args(parser.parse_args(settings.to_argv())) == settings
    assert layout.settings_from_args(parser.parse_args([])) == layout.RenderSettings()
    with pytest.raises(BadInputError, match="--size"):
        layout.RenderSettings(size=8)


def test_views_and_surface_settings_round_trip() -> None:
    defaults = layout.RenderSettings()
    assert (defaults.views, defaults.surface) == ("all", "mixed")
    parser = argparse.ArgumentParser()
    layout.add_settings_arguments(parser)
    for views in layout.VIEW_SETS:
        for surface in procedural.SURFACES:
            settings = layout.RenderSettings(size=64, samples=8, views=views, surface=surface)
            assert layout.settings_from_args(parser.parse_args(settings.to_argv())) == settings
            assert settings.to_json()["views"] == views and settings.to_json()["surface"] == surface
            json.dumps(settings.to_json())  # meta.json stores it
    # The `one2345-train render` command line of the elevation evaluation.
    command = ["--source", "procedural", "--count", "4", "--out", "x", "--views", "elevation", "--surface", "flat"]
    settings = layout.settings_from_args(_render_args(*command, "--size", "64", "--samples", "8", "--polar", "45:120"))
    assert (settings.views, settings.surface, settings.size, settings.samples) == ("elevation", "flat", 64, 8)
    assert str(settings.polar) == "45:120"
    assert layout.settings_from_args(_render_args("--source", "procedural", "--out", "x")) == layout.RenderSettings()
    with pytest.raises(BadInputError, match=r"--views 'some'.*all, elevation"):
        layout.RenderSettings(views="some")
    with pytest.raises(BadInputError, match=r"--surface 'shiny'.*mixed, textured, flat"):
        layout.RenderSettings(surface="shiny")
    with pytest.raises(SystemExit):  # argparse's choices: "invalid choice: 'some' (choose from 'all', 'elevation')"
        _render_args("--source", "procedural", "--out", "x", "--views", "some")


def test_elevation_views_are_view_0_and_its_nearby_views_of_the_full_layout() -> None:
    for polar in (50, 75, 76, 110):
        full_names, names = layout.view_file_names(polar), layout.view_file_names(polar, "elevation")
        assert names == {
            "0.png": "view_0.png",
            "0_0.png": "view_0_0_10.png",
            "0_1.png": "view_0_1_10.png",
            "0_2.png": "view_0_2_10.png",
            "0_3.png": "view_0_3_10.png",
        }
        assert all(full_names[view_id] == name for view_id, name in names.items())
        full, elevation = layout.pose_file_for(polar, 64), layout.pose_file_for(polar, 64, "elevation")
        assert elevation.view_ids == list(names)
        np.testing.assert_array_equal(elevation.intrinsics, full.intrinsics)
        assert elevation.near_far == full.near_far
        for view_id in names:
            np.testing.assert_array_equal(elevation.c2ws[view_id], full.c2ws[view_id])
    with pytest.raises(BadInputError, match="views 'some'"):
        layout.view_file_names(60, "some")


def test_done_depends_on_the_views_asked_for(tmp_path: Path) -> None:
    out = tmp_path / "out"
    full, elevation = ObjectJob("proc-000000", "000-000", seed=0), ObjectJob("proc-000001", "000-000", seed=1)
    for job, meta in [(full, {"views": "all"}), (elevation, {"views": "elevation"})]:
        layout.object_dir(out, job).mkdir(parents=True)
        (layout.object_dir(out, job) / layout.META_NAME).write_text(json.dumps(meta))
    assert layout.is_done(out, full) and layout.is_done(out, full, "elevation")  # a full object has the five views
    assert not layout.is_done(out, elevation) and layout.is_done(out, elevation, "elevation")
    base = ["--source", "procedural", "--count", "3", "--out", str(out)]
    assert [j.uid for j in driver.plan_jobs(_render_args(*base)).jobs] == ["proc-000001", "proc-000002"]
    plan = driver.plan_jobs(_render_args(*base, "--views", "elevation"))
    assert [j.uid for j in plan.jobs] == ["proc-000002"] and plan.done == 2

    layout.require_full_views(layout.object_dir(out, full))
    layout.require_full_views(tmp_path)  # no meta.json (official layout, older renders): full
    with pytest.raises(BadInputError, match=r"proc-000001 holds only the elevation views") as caught:
        layout.require_full_views(layout.object_dir(out, elevation))
    assert "--views elevation" in str(caught.value)


# ---------------------------------------------------------------------------------------------------------------------
# Procedural objects
# ---------------------------------------------------------------------------------------------------------------------


def test_procedural_objects_are_seeded_closed_and_painted() -> None:
    first, again, other = procedural.make_object(7), procedural.make_object(7), procedural.make_object(8)
    assert [p.name for p in first] == [p.name for p in again]
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.vertices, b.vertices)
    assert [p.vertices.shape for p in first] != [p.vertices.shape for p in other] or not np.allclose(
        first[0].vertices, other[0].vertices
    )
    kinds = set()
    for seed in range(30):
        parts = procedural.make_object(seed)
        assert 2 <= len(parts) <= 5
        for part in parts:
            kinds.add(part.name.split("-")[0])
            assert (part.corner_colors is None) != (part.texture is None)
            assert part.corner_uvs.shape == (len(part.faces), 3, 2)
            corners = part.vertices[part.faces]
            # Signed volume > 0: closed, outward-facing surfaces (divergence theorem).
            volume = np.einsum("ij,ij->i", corners[:, 0], np.cross(corners[:, 1], corners[:, 2])).sum() / 6
            assert volume > 0, part.name
    assert kinds == set(procedural.PRIMITIVES)


# Today's (pre-`surface`) output of seeds 0–2: part names, whether textured, and roughness — the last draw of each
# part, so equal roughness values mean the random stream was consumed exactly as before.
MIXED_GOLDEN = {
    0: [
        ("cone-0", True, 0.5333528543874623),
        ("cylinder-1", False, 0.7031969267738156),
        ("sphere-2", False, 0.4394237517835823),
        ("sphere-3", True, 0.7035159803501216),
        ("box-4", False, 0.5933076216775559),
    ],
    1: [
        ("cylinder-0", True, 0.6792810705001002),
        ("cone-1", True, 0.4878287152919626),
        ("torus-2", False, 0.4533034983132339),
    ],
    2: [
        ("sphere-0", True, 0.8457798060506521),
        ("box-1", True, 0.6630954992556215),
        ("sphere-2", False, 0.876317256552333),
        ("cylinder-3", False, 0.5924540370507466),
        ("torus-4", False, 0.596013453565551),
    ],
}


def _make(seed: int, surface: str) -> list[procedural.MeshPart]:
    return procedural.make_object(seed, procedural.ProceduralConfig(surface=surface))


def _assert_same_shape(a: procedural.MeshPart, b: procedural.MeshPart) -> None:
    assert a.name == b.name and a.roughness == b.roughness
    for name in ("vertices", "faces", "corner_uvs"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=f"{a.name} {name}")


def _assert_same_part(a: procedural.MeshPart, b: procedural.MeshPart) -> None:
    _assert_same_shape(a, b)
    for name in ("texture", "corner_colors"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), (a.name, name)
        if x is not None:
            np.testing.assert_array_equal(x, y, err_msg=f"{a.name} {name}")


def test_mixed_surface_is_todays_output() -> None:
    for seed, golden in MIXED_GOLDEN.items():
        parts = procedural.make_object(seed)
        assert [(p.name, p.texture is not None, p.roughness) for p in parts] == golden
        for a, b in zip(parts, _make(seed, "mixed"), strict=True):
            _assert_same_part(a, b)


def test_textured_and_flat_surfaces_paint_the_same_shapes() -> None:
    forced = 0
    for seed in range(20):
        mixed, textured, flat = procedural.make_object(seed), _make(seed, "textured"), _make(seed, "flat")
        assert all(p.texture is not None and p.corner_colors is None for p in textured)
        assert all(p.texture is None and p.corner_colors is not None for p in flat)
        for m, t, f in zip(mixed, textured, flat, strict=True):
            _assert_same_shape(m, t)
            _assert_same_shape(m, f)
            assert t.texture.shape == (64, 64, 3) and t.texture.dtype == np.uint8
            assert f.corner_colors.shape == (len(f.faces), 3, 4) and f.corner_colors.dtype == np.float32
            # A part whose mixed draw already fits the mode keeps its paint; the others are repainted.
            if m.texture is not None:
                np.testing.assert_array_equal(m.texture, t.texture)
            else:
                np.testing.assert_array_equal(m.corner_colors, f.corner_colors)
                forced += 1
        # Deterministic per seed in every mode.
        for surface, parts in [("textured", textured), ("flat", flat)]:
            for a, b in zip(parts, _make(seed, surface), strict=True):
                _assert_same_part(a, b)
    assert forced > 10  # the seeds do exercise repainting
    with pytest.raises(BadInputError, match=r"surface 'shiny'.*mixed, textured, flat"):
        procedural.ProceduralConfig(surface="shiny")


def test_primitive_volumes_match_closed_forms() -> None:
    def volume(mesh: tuple[np.ndarray, np.ndarray, np.ndarray]) -> float:
        corners = mesh[0][mesh[1]]
        return np.einsum("ij,ij->i", corners[:, 0], np.cross(corners[:, 1], corners[:, 2])).sum() / 6

    assert volume(procedural.box()) == pytest.approx(8.0)
    assert volume(procedural.sphere(96)) == pytest.approx(4 / 3 * np.pi, rel=2e-3)
    assert volume(procedural.cylinder(96)) == pytest.approx(2 * np.pi, rel=2e-3)
    assert volume(procedural.cylinder(96, top_radius=0.0)) == pytest.approx(2 / 3 * np.pi, rel=2e-3)
    assert volume(procedural.torus(96, 0.3)) == pytest.approx(2 * np.pi**2 * 0.3**2, rel=5e-3)  # 48 minor segments


# ---------------------------------------------------------------------------------------------------------------------
# Sources and planning
# ---------------------------------------------------------------------------------------------------------------------

ANNOTATIONS = {
    "chair": [f"chair{i:02d}" for i in range(30)],
    "lamp": [f"lamp{i:02d}" for i in range(20)],
    "mug": ["mug00", "mug01", "chair00"],  # an object may carry two categories
}


class FakeObjaverse:
    """Stand-in for the objaverse module: no network; records what was downloaded."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.downloaded: list[str] = []

    def load_lvis_annotations(self) -> dict[str, list[str]]:
        return ANNOTATIONS

    def _load_object_paths(self) -> dict[str, str]:
        uids = {uid for group in ANNOTATIONS.values() for uid in group}
        return {uid: f"glbs/000-{sum(map(ord, uid)) % 160:03d}/{uid}.glb" for uid in uids}

    def load_objects(self, uids: list[str], download_processes: int = 1) -> dict[str, str]:
        self.downloaded += uids
        paths = self._load_object_paths()
        return {uid: str(self.cache / paths[uid]) for uid in uids}


def test_lvis_selection() -> None:
    everything = sources.select_lvis(ANNOTATIONS, sources.LvisSelection(split="all"))
    assert sorted(everything) == sorted({uid for group in ANNOTATIONS.values() for uid in group})  # deduplicated
    assert everything == sources.select_lvis(ANNOTATIONS, sources.LvisSelection(split="all"))
    assert everything != sorted(everything)  # hash order, so a prefix spreads over categories
    mugs = sources.select_lvis(ANNOTATIONS, sources.LvisSelection(("mug",), split="all"))
    assert sorted(mugs) == ["chair00", "mug00", "mug01"]
    train = sources.select_lvis(ANNOTATIONS, sources.LvisSelection(split="train", val_fraction=0.2))
    val = sources.select_lvis(ANNOTATIONS, sources.LvisSelection(split="val", val_fraction=0.2))
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(everything)
    assert 2 <= len(val) <= 20
    with pytest.raises(BadInputError, match="unknown LVIS categories: sofa"):
        sources.select_lvis(ANNOTATIONS, sources.LvisSelection(("sofa",)))
    with pytest.raises(BadInputError, match="--split"):
        sources.LvisSelection(split="test")


def test_lvis_split_file(tmp_path: Path) -> None:
    split_file = tmp_path / "lvis_split_cc_by.json"
    split_file.write_text(
        json.dumps(
            {
                "train": [{"folder_id": "000-001", "uid": "chair03"}, {"folder_id": "000-002", "uid": "lamp04"}],
                "val": [{"folder_id": "000-003", "uid": "mug01"}],
            }
        )
    )
    pick = sources.LvisSelection(split="train", split_file=str(split_file))
    assert sorted(sources.select_lvis(ANNOTATIONS, pick)) == ["chair03", "lamp04"]
    pick = sources.LvisSelection(("mug",), split="val", split_file=str(split_file))
    assert sources.select_lvis(ANNOTATIONS, pick) == ["mug01"]
    split_file.write_text("[1, 2]")
    with pytest.raises(BadInputError, match="lvis_split_cc_by"):
        sources.select_lvis(ANNOTATIONS, sources.LvisSelection(split_file=str(split_file)))


def test_objaverse_plan_downloads_only_this_shards_unfinished_objects(tmp_path: Path) -> None:
    api = FakeObjaverse(tmp_path / "cache")
    out = tmp_path / "out"
    base = ["--source", "objaverse", "--out", str(out), "--split", "all", "--categories", "chair,lamp", "--count"]
    selected = sources.select_lvis(ANNOTATIONS, sources.LvisSelection(("chair", "lamp"), split="all"))[:20]

    plans = [
        driver.plan_jobs(_render_args(*base, "20", "--shard", f"{i}/3"), sources.ObjaverseSource(api=api))
        for i in range(3)
    ]
    planned = [job.uid for plan in plans for job in plan.jobs]
    assert sorted(planned) == sorted(selected)  # the shards partition the first 20 selected objects
    assert sorted(api.downloaded) == sorted(selected)  # and each object was downloaded once, by its shard
    job = plans[0].jobs[0]
    paths = api._load_object_paths()
    assert job.folder_id == paths[job.uid].split("/")[1] and job.path == str(api.cache / paths[job.uid])

    # Finished objects are neither planned nor downloaded again.
    done = plans[0].jobs[0]
    (out / done.folder_id / done.uid).mkdir(parents=True)
    (out / done.folder_id / done.uid / "meta.json").write_text("{}")
    api.downloaded.clear()
    again = driver.plan_jobs(_render_args(*base, "20", "--shard", "0/3"), sources.ObjaverseSource(api=api))
    assert [j.uid for j in again.jobs] == [j.uid for j in plans[0].jobs[1:]] and again.done == 1
    assert done.uid not in api.downloaded


def test_procedural_and_directory_plans(tmp_path: Path) -> None:
    out = tmp_path / "out"
    plan = driver.plan_jobs(
        _render_args("--source", "procedural", "--count", "5", "--first-seed", "998", "--out", str(out))
    )
    assert [(j.uid, j.folder_id, j.seed) for j in plan.jobs][:3] == [
        ("proc-000998", "000-000", 998),
        ("proc-000999", "000-000", 999),
        ("proc-001000", "000-001", 1000),
    ]
    layout.append_record(layout.manifest_path(out, (0, 1)), {"uid": "proc-000999", "status": "failed"})
    plan = driver.plan_jobs(
        _render_args("--source", "procedural", "--count", "5", "--first-seed", "998", "--out", str(out))
    )
    assert "proc-000999" not in [j.uid for j in plan.jobs] and plan.failed_before == 1
    retry = _render_args(
        "--source", "procedural", "--count", "5", "--first-seed", "998", "--out", str(out), "--retry-failed"
    )
    assert "proc-000999" in [j.uid for j in driver.plan_jobs(retry).jobs]

    folder = tmp_path / "meshes"
    (folder / "a").mkdir(parents=True)
    for name in ["a/chair.glb", "chair.OBJ", "lamp model.ply", "notes.txt"]:
        (folder / name).write_bytes(b"x")
    jobs = sources.directory_jobs(folder)
    assert [Path(j.path).name for j in jobs] == ["chair.glb", "chair.OBJ", "lamp model.ply"]
    assert jobs[2].uid == "lamp_model"
    assert jobs[0].uid != jobs[1].uid and jobs[0].uid.startswith("chair-")  # same stem twice: hashed suffixes
    with pytest.raises(BadInputError, match="neither 'procedural', 'objaverse' nor an existing folder"):
        sources.directory_jobs(tmp_path / "nope")


def test_missing_blender_environment_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(driver.BPY_PYTHON_ENV, str(tmp_path / "no-python"))
    with pytest.raises(BadInputError) as caught:
        driver.bpy_python()
    assert "no-python" in str(caught.value) and ".ci/blender-envs" in str(caught.value)
    explicit = tmp_path / "python"
    explicit.write_text("")
    assert driver.bpy_python(str(explicit)) == explicit
    assert os.environ[driver.BPY_PYTHON_ENV].endswith("no-python")
