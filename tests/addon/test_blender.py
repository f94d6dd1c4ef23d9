"""The One2345 extension end to end in the bpy wheels of Blender 4.2.0 and 5.0.1, against the real server.

One module-scoped fixture builds the zip with ``python -m one2345_addon.build``, then runs ``blender_session.py`` once
per Blender version (both at the same time, each with its own user folder and its own tiny-preset server on the CPU).
The session records observations; the tests here judge them, comparing imported geometry and colours with the mesh
files read independently (trimesh) and with numbers computed here (sRGB decoding, normalisation).

The server runs with ``ONE2345_SERVER_PYTHON`` if set, else the interpreter running pytest (the main venv).
A missing bpy environment fails the tests (build it with ``.ci/blender-envs``); it is never a skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.server.fake_hub import payload, run_hub

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO_ROOT / "artifacts"
VERSIONS = {"4.2": REPO_ROOT / ".venv-bpy42" / "bin" / "python", "5.0": REPO_ROOT / ".venv-bpy50" / "bin" / "python"}
SESSION = Path(__file__).with_name("blender_session.py")
SESSION_TIMEOUT_S = 900
CURSOR = np.array([1.0, 2.0, 0.5])


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    """IEC 61966-2-1 decoding of values in 0…1."""
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def normalised(vertices: np.ndarray, size: float) -> np.ndarray:
    """The add-on's documented import transform: bottom-centre of the bounding box to the origin, largest side
    ``size``."""
    lo, hi = vertices.min(axis=0), vertices.max(axis=0)
    pivot = np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, lo[2]])
    return (vertices - pivot) * (size / (hi - lo).max())


def make_inputs(work: Path) -> dict:
    """The input image (a shaded red-orange disc on transparency) and fixture meshes with known colours."""
    import trimesh
    from PIL import Image

    work.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:64, :64]
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = 220, (xx * 3).astype(np.uint8), 40
    rgba[..., 3] = (((xx - 32) ** 2 + (yy - 32) ** 2) < 20**2) * 255
    Image.fromarray(rgba).save(work / "red_ball.png")
    box = trimesh.creation.box(extents=(1.0, 2.0, 4.0))
    colours = np.tile(np.array([[255, 0, 0, 255]], np.uint8), (len(box.vertices), 1))
    colours[:4] = [0, 128, 255, 255]
    box.visual.vertex_colors = colours
    fixtures = []
    for suffix in ("ply", "obj", "glb"):
        box.export(work / f"fixture.{suffix}")
        fixtures.append(str(work / f"fixture.{suffix}"))
    return {"image": str(work / "red_ball.png"), "fixtures": fixtures}


@pytest.fixture(scope="module")
def built_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The zip as a fresh clone builds it without Blender: plain Python with the standard library only (-S: no
    site-packages, so no bpy), no blender on PATH, no $ONE2345_BLENDER_PYTHON and --no-blender (the repository's bpy
    environments are not consulted). Installing it below is the test that Blender takes it."""
    out = tmp_path_factory.mktemp("dist")
    env = {k: v for k, v in os.environ.items() if k not in ("ONE2345_BLENDER_PYTHON", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and not (Path(p) / "blender").exists())
    done = subprocess.run([sys.executable, "-S", "-m", "one2345_addon.build", "--out", str(out), "--no-blender"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "Blender's validator: skipped" in done.stderr and "checked the manifest (own rules" in done.stderr
    zip_path = Path(done.stdout.strip().splitlines()[-1])
    assert zip_path.is_file() and zip_path.parent == out
    return zip_path


@pytest.fixture(scope="module")
def sessions(built_zip: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Run the Blender session for both versions concurrently; version → observations."""
    missing = [f"{v} ({python})" for v, python in VERSIONS.items() if not python.is_file()]
    if missing:
        pytest.fail(f"bpy environment(s) missing: {', '.join(missing)}; run .ci/blender-envs")
    server_python = os.environ.get("ONE2345_SERVER_PYTHON") or sys.executable
    ARTIFACTS.mkdir(exist_ok=True)
    table = tmp_path_factory.mktemp("weights-table") / "table.json"
    table.write_text(json.dumps([{"name": name, "filename": filename, "size_bytes": len(data), "required": True}
                                 for name, (filename, data) in HUB_FILES.items()]))
    with run_hub({filename: data for filename, data in HUB_FILES.values()}) as hub:
        # About 3 s for the big file. huggingface_hub reports (and checks for cancel) once per 10 MiB it writes, so
        # the file spans three reports: cancelled after the first, it leaves a 10 MiB partial file to resume.
        hub.delay_s, hub.chunk_bytes = 0.03, 262_144
        return run_sessions(built_zip, tmp_path_factory, server_python, {"hub_url": hub.url,
                                                                          "weights_table": str(table)}, hub)


HUB_FILES = {"probe-big": ("probe/big.bin", payload(25_000_000, 1)), "probe-small": ("probe/small.bin",
                                                                                     payload(30_000, 2))}
"""The stand-in hub's weight files, which the Blender sessions' servers require (``ONE2345_WEIGHTS_TABLE``)."""


def run_in_both_blenders(session: Path, tmp_path_factory: pytest.TempPathFactory, prefix: str,
                         make_config: Callable[[str, Path], dict], timeout_s: float = SESSION_TIMEOUT_S,
                         env: dict[str, str] | None = None) -> dict[str, dict]:
    """Run the Blender script ``session`` in every bpy version of :data:`VERSIONS` at once, each in its own work
    folder with its own Blender user folder; returns version → its ``results.json``, with ``_log`` (the session's
    output), ``_work`` and ``_config`` added. ``make_config(version, work)`` gives the config beyond ``work`` and
    ``results``.

    A missing bpy environment, a session that exits non-zero or times out, and a session whose recorder caught an
    exception outside the scenarios (``_session``) fail the caller."""
    missing = [f"{v} ({python})" for v, python in VERSIONS.items() if not python.is_file()]
    if missing:
        pytest.fail(f"bpy environment(s) missing: {', '.join(missing)}; run .ci/blender-envs")
    procs = {}
    for version, python in VERSIONS.items():
        work = tmp_path_factory.mktemp(f"{prefix}{version.replace('.', '')}")
        config = {"work": str(work), "results": str(work / "results.json"), **make_config(version, work)}
        (work / "config.json").write_text(json.dumps(config))
        environ = {**os.environ, "BLENDER_USER_RESOURCES": str(work / "blender-user"), **(env or {})}
        log = open(work / "session.log", "w")  # noqa: SIM115 - closed after the process ends
        procs[version] = (subprocess.Popen([str(python), str(session), "--config", str(work / "config.json")],
                                           stdout=log, stderr=subprocess.STDOUT, env=environ, cwd=work),
                          work, log, config)
    results = {}
    deadline = time.monotonic() + timeout_s
    for version, (proc, work, log, config) in procs.items():
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        text = (work / "session.log").read_text(errors="replace")
        assert proc.returncode == 0, f"Blender {version} session exited with {proc.returncode}:\n{text[-4000:]}"
        record = json.loads((work / "results.json").read_text())
        assert "_session" not in record, record["_session"]["exception"] + text[-3000:]
        record["_log"], record["_work"], record["_config"] = text, work, config
        results[version] = record
    return results


def run_sessions(built_zip: Path, tmp_path_factory: pytest.TempPathFactory, server_python: str, extra: dict,
                 hub) -> dict[str, dict]:
    def make_config(version: str, work: Path) -> dict:
        return {"zip": str(built_zip), "server_python": server_python,
                "render": str(ARTIFACTS / f"addon_render_bpy{version.replace('.', '')}.png"), **make_inputs(work),
                **extra}

    results = run_in_both_blenders(SESSION, tmp_path_factory, "bpy", make_config)
    results["_hub_requests"] = list(hub.requests)
    return results


def observed(sessions: dict, version: str, name: str) -> dict:
    record = sessions[version].get(name)
    assert record is not None, f"scenario {name} did not run:\n{sessions[version]['_log'][-3000:]}"
    assert "exception" not in record, f"scenario {name} raised:\n{record['exception']}"
    return record


@pytest.fixture(params=list(VERSIONS))
def version(request: pytest.FixtureRequest) -> str:
    return request.param


def test_install_and_enable(sessions, version):
    record = observed(sessions, version, "install")
    assert record["result"] == ["FINISHED"] and record["enabled"]
    assert record["operators"] == ["ONE2345_OT_generate_mesh", "ONE2345_OT_cancel_job", "ONE2345_OT_check_server",
                                   "ONE2345_OT_setup_server_env"]
    assert record["cli_registered"] and record["scene_settings"]
    assert "build.py" not in record["installed_files"] and "blender_manifest.toml" in record["installed_files"]
    assert "/extensions/" in record["user_dir"]  # the per-extension user folder, not the add-on's own


def test_panel_draws_image_options_and_generate(sessions, version):
    record = observed(sessions, version, "panel_idle")
    assert record["operators"] == ["one2345.generate_mesh"]
    for prop in ("image_source", "filepath", "elevation_mode", "seed", "quality", "resolution", "remove_background",
                 "mesh_format"):
        assert prop in record["props"]
    assert record["progress"] == []


def test_preferences_draw_server_settings_and_buttons(sessions, version):
    record = observed(sessions, version, "preferences_draw")
    # The last three: the Weights box, not checked yet.
    assert record["operators"] == ["one2345.check_server", "one2345.stop_server", "one2345.open_log",
                                   "one2345.setup_server_env", "one2345.open_log", "one2345.refresh_weights",
                                   "one2345.download_weights", "one2345.import_weights"]
    for prop in ("server_mode", "python_path", "weights_dir", "device", "keep_warm", "import_size"):
        assert prop in record["props"]


def test_to_request_maps_settings_onto_the_contract(sessions, version):
    record = observed(sessions, version, "request_options")
    paper = {"elevation": None, "seed": 0, "steps_stage1": 75, "steps_stage2": 50, "guidance": 3.0,
             "resolution": 256, "format": "ply", "remove_background": True,  # the reference's defaults (spec §1)
             "target_faces": None, "texture_size": None, "review": False}  # the raw mesh, no pause
    assert record["defaults"] == record["reset"] == paper
    assert record["changed"] == {**paper, "elevation": 15.0, "seed": None, "steps_stage1": 25, "steps_stage2": 15,
                                 "format": "glb", "remove_background": False}
    assert record["custom"] == {**record["changed"], "steps_stage1": 7, "steps_stage2": 5, "guidance": 4.5}
    # a texture is always a GLB (the one HTTP result that carries an image), whatever the format says
    assert record["asset"] == {**paper, "format": "glb", "texture_size": 2048, "target_faces": 20000,
                               "review": True}


def test_setup_environment_is_refused_offline(sessions, version):
    record = observed(sessions, version, "setup_offline")
    assert record["online_access"] is False  # the bpy wheel runs with online access off
    assert record["result"] == ["CANCELLED"]
    assert record["error"]["kind"] == "offline" and "Online access" in record["error"]["message"]


def test_no_server_python_explains_the_fix(sessions, version):
    record = observed(sessions, version, "no_python")
    assert record["result"] == ["CANCELLED"] and record["elapsed"] < 5
    assert record["error"]["kind"] == "server_not_configured"
    assert "No server Python" in record["error"]["message"] and "Server Python" in record["error"]["fix"]
    assert record["panel_operators"] == ["one2345.generate_mesh", "one2345.open_preferences",
                                         "one2345.setup_server_env"]
    assert any("No server Python" in label for label in record["panel_labels"])


def test_check_server_reports_in_words(sessions, version):
    record = observed(sessions, version, "check_server")
    assert record["status_ok"].startswith("Server Python OK: server 0.1.0, torch ")
    assert "does not exist" in record["status_missing"] and "no-such-python" in record["status_missing"]


def test_bad_image_is_reported_by_the_server(sessions, version):
    record = observed(sessions, version, "bad_image")
    assert record["result"] == ["CANCELLED"]
    assert record["error"]["kind"] == "bad_input" and "image" in record["error"]["message"]
    assert record["server_running"]  # the first job started the server, and a bad input does not stop it


def test_missing_image_file_fails_before_contacting_the_server(sessions, version):
    record = observed(sessions, version, "missing_file")
    assert record["result"] == ["CANCELLED"]
    assert record["error"]["kind"] == "bad_input" and "nope.png" in record["error"]["message"]


@pytest.mark.parametrize("suffix", ["ply", "obj", "glb"])
def test_import_fixture_mesh_geometry_colours_material(sessions, version, suffix):
    import trimesh

    record = observed(sessions, version, "import_fixtures")[suffix]
    source = trimesh.load(sessions[version]["_config"]["fixtures"][["ply", "obj", "glb"].index(suffix)],
                          process=False, force="mesh")
    vertices = np.asarray(source.vertices, np.float64)
    if suffix == "glb":  # glTF is y-up; Blender's importer turns it z-up: (x, y, z) → (x, −z, y)
        vertices = vertices[:, [0, 2, 1]] * [1, -1, 1]
    expected = normalised(vertices, 2.0)
    coords = np.array(record["coords"])
    assert record["collections"] == ["One2345"] and record["scale"] == [1.0, 1.0, 1.0]
    assert record["location"] == [0.0, 0.0, 0.0] and max(record["dimensions"]) == pytest.approx(2.0, abs=1e-5)
    # every imported vertex is an expected one (importers may reorder or split vertices)
    nearest = np.linalg.norm(coords[:, None] - expected[None], axis=-1).argmin(axis=1)
    np.testing.assert_allclose(coords, expected[nearest], atol=1e-5)
    (attribute,) = record["attributes"]
    colours = np.asarray(source.visual.vertex_colors, np.float64)[:, :3] / 255
    linear = np.array(attribute["linear"])[:, :3]
    if attribute["domain"] == "CORNER":  # glTF: one colour per face corner, stored as linear bytes
        assert len(linear) == 3 * record["faces"]
        # glTF's COLOR_0 is linear by definition, so the file's bytes arrive undecoded
        unique = np.unique(np.round(linear, 2), axis=0)
        np.testing.assert_allclose(unique, np.unique(np.round(colours, 2), axis=0), atol=0.011)
    else:
        np.testing.assert_allclose(linear, srgb_to_linear(colours[nearest]), atol=2e-3)
    (material,) = record["materials"]
    assert {"from_node": "ShaderNodeVertexColor", "from_socket": "Color", "layer_name": attribute["name"],
            "to_node": "ShaderNodeBsdfPrincipled", "to_socket": "Base Color"} in material["links"]


def test_datablock_image_is_exported_as_srgb_png(sessions, version):
    record = observed(sessions, version, "datablock_image")
    # a float buffer is linear and must be sRGB-encoded: 0.05 → 63, 0.2 → 124, 0.5 → 188 (IEC 61966-2-1); Blender
    # lists the bottom row first when writing and when reading back, so only a correctly flipped PNG round-trips
    assert record["reloaded_red_bytes"] == [[0, 63, 124, 255], [188, 188, 188, 188]]


def test_server_crash_mid_job_is_reported_and_next_run_restarts_it(sessions, version):
    crash = observed(sessions, version, "crash")
    assert crash["state"] == "failed" and crash["error"]["kind"] == "server_died"
    assert "stopped while working" in crash["error"]["message"] and "-9" in crash["error"]["message"]
    assert crash["seconds_to_error"] < 10 and not crash["imported"] and crash["active_cleared"]
    assert "one2345.start_server" in crash["panel_operators"] and "one2345.open_log" in crash["panel_operators"]
    generate = observed(sessions, version, "generate")
    assert generate["result"] == ["FINISHED"]
    assert any("had stopped" in note and "started it again" in note for note in generate["notes"])
    assert generate["pid"] != crash["killed_pid"]


def test_generate_mesh_imports_a_coloured_object(sessions, version):
    import trimesh

    record = observed(sessions, version, "generate")
    assert record["result"] == ["FINISHED"] and record["new_objects"] == ["red_ball"]
    obj = record["object"]
    assert obj["type"] == "MESH" and obj["collections"] == ["One2345"]
    np.testing.assert_allclose(obj["location"], CURSOR, atol=1e-6)
    assert obj["rotation"] == [0.0, 0.0, 0.0] or np.allclose(obj["rotation"], 0.0)
    assert max(obj["dimensions"]) == pytest.approx(1.0, abs=1e-5)  # "Import Size" 1 m
    props = record["props"]
    assert all(record["files_exist"].values()) and len(record["files_exist"]) >= 6
    assert len(props["one2345_job_id"]) == 32 and props["one2345_mesh"].endswith("red_ball.ply")
    # operator arguments override the scene's settings (resolution 40 in the scene, 32 passed to the operator)
    assert record["meta_options"]["resolution"] == 32 and record["meta_options"]["steps_stage1"] == 2
    assert Path(props["one2345_pose"]).name == "pose.json"
    # geometry and colours against the downloaded PLY, read independently
    ply = trimesh.load(props["one2345_mesh"], process=False)
    assert obj["vertices"] == len(ply.vertices) > 100 and obj["faces"] == len(ply.faces)
    np.testing.assert_allclose(obj["coords"], normalised(np.asarray(ply.vertices, np.float64), 1.0), atol=1e-5)
    (attribute,) = obj["attributes"]
    assert attribute["data_type"] == "FLOAT_COLOR" and attribute["domain"] == "POINT"
    file_rgb = np.asarray(ply.visual.vertex_colors, np.float64)[:, :3] / 255
    np.testing.assert_allclose(np.array(attribute["linear"])[:, :3], srgb_to_linear(file_rgb), atol=2e-3)
    assert np.ptp(file_rgb, axis=0).max() > 0.05  # the colours are not one flat value
    (material,) = obj["materials"]
    assert {"from_node": "ShaderNodeVertexColor", "from_socket": "Color", "layer_name": attribute["name"],
            "to_node": "ShaderNodeBsdfPrincipled", "to_socket": "Base Color"} in material["links"]
    assert obj["render_color_index"] == 0
    assert "0.png" in record["previews"] and record["panel_icons"] >= 4  # generated views shown in the panel
    # The elevation was left on Auto; the tiny preset's random-weight views give the estimator nothing to trust, so
    # the server flags it, and the panel and the object say so with the value used.
    meta = json.loads(Path(props["one2345_meta"]).read_text())
    uncertain = meta["elevation_estimate"]["uncertain"]
    assert record["server_uncertain"] is uncertain and props["one2345_elevation_uncertain"] == int(uncertain)
    said = [n for n in record["notes"] if n.startswith("Elevation uncertain")]
    assert said == ([f"Elevation uncertain — set it by hand (Elevation: Manual); used {meta['elevation']:.0f}°."]
                    if uncertain else [])
    if uncertain:
        assert any("Elevation uncertain" in text for text in record["panel_labels"])


def test_generate_is_undoable(sessions, version):
    record = observed(sessions, version, "undo")
    assert record.get("undo_error") is None
    assert record["before"] and record["after"] is False and record["after_redo"]
    assert record["collection_after_redo"] == ["One2345"]


def test_cycles_render_of_the_imported_mesh(sessions, version):
    record = observed(sessions, version, "render")
    assert Path(record["path"]).is_file() and record["size"] == [256, 256]
    assert 0.03 < record["object_fraction"] < 0.9  # the object is in frame and does not fill it
    assert record["object_channel_spread"] > 0.01  # vertex colours vary across the surface


def test_cli_command_writes_meshes_and_exit_codes(sessions, version):
    record = observed(sessions, version, "cli")
    assert record["rc"] == 0 and record["files"] == ["red_ball.meta.json", "red_ball.obj"]
    assert record["rc_missing"] == 1 and record["rc_usage"] == 2
    out = Path(sessions[version]["_config"]["work"]) / "cli-out"
    vertex_lines = [line.split() for line in (out / "red_ball.obj").read_text().splitlines() if line.startswith("v ")]
    assert len(vertex_lines) > 100 and all(len(v) == 7 for v in vertex_lines)  # x y z r g b
    assert json.loads((out / "red_ball.meta.json").read_text())["options"]["resolution"] == 32


def test_cancel_stops_the_job_promptly(sessions, version):
    record = observed(sessions, version, "cancel")
    assert record["running_operators"] == ["one2345.cancel_job"] and record["poll_while_running"] is False
    (bar,) = record["progress_calls"]
    assert bar["type"] == "BAR" and 0 < bar["factor"] < 1
    assert record["cancel_result"] == ["FINISHED"] and record["state"] == "cancelled"
    assert record["seconds_to_cancelled"] < 5 and record["server_state"] == "cancelled"
    assert record["objects_added"] == 0 and record["poll_after"] is True


def test_remote_server_check_reports_token_and_reachability(sessions, version):
    record = observed(sessions, version, "remote")
    assert record["status_ok"].startswith("Server at http://127.0.0.1:") and "preset tiny" in record["status_ok"]
    assert "rejected the token" in record["status_bad_token"]
    assert "No answer" in record["status_unreachable"] and "127.0.0.1:9" in record["status_unreachable"]


def test_stale_server_from_a_crashed_session_is_stopped_not_duplicated(sessions, version):
    record = observed(sessions, version, "stale")
    assert record["pid_file_before"]
    assert record["note"] and "earlier Blender session" in record["note"]
    assert record["old_alive"] is False and record["new_alive"] and record["new_differs"]


def test_disable_stops_everything(sessions, version):
    record = observed(sessions, version, "disable")
    assert record["still_enabled"] is False and record["operator_gone"]
    assert record["server_alive"] is False and record["pid_file_exists"] is False
    assert record["cli_handle"] is False


def test_build_uses_blenders_validator(tmp_path, monkeypatch):
    """The build's own rules refuse what Blender's validator refuses, with the field, the value and Blender's rule;
    tests/addon/test_build.py checks each rule against the bpy 4.2 and 5.0 validators themselves."""
    from one2345_addon import build

    bad = tmp_path / "blender_manifest.toml"
    text = build.MANIFEST.read_text()
    assert 'to the server"' in text
    bad.write_text(text.replace('to the server"', 'to the server."'))
    monkeypatch.setattr(build, "MANIFEST", bad)
    with pytest.raises(RuntimeError, match=r'"permissions.network" = .*the server\.\'.*must not end with punctuation'):
        build.build(tmp_path / "out", no_blender=True)


# -- #10 redo, #13 textured output and re-mesh, #15 review, recipes and history, #10 weights ----------------------

def test_generate_has_no_redo_panel(sessions, version):
    """Redo would run the whole generation again, blocking Blender: one undo step, no "Adjust Last Operation"."""
    assert observed(sessions, version, "redo_free")["bl_options"] == ["UNDO"]


def test_out_of_memory_offers_low_vram_mode(sessions, version):
    record = observed(sessions, version, "low_vram_fix")
    assert record["oom_fixes"][0] == "one2345.use_low_vram" and record["result"] == ["FINISHED"]
    assert record["pref"] is True and record["launch"] is True


def test_textured_result_imports_with_its_texture_wired_into_the_material(sessions, version):
    import trimesh

    record = observed(sessions, version, "textured")
    assert record["result"] == ["FINISHED"], record["error"]
    obj, props = record["object"], record["props"]
    assert props["one2345_mesh"].endswith(".glb") and props["one2345_textured"] == 1
    assert obj["attributes"] == [] and record["uv_layers"]  # UVs, no vertex colours
    (image,) = record["images"]
    assert image["size"] == [512, 512] and image["packed"]
    (material,) = obj["materials"]
    assert {"from_node": "ShaderNodeTexImage", "from_socket": "Color", "layer_name": None,
            "to_node": "ShaderNodeBsdfPrincipled", "to_socket": "Base Color"} in material["links"]
    assert len(material["links"]) == 2  # texture → base colour, BSDF → output: the importer's material is gone
    glb = trimesh.load(props["one2345_mesh"], force="mesh", process=False)
    assert glb.visual.material.baseColorTexture.size == (512, 512)
    assert obj["faces"] <= 1010  # the 1000-face budget, give or take Blender splitting nothing
    # Cycles shows the texture: the object is visible and not one flat colour
    assert record["object_fraction"] > 0.02 and record["object_channel_spread"] > 0.005
    assert {"one2345.remesh", "one2345.regenerate"} <= set(record["object_panel"])


def test_remesh_makes_a_new_object_from_the_same_views(sessions, version):
    import trimesh

    record = observed(sessions, version, "remesh")
    assert record["result"] == ["FINISHED"] and record["source_still_there"]
    props = record["props"]
    assert props["one2345_remesh_of"] == record["source_job"] != props["one2345_job_id"]
    assert record["new_objects"][0].endswith("_remesh") and props["one2345_mesh"].endswith(".ply")
    ply = trimesh.load(props["one2345_mesh"], process=False)
    assert record["object"]["vertices"] == len(ply.vertices) > 100 and len(record["object"]["attributes"]) == 1


def test_review_pauses_rerolls_only_the_ticked_views_then_continues(sessions, version):
    record = observed(sessions, version, "review")
    assert record["result"] == ["FINISHED"] and record["paused"]
    assert len(record["numbers"]) == 8 and record["numbers"][:4] == [0, 1, 2, 3]
    assert record["panel_icons"] == 8 and record["panel_checkboxes"] == 8
    assert {"one2345.reroll_views", "one2345.continue_job", "one2345.cancel_job"} <= set(record["panel_operators"])
    assert record["generate_poll_in_review"] is False
    assert record["reroll_without_selection"] == ["CANCELLED"]  # nothing ticked: refused, the job waits on
    assert record["reroll"] == ["FINISHED"] and record["revision"] == 1
    ticked = [record["numbers"][1], record["numbers"][5]]  # 5 is view 9 when ring 2 goes up (low elevation)
    assert record["changed"] == ticked  # the other six views are byte-identical
    assert record["view_seeds"] == {str(n): 7 for n in ticked} and record["selection_cleared"]
    assert record["continue"] == ["FINISHED"] and len(record["new_objects"]) == 1 and record["active_cleared"]
    assert record["meta_elevation"] == pytest.approx(record["target_elevation"])  # as edited in the panel
    recipe = record["recipe"]
    assert recipe["options"]["view_seeds"] == {str(n): 7 for n in ticked} and recipe["options"]["review"] is False
    assert recipe["options"]["seed"] == 0 and len(recipe["input_sha256"]) == 64
    assert len(record["props"]["one2345_input_sha256"]) == 64


def test_regenerate_reproduces_the_mesh_and_variation_changes_it(sessions, version):
    record = observed(sessions, version, "regenerate")
    assert record["regenerate_result"] == ["FINISHED"] and record["variation_result"] == ["FINISHED"]
    source = Path(record["source_mesh"]).read_bytes()
    assert Path(record["meshes"]["regenerate"]).read_bytes() == source
    assert Path(record["meshes"]["variation"]).read_bytes() != source
    assert record["regenerate_seed"] == 0 and record["variation_seed"] != 0


def test_history_lists_imports_regenerates_and_deletes(sessions, version):
    record = observed(sessions, version, "history")
    assert record["refresh"] == ["FINISHED"]
    items = record["items"]
    review = observed(sessions, version, "review")["props"]["one2345_job_id"]
    by_id = {item["job_id"]: item for item in items}
    assert review in by_id and by_id[review]["state"] == "done" and by_id[review]["thumbs"] == [True, True]
    assert "seed 0" in by_id[review]["settings"] and by_id[review]["created"][:2] == "20"
    assert [item["created"] for item in items] == sorted((item["created"] for item in items), reverse=True)
    assert {"one2345.history_job", "one2345.delete_history_job", "one2345.open_history_folder",
            "one2345.refresh_history"} <= set(record["panel_operators"])
    assert record["open_folder"] == ["FINISHED"] and (Path(record["folder"]) / "status.json").is_file()
    source = Path(observed(sessions, version, "review")["props"]["one2345_mesh"]).read_bytes()
    assert record["import"] == ["FINISHED"] and Path(record["imported_mesh"]).read_bytes() == source
    assert record["imported_recipe"]
    assert record["history_regenerate"] == ["FINISHED"] and Path(record["regenerated_mesh"]).read_bytes() == source
    assert record["delete"] == ["FINISHED"] and record["after_delete"] is False
    assert record["server_after_delete"] == "not_found"
    assert record["pinned"] is True  # an imported object's job is kept through size-limit clean-ups


def test_weights_download_from_the_addon_then_generate(sessions, version):
    record = observed(sessions, version, "weights")
    assert record["listing_states"] == {"probe-big": "missing", "probe-small": "missing"}
    assert record["generate_poll"] is False
    assert "Model weights are missing" in record["generate_refusal"] and "Preferences" in record["generate_refusal"]
    assert ["one2345.download_weights", "Download (≈ 25.0 MB)"] in record["prefs_buttons"]
    assert record["progress_bar"] and "probe" in record["progress_bar"][0]
    assert record["cancel"] == ["FINISHED"] and record["after_cancel"] == "cancelled"
    assert record["states_after_cancel"]["probe-big"] == "partial" and max(record["fractions"]) < 1.0
    assert record["download"] == ["FINISHED"] and record["download_state"] == "done"
    assert record["states_after_download"] == {"probe-big": "present", "probe-small": "present"}
    assert record["generate_poll_after"] is True and record["generate"] == ["FINISHED"] and record["generated"] == 1
    assert record["missing_weights_fix"][0] == "one2345.download_weights"


def test_the_weights_download_resumed_with_a_range_request(sessions):
    ranged = [r for r in sessions["_hub_requests"] if r[0] == "GET" and r[2] is not None and "big.bin" in r[1]]
    assert len(ranged) >= len(VERSIONS)  # each Blender resumed its cancelled download
