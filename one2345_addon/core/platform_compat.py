"""What differs between Windows and POSIX for the add-on: argument splitting, process liveness and start times,
termination, virtual-environment layout and path lengths (standard library only).

Every function takes ``platform`` (a ``sys.platform`` value; None means this machine), so the Windows branches run in
unit tests on Linux. The Win32 calls go through :class:`Kernel32`, which wraps a ``kernel32`` object — the real
``ctypes.WinDLL("kernel32")`` on Windows, a stand-in in tests.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath
from typing import Any

from .client import ServerError

# Win32 constants (winnt.h / winerror.h / minwinbase.h).
PROCESS_TERMINATE = 0x0001
PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
STILL_ACTIVE = 259
ERROR_ACCESS_DENIED = 5
ERROR_INVALID_PARAMETER = 87
CREATE_NO_WINDOW = 0x08000000
CREATE_NEW_PROCESS_GROUP = 0x00000200

MAX_PATH = 260
"""Windows' classic path limit (259 characters plus the terminating NUL) unless long paths are enabled."""
VENV_DEEPEST_RELATIVE = 200
"""Characters of the longest file path inside a server environment, relative to its folder, plus headroom.

Measured on the CPU environment of this repository (torch 2.13 and the server's dependencies): 191 characters,
``Lib/site-packages/torch-<version>.dist-info/licenses/third_party/kineto/.../duktape-1.8.0/LICENSE.txt`` in the
Windows layout (``Lib/`` instead of ``lib/python3.11/``); ``+cu130`` instead of ``+cpu`` adds two. The remaining
headroom is for newer releases that nest deeper."""


def current(platform: str | None) -> str:
    """``platform`` or this machine's ``sys.platform``."""
    return platform or sys.platform


def is_windows(platform: str | None = None) -> bool:
    """True for ``win32`` (and ``cygwin``, which uses Windows processes and paths underneath)."""
    return current(platform) in ("win32", "cygwin")


# -- 1. splitting a command line ---------------------------------------------------------------------------------

