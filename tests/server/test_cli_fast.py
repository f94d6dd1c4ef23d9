"""Issue #31, the CLI findings: the true reason, fast, and nothing left behind.

- 11: an image outside the size rule is called too small / too large with the allowed range, never "corrupt".
- 12: every output is written with the user's umask (0644 under umask 022), not mkstemp's 0600.
- 13: a failed, interrupted (Ctrl+C) or terminated (SIGTERM) ``generate`` leaves no ``<out>.one2345/``; an older
  complete run folder survives a failed run; what a SIGKILL left is removed by the next run.
- 15: a wrong path or option is answered before torch is imported (checked in a subprocess).
- 16: ``weights verify`` refuses a FIFO unopened, exits 1 for a checkpoint folder with wrong keys, and never passes on
  torch's ``weights_only=False`` advice; ``remesh`` on absurdly nested meta.json is a clear bad-input error.
- 17: the help texts and the ``--offline`` report say what the code does.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from server.common.cameras import PoseFile
from server.common.errors import BadInputError
from server.common.fsutil import make_temp_dir, write_bytes_atomic, write_json_atomic
from server.common.mesh_io import Mesh, export_mesh
from server.common.synthetic import write_views_dir
from server.service.cli import build_parser, main
from server.stages import preprocess
from server.stages.reconstruction.checkpoint import save_checkpoint, verify_checkpoint
from server.stages.reconstruction.model import build_model

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "diffusers", "cv2", "scipy")


def png(size: tuple[int, int] = (64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 60, 40)).save(buf, format="PNG")
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height over the pixels of a 16×16 image (refused from the header)."""
    data = bytearray(png((16, 16)))
    data[16:20], data[20:24] = width.to_bytes(4, "big"), height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


# -- 15: validation before the heavy imports ------------------------------------------------------------------------

_PROBE = """
import json, sys, time
start = time.perf_counter()
from server.service.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "seconds": time.perf_counter() - start,
                  "heavy": sorted(m for m in sys.modules if m in HEAVY)}))
""".replace("HEAVY", repr(HEAVY))


