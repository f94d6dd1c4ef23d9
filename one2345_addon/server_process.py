"""Starting, reusing, restarting and stopping the local One2345 server process (standard library only).

Lifecycle decisions:

* The server is started on first use with the Python interpreter from the preferences (a virtual environment with the
  server installed; never Blender's own), on ``127.0.0.1`` and a free port, with a random bearer token passed through
  ``ONE2345_TOKEN``. It prints one JSON "ready" line on stdout; stderr (its log) goes to ``logs/server.log`` in the
  extension's user folder.
* It is reused while alive and its launch settings are unchanged. When it has died, :meth:`ServerManager.ensure`
  starts it again once and says so in :attr:`Connection.note`; a second failure is reported, not retried.
* A pid file in the user folder records the running server. A Blender that crashed leaves it behind; the next
  session finds it, checks that the process still is a One2345 server, and stops it instead of starting a second one
  next to it.
* :meth:`ServerManager.stop` runs on add-on disable and at interpreter exit (``atexit``).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

from .client import Client, ServerError

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

    def client(self, timeout: float = 30.0) -> Client:
        """A :class:`Client` for this connection."""
        return Client(self.url, self.token, timeout=timeout)


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
    """The command line that starts the server: ``<python> -m server serve --port 0 ...``."""
    cmd = [check_python(settings.python), "-m", "server", "serve", "--host", "127.0.0.1", "--port", "0",
           "--preset", settings.preset, "--device", settings.device, "--jobs-dir", str(jobs_dir)]
    if settings.weights_dir.strip():
        cmd += ["--weights-dir", os.path.abspath(os.path.expanduser(settings.weights_dir.strip()))]
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


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (and is not a zombie, where /proc tells)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _is_one2345_server(pid: int, url: str) -> bool:
    """Guard against killing an unrelated process that reused a recorded pid."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        with contextlib.suppress(OSError):
            args = cmdline.read_bytes().decode("utf-8", "replace").split("\0")
            # `python -m server serve …`, `python -m server.serve …` or the `one2345 serve …` script
            return any(a == "server.serve" or ((a in ("server", "one2345") or a.endswith("/one2345"))
                       and i + 1 < len(args) and args[i + 1] == "serve") for i, a in enumerate(args))
        return False
    try:  # No /proc (macOS, Windows): trust the pid only if a One2345 server still answers at the recorded URL.
        return Client(url, timeout=2.0).health().get("status") == "ok"
    except ServerError:
        return False


