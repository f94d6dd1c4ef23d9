"""``one2345 serve --owner-pid PID`` (issue #31, finding 9): a server started by the add-on stops by itself, cleanly,
within seconds of its owner's death; a pid that is not running is refused at start.

The owner here is a plain Python process killed with SIGKILL (as a crash or a batch timeout kills Blender); the
add-on's own test kills a real Blender.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime

import pytest

from server.service.serve import process_alive, watch_owner
from tests.server.test_serve_process import REPO, SLOW, finished, start_server, stop, submit, wait_for


def owner_process() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def test_process_alive_sees_a_killed_process_even_before_it_is_reaped():
    owner = owner_process()
    try:
        assert process_alive(owner.pid) and process_alive(os.getpid())
        owner.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 5
        while process_alive(owner.pid):  # not reaped yet: a zombie counts as gone
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        owner.kill()
        owner.wait()
    assert not process_alive(owner.pid)


def test_the_watchdog_calls_stop_once_the_owner_is_gone_and_not_before():
    owner = owner_process()
    stopped = threading.Event()
    try:
        thread = watch_owner(owner.pid, stopped.set, stopped.is_set, poll_s=0.05)
        time.sleep(0.5)
        assert not stopped.is_set() and thread.is_alive()
        owner.kill()
        start = time.monotonic()
        assert stopped.wait(5)
        assert time.monotonic() - start < 1.0
        thread.join(2)
        assert not thread.is_alive()
    finally:
        owner.kill()
        owner.wait()


def test_a_server_stops_cleanly_when_its_owner_is_killed(tmp_path):
    owner = owner_process()
    server = start_server(tmp_path / "jobs", tmp_path / "server.log", "--owner-pid", str(owner.pid))
    try:
        job_id = submit(server, SLOW).json()["id"]
        wait_for(server, job_id, lambda s: finished(s) or (s["stage"] == "stage1" and s["step"] >= 1))
        owner.send_signal(signal.SIGKILL)
        killed, killed_wall = time.monotonic(), time.time()
        code = server.proc.wait(60)
        took = time.monotonic() - killed
        log = server.stderr.read_text()
        assert code == 0, log[-3000:]
        (line,) = [line for line in log.splitlines() if f"the owner process {owner.pid} is gone" in line]
        noticed = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp() - killed_wall
        print(f"\nthe owner's death was noticed after {noticed:.2f} s; the server exited after {took:.1f} s")
        assert noticed < 2.5, noticed  # OWNER_POLL_S, plus a busy machine's delays
        assert "Traceback" not in log[log.index(line):], log[log.index(line):]
        assert took < 45, took  # the rest is the running job's cancellation and the interpreter's exit
        record = json.loads((tmp_path / "jobs" / job_id / "status.json").read_text())
        assert record["state"] == "cancelled" and "server was stopped" in record["error"]["message"]
    finally:
        owner.kill()
        owner.wait()
        if server.proc.poll() is None:
            stop(server)


def test_a_server_started_by_hand_ignores_other_deaths_and_a_dead_owner_is_refused(tmp_path):
    # Without the flag nothing is watched: another process dying changes nothing.
    bystander = owner_process()
    server = start_server(tmp_path / "jobs", tmp_path / "server.log")
    try:
        bystander.kill()
        bystander.wait()
        time.sleep(1.5)
        assert server.proc.poll() is None and server.client.get("/v1/health").status_code == 200
    finally:
        assert stop(server) == 0
    run = subprocess.run([sys.executable, "-m", "server.service.serve", "--preset", "tiny", "--device", "cpu",
                          "--jobs-dir", str(tmp_path / "jobs"), "--owner-pid", str(bystander.pid)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stdout == ""
    assert f"--owner-pid {bystander.pid}: no process with that id is running" in run.stderr


@pytest.mark.parametrize("pid", ["0", "-5"])
def test_owner_pids_that_are_no_process_are_refused(tmp_path, pid):
    run = subprocess.run([sys.executable, "-m", "server.service.serve", "--jobs-dir", str(tmp_path / "jobs"),
                          "--owner-pid", pid], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--owner-pid" in run.stderr
