"""Every ``one2345`` command against a corpus of bad inputs: each gives one clear message and exit code 2, never a
traceback, and nothing is written where it should not be.

The corpus is the kinds of mistake a user or a script makes — a missing file, a folder where a file belongs and the
reverse, empty, truncated and garbage files, a decompression bomb, wrong shapes — crossed with every command that
reads a file. The commands run in process through :func:`server.service.cli.main` (a traceback there is an exception
escaping
``main``, which fails the test with it); a handful run as real subprocesses too, to check the installed entry point.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from server.common.synthetic import write_views_dir
from server.service.cli import main
from server.stages.reconstruction.checkpoint import save_checkpoint
from server.stages.reconstruction.model import build_model

REPO = Path(__file__).resolve().parents[2]


def png(size: tuple[int, int] = (64, 64), color=(200, 60, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A valid PNG header claiming width × height (900 MP) over the pixels of a 16×16 image."""
    data = bytearray(png((16, 16)))
    data[16:20], data[20:24] = width.to_bytes(4, "big"), height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


GARBAGE = bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))

# An image argument: each maker writes its bad input at the given path (or leaves it missing).
BAD_FILES: dict[str, Callable[[Path], None]] = {
    "missing": lambda p: None,
    "folder": lambda p: p.mkdir(),
    "empty": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_bytes(png()[:70]),
    "garbage": lambda p: p.write_bytes(GARBAGE),
    "bomb": lambda p: p.write_bytes(bomb_png()),
    "text": lambda p: p.write_text("not an image\n"),
}


