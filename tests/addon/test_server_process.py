"""Server process lifecycle against a stand-in server program (tests/addon/fake_server.py): start, ready line,
reuse, restart once after death, start-up failures quoted from the log, stale servers, stop; version notes; slots
for several Blenders; and the Windows code paths (liveness, termination, argument splitting) run here by injecting
the platform and the kernel32 calls."""

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

from one2345_addon import build, build_rules
from one2345_addon.build import write_wheel
from one2345_addon.core import platform_compat, server_process, server_slots, setup_env
from one2345_addon.core.client import Client, ServerError
from one2345_addon.core.server_process import LaunchSettings, ServerManager, check_python, pid_alive, split_args

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
    assert Client(first.url).health()["version"] == server_process.addon_version() == first.server_version
    assert Client(first.url, first.token).jobs() == []  # the token reached the server through ONE2345_TOKEN
    record = json.loads(manager.pid_file.read_text())
    assert record["pid"] == first.pid == manager.process.pid and record["url"] == first.url
    assert record["owner_pid"] == os.getpid() and record["owner_id"] == manager.id and manager.slot == 1
    assert record["owner_start"] and record["server_start"] == platform_compat.process_start_time(first.pid)
    assert first.jobs_dir == str(manager.jobs_dir) == str(manager.state_dir / "server-jobs")
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
        assert server_slots.stop_stale_server(pid_file) is None
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
    # PyTorch comes from a local folder (a stand-in wheel), so nothing is downloaded; the package step then fails
    wheels = tmp_path / "wheels"
    write_wheel(wheels, "torch", "2.1.0", {"torch/__init__.py": b"__version__ = '2.1.0'\n"})
    local = setup_env.TorchChoice("cpu", None, "test: a local stand-in for PyTorch")
    lines = []
    with pytest.raises(ServerError) as caught:
        server_process.setup_environment(tmp_path / "env", sys.executable, f"--no-index {tmp_path / 'missing-pkg'}",
                                         tmp_path / "logs" / "setup.log", progress=lambda line, n: lines.append(n),
                                         torch=local, pip_options=("--no-index", "--find-links", str(wheels)))
    assert caught.value.kind == "setup_failed" and "pip install" in caught.value.message
    assert "install the server and its dependencies" in caught.value.message
    log = (tmp_path / "logs" / "setup.log").read_text()
    assert "-m venv" in log and "missing-pkg" in log and "missing-pkg" in caught.value.message  # quoted log tail
    assert "Successfully installed torch-2.1.0" in log  # the PyTorch step ran first, from the given index
    assert (tmp_path / "env" / "bin" / "python").exists() and lines == list(range(1, len(lines) + 1))


# -- versions ---------------------------------------------------------------------------------------------------------

def test_version_mismatch_is_reported_with_the_fix(fake_python, manager, monkeypatch):
    monkeypatch.setenv("FAKE_SERVER_VERSION", "9.9.9")
    connection = manager.ensure(settings(fake_python, manager.state_dir))
    addon = server_process.addon_version()
    assert addon and addon != "9.9.9" and connection.server_version == "9.9.9"
    for text in (connection.note, server_process.describe_health(connection)):
        assert "9.9.9" in text and addon in text and "run Set Up Server Environment again" in text
    assert manager.ensure(settings(fake_python, manager.state_dir)).note is None  # said once, at start


def test_addon_version_reads_the_manifest_next_to_the_package_or_the_repo(tmp_path):
    assert server_process.addon_version() == build.check_versions(
        build_rules.load_toml(build.MANIFEST), build_rules.load_toml(build.PYPROJECT), build.server_version())
    installed = tmp_path / "one2345"
    installed.mkdir()
    (installed / "blender_manifest.toml").write_text('schema_version = "1.0.0"\nid = "one2345"\nversion = "2.3.4"\n'
                                                     '[build]\nversion = "not this one"\n')
    assert server_process.addon_version(installed) == "2.3.4"
    assert server_process.version_note("2.3.4", "2.3.4") is None and server_process.version_note(None, "1") is None


# -- several Blenders: slots -----------------------------------------------------------------------------------------