def probe(argv: list[str]) -> tuple[dict, str]:
    """``one2345 argv`` in a fresh interpreter → (its report: exit code, seconds, heavy modules imported; stderr)."""
    done = subprocess.run([sys.executable, "-c", _PROBE, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.parametrize(("argv", "needle"), [
    (["generate", "{tmp}/nonexistent.png", "-o", "{tmp}/x.glb"], "does not exist"),
    (["generate", "{tmp}", "-o", "{tmp}/x.glb"], "is a folder"),
    (["generate", "{tmp}/tiny.png", "-o", "{tmp}/x.glb"], "too small"),
    (["generate", "{tmp}/huge.png", "-o", "{tmp}/x.glb"], "too large"),
    (["generate", "{tmp}/ok.png", "-o", "{tmp}/x.glb", "--steps-stage1", "0"], "steps_stage1"),
    (["generate", "{tmp}/ok.png", "-o", "{tmp}/x.glb", "--resolution", "5"], "resolution"),
    (["generate", "{tmp}/ok.png", "-o", "{tmp}/x.stl"], ".ply, .glb or .obj"),
    (["generate", "{tmp}/ok.png", "-o", "{tmp}/x.glb", "--device", "tpu"], "tpu"),
    (["reconstruct", "{tmp}/nowhere", "-o", "{tmp}/m.ply"], "does not exist"),
    (["reconstruct", "{tmp}/ok.png", "-o", "{tmp}/m.ply"], "not a folder"),
    (["remesh", "{tmp}/nowhere", "-o", "{tmp}/m.glb"], "does not exist"),
    (["weights", "verify", "{tmp}/nowhere.pth"], "does not exist"),
    (["elevation", "{tmp}/a.png", "{tmp}/b.png", "{tmp}/c.png", "{tmp}/d.png"], "does not exist"),
])
def test_a_wrong_path_or_option_is_answered_before_torch_loads(argv, needle, tmp_path):
    (tmp_path / "ok.png").write_bytes(png())
    (tmp_path / "tiny.png").write_bytes(png((8, 8)))
    (tmp_path / "huge.png").write_bytes(png_header(7000, 7000))
    report, err = probe([a.format(tmp=tmp_path) for a in argv])
    assert report["code"] == 2, err
    assert needle in err and "Traceback" not in err, err
    assert report["heavy"] == [], f"imported before the input was checked: {report['heavy']}"
    # Under a second on an idle machine (the probe measured ~0.3 s); the bound leaves room for a loaded CI runner.
    assert report["seconds"] < 5, report


# -- 11: the size rule, in its own words ----------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "needle"), [((8, 8), "8×8 px, too small"), ((7000, 7000), "49.0 MP), too large")])
def test_an_image_outside_the_size_rule_is_not_called_corrupt(size, needle, tmp_path, capsys):
    image = tmp_path / "photo.png"
    image.write_bytes(png(size) if size == (8, 8) else png_header(*size))
    for load in (preprocess.load_image, lambda p: preprocess.load_image(p.read_bytes())):
        with pytest.raises(BadInputError) as caught:
            load(image)
        assert needle in caught.value.message and "corrupt" not in caught.value.message
        assert "allowed: each side at least 16 px and at most 40,000,000 pixels" in caught.value.message
    code, err = run(["generate", str(image), "-o", str(tmp_path / "out.glb"), "--preset", "tiny"], capsys)
    assert code == 2 and needle in err and "corrupt" not in err, err
    assert "allowed: each side at least 16 px" in err


# -- 12: the user's umask -------------------------------------------------------------------------------------------


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_every_written_file_gets_the_users_umask(tmp_path, umask_022):
    from server.stages.asset import export_textured_mesh
    from server.stages.asset.bake import TexturedMesh

    mesh = Mesh(vertices=np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32), faces=np.array([[0, 1, 2]]),
                colors=np.full((3, 3), 128, np.uint8))
    files = [export_mesh(mesh, tmp_path / f"m.{s}") for s in ("ply", "glb", "obj")]
    files.append(PoseFile.for_polar(75.0).write(tmp_path / "pose.json"))
    files.append(write_json_atomic(tmp_path / "meta.json", {"a": 1}))
    files.append(write_bytes_atomic(tmp_path / "raw.bin", b"x"))
    folder = save_checkpoint(build_model("tiny", seed=0), tmp_path / "ckpt")
    files += [folder / "config.json", folder / "model.safetensors"]
    for f in files:
        assert mode(f) == 0o644, f"{f.name}: {oct(mode(f))}"
    assert mode(folder) == 0o755 and mode(make_temp_dir(tmp_path, ".t-")) == 0o755

    # A textured OBJ: the mesh, its .mtl and its texture PNG.
    textured = TexturedMesh(vertices=mesh.vertices, faces=mesh.faces, uvs=np.array([[0, 0], [1, 0], [0, 1]],
                                                                                     np.float32),
                            texture=np.full((8, 8, 3), 90, np.uint8))
    written = export_textured_mesh(textured, tmp_path / "t.obj")
    assert len(written) == 3
    for f in written:
        assert mode(f) == 0o644, f"{f.name}: {oct(mode(f))}"
    assert not list(tmp_path.glob(".*.tmp"))


# -- 13: nothing left behind ------------------------------------------------------------------------------------------


class FakePipe:
    """Writes what a real run writes first (the input, an empty views/), then fails as told, or finishes."""

    def __init__(self, failure: BaseException | None) -> None:
        self.failure = failure

    def __call__(self, image, run_dir, options, progress=None, outputs=()):
        run_dir = Path(run_dir)
        (run_dir / "views").mkdir(parents=True)
        (run_dir / "input.png").write_bytes(Path(image).read_bytes())
        if self.failure is not None:
            raise self.failure
        (run_dir / "meta.json").write_text("{}")
        for out in outputs:
            Path(out).write_bytes(b"mesh")
        return SimpleNamespace(elevation=15.0, elevation_source="given", background="none", vertices=3,
                               elevation_uncertain=False, elevation_confidence=None)


@pytest.fixture
def photo(tmp_path) -> Path:
    (tmp_path / "photo.png").write_bytes(png())
    return tmp_path / "photo.png"


@pytest.mark.parametrize(("failure", "code"), [
    (BadInputError("no object found"), 1), (KeyboardInterrupt(), 130), (RuntimeError("a bug"), None),
])
def test_a_failed_or_interrupted_generate_leaves_nothing(failure, code, photo, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("server.pipeline.One2345Pipeline.from_preset", lambda *a, **k: FakePipe(failure))
    argv = ["generate", str(photo), "-o", str(tmp_path / "out.glb"), "--preset", "tiny", "--device", "cpu"]
    if code is None:
        with pytest.raises(RuntimeError):
            main(argv)
    else:
        assert run(argv, capsys)[0] == code
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png"]


def test_an_older_complete_run_survives_a_failed_run_and_is_replaced_by_a_finished_one(photo, tmp_path, monkeypatch,
                                                                                       capsys):
    older = tmp_path / "out.one2345"
    older.mkdir()
    (older / "meta.json").write_text('{"older": true}')
    stale = tmp_path / ".out.one2345.incomplete"  # what a SIGKILLed run left
    (stale / "views").mkdir(parents=True)
    argv = ["generate", str(photo), "-o", str(tmp_path / "out.glb"), "--preset", "tiny", "--device", "cpu"]

    monkeypatch.setattr("server.pipeline.One2345Pipeline.from_preset",
                        lambda *a, **k: FakePipe(BadInputError("no object")))
    assert run(argv, capsys)[0] == 1
    assert (older / "meta.json").read_text() == '{"older": true}' and not stale.exists()

    monkeypatch.setattr("server.pipeline.One2345Pipeline.from_preset", lambda *a, **k: FakePipe(None))
    code, err = run(argv, capsys)
    assert code == 0, err
    assert (older / "meta.json").read_text() == "{}" and (older / "input.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.glb", "out.one2345", "photo.png"]
    assert str(older) in err


_SLOW_RUN = """
import sys, time
from pathlib import Path
import server.pipeline

def from_preset(*a, **k):
    def pipe(image, run_dir, options, progress=None, outputs=()):
        (Path(run_dir) / "views").mkdir(parents=True)
        (Path(run_dir) / "input.png").write_bytes(b"x")
        print("running", flush=True)
        time.sleep(60)
    return pipe

server.pipeline.One2345Pipeline.from_preset = from_preset
from server.service.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_removes_the_unfinished_run(photo, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_RUN, "generate", str(photo), "-o", str(tmp_path / "o.glb"),
                             "--preset", "tiny", "--device", "cpu"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "running"
        assert (tmp_path / ".o.one2345.incomplete" / "views").is_dir()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "terminated" in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png"]


# -- 16: weights verify ----------------------------------------------------------------------------------------------


def test_weights_verify_refuses_a_fifo_without_opening_it(tmp_path):
    fifo = tmp_path / "ckpt.pth"
    os.mkfifo(fifo)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "server.service.cli", "weights", "verify", str(fifo)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "FIFO" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert time.monotonic() - start < 60
    result = verify_checkpoint(fifo)  # the library too: an answer, not a read that waits for a writer
    assert not result.ok and result.report is None and "FIFO" in result.details


def test_weights_verify_exits_1_for_a_checkpoint_folder_with_wrong_keys(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    folder = save_checkpoint(build_model("tiny", seed=0), tmp_path / "ckpt")
    state = load_file(str(folder / "model.safetensors"))
    dropped = sorted(state)[0]
    del state[dropped]
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(folder / "model.safetensors"))
    code, err = run(["weights", "verify", str(folder)], capsys)
    assert code == 1, err
    assert "FAILED" in err and dropped in err and "extra.weight" in err and "1 missing keys" in err


def test_weights_verify_never_passes_on_torchs_advice(tmp_path, capsys):
    code_pickle = tmp_path / "code.pth"
    code_pickle.write_bytes(pickle.dumps({"a": SimpleNamespace}))  # a global that weights_only refuses
    random = tmp_path / "random.pth"
    random.write_bytes(bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8)))
    for path in (code_pickle, random):
        code, err = run(["weights", "verify", str(path)], capsys)
        assert code == 2 and "not a reconstruction checkpoint" in err, err
        assert "weights_only" not in err and "Weights only" not in err and "trust" not in err, err


# -- 16: remesh on a damaged record ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("meta", "needle"), [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"options": ' * 50_000 + "1" + "}" * 50_000, "nested too deeply"),
    ("{trunc", "not JSON"),
    ("[1, 2]", "not an object"),
])
def test_remesh_of_a_run_with_a_damaged_meta_json_is_bad_input(meta, needle, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "photo.one2345"
    write_views_dir(run_dir / "views", polar=75.0)
    (run_dir / "meta.json").write_text(meta)
    monkeypatch.setattr("server.service.cli.commands._load_model",
                        lambda a: pytest.fail("loaded a model for a bad record"))
    code, err = run(["remesh", str(run_dir), "-o", str(tmp_path / "m.glb")], capsys)
    assert code == 2 and needle in err and "Traceback" not in err, err
    assert "--preset and --resolution" in err
    assert not (tmp_path / "m.glb").exists()


# -- 17: words --------------------------------------------------------------------------------------------------------


def _help(*command: str) -> str:
    parser = build_parser()
    for action in parser._subparsers._group_actions:
        for name, sub in action.choices.items():
            if name == command[0]:
                return sub.format_help() if len(command) == 1 else sub._subparsers._group_actions[0].choices[
                    command[1]].format_help()
    raise KeyError(command)


def test_help_texts_say_what_the_commands_do(tmp_path):
    elevation = " ".join(_help("elevation").split())
    assert "most confident fit is kept" in elevation and "no fit is possible at all" in elevation
    written = write_views_dir(tmp_path / "views", polar=75.0)
    views = [p for p in written.iterdir() if p.suffix == ".png"]
    summary = " ".join(build_parser().format_help().split())
    assert f"{len(views)} views" in summary and len(views) == 40


def test_weights_download_offline_names_one_command(tmp_path, capsys):
    code, err = run(["weights", "download", "--offline", "--dir", str(tmp_path)], capsys)
    assert code == 1, err
    assert "offline=True" not in err and "&&" not in err and "Traceback" not in err, err
    assert "sam, zero123-xl, loftr, reconstruction" in err
    assert f"run `one2345 weights download --dir {tmp_path}`" in err
    code, err = run(["weights", "download", "--offline", "--dir", str(tmp_path), "--only", "zero123-xl", "--only",
                     "reconstruction"], capsys)
    assert code == 1 and "one2345 weights download --only zero123-xl --only reconstruction --dir" in err, err