def run(argv: list[str], capsys) -> tuple[int, str]:
    """``one2345 argv`` in process → (exit code, stderr). An exception escaping main fails the test."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    err = capsys.readouterr().err
    return code, err


def assert_clean_refusal(code: int, err: str, *needles: str) -> None:
    assert code == 2, f"exit {code}, expected 2:\n{err}"
    assert "Traceback" not in err, err
    assert "error" in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err}"


@pytest.fixture(scope="module")
def views(tmp_path_factory) -> Path:
    return write_views_dir(tmp_path_factory.mktemp("corpus") / "views", polar=75.0)


def copy_views(views: Path, to: Path) -> Path:
    to.mkdir()
    for f in views.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
    return to


# -- images: generate and elevation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_generate_refuses_every_bad_image_before_loading_models(kind, tmp_path, capsys, monkeypatch):
    image = tmp_path / "photo.png"
    BAD_FILES[kind](image)
    monkeypatch.setattr("server.pipeline.One2345Pipeline.from_preset",
                        lambda *a, **k: pytest.fail("models were loaded for an input that cannot be used"))
    code, err = run(["generate", str(image), "-o", str(tmp_path / "out.glb"), "--preset", "tiny"], capsys)
    assert_clean_refusal(code, err, "photo.png")
    assert not (tmp_path / "out.glb").exists() and not (tmp_path / "out.one2345").exists()


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_elevation_refuses_every_bad_view(kind, views, tmp_path, capsys):
    bad = tmp_path / "0_1.png"
    BAD_FILES[kind](bad)
    argv = ["elevation", str(views / "0_0.png"), str(bad), str(views / "0_2.png"), str(views / "0_3.png"),
            "--matcher", "sift"]
    assert_clean_refusal(*run(argv, capsys), "0_1.png")


def test_elevation_refuses_views_of_different_sizes(views, tmp_path, capsys):
    small = tmp_path / "small.png"
    small.write_bytes(png((32, 32)))
    argv = ["elevation", str(views / "0_0.png"), str(small), str(views / "0_2.png"), str(views / "0_3.png")]
    assert_clean_refusal(*run(argv, capsys), "size")


@pytest.mark.parametrize(("argv", "needle"), [
    (["--out-dir", "{file}"], "not a folder"),
    (["-o", "{folder}.glb"], "is a folder"),
    (["-o", "{file}/inside.glb"], "not a folder"),
    (["-o", "{tmp}/out.stl"], ".ply, .glb or .obj"),
    (["-o", "{tmp}/out.glb", "--resolution", "5"], "resolution"),
    (["-o", "{tmp}/out.glb", "--steps-stage1", "0"], "steps_stage1"),
    (["-o", "{tmp}/out.glb", "--elevation", "nan"], "elevation"),
    (["-o", "{tmp}/out.glb", "--seed", "-1"], "seed"),
    (["-o", "{tmp}/out.glb", "--guidance", "inf"], "guidance"),
    (["-o", "{tmp}/out.glb", "--device", "tpu"], "tpu"),
    ([], "-o OUT"),
])
def test_generate_refuses_bad_outputs_and_options_before_running(argv, needle, tmp_path, capsys, monkeypatch):
    image = tmp_path / "photo.png"
    image.write_bytes(png())
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder.glb").mkdir()
    argv = [a.format(file=tmp_path / "file", folder=tmp_path / "folder", tmp=tmp_path) for a in argv]
    monkeypatch.setattr("server.pipeline.One2345Pipeline.from_preset",
                        lambda *a, **k: pytest.fail("models were loaded for a run that cannot finish"))
    assert_clean_refusal(*run(["generate", str(image), "--preset", "tiny", *argv], capsys), needle)


# -- views folders: reconstruct -------------------------------------------------------------------------------------


def _break_view(kind: str) -> Callable[[Path], None]:
    return lambda folder: (folder / "3_2.png").unlink() or BAD_FILES[kind](folder / "3_2.png")


VIEWS_CASES: dict[str, Callable[[Path], None]] = {
    **{f"view {kind}": _break_view(kind) for kind in BAD_FILES},
    "pose.json missing": lambda f: (f / "pose.json").unlink(),
    "pose.json empty": lambda f: (f / "pose.json").write_text(""),
    "pose.json truncated": lambda f: (f / "pose.json").write_text((f / "pose.json").read_text()[:200]),
    "pose.json garbage": lambda f: (f / "pose.json").write_bytes(GARBAGE),
    "pose.json a list": lambda f: (f / "pose.json").write_text("[1, 2, 3]"),
    "pose.json deep": lambda f: (f / "pose.json").write_text("[" * 100_000 + "]" * 100_000),
    "pose.json huge int": lambda f: (f / "pose.json").write_text('{"intrinsics": 1' + "0" * 5000 + "}"),
    "pose.json wrong shapes": lambda f: (f / "pose.json").write_text(json.dumps(
        {**json.loads((f / "pose.json").read_text()), "intrinsics": [[1, 2], [3, 4]]})),
    "pose.json a folder": lambda f: (f / "pose.json").unlink() or (f / "pose.json").mkdir(),
    "a view of another size": lambda f: (f / "3_2.png").write_bytes(png((32, 32))),
    "31 views": lambda f: (f / "pose.json").write_text(json.dumps(_drop_pose(json.loads(
        (f / "pose.json").read_text()), "3_2.png"))),
}


def _drop_pose(pose: dict, name: str) -> dict:
    pose["c2ws"] = {k: v for k, v in pose["c2ws"].items() if k != name}
    return pose


@pytest.mark.parametrize("case", sorted(VIEWS_CASES))
def test_reconstruct_refuses_every_broken_views_folder(case, views, tmp_path, capsys):
    folder = copy_views(views, tmp_path / "views")
    VIEWS_CASES[case](folder)
    out = tmp_path / "mesh.ply"
    assert_clean_refusal(*run(["reconstruct", str(folder), "-o", str(out), "--preset", "tiny"], capsys))
    assert not out.exists()


@pytest.mark.parametrize(("make", "needle"), [
    (lambda tmp, views: [str(tmp / "nowhere"), "-o", str(tmp / "m.ply")], "nowhere"),
    (lambda tmp, views: [str(views / "0_0.png"), "-o", str(tmp / "m.ply")], "not a folder"),
    (lambda tmp, views: [str(tmp), "-o", str(tmp / "m.ply")], "pose.json"),
    (lambda tmp, views: [str(views), "-o", str(tmp / "d.ply")], "is a folder"),
    (lambda tmp, views: [str(views), "-o", str(tmp / "f" / "m.ply")], "not a folder"),
    (lambda tmp, views: [str(views), "-o", str(tmp / "m.stl")], ".ply, .glb or .obj"),
    (lambda tmp, views: [str(views), "-o", str(tmp / "m.ply"), "--resolution", "8"], "resolution"),
    (lambda tmp, views: [str(views), "-o", str(tmp / "m.ply"), "--checkpoint", str(tmp / "none.pth")], "none.pth"),
    (lambda tmp, views: [str(views), "-o", str(tmp / "m.ply"), "--checkpoint", str(tmp / "f")], "checkpoint"),
    (lambda tmp, views: [str(views), "-o", str(tmp / "m.ply"), "--device", "cuda:x"], "cuda:x"),
])
def test_reconstruct_refuses_bad_arguments(make, needle, views, tmp_path, capsys):
    (tmp_path / "d.ply").mkdir()
    (tmp_path / "f").write_bytes(GARBAGE)
    assert_clean_refusal(*run(["reconstruct", *make(tmp_path, views), "--preset", "tiny"], capsys), needle)


# -- checkpoints: weights verify (and its fuzz in test_verify_fuzz.py) ----------------------------------------------


def _checkpoint_folder(path: Path, edit: Callable[[dict], object] | None = None, raw: bytes | None = None) -> None:
    save_checkpoint(build_model("tiny", seed=0), path)
    if raw is not None:
        (path / "config.json").write_bytes(raw)
    elif edit is not None:
        meta = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(edit(meta)))


VERIFY_CASES: dict[str, Callable[[Path], None]] = {
    "missing": lambda p: None,
    "empty file": lambda p: p.write_bytes(b""),
    "empty folder": lambda p: p.mkdir(),
    "garbage": lambda p: p.write_bytes(GARBAGE),
    "truncated zip": lambda p: (torch.save({"a": torch.zeros(3)}, p), p.write_bytes(p.read_bytes()[:100])),
    "a tensor": lambda p: torch.save(torch.zeros(3), p),
    "mixed key types": lambda p: torch.save({1: torch.zeros(1), "a": torch.zeros(1)}, p),
    "networks that are not dicts": lambda p: torch.save({n: torch.zeros(1) for n in (
        "pyramid_feature_network", "sdf_network_lod0", "variance_network_lod0", "rendering_network_lod0")}, p),
    "networks with non-string keys": lambda p: torch.save({n: {1: torch.zeros(1)} for n in (
        "pyramid_feature_network", "sdf_network_lod0", "variance_network_lod0", "rendering_network_lod0")}, p),
    "config not utf-8": lambda p: _checkpoint_folder(p, raw=b"\xff\xfe{\x00"),
    "config not json": lambda p: _checkpoint_folder(p, raw=b"{trunc"),
    "config a list": lambda p: _checkpoint_folder(p, raw=b"[]"),
    "format_version a string": lambda p: _checkpoint_folder(p, lambda m: {**m, "format_version": "1"}),
    "no config": lambda p: _checkpoint_folder(p, lambda m: {k: v for k, v in m.items() if k != "config"}),
    "config of wrong types": lambda p: _checkpoint_folder(p, lambda m: {**m, "config": {"bogus": [1]}}),
    "config a number": lambda p: _checkpoint_folder(p, lambda m: {**m, "config": 3}),
    "weights garbage": lambda p: (_checkpoint_folder(p), (p / "model.safetensors").write_bytes(GARBAGE)),
    "weights empty": lambda p: (_checkpoint_folder(p), (p / "model.safetensors").write_bytes(b"")),
    "weights a folder": lambda p: (_checkpoint_folder(p), (p / "model.safetensors").unlink(),
                                   (p / "model.safetensors").mkdir()),
}


@pytest.mark.parametrize("case", sorted(VERIFY_CASES))
def test_weights_verify_refuses_everything_that_is_not_a_checkpoint(case, tmp_path, capsys):
    path = tmp_path / "ckpt"
    VERIFY_CASES[case](path)
    code, err = run(["weights", "verify", str(path)], capsys)
    assert_clean_refusal(code, err, "ckpt")


def test_weights_verify_says_ok_for_a_real_checkpoint(tmp_path, capsys):
    save_checkpoint(build_model("tiny", seed=0), tmp_path / "ok")
    assert main(["weights", "verify", str(tmp_path / "ok")]) == 0
    assert "OK" in capsys.readouterr().out


def test_weights_download_refuses_a_file_as_its_folder(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert_clean_refusal(*run(["weights", "download", "--offline", "--dir", str(tmp_path / "f")], capsys), "f")


# -- serve and sample-views -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "needle"), [
    (["--port", "70000"], "70000"), (["--port", "-1"], "-1"), (["--port", "x"], "x"),
    (["--max-upload-mb", "nan"], "nan"), (["--max-upload-mb", "inf"], "inf"), (["--max-upload-mb", "0"], "0"),
    (["--max-upload-mb", "-5"], "-5"), (["--max-queue", "0"], "0"), (["--preset", "huge"], "huge"),
    (["--jobs-dir", "{file}"], "not a folder"), (["--device", "gpu9"], "gpu9"),
])
def test_serve_refuses_bad_settings_before_binding(argv, needle, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("ONE2345_TOKEN", "corpus-token-0123456789")
    argv = [a.format(file=tmp_path / "file") for a in argv]
    monkeypatch.setattr("server.service.serve.bind_socket", lambda *a: pytest.fail("bound a socket with bad settings"))
    assert_clean_refusal(*run(["serve", "--preset", "tiny", "--device", "cpu", "--jobs-dir", str(tmp_path / "j"),
                               *argv], capsys), needle)


@pytest.mark.parametrize(("token", "host", "needle"), [
    ("   ", "127.0.0.1", "printable"), ("tab\tinside", "127.0.0.1", "printable"),
    ("x", "0.0.0.0", "at least 16"), ("fifteen-chars-x", "0.0.0.0", "at least 16"),
])
def test_serve_refuses_unusable_tokens(token, host, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ONE2345_TOKEN", token)
    monkeypatch.setattr("server.service.serve.bind_socket", lambda *a: pytest.fail("bound a socket with a bad token"))
    assert_clean_refusal(*run(["serve", "--host", host, "--jobs-dir", str(tmp_path)], capsys), needle)


@pytest.mark.parametrize(("argv", "needle"), [
    (["{file}"], "not a folder"), (["{tmp}/v", "--polar", "nan"], "polar"), (["{tmp}/v", "--polar", "500"], "polar"),
])
def test_sample_views_refuses_bad_arguments(argv, needle, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    argv = [a.format(file=tmp_path / "file", tmp=tmp_path) for a in argv]
    assert_clean_refusal(*run(["sample-views", *argv], capsys), needle)


# -- the real entry point ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["reconstruct", "{bomb_dir}", "-o", "{tmp}/m.ply", "--preset", "tiny"],
    ["weights", "verify", "{garbage}"],
    ["generate", "{garbage}", "-o", "{tmp}/out.glb", "--preset", "tiny"],
    ["serve", "--port", "70000"],
])
def test_the_installed_command_prints_no_traceback(argv, views, tmp_path):
    bomb_dir = copy_views(views, tmp_path / "bomb")
    (bomb_dir / "0_0.png").write_bytes(bomb_png())
    (tmp_path / "garbage").write_bytes(GARBAGE)
    argv = [a.format(bomb_dir=bomb_dir, tmp=tmp_path, garbage=tmp_path / "garbage") for a in argv]
    env = {**os.environ, "ONE2345_TOKEN": "corpus-token-0123456789"}
    run_ = subprocess.run([sys.executable, "-m", "server.service.cli", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert run_.returncode == 2, run_.stderr
    assert "Traceback" not in run_.stderr and "error" in run_.stderr, run_.stderr


# -- the installed command on the inputs that hang or crash a careless reader (issue #31) ----------------------------


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _run_with(meta: Callable[[Path], None]) -> Callable[[Path, Path], None]:
    def make(tmp: Path, views: Path) -> None:
        (tmp / "run").mkdir()
        run_dir = copy_views(views, tmp / "run" / "views").parent
        meta(run_dir / "meta.json")
    return make


def _views_with(change: Callable[[Path], None]) -> Callable[[Path, Path], None]:
    def make(tmp: Path, views: Path) -> None:
        change(copy_views(views, tmp / "v"))
    return make


def _nothing(tmp: Path, views: Path) -> None:
    pass


DEEP = "[" * 100_000 + "]" * 100_000

# case → (how to make it under tmp, the arguments, a word the one-line message must hold)
SUBPROCESS_CASES: dict[str, tuple[Callable[[Path, Path], None], list[str], str]] = {
    "generate: image a FIFO": (lambda t, v: _fifo(t / "in.png"), ["generate", "{t}/in.png", "-o", "{t}/o.glb"],
                               "not a regular file"),
    "generate: image 8x8": (lambda t, v: (t / "in.png").write_bytes(png((8, 8))),
                            ["generate", "{t}/in.png", "-o", "{t}/o.glb"], "too small"),
    "generate: image 49 MP": (lambda t, v: (t / "in.png").write_bytes(bomb_png(7000, 7000)),
                              ["generate", "{t}/in.png", "-o", "{t}/o.glb"], "too large"),
    "generate: image missing": (_nothing, ["generate", "{t}/in.png", "-o", "{t}/o.glb"], "does not exist"),
    "generate: image a folder": (lambda t, v: (t / "in.png").mkdir(), ["generate", "{t}/in.png", "-o", "{t}/o.glb"],
                                 "is a folder"),
    "generate: output a folder": (lambda t, v: ((t / "in.png").write_bytes(png()), (t / "o.glb").mkdir()),
                                  ["generate", "{t}/in.png", "-o", "{t}/o.glb"], "is a folder"),
    "elevation: a view a FIFO": (lambda t, v: _fifo(t / "0_1.png"),
                                 ["elevation", "{v}/0_0.png", "{t}/0_1.png", "{v}/0_2.png", "{v}/0_3.png"],
                                 "not a regular file"),
    "weights verify: a FIFO": (lambda t, v: _fifo(t / "c.pth"), ["weights", "verify", "{t}/c.pth"], "FIFO"),
    "weights verify: config.json a FIFO": (lambda t, v: ((t / "c").mkdir(), _fifo(t / "c" / "config.json")),
                                           ["weights", "verify", "{t}/c"], "config.json"),
    "reconstruct: pose.json a FIFO": (_views_with(lambda f: ((f / "pose.json").unlink(), _fifo(f / "pose.json"))),
                                      ["reconstruct", "{t}/v", "-o", "{t}/m.ply", "--preset", "tiny"], "pose"),
    "reconstruct: pose.json deep": (_views_with(lambda f: (f / "pose.json").write_text(DEEP)),
                                    ["reconstruct", "{t}/v", "-o", "{t}/m.ply", "--preset", "tiny"], "pose"),
    "reconstruct: --checkpoint a FIFO": (lambda t, v: _fifo(t / "c.pth"),
                                         ["reconstruct", "{v}", "-o", "{t}/m.ply", "--checkpoint", "{t}/c.pth"],
                                         "FIFO"),
    "reconstruct: views a file": (lambda t, v: (t / "v").write_bytes(b"x"), ["reconstruct", "{t}/v", "-o",
                                                                          "{t}/m.ply"], "not a folder"),
    "remesh: meta.json deep": (_run_with(lambda p: p.write_text(DEEP)), ["remesh", "{t}/run", "-o", "{t}/m.glb"],
                               "nested too deeply"),
    "remesh: meta.json a FIFO": (_run_with(_fifo), ["remesh", "{t}/run", "-o", "{t}/m.glb"], "not a regular file"),
    "remesh: meta.json a folder": (_run_with(lambda p: p.mkdir()), ["remesh", "{t}/run", "-o", "{t}/m.glb"],
                                   "not a regular file"),
    "remesh: run missing": (_nothing, ["remesh", "{t}/run", "-o", "{t}/m.glb"], "does not exist"),
    "sample-views: onto a file": (lambda t, v: (t / "f").write_bytes(b"x"), ["sample-views", "{t}/f"],
                                  "not a folder"),
}


def assert_one_line_refusal(code: int, err: str, command: str, needle: str) -> None:
    """Exit 1 or 2, no traceback, and one line of message (``one2345 CMD: error: …``), perhaps with its fix line."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code in (1, 2), f"exit {code}:\n{err}"
    assert "Traceback" not in err and lines, err
    assert lines[0].startswith(f"one2345 {command}: error: ") and needle in lines[0], err
    assert len(lines) <= 2 and all(line.startswith("  fix: ") for line in lines[1:]), err


@pytest.mark.parametrize("case", sorted(SUBPROCESS_CASES))
def test_the_installed_command_answers_every_bad_input_in_one_line(case, views, tmp_path):
    make, argv, needle = SUBPROCESS_CASES[case]
    make(tmp_path, views)
    argv = [a.format(t=tmp_path, v=views) for a in argv]
    # A FIFO opened for reading waits for a writer for ever: the timeout is the hang check.
    done = subprocess.run([sys.executable, "-m", "server.service.cli", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=240)
    assert_one_line_refusal(done.returncode, done.stderr, argv[0], needle)