def test_a_live_owner_in_another_process_keeps_its_server_and_a_dead_ones_is_cleaned_up(fake_python, tmp_path):
    state = tmp_path / "user"
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # "another Blender"
    theirs = ServerManager(state)
    mine = third = None
    try:
        their_connection = theirs.ensure(settings(fake_python, state))
        record = json.loads(theirs.pid_file.read_text())
        record.update(owner_pid=owner.pid, owner_start=platform_compat.process_start_time(owner.pid), owner_id="x")
        server_slots.write_record(theirs.pid_file, record)  # slot 1 now belongs to the other process

        mine = ServerManager(state)
        connection = mine.ensure(settings(fake_python, state))
        assert mine.slot == 2 and connection.jobs_dir == str(state / "server-jobs-2") != their_connection.jobs_dir
        assert "Another Blender session" in connection.note and "server-jobs-2" in connection.note
        assert pid_alive(their_connection.pid) and mine.log_path.name == "server-2.log"
        assert json.loads((state / "server-2.pid.json").read_text())["owner_id"] == mine.id
        mine.stop()
        assert not (state / "server-2.pid.json").exists() and pid_alive(their_connection.pid)

        owner.kill()  # the other Blender crashes; its server keeps running
        owner.wait()
        assert pid_alive(their_connection.pid)
        third = ServerManager(state)
        again = third.ensure(settings(fake_python, state))
        theirs.process.wait(timeout=5)
        assert third.slot == 1 and again.jobs_dir == str(state / "server-jobs")  # the folder (history) is reused
        assert f"(pid {their_connection.pid})" in again.note and not pid_alive(their_connection.pid)
    finally:
        owner.kill()
        owner.wait()
        for m in (third, mine, theirs):
            if m is not None:
                m.stop()


