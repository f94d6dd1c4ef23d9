"""Server process lifecycle against a stand-in server program (tests/addon/fake_server.py): start, ready line,
reuse, restart once after death, start-up failures quoted from the log, stale servers, stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from one2345_addon import server_process
from one2345_addon.client import Client, ServerError
from one2345_addon.server_process import LaunchSettings, ServerManager, check_python, pid_alive

FAKE = Path(__file__).with_name("fake_server.py")


@pytest.fixture
def fake_python(tmp_path: Path) -> Path:
    """An executable standing in for a server environment's Python: `<it> -m server serve …` runs the fake."""
    path = tmp_path / "bin" / "python"
    path.parent.mkdir()
    path.write_text(f'#!/bin/sh\nshift 2\nexec "{sys.executable}" "{FAKE}" -m server "$@"\n')
    path.chmod(0o755)
    return path


@pytest.fixture
def manager(tmp_path: Path):
    manager = ServerManager(tmp_path / "user")
    yield manager
    manager.stop()


def settings(python: Path, state_dir: Path, **kwargs) -> LaunchSettings:
    return LaunchSettings(python=str(python), state_dir=state_dir, preset="tiny", device="cpu",
                          startup_timeout=20.0, **kwargs)


def test_check_python_explains_each_problem(tmp_path):
    with pytest.raises(ServerError) as empty:
        check_python("  ")
    with pytest.raises(ServerError) as own:
        check_python(sys.executable)  # inside Blender this is Blender's own interpreter
    with pytest.raises(ServerError) as missing:
        check_python(str(tmp_path / "nope" / "python"))
    assert empty.value.kind == own.value.kind == "server_not_configured"
    assert "Blender's own Python" in own.value.message
    assert missing.value.kind == "server_python_missing" and "nope/python" in missing.value.message


def test_start_ready_reuse_and_stop(fake_python, manager):
    launch = settings(fake_python, manager.state_dir, weights_dir="/w", extra_args=("--max-queue", "2"))
    first = manager.ensure(launch)
    assert first.local and first.note is None and first.url.startswith("http://127.0.0.1:")
    assert Client(first.url).health()["version"] == "0.0-fake"
    assert Client(first.url, first.token).jobs() == []  # the token reached the server through ONE2345_TOKEN
    record = json.loads(manager.pid_file.read_text())
    assert record["pid"] == first.pid == manager.process.pid and record["url"] == first.url
    cmdline = Path(f"/proc/{first.pid}/cmdline").read_bytes().split(b"\0")
    for flag in (b"--port", b"0", b"--preset", b"tiny", b"--device", b"cpu", b"--weights-dir", b"/w",
                 b"--max-queue", b"2", b"--jobs-dir", str(manager.jobs_dir).encode()):
        assert flag in cmdline
    again = manager.ensure(launch)
    assert again.pid == first.pid and again.note is None  # reused, not restarted
    changed = manager.ensure(replace(launch, device="cuda"))
    assert changed.pid != first.pid and "changed preferences" in changed.note
    assert not pid_alive(first.pid)
    manager.stop()
    assert not pid_alive(changed.pid) and not manager.pid_file.exists() and not manager.running()


def test_dead_server_is_restarted_once_and_said_so(fake_python, manager):
    launch = settings(fake_python, manager.state_dir)
    first = manager.ensure(launch)
    os.kill(first.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while manager.exit_code() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert manager.exit_code() == -signal.SIGKILL
    second = manager.ensure(launch)
    assert second.pid != first.pid and "had stopped (exit code -9)" in second.note
    assert manager.ensure(launch).note is None


def test_server_that_exits_during_start_up_quotes_its_log(fake_python, manager, monkeypatch):
    monkeypatch.setenv("FAKE_SERVER_MODE", "crash")
    with pytest.raises(ServerError) as caught:
        manager.ensure(settings(fake_python, manager.state_dir))
    assert caught.value.kind == "server_start_failed" and "exit code 1" in caught.value.message
    assert "No module named 'server'" in caught.value.message and "Set Up Server Environment" in caught.value.fix
    assert not manager.running() and not manager.pid_file.exists()


def test_server_that_never_reports_ready_times_out_and_is_killed(fake_python, manager, monkeypatch):
    monkeypatch.setenv("FAKE_SERVER_MODE", "silent")
    start = time.monotonic()
    with pytest.raises(ServerError) as caught:
        manager.ensure(replace(settings(fake_python, manager.state_dir), startup_timeout=1.5))
    assert time.monotonic() - start < 10
    assert caught.value.kind == "server_start_failed" and "within 2 s" in caught.value.message
    assert "fake server starting" in caught.value.message  # the log tail
    assert not manager.running()


def test_stale_server_of_a_crashed_session_is_stopped(fake_python, tmp_path):
    crashed = ServerManager(tmp_path / "user")  # never stopped: its Blender "crashed"
    old = crashed.ensure(settings(fake_python, crashed.state_dir))
    fresh = ServerManager(tmp_path / "user")
    try:
        new = fresh.ensure(settings(fake_python, fresh.state_dir))
        crashed.process.wait(timeout=5)
        assert f"(pid {old.pid})" in new.note and not pid_alive(old.pid) and new.pid != old.pid
        assert json.loads(fresh.pid_file.read_text())["pid"] == new.pid
    finally:
        fresh.stop()
        crashed.stop()


def test_unrelated_process_in_a_stale_pid_file_is_left_alone(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pid_file = tmp_path / "server.pid.json"
        pid_file.write_text(json.dumps({"pid": sleeper.pid, "url": "http://127.0.0.1:9"}))
        assert server_process.stop_stale_server(pid_file) is None
        assert sleeper.poll() is None and not pid_file.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_diagnose_python_names_missing_modules(tmp_path):
    bare = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    with pytest.raises(ServerError) as caught:
        server_process.diagnose_python(str(bare / "bin" / "python"))
    assert caught.value.kind == "server_start_failed"
    for module in ("server", "torch", "fastapi", "uvicorn"):
        assert f"{module} (ModuleNotFoundError" in caught.value.message


def test_setup_environment_logs_and_reports_a_failed_install(tmp_path):
    lines = []
    with pytest.raises(ServerError) as caught:
        server_process.setup_environment(tmp_path / "env", sys.executable, f"--no-index {tmp_path / 'missing-pkg'}",
                                         tmp_path / "logs" / "setup.log", progress=lambda line, n: lines.append(n))
    assert caught.value.kind == "setup_failed" and "pip install" in caught.value.message
    log = (tmp_path / "logs" / "setup.log").read_text()
    assert "-m venv" in log and "missing-pkg" in log and "missing-pkg" in caught.value.message  # quoted log tail
    assert (tmp_path / "env" / "bin" / "python").exists() and lines == list(range(1, len(lines) + 1))
