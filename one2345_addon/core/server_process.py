"""Starting, reusing, restarting and stopping the local One2345 server process (standard library only).

Lifecycle decisions:

* The server is started on first use with the Python interpreter from the preferences (a virtual environment with the
  server installed; never Blender's own), on ``127.0.0.1`` and a free port, with a random bearer token passed through
  ``ONE2345_TOKEN``. It prints one JSON "ready" line on stdout; stderr (its log) goes to ``logs/server.log`` in the
  extension's user folder.
* It is reused while alive and its launch settings are unchanged. When it has died, :meth:`ServerManager.ensure`
  starts it again once and says so in :attr:`Connection.note`; a second failure is reported, not retried.
* Several Blenders (or a ``blender -b -c one2345 generate`` batch) on one machine share the user folder. Each live
  session owns one *slot* (its record file, jobs folder and log; see :mod:`server_slots`); a slot left by a crashed
  Blender is cleaned up and reused, so a single-Blender user always gets ``server-jobs`` and its history.
* The add-on's version (its manifest) and the server's (the ready line, ``/v1/health``) are compared; a mismatch is
  reported with the fix: run "Set Up Server Environment" again.
* :meth:`ServerManager.stop` runs on add-on disable and at interpreter exit (``atexit``). A Blender that is killed
  runs neither, so the server is started with ``--owner-pid`` (Blender's pid) and stops by itself within seconds of
  Blender's death; the slot clean-up above remains for servers that predate that flag.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

from . import platform_compat, setup_env
from .client import Client, ServerError
from .server_slots import (
    MAX_SLOTS,
    ClaimLock,
    owner_alive,
    read_record,
    slot_paths,
    stop_recorded_server,
    write_record,
)

LOG_TAIL_LINES = 15


@dataclass(frozen=True)
class LaunchSettings:
    """How to start the server; a snapshot of the preferences taken on Blender's main thread."""

    python: str
    """Path of the server environment's Python interpreter."""
    state_dir: Path
    """The extension's user folder: log, pid file and the server's jobs folder live here."""
    preset: str = "paper"
    """``paper`` (the real models) or ``tiny`` (small random models, for tests)."""
    device: str = "auto"
    """``auto``, ``cpu`` or ``cuda``."""
    weights_dir: str = ""
    """Folder with the model weights; empty for the server's default."""
    extra_args: tuple[str, ...] = ()
    """Further ``serve`` flags from the advanced preferences."""
    startup_timeout: float = 180.0
    """Seconds to wait for the ready line (loading models on a slow disk takes a while)."""
    offline: bool = True
    """Blender's online access is off: the server must not download anything (``HF_HUB_OFFLINE=1``)."""
    low_vram: bool = False
    """``serve --low-vram``: only the model in use sits on the GPU (for GPUs with little memory)."""


@dataclass(frozen=True)
class Connection:
    """A server the add-on can talk to."""

    url: str
    """Base URL, e.g. ``http://127.0.0.1:8123``."""
    token: str | None
    """Bearer token for every request except ``/v1/health``."""
    local: bool = True
    """True when this add-on started (and owns) the process."""
    pid: int | None = None
    """The server's process id (local servers)."""
    jobs_dir: str | None = None
    """The server's jobs folder from its ready line (local servers)."""
    note: str | None = None
    """Something the user should be told, e.g. that a dead server was restarted."""
    server_version: str | None = None
    """The server's version from its ready line (local servers)."""

    def client(self, timeout: float = 30.0) -> Client:
        """A :class:`Client` for this connection."""
        return Client(self.url, self.token, timeout=timeout)


# -- 1. versions ----------------------------------------------------------------------------------------------------

_VERSION_LINE = re.compile(r'^version\s*=\s*"([^"]+)"', re.MULTILINE)