def test_a_reused_pid_in_a_stale_record_is_not_killed(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pid_file = tmp_path / "server.pid.json"
        # the recorded server had this pid but started at another time: the pid now belongs to someone else
        server_slots.write_record(pid_file, {"owner_pid": 999_999_999, "pid": sleeper.pid, "server_start": "proc:1"})
        assert server_slots.stop_stale_server(pid_file) is None
        assert sleeper.poll() is None and not pid_file.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_claim_lock_left_by_a_dead_process_is_broken(fake_python, tmp_path):
    state = tmp_path / "user"
    state.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (state / ".slots.lock").write_text(json.dumps({"pid": int(dead.stdout), "start": None}))
    manager = ServerManager(state)
    try:
        start = time.monotonic()
        manager.ensure(settings(fake_python, state))
        assert time.monotonic() - start < 10 and not (state / ".slots.lock").exists()
    finally:
        manager.stop()


# -- Windows code paths, run on this machine by injecting the platform and the kernel32 calls ------------------------

class FakeKernel32:
    """kernel32 stand-in: processes by pid with an exit code (259 = STILL_ACTIVE) and a creation time."""

    def __init__(self, processes: dict[int, dict]) -> None:
        self.processes = processes
        self.open_handles: dict[int, int] = {}
        self.error = 0
        self.calls: list[tuple] = []

    def OpenProcess(self, access, inherit, pid):
        self.calls.append(("OpenProcess", access, pid))
        process = self.processes.get(pid)
        if process is None or process.get("denied"):
            self.error = 5 if process is not None else 87
            return 0
        handle = 4000 + len(self.calls)
        self.open_handles[handle] = pid
        return handle

    def GetExitCodeProcess(self, handle, code_ref):
        code_ref._obj.value = self.processes[self.open_handles[handle]]["exit"]
        return 1

    def GetProcessTimes(self, handle, created, exited, kernel, user):
        ticks = self.processes[self.open_handles[handle]]["created"]
        created._obj.low, created._obj.high = ticks & 0xFFFFFFFF, ticks >> 32
        return 1

    def TerminateProcess(self, handle, code):
        process = self.processes[self.open_handles[handle]]
        self.calls.append(("TerminateProcess", self.open_handles[handle]))
        if process.get("protected"):
            return 0
        process["exit"] = code
        return 1

    def CloseHandle(self, handle):
        del self.open_handles[handle]
        return 1


def test_windows_liveness_uses_openprocess_and_the_exit_code():
    fake = FakeKernel32({10: {"exit": 259, "created": 133_000_000_000_000_001}, 11: {"exit": 0, "created": 5},
                         12: {"denied": True}})
    api = platform_compat.Kernel32(fake, lambda: fake.error)
    assert platform_compat.pid_alive(10, "win32", api)
    assert not platform_compat.pid_alive(11, "win32", api)  # exited: exit code no longer STILL_ACTIVE
    assert platform_compat.pid_alive(12, "win32", api)  # another user's process: exists, access denied
    assert not platform_compat.pid_alive(13, "win32", api)  # no such process (ERROR_INVALID_PARAMETER)
    assert platform_compat.process_start_time(10, "win32", api) == "133000000000000001"
    assert platform_compat.same_process(10, "133000000000000001", "win32", api)
    assert not platform_compat.same_process(10, "42", "win32", api)  # the pid was reused by a newer process
    assert not fake.open_handles  # every handle closed
    assert all(c[1] == platform_compat.PROCESS_QUERY_LIMITED_INFORMATION for c in fake.calls)


def test_windows_termination_uses_terminateprocess_then_taskkill():
    fake = FakeKernel32({20: {"exit": 259, "created": 1}, 21: {"exit": 259, "created": 2, "protected": True}})
    api = platform_compat.Kernel32(fake, lambda: fake.error)
    platform_compat.terminate_pid(20, timeout=1, platform="win32", api=api)
    assert fake.processes[20]["exit"] != 259 and ("TerminateProcess", 20) in fake.calls
    commands = []

    def taskkill(cmd, **kwargs):
        commands.append((cmd, kwargs))
        fake.processes[21]["exit"] = 1
        return subprocess.CompletedProcess(cmd, 0)

    platform_compat.terminate_pid(21, timeout=1, platform="win32", api=api, run=taskkill)
    assert commands[0][0] == ["taskkill", "/PID", "21", "/T", "/F"]
    assert commands[0][1]["creationflags"] == platform_compat.CREATE_NO_WINDOW
    assert not platform_compat.pid_alive(21, "win32", api) and not fake.open_handles


@pytest.mark.parametrize("args", [
    [r"C:\Users\me\weights", "--max-queue", "4"],
    [r"C:\Program Files\One2345\w", r"\\server\share\dir" + "\\"],
    ['say "hi"', "", "tab\there", r"a\\\"b", "trailing\\"],
])
def test_windows_argument_splitting_reads_back_what_windows_programs_receive(args):
    line = subprocess.list2cmdline(args)  # how Python passes a list to a Windows program
    assert split_args(line, "win32") == args


def test_windows_splitting_keeps_backslashes_that_posix_rules_eat():
    text = r'--weights-dir C:\Users\me\w --jobs-dir "D:\my jobs\"'
    assert split_args(text, "win32") == ["--weights-dir", r"C:\Users\me\w", "--jobs-dir", 'D:\\my jobs"']
    assert split_args(r'--weights-dir "D:\my jobs\\"', "win32") == ["--weights-dir", "D:\\my jobs\\"]
    assert split_args(r"--weights-dir C:\Users\me\w", "linux") == ["--weights-dir", "C:Usersmew"]
    assert split_args('--weights-dir "/a b" --max-queue 2', "linux") == ["--weights-dir", "/a b", "--max-queue", "2"]
    assert split_args('say "a ""quoted"" word"', "win32") == ["say", 'a "quoted" word']
    with pytest.raises(ServerError) as caught:
        split_args('--weights-dir "/a b', "linux")
    assert caught.value.kind == "server_not_configured" and "/a b" in caught.value.message


def test_popen_flags_detach_the_server_per_platform():
    assert platform_compat.popen_isolation("linux") == {"start_new_session": True}
    flags = platform_compat.popen_isolation("win32")["creationflags"]
    assert flags & platform_compat.CREATE_NEW_PROCESS_GROUP and flags & platform_compat.CREATE_NO_WINDOW
    assert platform_compat.join_args(["a b", "c"], "win32") == '"a b" c'
    assert platform_compat.join_args(["a b", "c"], "linux") == "'a b' c"


def test_low_vram_and_the_weights_folder_reach_the_server_command(fake_python: Path, tmp_path: Path):
    settings = LaunchSettings(python=str(fake_python), state_dir=tmp_path, preset="paper", device="cuda",
                              weights_dir=str(tmp_path / "w"), low_vram=True, extra_args=("--max-queue", "4"))
    cmd = server_process.server_command(settings, tmp_path / "jobs")
    assert cmd[cmd.index("--weights-dir") + 1] == str(tmp_path / "w")
    assert cmd[-3:] == ["--low-vram", "--max-queue", "4"]  # the user's extra arguments come last
    assert "--low-vram" not in server_process.server_command(replace(settings, low_vram=False), tmp_path / "jobs")


def test_the_server_is_told_to_watch_this_blender(fake_python: Path, tmp_path: Path, manager):
    """#31 finding 9: the launch passes Blender's own pid, so a killed Blender's server stops by itself (the real
    round trip, SIGKILL of a bpy process, is tests/addon/test_first_use.py)."""
    cmd = server_process.server_command(settings(fake_python, tmp_path), tmp_path / "jobs")
    assert cmd[cmd.index("--owner-pid") + 1] == str(os.getpid())
    manager.ensure(settings(fake_python, manager.state_dir))
    assert f"--owner-pid {os.getpid()}" in manager.log_path.read_text()  # the logged command line


def test_a_server_too_old_for_the_owner_flag_says_to_set_up_again(fake_python, manager, monkeypatch):
    monkeypatch.setenv("FAKE_SERVER_MODE", "old")
    with pytest.raises(ServerError) as caught:
        manager.ensure(settings(fake_python, manager.state_dir))
    assert caught.value.kind == "server_start_failed" and "unrecognized arguments: --owner-pid" in caught.value.message
    assert "older than this add-on" in caught.value.fix and "Set Up Server Environment" in caught.value.fix
