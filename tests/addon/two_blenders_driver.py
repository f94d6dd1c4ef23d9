"""One "Blender" for tests/addon/test_two_blenders.py: a bpy wheel's Python that imports bpy, then drives the
add-on's server manager from the source folder the way the add-on does (``server_process.manager(user folder)``).

Usage: ``<bpy python> two_blenders_driver.py CONFIG_JSON``; prints one JSON line per event on stdout and reads
commands from stdin: ``ensure`` (again), ``jobs`` (an authenticated request), ``exit`` (shut down like disabling the
add-on). Killing the process with SIGKILL stands in for a crashed Blender. Config: ``python`` (the server
environment's, or a stand-in), ``state_dir`` (the user folder), optionally ``startup_timeout`` (seconds; a real
server on a loaded machine needs more than the stand-in's 30).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import bpy  # noqa: F401 - a real Blender Python process, as the add-on runs in

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from one2345_addon.core import server_process  # after the path to the source folder


def say(event: str, **fields) -> None:
    print(json.dumps({"event": event, "pid": os.getpid(), **fields}), flush=True)


def main() -> int:
    config = json.loads(sys.argv[1])
    settings = server_process.LaunchSettings(python=config["python"], state_dir=Path(config["state_dir"]),
                                             preset="tiny", device="cpu",
                                             startup_timeout=float(config.get("startup_timeout", 30.0)))
    manager = server_process.manager(settings.state_dir)

    def ensure() -> None:
        connection = manager.ensure(settings)
        say("ensured", server_pid=connection.pid, jobs_dir=connection.jobs_dir, url=connection.url,
            note=connection.note, slot=manager.slot, record=str(manager.pid_file), log=str(manager.log_path))

    ensure()
    for line in sys.stdin:
        command = line.strip()
        if command == "ensure":
            ensure()
        elif command == "jobs":
            connection = manager.ensure(settings)
            say("jobs", jobs=connection.client().jobs(), server_pid=connection.pid)
        elif command == "exit":
            break
    server_process.shutdown()
    say("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