def addon_version(package_dir: Path | None = None) -> str | None:
    """The add-on's version: ``blender_manifest.toml`` next to ``__init__.py`` (the installed extension) or, in a
    source checkout, the repository's; None when neither can be read."""
    here = package_dir or Path(__file__).resolve().parent.parent  # the add-on's folder, above core/
    for manifest in (here / "blender_manifest.toml", here.parent / "blender_manifest.toml"):
        with contextlib.suppress(OSError):
            text = manifest.read_text(encoding="utf-8")
            # `version` is a top-level key, so it comes before the first [table]
            found = _VERSION_LINE.search(text.split("\n[", 1)[0])
            if found:
                return found.group(1)
    return None


def version_note(server_version: str | None, addon: str | None = None) -> str | None:
    """A sentence when the server's version differs from the add-on's, else None (also when either is unknown)."""
    addon = addon if addon is not None else addon_version()
    if not server_version or not addon or server_version == addon:
        return None
    return (f"The One2345 server is version {server_version} but the add-on is version {addon}: run Set Up Server "
            "Environment again (Preferences > Add-ons > One2345) so they match.")


def _join_notes(*notes: str | None) -> str | None:
    return " ".join(n for n in notes if n) or None


# -- 2. the interpreter and the command line ------------------------------------------------------------------------

def split_args(text: str, platform: str | None = None) -> list[str]:
    """Split "Extra Server Arguments" with the platform's rules (Windows: backslashes kept, as Windows programs
    read their command line; POSIX: shell quoting). See ``platform_compat.split_args``.

    Raises:
        ServerError: ``server_not_configured`` for unbalanced quotes (POSIX).
    """
    return platform_compat.split_args(text, platform)


def check_python(python: str) -> str:
    """Validate the configured server interpreter and return it as an absolute path.

    Raises:
        ServerError: ``server_not_configured`` when empty or Blender's own Python; ``server_python_missing`` when the
            file does not exist or is not executable.
    """
    fix = ("Set 'Server Python' in Preferences > Add-ons > One2345 to the python of a virtual environment with the "
           "server installed, or click 'Set Up Server Environment' there")
    if not python.strip():
        raise ServerError("server_not_configured", "No server Python is configured, so the One2345 server cannot "
                          "start.", fix)
    path = os.path.abspath(os.path.expanduser(python.strip()))
    if os.path.normcase(path) == os.path.normcase(os.path.abspath(sys.executable)):
        raise ServerError("server_not_configured", f"The server Python {path!r} is Blender's own Python; the server "
                          "needs its own environment with PyTorch.", fix)
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise ServerError("server_python_missing", f"The server Python {path!r} does not exist or is not executable.",
                          fix)
    return path