def terminate_pid(pid: int, timeout: float = 5.0) -> None:
    """SIGTERM, wait up to ``timeout`` s, then SIGKILL (TerminateProcess on Windows)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, getattr(signal, "SIGKILL", signal.SIGTERM))


def stop_stale_server(pid_file: Path) -> int | None:
    """Stop a server recorded in ``pid_file`` by an earlier (crashed) Blender session; return its pid if stopped."""
    try:
        record = json.loads(pid_file.read_text())
        pid, url = int(record["pid"]), str(record.get("url", ""))
    except (OSError, ValueError, KeyError, TypeError):
        pid_file.unlink(missing_ok=True)
        return None
    stopped = None
    if pid != os.getpid() and pid_alive(pid) and _is_one2345_server(pid, url):
        terminate_pid(pid)
        stopped = pid
    pid_file.unlink(missing_ok=True)
    return stopped


class ServerManager:
    """Owns at most one server process for this Blender session. All public methods are thread-safe.

    Args:
        state_dir: the extension's user folder.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.log_path = self.state_dir / "logs" / "server.log"
        self.pid_file = self.state_dir / "server.pid.json"
        self.jobs_dir = self.state_dir / "server-jobs"
        self._lock = threading.RLock()
        self._proc: subprocess.Popen[str] | None = None
        self._log: IO[bytes] | None = None
        self._settings: LaunchSettings | None = None
        self._connection: Connection | None = None

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
                self._stop_locked()
                note = "Restarted the One2345 server with the changed preferences."
            elif self._proc is not None:
                code = self._proc.returncode
                self._stop_locked()
                note = f"The One2345 server had stopped (exit code {code}); started it again."
            else:
                stale = stop_stale_server(self.pid_file)
                if stale is not None:
                    note = f"Stopped a One2345 server left running by an earlier Blender session (pid {stale})."
            connection = self._start_locked(settings)
            return replace(connection, note=note)

    def stop(self) -> None:
        """Stop the server this session started (no-op when none) and remove the pid file."""
        with self._lock:
            self._stop_locked()

    # -- internals -----------------------------------------------------------------------------------------------

    def _start_locked(self, settings: LaunchSettings) -> Connection:
        cmd = server_command(settings, self.jobs_dir)
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - stays open for the process's lifetime
        self._log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
        self._log.flush()
        token = secrets.token_urlsafe(32)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONHOME"}  # Blender's Python must not leak in.
        env.update(ONE2345_TOKEN=token, PYTHONUNBUFFERED="1")
        if settings.offline:
            env["HF_HUB_OFFLINE"] = "1"
        popen_kwargs: dict = {"start_new_session": True} if os.name == "posix" else {
            "creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)}
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log,
                                    cwd=self.state_dir, env=env, text=True, encoding="utf-8", errors="replace",
                                    **popen_kwargs)
        except OSError as exc:
            raise ServerError("server_start_failed", f"Could not run {cmd[0]!r}: {exc.strerror or exc}.",
                              "Check 'Server Python' in the add-on preferences") from exc
        self._proc, self._settings = proc, settings
        ready: queue.Queue[dict] = queue.Queue()
        threading.Thread(target=self._pump_stdout, args=(proc, ready), name="one2345-server-stdout",
                         daemon=True).start()
        line = self._wait_ready(proc, ready, settings.startup_timeout)
        url = str(line["url"]).rstrip("/")
        pid = int(line.get("pid") or proc.pid)
        self._connection = Connection(url=url, token=token, local=True, pid=pid,
                                      jobs_dir=line.get("jobs_dir") or str(self.jobs_dir))
        self.pid_file.write_text(json.dumps({"pid": pid, "url": url, "python": cmd[0], "started": time.time()}))
        return self._connection

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
                self._stop_locked()
                raise ServerError("server_start_failed", f"The One2345 server exited during start-up (exit code "
                                  f"{code}). Last lines of its log:\n{log_tail(self.log_path)}", _start_fix(self))
        self._stop_locked()
        raise ServerError("server_start_failed", f"The One2345 server did not report ready within {timeout:.0f} s. "
                          f"Last lines of its log:\n{log_tail(self.log_path)}",
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

    def _stop_locked(self) -> None:
        proc, self._proc, self._connection, self._settings = self._proc, None, None, None
        if proc is not None:
            if proc.poll() is None:
                terminate_pid(proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            self.pid_file.unlink(missing_ok=True)
        if self._log is not None:
            self._log.close()
            self._log = None


def _start_fix(manager: ServerManager) -> str:
    return (f"Open the server log ({manager.log_path}); if it says 'No module named server', install the server "
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
                          "Install the server into it (pip install 'one2345-blender[server]') or click "
                          "'Set Up Server Environment'")
    gpu = {True: "a CUDA GPU is available", False: "no CUDA GPU (CPU only, slow)"}.get(found.get("cuda"), "")
    return (f"Server Python OK: server {found['server']}, torch {found['torch']}, fastapi {found['fastapi']}; "
            f"{gpu}.")


def describe_health(connection: Connection) -> str:
    """Ask a running server for its health and check the token; return a verdict in words."""
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
    return (f"Server at {connection.url} is up: version {health.get('version')}, device {health.get('device')}, "
            f"preset {health.get('preset')}, {health.get('queue_length', 0)} queued{running}.")


def setup_environment(venv_dir: Path, base_python: str, package: str, log_path: Path,
                      progress: Callable[[str, int], None] = lambda line, n: None,
                      cancelled: Callable[[], bool] = lambda: False) -> Path:
    """Create a virtual environment and pip-install the server package into it; return its Python.

    Args:
        venv_dir: where the environment goes (inside the extension's user folder).
        base_python: the interpreter that creates it (Blender's, which is never itself modified).
        package: the pip requirement(s), e.g. ``one2345-blender[server]``, a folder or a URL.
        log_path: every line of the tools' output is appended here.
        progress: called with each output line and the line count.
        cancelled: polled between output lines; True stops pip.

    Raises:
        ServerError: ``setup_failed`` with the last lines of the log, or ``cancelled``.
    """
    python = venv_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    steps = [] if python.exists() else [[base_python, "-m", "venv", str(venv_dir)]]
    steps += [[str(python), "-m", "pip", "install", "--upgrade", *shlex.split(package)],
              [str(python), "-c", "import server, torch, fastapi, uvicorn; print('server import OK')"]]
    lines = 0
    with open(log_path, "a", encoding="utf-8") as log:
        for cmd in steps:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
            log.flush()
            env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH")}
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, encoding="utf-8", errors="replace", env=env, cwd=log_path.parent)
            _SETUP_PROCS.add(proc)
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    log.write(line)
                    lines += 1
                    progress(line.rstrip(), lines)
                    if cancelled():
                        proc.terminate()
                        raise ServerError("cancelled", "Setting up the server environment was cancelled.")
                code = proc.wait()
            finally:
                _SETUP_PROCS.discard(proc)
                if proc.poll() is None:
                    proc.kill()
            if code != 0:
                log.flush()
                raise ServerError("setup_failed", f"'{' '.join(cmd[:4])} ...' failed (exit code {code}). Last lines "
                                  f"of the log:\n{log_tail(log_path)}",
                                  "Open the set-up log; check the package name and the network connection")
    return python


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