def split_args(text: str, platform: str | None = None) -> list[str]:
    """Split the preferences' "Extra Server Arguments" the way the platform's own programs split a command line.

    POSIX: ``shlex`` rules (quotes group, backslash escapes). Windows: the C runtime / ``CommandLineToArgvW`` rules
    for arguments after the program name, so ``C:\\Users\\me\\weights`` keeps its backslashes — what
    ``subprocess.list2cmdline`` writes, this reads back:

    * spaces and tabs separate arguments outside double quotes;
    * ``2n`` backslashes before ``"`` give ``n`` backslashes and the quote opens or closes a quoted part;
      ``2n+1`` backslashes before ``"`` give ``n`` backslashes and a literal ``"``;
    * backslashes not followed by ``"`` are literal;
    * inside a quoted part, ``""`` is a literal ``"`` (the rule of the Universal C Runtime, Python's own).

    Raises:
        ServerError: ``server_not_configured`` for unbalanced quotes on POSIX (Windows leaves a quote open to the end).
    """
    if not is_windows(platform):
        try:
            return shlex.split(text)
        except ValueError as exc:
            raise ServerError("server_not_configured", f"The extra server arguments {text!r} cannot be split: {exc}.",
                              "Balance the quotes in 'Extra Server Arguments' in the add-on preferences") from exc
    args: list[str] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in " \t":
            i += 1
        if i >= n:
            return args
        part: list[str] = []
        quoted = False
        while i < n and (quoted or text[i] not in " \t"):
            c = text[i]
            if c == "\\":
                j = i
                while j < n and text[j] == "\\":
                    j += 1
                count = j - i
                if j < n and text[j] == '"':
                    part.append("\\" * (count // 2))
                    if count % 2:
                        part.append('"')
                        j += 1
                    i = j  # an even count leaves the quote to toggle quoting below
                else:
                    part.append("\\" * count)
                    i = j
            elif c == '"':
                if quoted and i + 1 < n and text[i + 1] == '"':
                    part.append('"')
                    i += 2
                else:
                    quoted = not quoted
                    i += 1
            else:
                part.append(c)
                i += 1
        args.append("".join(part))


def join_args(args: list[str], platform: str | None = None) -> str:
    """A command line as the user would type it on this platform (for logs and progress lines)."""
    return subprocess.list2cmdline(args) if is_windows(platform) else shlex.join(args)


# -- 2. Win32 process calls --------------------------------------------------------------------------------------

class _FileTime(ctypes.Structure):
    _fields_ = [("low", ctypes.c_uint32), ("high", ctypes.c_uint32)]


class Kernel32:
    """The few ``kernel32`` calls the add-on needs, with handles always closed.

    Args:
        dll: an object with ``OpenProcess``, ``GetExitCodeProcess``, ``GetProcessTimes``, ``TerminateProcess`` and
            ``CloseHandle`` (``ctypes.WinDLL("kernel32", use_last_error=True)`` when None).
        last_error: returns the calling thread's last Win32 error (``ctypes.get_last_error`` when None).
    """

    def __init__(self, dll: Any = None, last_error: Callable[[], int] | None = None) -> None:
        if dll is None:
            dll = _windows_kernel32()
            last_error = ctypes.get_last_error  # type: ignore[attr-defined]  # Windows only
        self.dll = dll
        self.last_error = last_error or (lambda: 0)

    def _open(self, access: int, pid: int) -> tuple[Any, int]:
        handle = self.dll.OpenProcess(access, False, pid)
        return handle, (0 if handle else self.last_error())

    def alive(self, pid: int) -> bool:
        """OpenProcess + GetExitCodeProcess: alive while the exit code is STILL_ACTIVE.

        Access denied means a process exists that we may not query (another user's): alive. Invalid parameter means
        no process has this id."""
        handle, error = self._open(PROCESS_QUERY_LIMITED_INFORMATION, pid)
        if not handle:
            return error == ERROR_ACCESS_DENIED
        try:
            code = ctypes.c_ulong(0)  # a DWORD
            if not self.dll.GetExitCodeProcess(handle, ctypes.byref(code)):
                return True  # cannot tell; never declare a live owner dead
            return code.value == STILL_ACTIVE
        finally:
            self.dll.CloseHandle(handle)

    def start_time(self, pid: int) -> str | None:
        """The process's creation time (100 ns ticks since 1601, as text), or None when it cannot be read."""
        handle, _ = self._open(PROCESS_QUERY_LIMITED_INFORMATION, pid)
        if not handle:
            return None
        try:
            created, exited, kernel, user = _FileTime(), _FileTime(), _FileTime(), _FileTime()
            if not self.dll.GetProcessTimes(handle, ctypes.byref(created), ctypes.byref(exited),
                                            ctypes.byref(kernel), ctypes.byref(user)):
                return None
            return str((created.high << 32) | created.low)
        finally:
            self.dll.CloseHandle(handle)

    def terminate(self, pid: int, exit_code: int = 1) -> bool:
        """TerminateProcess; True when the call succeeded."""
        handle, _ = self._open(PROCESS_TERMINATE, pid)
        if not handle:
            return False
        try:
            return bool(self.dll.TerminateProcess(handle, exit_code))
        finally:
            self.dll.CloseHandle(handle)


def _windows_kernel32() -> Any:
    """kernel32 with the signatures declared, so 64-bit HANDLEs are not cut to a C int (Windows only)."""
    from ctypes import wintypes

    dll = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    dll.OpenProcess.argtypes = (wintypes.DWORD, wintypes.BOOL, wintypes.DWORD)
    dll.OpenProcess.restype = wintypes.HANDLE
    dll.GetExitCodeProcess.argtypes = (wintypes.HANDLE, ctypes.POINTER(wintypes.DWORD))
    dll.GetExitCodeProcess.restype = wintypes.BOOL
    dll.GetProcessTimes.argtypes = (wintypes.HANDLE, *([ctypes.POINTER(_FileTime)] * 4))
    dll.GetProcessTimes.restype = wintypes.BOOL
    dll.TerminateProcess.argtypes = (wintypes.HANDLE, wintypes.UINT)
    dll.TerminateProcess.restype = wintypes.BOOL
    dll.CloseHandle.argtypes = (wintypes.HANDLE,)
    dll.CloseHandle.restype = wintypes.BOOL
    return dll


_KERNEL32: Kernel32 | None = None


def kernel32(api: Kernel32 | None = None) -> Kernel32:
    """``api`` if given, else this machine's (created on first use; only on Windows)."""
    global _KERNEL32
    if api is not None:
        return api
    if _KERNEL32 is None:
        _KERNEL32 = Kernel32()
    return _KERNEL32


# -- 3. processes: alive, start time, terminate -------------------------------------------------------------------

def pid_alive(pid: int, platform: str | None = None, api: Kernel32 | None = None) -> bool:
    """Whether a process with this id exists and has not exited.

    POSIX: ``os.kill(pid, 0)`` (a zombie, which /proc shows as state ``Z``, counts as exited). Windows: ``os.kill``
    would terminate the process, so OpenProcess + GetExitCodeProcess instead.
    """
    if pid <= 0:
        return False
    if is_windows(platform):
        return kernel32(api).alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def process_start_time(pid: int, platform: str | None = None, api: Kernel32 | None = None) -> str | None:
    """An opaque token that differs between two processes that had the same id (None when unknown).

    Linux: field 22 of ``/proc/<pid>/stat`` (clock ticks since boot). Windows: the creation time from
    GetProcessTimes. macOS and others: ``ps -o lstart=``. Recorded next to a pid, it tells a reused pid apart from
    the process that was recorded.
    """
    if pid <= 0:
        return None
    if is_windows(platform):
        return kernel32(api).start_time(pid)
    with contextlib.suppress(OSError, IndexError):
        return "proc:" + Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    try:
        done = subprocess.run(["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True, timeout=5,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = done.stdout.strip()
    return f"ps:{text}" if done.returncode == 0 and text else None


def same_process(pid: int, recorded_start: str | None, platform: str | None = None,
                 api: Kernel32 | None = None) -> bool:
    """True when ``pid`` is alive and, where both start times are known, is the process that was recorded."""
    if not pid_alive(pid, platform, api):
        return False
    if not recorded_start:
        return True
    now = process_start_time(pid, platform, api)
    return now is None or now == recorded_start


def terminate_pid(pid: int, timeout: float = 5.0, platform: str | None = None, api: Kernel32 | None = None,
                  run: Callable[..., Any] = subprocess.run) -> None:
    """Stop a process: POSIX SIGTERM, wait up to ``timeout`` s, then SIGKILL. Windows has no polite signal for a
    console-less process: TerminateProcess, falling back to ``taskkill /F /T`` (which also ends its children)."""
    if is_windows(platform):
        if not kernel32(api).terminate(pid) and pid_alive(pid, platform, api):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                run(["taskkill", "/PID", str(pid), "/T", "/F"], capture_output=True, timeout=timeout, check=False,
                    creationflags=CREATE_NO_WINDOW)
        _wait_gone(pid, timeout, platform, api)
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGTERM)
    if _wait_gone(pid, timeout, platform, api):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, getattr(signal, "SIGKILL", signal.SIGTERM))
    _wait_gone(pid, 2.0, platform, api)


def _wait_gone(pid: int, timeout: float, platform: str | None, api: Kernel32 | None) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid, platform, api):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def popen_isolation(platform: str | None = None) -> dict[str, Any]:
    """``subprocess.Popen`` arguments that detach a background server from Blender's console and Ctrl+C: a new
    session on POSIX; a new process group without a console window on Windows."""
    if is_windows(platform):
        return {"creationflags": CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW}
    return {"start_new_session": True}


def no_window(platform: str | None = None) -> dict[str, Any]:
    """``subprocess`` arguments that keep a short-lived tool (pip, nvidia-smi) from flashing a console on Windows."""
    return {"creationflags": CREATE_NO_WINDOW} if is_windows(platform) else {}


# -- 4. virtual environments and path lengths ---------------------------------------------------------------------

def pure_path(path: str | PurePath, platform: str | None = None) -> PurePath:
    """``path`` as the platform's pure path type (so Windows paths can be built and measured on Linux)."""
    return PureWindowsPath(path) if is_windows(platform) else PurePosixPath(path)


def venv_python(venv_dir: str | PurePath, platform: str | None = None) -> PurePath:
    """The interpreter of a virtual environment: ``Scripts\\python.exe`` on Windows, ``bin/python`` elsewhere."""
    root = pure_path(venv_dir, platform)
    return root / "Scripts" / "python.exe" if is_windows(platform) else root / "bin" / "python"


def default_venv_dir(user_dir: str | PurePath, platform: str | None = None,
                     environ: Mapping[str, str] | None = None) -> PurePath:
    """Where "Set Up Server Environment" creates the server's environment.

    Elsewhere: ``<user folder>/server-env``. Windows: ``%LOCALAPPDATA%\\One2345`` — Blender's extension user folder
    (``%APPDATA%\\Blender Foundation\\Blender\\<version>\\extensions\\.user\\user_default\\one2345``, about 95
    characters) plus the deepest file of a torch install (:data:`VENV_DEEPEST_RELATIVE`) is far over
    :data:`MAX_PATH`, and pip fails midway unless long paths are enabled.
    """
    environ = os.environ if environ is None else environ
    local = environ.get("LOCALAPPDATA", "")
    if is_windows(platform) and local:
        return pure_path(local, platform) / "One2345"
    return pure_path(user_dir, platform) / "server-env"


def long_paths_enabled(platform: str | None = None, read_registry: Callable[[], int] | None = None) -> bool:
    """True unless this is Windows with ``LongPathsEnabled`` off (``HKLM\\SYSTEM\\CurrentControlSet\\Control\\
    FileSystem``; Windows 10 1607 and later honour it for Python, which is long-path aware)."""
    if not is_windows(platform):
        return True
    if read_registry is None:
        def read_registry() -> int:
            import winreg  # Windows only

            with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"SYSTEM\CurrentControlSet\Control\FileSystem") as key:
                return int(winreg.QueryValueEx(key, "LongPathsEnabled")[0])
    try:
        return bool(read_registry())
    except (OSError, ValueError, ImportError):
        return False


def check_venv_path(venv_dir: str | PurePath, platform: str | None = None,
                    read_registry: Callable[[], int] | None = None) -> None:
    """Refuse, before anything is downloaded, an environment folder whose deepest file would pass MAX_PATH.

    Raises:
        ServerError: ``setup_failed`` naming the folder, its length and the limit.
    """
    folder = str(venv_dir)
    longest = len(folder) + 1 + VENV_DEEPEST_RELATIVE
    if longest < MAX_PATH or long_paths_enabled(platform, read_registry):
        return
    allowed = MAX_PATH - 2 - VENV_DEEPEST_RELATIVE
    raise ServerError(
        "setup_failed", f"The server environment folder '{folder}' is {len(folder)} characters long; the deepest file "
        f"PyTorch installs under it would be about {longest} characters, over Windows' {MAX_PATH - 1}-character limit "
        f"(long paths are not enabled), so pip would fail midway.",
        f"Choose a folder of at most {allowed} characters (e.g. C:\\One2345), or enable Windows long paths "
        "(LongPathsEnabled = 1 in HKLM\\SYSTEM\\CurrentControlSet\\Control\\FileSystem) and set up again")