def server_command(settings: LaunchSettings, jobs_dir: Path) -> list[str]:
    """The command line that starts the server: ``<python> -m server serve --port 0 ...``.

    ``--owner-pid`` is this Blender's pid: the server stops by itself within seconds of Blender's death (a crash, a
    kill, a batch's timeout), which no ``atexit`` handler of a killed Blender could do.
    """
    cmd = [check_python(settings.python), "-m", "server", "serve", "--host", "127.0.0.1", "--port", "0",
           "--preset", settings.preset, "--device", settings.device, "--jobs-dir", str(jobs_dir),
           "--owner-pid", str(os.getpid())]
    if settings.weights_dir.strip():
        cmd += ["--weights-dir", os.path.abspath(os.path.expanduser(settings.weights_dir.strip()))]
    if settings.low_vram:
        cmd.append("--low-vram")
    return cmd + list(settings.extra_args)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file ('' if it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# -- 3. processes -----------------------------------------------------------------------------------------------------

def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists and has not exited (the platform's API; see platform_compat)."""
    return platform_compat.pid_alive(pid)


def terminate_pid(pid: int, timeout: float = 5.0) -> None:
    """SIGTERM, wait up to ``timeout`` s, then SIGKILL; TerminateProcess (or ``taskkill /F``) on Windows."""
    platform_compat.terminate_pid(pid, timeout)


class ServerManager:
    """Owns at most one server process for this Blender session. All public methods are thread-safe.

    Args:
        state_dir: the extension's user folder.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.id = uuid.uuid4().hex
        """Tells this manager's records from another manager's in the same process."""
        self._lock = threading.RLock()
        self._slot: int | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._log: IO[bytes] | None = None
        self._settings: LaunchSettings | None = None
        self._connection: Connection | None = None

    @property
    def slot(self) -> int | None:
        """The slot this session holds (1 for the first Blender), or None while it runs no server."""
        return self._slot

    @property
    def pid_file(self) -> Path:
        """The record of this session's slot (slot 1's before any is held)."""
        return slot_paths(self.state_dir, self._slot or 1)[0]

    @property
    def jobs_dir(self) -> Path:
        """The jobs folder of this session's slot (slot 1's before any is held)."""
        return slot_paths(self.state_dir, self._slot or 1)[1]

    @property
    def log_path(self) -> Path:
        """The server log of this session's slot (slot 1's before any is held)."""
        return slot_paths(self.state_dir, self._slot or 1)[2]

    @property
    def process(self) -> subprocess.Popen[str] | None:
        """The server process this session started (alive or not), or None."""
        return self._proc

    def running(self) -> bool:
        """True while a server this session started is alive."""
        proc = self._proc
        return proc is not None and proc.poll() is None

    def exit_code(self) -> int | None:
        """The exit code of a server this session started that has since died; None while alive or never started."""
        proc = self._proc
        return None if proc is None else proc.poll()

    def ensure(self, settings: LaunchSettings) -> Connection:
        """Return a connection to a live server, starting (or restarting once) the process as needed.

        Raises:
            ServerError: ``server_not_configured`` / ``server_python_missing`` (bad interpreter) or
                ``server_start_failed`` (it exited or did not report ready in time; the message quotes the log).
        """
        with self._lock:
            note = None
            if self._proc is not None and self._proc.poll() is None:
                if settings == self._settings and self._connection is not None:
                    return replace(self._connection, note=None)
                self._stop_locked(release=False)
                note = "Restarted the One2345 server with the changed preferences."
            elif self._proc is not None:
                code = self._proc.returncode
                self._stop_locked(release=False)
                note = f"The One2345 server had stopped (exit code {code}); started it again."
            if self._slot is None:
                note = _join_notes(note, self._claim_slot())
            try:
                connection = self._start_locked(settings)
            except BaseException:
                self._release_slot()
                raise
            return replace(connection, note=_join_notes(note, connection.note))

    def stop(self) -> None:
        """Stop the server this session started (no-op when none) and give its slot back."""
        with self._lock:
            self._stop_locked()

    # -- internals -----------------------------------------------------------------------------------------------

    def _owner(self) -> dict[str, Any]:
        return {"owner_pid": os.getpid(), "owner_start": platform_compat.process_start_time(os.getpid()),
                "owner_id": self.id}

    def _claim_slot(self) -> str | None:
        """Clean up stale slots, take the first free one; return a note for the user (or None)."""
        stopped: list[int] = []
        busy: list[int] = []
        with ClaimLock(self.state_dir):
            free = None
            for slot in range(1, MAX_SLOTS + 1):
                path = slot_paths(self.state_dir, slot)[0]
                record = read_record(path)
                if record is None and path.exists() and time.time() - path.stat().st_mtime < 5:
                    busy.append(slot)  # unreadable but fresh: being replaced right now
                    continue
                if record is not None and owner_alive(record, self.id):
                    busy.append(slot)
                    continue
                if record is not None:
                    pid = stop_recorded_server(record)
                    if pid is not None:
                        stopped.append(pid)
                    path.unlink(missing_ok=True)
                elif path.exists():
                    path.unlink(missing_ok=True)
                if free is None:
                    free = slot
            if free is None:
                raise ServerError("server_start_failed", f"{MAX_SLOTS} Blender sessions already run their own One2345 "
                                  f"server from {self.state_dir}.", "Close some of them, or use one remote server")
            self._slot = free
            write_record(slot_paths(self.state_dir, free)[0], {"slot": free, **self._owner(), "pid": None,
                                                                "jobs_dir": str(self.jobs_dir)})
        notes = []
        if stopped:
            notes.append("Stopped a One2345 server left running by an earlier Blender session "
                         f"(pid {', '.join(map(str, stopped))}).")
        if free > 1:
            notes.append(f"Another Blender session runs its own One2345 server; this one keeps its jobs in "
                         f"{self.jobs_dir.name}.")
        return " ".join(notes) or None

    def _release_slot(self) -> None:
        if self._slot is None:
            return
        path = self.pid_file
        record = read_record(path)
        if record is not None and record.get("owner_id") == self.id and record.get("owner_pid") == os.getpid():
            path.unlink(missing_ok=True)
        self._slot = None

    def _start_locked(self, settings: LaunchSettings) -> Connection:
        jobs_dir, log_path, pid_file = self.jobs_dir, self.log_path, self.pid_file
        cmd = server_command(settings, jobs_dir)
        jobs_dir.mkdir(parents=True, exist_ok=True)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")  # noqa: SIM115 - stays open for the process's lifetime
        self._log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
        self._log.flush()
        token = secrets.token_urlsafe(32)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONHOME"}  # Blender's Python must not leak in.
        env.update(ONE2345_TOKEN=token, PYTHONUNBUFFERED="1")
        if settings.offline:
            env["HF_HUB_OFFLINE"] = "1"
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log,
                                    cwd=self.state_dir, env=env, text=True, encoding="utf-8", errors="replace",
                                    **platform_compat.popen_isolation())
        except OSError as exc:
            self._log.close()
            self._log = None
            raise ServerError("server_start_failed", f"Could not run {cmd[0]!r}: {exc.strerror or exc}.",
                              "Check 'Server Python' in the add-on preferences") from exc
        self._proc, self._settings = proc, settings
        record = {"slot": self._slot, **self._owner(), "pid": proc.pid,
                  "server_start": platform_compat.process_start_time(proc.pid), "python": cmd[0],
                  "jobs_dir": str(jobs_dir), "started": time.time()}
        write_record(pid_file, record)  # before the ready line: a crash of this Blender now still leaves a trace
        ready: queue.Queue[dict] = queue.Queue()
        threading.Thread(target=self._pump_stdout, args=(proc, ready), name="one2345-server-stdout",
                         daemon=True).start()
        line = self._wait_ready(proc, ready, settings.startup_timeout)
        url = str(line["url"]).rstrip("/")
        pid = int(line.get("pid") or proc.pid)
        version = str(line["version"]) if line.get("version") else None
        if pid != proc.pid:  # Windows venvs: Scripts\python.exe is a launcher whose child is the server
            record.update(launcher_pid=proc.pid, launcher_start=record["server_start"],
                          server_start=platform_compat.process_start_time(pid))
        record.update(pid=pid, url=url, version=version)
        write_record(pid_file, record)
        self._connection = Connection(url=url, token=token, local=True, pid=pid,
                                      jobs_dir=line.get("jobs_dir") or str(jobs_dir), server_version=version)
        return replace(self._connection, note=version_note(version))

    def _wait_ready(self, proc: subprocess.Popen[str], ready: queue.Queue[dict], timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return ready.get(timeout=0.1)
            except queue.Empty:
                pass
            if proc.poll() is not None and ready.empty():
                time.sleep(0.2)  # let the stdout pump flush the last lines into the log
                code = proc.returncode
                log_path = self.log_path
                self._stop_locked()
                tail = log_tail(log_path)
                raise ServerError("server_start_failed", f"The One2345 server exited during start-up (exit code "
                                  f"{code}). Last lines of its log:\n{tail}", _start_fix(log_path, tail))
        log_path = self.log_path
        self._stop_locked()
        raise ServerError("server_start_failed", f"The One2345 server did not report ready within {timeout:.0f} s. "
                          f"Last lines of its log:\n{log_tail(log_path)}",
                          "Raise the start-up timeout in the add-on preferences, or open the server log")

    def _pump_stdout(self, proc: subprocess.Popen[str], ready: queue.Queue[dict]) -> None:
        """Find the ready line; copy everything else to the log so the pipe never fills up."""
        assert proc.stdout is not None
        announced = False
        for raw in proc.stdout:
            line = raw.strip()
            if not announced and line.startswith("{"):
                with contextlib.suppress(ValueError):
                    message = json.loads(line)
                    if isinstance(message, dict) and message.get("event") == "ready":
                        announced = True
                        ready.put(message)
                        continue
            log = self._log
            if log is not None and not log.closed:
                with contextlib.suppress(OSError, ValueError):
                    log.write(f"[stdout] {line}\n".encode())
                    log.flush()

    def _stop_locked(self, release: bool = True) -> None:
        proc, self._proc, self._connection, self._settings = self._proc, None, None, None
        if proc is not None:
            record = read_record(self.pid_file) or {}
            if proc.poll() is None:
                server = record.get("pid")
                if isinstance(server, int) and server != proc.pid and record.get("owner_id") == self.id:
                    platform_compat.terminate_pid(server)  # the launcher's child (Windows venvs)
                platform_compat.terminate_pid(proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None
        if release:
            self._release_slot()


def _start_fix(log_path: Path, tail: str = "") -> str:
    if "unrecognized arguments" in tail:  # e.g. --owner-pid: a server older than this add-on
        return ("The server in that Python is older than this add-on: click 'Set Up Server Environment' (it "
                "installs the server bundled with the add-on)")
    return (f"Open the server log ({log_path}); if it says 'No module named server', install the server "
            "into that Python or click 'Set Up Server Environment'")


# -- checking and setting up the server environment ------------------------------------------------------------

_PROBE = """import json, importlib.metadata as md
out = {}
for name in ("server", "torch", "fastapi", "uvicorn"):
    try:
        module = __import__(name)
        out[name] = getattr(module, "__version__", "?")
    except Exception as exc:  # any failure of a probed import is the diagnosis, reported in words
        out[name] = "MISSING: %s: %s" % (type(exc).__name__, exc)
