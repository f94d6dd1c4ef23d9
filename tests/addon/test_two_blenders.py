"""Several Blenders on one machine (issue #10 item 5), with real processes: two bpy Pythons (4.2 and 5.0) started at
the same moment share one user folder and each get a live server with its own jobs folder; neither stops the other's;
a third session (a headless batch) comes and goes without touching them; a Blender killed with SIGKILL leaves its
server running, and the next session stops that stale server and reuses its slot and jobs folder. (The stand-in
server ignores ``--owner-pid``, as a server from before that flag does; the real server stops by itself when its
Blender dies: ``test_first_use.py``.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from one2345_addon.core.platform_compat import pid_alive

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
DRIVER = HERE / "two_blenders_driver.py"
FAKE = HERE / "fake_server.py"
PYTHONS = {v: REPO_ROOT / f".venv-bpy{v.replace('.', '')}" / "bin" / "python" for v in ("4.2", "5.0")}


@pytest.fixture
def fake_python(tmp_path: Path) -> Path:
    """A server environment's Python standing in for the real one: ``<it> -m server serve …`` runs the fake."""
    path = tmp_path / "env" / "bin" / "python"
    path.parent.mkdir(parents=True)
    path.write_text(f'#!/bin/sh\nshift 2\nexec "{sys.executable}" "{FAKE}" -m server "$@"\n')
    path.chmod(0o755)
    return path


class Blender:
    """One driver process and its event lines."""

    def __init__(self, version: str, config: dict) -> None:
        python = PYTHONS[version]
        if not python.is_file():
            pytest.fail(f"bpy {version} environment missing ({python}); run .ci/blender-envs")
        self.proc = subprocess.Popen([str(python), str(DRIVER), json.dumps(config)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)

    def event(self, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        line = self.proc.stdout.readline()  # the driver answers every command; a dead one gives ''
        if not line:
            raise AssertionError(f"driver ended (code {self.proc.poll()}): {self.proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "driver too slow"
        return json.loads(line)

    def command(self, text: str) -> dict:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self.event()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def test_two_blenders_keep_their_servers_and_a_crashed_ones_is_cleaned_up(tmp_path, fake_python):
    start = time.monotonic()
    state = tmp_path / "user"
    config = {"python": str(fake_python), "state_dir": str(state)}
    sessions: list[Blender] = []
    try:
        first, second = Blender("4.2", config), Blender("5.0", config)  # started together: the claim lock decides
        sessions += [first, second]
        a, b = first.event(), second.event()
        assert {a["slot"], b["slot"]} == {1, 2}
        if a["slot"] == 2:
            (first, a), (second, b) = (second, b), (first, a)
        assert a["jobs_dir"] == str(state / "server-jobs") and b["jobs_dir"] == str(state / "server-jobs-2")
        assert "Another Blender session" in b["note"] and a["note"] is None
        assert a["server_pid"] != b["server_pid"] and pid_alive(a["server_pid"]) and pid_alive(b["server_pid"])
        for session, seen in ((first, a), (second, b)):
            again = session.command("ensure")
            assert again["server_pid"] == seen["server_pid"] and again["note"] is None  # nobody restarted anything
            assert session.command("jobs")["jobs"] == []  # its own token works on its own server
            record = json.loads(Path(seen["record"]).read_text())
            assert record["owner_pid"] == seen["pid"] and record["pid"] == seen["server_pid"]

        batch = Blender("4.2", config)  # a headless `blender -b -c one2345 generate` meanwhile
        sessions.append(batch)
        c = batch.event()
        assert c["slot"] == 3 and c["jobs_dir"] == str(state / "server-jobs-3")
        assert batch.command("exit")["event"] == "stopped"
        batch.proc.wait(timeout=10)
        assert not pid_alive(c["server_pid"]) and not Path(c["record"]).exists()
        assert pid_alive(a["server_pid"]) and pid_alive(b["server_pid"])

        os.kill(first.proc.pid, signal.SIGKILL)  # the first Blender crashes; its server keeps running
        first.proc.wait(timeout=10)
        time.sleep(0.2)
        assert pid_alive(a["server_pid"]) and Path(a["record"]).exists()

        after = Blender("5.0", config)  # the next session
        sessions.append(after)
        d = after.event()
        assert d["slot"] == 1 and d["jobs_dir"] == a["jobs_dir"]  # the history folder is reused
        assert f"(pid {a['server_pid']})" in d["note"] and "earlier Blender session" in d["note"]
        deadline = time.monotonic() + 5
        while pid_alive(a["server_pid"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(a["server_pid"]) and pid_alive(b["server_pid"]) and pid_alive(d["server_pid"])
        assert json.loads(Path(d["record"]).read_text())["owner_pid"] == d["pid"]

        for session, seen in ((second, b), (after, d)):
            assert session.command("exit")["event"] == "stopped"
            session.proc.wait(timeout=10)
            assert not pid_alive(seen["server_pid"]) and not Path(seen["record"]).exists()
        assert not list(state.glob("server*.pid.json")) and not (state / ".slots.lock").exists()
    finally:
        for session in sessions:
            session.close()
    assert time.monotonic() - start < 60