try:
    import torch
    out["cuda"] = bool(torch.cuda.is_available())
except Exception:  # torch missing or broken: already reported above; CUDA status unknown
    out["cuda"] = None
print(json.dumps(out))
"""


def diagnose_python(python: str, timeout: float = 180.0) -> str:
    """Check that an interpreter can run the server; return a one-paragraph verdict in words.

    Raises:
        ServerError: ``server_not_configured``/``server_python_missing`` for a bad path, ``server_start_failed`` when
            the interpreter cannot import the server or its dependencies (the message names what is missing).
    """
    path = check_python(python)
    try:
        # a neutral working folder: `-c` puts it on sys.path, and a source checkout there would fake an install
        done = subprocess.run([path, "-c", _PROBE], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, cwd=tempfile.gettempdir())
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServerError("server_start_failed", f"Could not run {path!r}: {exc}.",
                          "Choose another Server Python") from exc
    try:
        found = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        raise ServerError("server_start_failed", f"{path!r} is not a working Python: {done.stderr.strip()[-300:]}",
                          "Choose another Server Python") from exc
    missing = [f"{name} ({found[name][9:]})" for name in ("server", "torch", "fastapi", "uvicorn")
               if str(found.get(name, "")).startswith("MISSING")]
    if missing:
        raise ServerError("server_start_failed", f"{path} cannot import: {', '.join(missing)}.",
                          "Click 'Set Up Server Environment' (it installs the server bundled with this add-on), "
                          "or install the server into that Python yourself")
    gpu = {True: "a CUDA GPU is available", False: "no CUDA GPU (CPU only, slow)"}.get(found.get("cuda"), "")
    verdict = (f"Server Python OK: server {found['server']}, torch {found['torch']}, fastapi {found['fastapi']}; "
               f"{gpu}.")
    return _join_notes(verdict, version_note(str(found["server"]))) or verdict


def describe_health(connection: Connection) -> str:
    """Ask a running server for its health and check the token; return a verdict in words (with a note when the
    server's version differs from the add-on's)."""
    client = connection.client(timeout=10.0)
    health = client.health()
    try:
        client.jobs()
    except ServerError as exc:
        if exc.kind == "unauthorized":
            raise ServerError("unauthorized", f"The server at {connection.url} rejected the token.",
                              "Copy the server's ONE2345_TOKEN into the add-on preferences") from exc
        raise
    running = f", running job {health['running'][:8]}" if health.get("running") else ""
    verdict = (f"Server at {connection.url} is up: version {health.get('version')}, device {health.get('device')}, "
               f"preset {health.get('preset')}, {health.get('queue_length', 0)} queued{running}.")
    return _join_notes(verdict, version_note(health.get("version"))) or verdict


def setup_environment(venv_dir: Path, base_python: str, package: str, log_path: Path,
                      progress: Callable[[str, int], None] = lambda line, n: None,
                      cancelled: Callable[[], bool] = lambda: False, *,
                      torch: setup_env.TorchChoice | None = None, wheel_folder: Path | None = None,
                      pip_options: Sequence[str] = (), notes: list[str] | None = None) -> Path:
    """Create (or update) the server's virtual environment: PyTorch from the right index, then the server; return
    the environment's Python.

    Args:
        venv_dir: where the environment goes (``platform_compat.default_venv_dir``: the extension's user folder, on
            Windows a short folder under %LOCALAPPDATA%).
        base_python: the interpreter that creates it (Blender's, which is never itself modified).
        package: empty for the server wheel bundled in this add-on's zip (add-on and server then match); otherwise
            pip requirement words split like a command line, e.g. a path, a wheel or a URL.
        log_path: every command and every line of the tools' output is appended here.
        progress: called with each line (commands as ``$ ...``) and the line count.
        cancelled: polled between output lines; True stops pip.
        torch: the PyTorch build; None detects it (nvidia-smi, platform; see ``setup_env.choose_torch``).
        wheel_folder: where the bundled wheel lies (default: the add-on's ``server_wheel`` folder).
        pip_options: more options for every ``pip install`` (tests point pip at a local folder).
        notes: warnings the user must see afterwards are appended here (e.g. that the CPU build takes hours).

    Raises:
        ServerError: ``setup_failed`` with the last lines of the log (or a folder too long for Windows, or no bundled
            wheel), or ``cancelled``.
    """
    return setup_env.run_setup(Path(venv_dir), base_python, package, Path(log_path), progress, cancelled,
                               choice=torch, wheel_folder=wheel_folder or setup_env.WHEEL_FOLDER,
                               pip_options=pip_options, notes=notes, processes=_SETUP_PROCS)


_SETUP_PROCS: set[subprocess.Popen[str]] = set()
_MANAGER: ServerManager | None = None


def manager(state_dir: Path) -> ServerManager:
    """The session's single :class:`ServerManager` (created on first use)."""
    global _MANAGER
    if _MANAGER is None or _MANAGER.state_dir != Path(state_dir):
        if _MANAGER is not None:
            _MANAGER.stop()
        _MANAGER = ServerManager(Path(state_dir))
    return _MANAGER


def current_manager() -> ServerManager | None:
    """The session's manager if one was created, else None."""
    return _MANAGER


def shutdown() -> None:
    """Stop the session's server and any set-up process; registered with ``atexit`` and called on add-on disable."""
    global _MANAGER
    for proc in list(_SETUP_PROCS):
        proc.terminate()
    if _MANAGER is not None:
        _MANAGER.stop()
        _MANAGER = None
