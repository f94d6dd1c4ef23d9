"""``one2345 serve``: the inference server process (FastAPI + uvicorn on loopback).

    one2345 serve --port 0 --preset tiny --device cpu          # or: python -m server.service.serve …

Start-up: resolve the device, load the jobs folder, optionally load the models (``--preload``), bind the socket
(``--port 0`` picks a free port), start uvicorn, and print exactly one line on stdout — JSON with ``"event":
"ready"``, the URL, pid, version, device, preset, token file and jobs dir. Everything else (logs, progress bars) goes
to stderr; after the ready line ``sys.stdout`` itself points at stderr, so a stray ``print`` cannot corrupt the
channel a parent process reads.

Token: ``ONE2345_TOKEN`` when set; otherwise a random token is written to a new file that only the user can read
(mode 0600, created exclusively so no other process can slip in a file of its own) and removed at exit. Binding an
address other than loopback requires ``ONE2345_TOKEN`` of at least :data:`MIN_REMOTE_TOKEN_LENGTH` characters, so a
server reachable from the network never runs with a guessable token or one that only sits in a local file. A token
is printable ASCII without spaces (it travels in an HTTP header, where surrounding spaces would be stripped).

SIGTERM and SIGINT stop the server cleanly: uvicorn stops accepting requests, the running job is cancelled (it ends
"cancelled" on disk), queued jobs are cancelled, and the process exits with status 0. With ``--owner-pid PID`` (the
Blender add-on passes its own pid) the server stops the same way by itself within :data:`OWNER_POLL_S` seconds of
that process's death, so a crashed or killed Blender never leaves a server holding its models.

Slow clients (:class:`ClientTimeouts`): a request head must be complete within 10 s of the connection opening (or of
the previous answer), a body that stalls for 30 s is answered 408 and closed, and a connection idle for 5 s between
requests is closed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import secrets
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO

import uvicorn

from server import __version__
from server.common.errors import BadInputError, One2345Error
from server.common.fsutil import check_folder_path
from server.common.net import is_loopback

if TYPE_CHECKING:
    from server.service.jobs import JobsConfig

log = logging.getLogger("server.service.serve")  # also when run as __main__

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
TOKEN_ENV = "ONE2345_TOKEN"
JOBS_DIR_ENV = "ONE2345_JOBS_DIR"
MIN_REMOTE_TOKEN_LENGTH = 16
"""Shortest ONE2345_TOKEN accepted for a bind other than loopback."""
MAX_UPLOAD_MB = 1024.0
"""Largest --max-upload-mb: the upload is held in memory while it is checked."""
OWNER_POLL_S = 0.5
"""How often the server checks that its --owner-pid process is alive."""


@dataclass(frozen=True)
class ClientTimeouts:
    """How long the server waits for a slow client, in seconds. Generous for a tool on loopback (a request there
    arrives in milliseconds), short enough that a stuck or hostile client cannot hold connections for ever."""

    headers_s: float = 10.0
    """From the connection's opening, or the end of the previous answer on it, to the end of a request's head (its
    request line and headers). A partial head still incomplete then is answered 408 and the connection closed."""
    body_stall_s: float = 30.0
    """Longest pause while a request body arrives (also an over-long Content-Length whose bytes never come): then a
    408 if nothing was answered yet, and the connection is closed. Time the server itself is not reading does not
    count."""
    keep_alive_s: float = 5.0
    """A connection on which nothing arrives for this long (after it opened, or after an answer) is closed."""


def default_jobs_dir() -> Path:
    """``$ONE2345_JOBS_DIR``, else ``$XDG_DATA_HOME/one2345/jobs`` (``~/.local/share/one2345/jobs``).

    Results are user data, not a cache, so they live under the data home rather than ``~/.cache``.
    """
    if os.environ.get(JOBS_DIR_ENV):
        return Path(os.environ[JOBS_DIR_ENV]).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home) / "one2345" / "jobs"


@dataclass(frozen=True)
class ServeSettings:
    """Everything ``one2345 serve`` is configured with."""

    host: str = "127.0.0.1"
    """Address to bind; anything but loopback needs ONE2345_TOKEN."""
    port: int = 0
    """TCP port; 0 picks a free one (the ready line says which)."""
    preset: str = "paper"
    """Model preset: paper (official weights) or tiny (small random models, for tests and trying the tool)."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N."""
    weights_dir: Path | None = None
    """Weights folder (default: $ONE2345_WEIGHTS or ~/.cache/one2345/weights)."""
    jobs_dir: Path | None = None
    """Folder of job folders (default: :func:`default_jobs_dir`)."""
    preload: bool = False
    """Load the models before the ready line instead of on the first job."""
    max_queue: int = 8
    """Jobs that may wait behind the running one (more are answered 429)."""
    max_upload_mb: float = 20.0
    """Largest accepted image file in MiB (larger uploads are answered 413)."""
    review_timeout_min: float = 60.0
    """Minutes a job waits in review before it expires."""
    max_jobs_gb: float = 20.0
    """Size limit of the jobs folder in GiB (oldest finished, unpinned jobs go first); 0 for no limit."""
    low_vram: bool = False
    """Only the model in use sits on the GPU (:func:`server.pipeline.resident`)."""
    owner_pid: int | None = None
    """Stop by itself once this process is gone (the add-on passes its own pid); None: run until stopped."""
    timeouts: ClientTimeouts = field(default_factory=ClientTimeouts)
    """Deadlines for slow clients."""

    def check(self) -> ServeSettings:
        """Raise BadInputError naming the first setting out of range."""
        if not 0 <= self.port <= 65535:
            raise BadInputError(f"--port {self.port} is not a TCP port: use 0 (pick a free one) or 1…65535")
        if not 1 <= self.max_queue <= 10_000:
            raise BadInputError(f"--max-queue {self.max_queue} is outside 1…10000")
        if not (math.isfinite(self.max_upload_mb) and 0 < self.max_upload_mb <= MAX_UPLOAD_MB
                and self.max_upload_mb * 2**20 >= 1024):
            raise BadInputError(f"--max-upload-mb {self.max_upload_mb:g} is outside 0.001…{MAX_UPLOAD_MB:g} (MiB; "
                                "the default is 20)")
        if not (math.isfinite(self.review_timeout_min) and 0.1 <= self.review_timeout_min <= 7 * 24 * 60):
            raise BadInputError(f"--review-timeout-min {self.review_timeout_min:g} is outside 0.1…10080 (minutes; "
                                "the default is 60)")
        if not (math.isfinite(self.max_jobs_gb) and 0 <= self.max_jobs_gb <= 1e6):
            raise BadInputError(f"--max-jobs-gb {self.max_jobs_gb:g} is outside 0…1000000 (GiB, 0 for no limit; "
                                "the default is 20)")
        if self.owner_pid is not None and (self.owner_pid <= 0 or not process_alive(self.owner_pid)):
            raise BadInputError(f"--owner-pid {self.owner_pid}: no process with that id is running",
                                fix="pass the pid of the running process whose death should stop the server, or "
                                    "leave the flag out")
        return self

    @property
    def jobs_config(self) -> JobsConfig:
        from server.service.jobs import JobsConfig  # imports torch: only when serving

        return JobsConfig(max_queue=self.max_queue, review_timeout_s=self.review_timeout_min * 60.0,
                          max_jobs_bytes=round(self.max_jobs_gb * 2**30) if self.max_jobs_gb > 0 else None)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServeSettings:
        return cls(host=args.host, port=args.port, preset=args.preset, device=args.device,
                   weights_dir=args.weights_dir, jobs_dir=args.jobs_dir, preload=args.preload,
                   max_queue=args.max_queue, max_upload_mb=args.max_upload_mb,
                   review_timeout_min=args.review_timeout_min, max_jobs_gb=args.max_jobs_gb,
                   low_vram=args.low_vram, owner_pid=args.owner_pid)


def resolve_token(host: str) -> tuple[str, Path | None]:
    """The bearer token and, when it was generated, the 0600 file holding it.

    Raises:
        BadInputError: a non-loopback ``host`` without ``ONE2345_TOKEN`` set.
    """
    token = os.environ.get(TOKEN_ENV, "")
    if token:  # set and not empty (an empty one means "not set")
        if not all("!" <= c <= "~" for c in token):
            raise BadInputError(f"{TOKEN_ENV} must be printable ASCII without spaces; its {len(token)} "
                                "character(s) include a space, tab or other character that an HTTP header cannot "
                                "carry unchanged",
                                fix=f"export {TOKEN_ENV}=$(python3 -c 'import secrets; print(secrets.token_urlsafe("
                                    "32))'), or unset it to get a random token in a file")
        if not is_loopback(host) and len(token) < MIN_REMOTE_TOKEN_LENGTH:
            raise BadInputError(f"refusing to bind {host} (not loopback) with a {len(token)}-character "
                                f"{TOKEN_ENV}; at least {MIN_REMOTE_TOKEN_LENGTH} characters are required",
                                fix=f"export {TOKEN_ENV}=$(python3 -c 'import secrets; print(secrets.token_urlsafe("
                                    "32))')")
        return token, None
    if not is_loopback(host):
        raise BadInputError(f"refusing to bind {host} (not loopback) without {TOKEN_ENV} set",
                            fix=f"export {TOKEN_ENV}=<a random secret of at least {MIN_REMOTE_TOKEN_LENGTH} "
                                "characters>, or bind 127.0.0.1")
    token = secrets.token_urlsafe(32)
    fd, name = tempfile.mkstemp(prefix="one2345-token-", suffix=".txt")  # O_EXCL, mode 0600
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return token, Path(name)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on ``host:port`` (port 0 → a free port; read it with ``getsockname``)."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie, dead but not yet reaped, counts as gone)."""
    if os.name == "nt":
        return _windows_process_alive(pid)
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except (OSError, IndexError):  # no /proc (macOS): the kill check has to do
        return True


def _windows_process_alive(pid: int) -> bool:
    # os.kill(pid, 0) would terminate the process on Windows; ask for a handle and whether it has exited instead.
    import ctypes

    synchronize, wait_timeout, access_denied = 0x00100000, 0x102, 5
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    handle = kernel32.OpenProcess(synchronize, False, pid)
    if not handle:
        return ctypes.get_last_error() == access_denied  # type: ignore[attr-defined]
    try:
        return kernel32.WaitForSingleObject(handle, 0) == wait_timeout
    finally:
        kernel32.CloseHandle(handle)


def watch_owner(pid: int, stop: Callable[[], None], is_stopping: Callable[[], bool],
                poll_s: float = OWNER_POLL_S) -> threading.Thread:
    """Start a daemon thread that calls ``stop`` once process ``pid`` is gone.

    When ``pid`` is this process's parent (the add-on starts the server), being re-parented also counts as its death,
    so a recycled pid cannot keep the server alive.
    """
    was_parent = os.name != "nt" and os.getppid() == pid

    def run() -> None:
        while not is_stopping():
            if not process_alive(pid) or (was_parent and os.getppid() != pid):
                log.warning("the owner process %d is gone: stopping the server", pid)
                stop()
                return
            time.sleep(poll_s)

    thread = threading.Thread(target=run, name="one2345-owner-watchdog", daemon=True)
    thread.start()
    return thread


def timed_h11_protocol(timeouts: ClientTimeouts) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol with the deadlines of ``timeouts`` (uvicorn itself has only an idle keep-alive timer,
    which any byte cancels for good, and none before the first request)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        _timer: asyncio.TimerHandle | None = None
        _phase: str | None = None
        _phase_start = 0.0
        _heard = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._watch()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch()
            if self._phase == "head":
                self._heard = True  # part of the next request's head has arrived

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel()
            super().connection_lost(exc)

        def _cancel(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _watch(self) -> None:
            """Set the deadline of what the connection waits for now: a request head, or more of a body."""
            if self.transport.is_closing():
                self._cancel()
                return
            if self.conn.their_state is h11.SEND_BODY:
                phase = "body"
            elif self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE:
                phase = "head"
            else:
                phase = None  # the request is in; the answer is the server's to give
            if phase == self._phase and phase != "body":  # a head's deadline counts from its start, not the last byte
                return
            self._cancel()
            self._phase, self._phase_start, self._heard = phase, time.monotonic(), False
            if phase == "body":
                self._timer = self.loop.call_later(timeouts.body_stall_s, self._on_body_stall)
            elif phase == "head":
                self._timer = self.loop.call_later(min(timeouts.keep_alive_s, timeouts.headers_s), self._on_head)

        def _on_head(self) -> None:
            self._timer = None
            if not self._heard:  # an idle connection
                self._close(None, "idle")
                return
            left = self._phase_start + timeouts.headers_s - time.monotonic()
            if left > 0:
                self._timer = self.loop.call_later(left, self._on_head)
                return
            self._close(f"the request's headers were not complete within {timeouts.headers_s:g} s",
                        f"headers incomplete after {timeouts.headers_s:g} s")

        def _on_body_stall(self) -> None:
            self._timer = None
            if self.flow.read_paused:  # the server is not reading: the wait is not the client's
                self._timer = self.loop.call_later(timeouts.body_stall_s, self._on_body_stall)
                return
            answer = None if self.cycle is None or self.cycle.response_started else (
                f"no part of the request body arrived for {timeouts.body_stall_s:g} s; the request was dropped")
            self._close(answer, f"request body stalled for {timeouts.body_stall_s:g} s")

        def _close(self, message: str | None, why: str) -> None:
            """Close the connection, first answering 408 with ``message`` when there is one."""
            if why != "idle":
                log.info("closing the connection of %s: %s", f"{self.client[0]}:{self.client[1]}" if self.client
                         else "?", why)
            if message is not None:
                body = json.dumps({"error": {"kind": "bad_input", "message": message,
                                             "fix": "send the whole request without pausing"}}).encode()
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                     b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.disconnected = True  # the app's receive() answers http.disconnect; its answer is dropped
                self.cycle.message_event.set()
            self.transport.close()

    return TimedH11Protocol


def serve(settings: ServeSettings, stdout: TextIO | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; return the exit code.

    Args:
        settings: the configuration.
        stdout: where the ready line goes (default: the real stdout).
    """
    stdout = stdout or sys.stdout
    settings.check()
    token, token_file = resolve_token(settings.host)  # before the heavy imports: a refusal is immediate

    from server.common import weights as weights_table
    from server.common.devices import resolve_device
    from server.pipeline import PRESETS, One2345Pipeline
    from server.service.app import AppConfig, create_app
    from server.service.jobs import JobManager, TextToImage
    from server.service.weights_api import WeightsConfig, WeightsManager

    try:
        if settings.preset not in PRESETS:
            raise BadInputError(f"unknown preset {settings.preset!r}; choose one of {', '.join(PRESETS)}")
        device = resolve_device(settings.device)
        jobs_dir = check_folder_path((settings.jobs_dir or default_jobs_dir()).expanduser().resolve(), "--jobs-dir")

        def load() -> One2345Pipeline:
            log.info("loading the %s models on %s", settings.preset, device)
            return One2345Pipeline.from_preset(settings.preset, device=device, weights_dir=settings.weights_dir,
                                               low_vram=settings.low_vram)

        manager = JobManager(jobs_dir, load, settings.jobs_config,
                             TextToImage(settings.preset, device, settings.weights_dir, settings.low_vram))
        if settings.preset == "paper":  # what an interrupted Zero123 conversion left (4–5 GB), whatever killed it
            from server.pipeline.models import remove_interrupted_conversions

            for leftover in remove_interrupted_conversions(settings.weights_dir):
                log.info("removed %s, left by an interrupted Zero123 conversion", leftover.name)
        weights_config = WeightsConfig.for_preset(settings.preset, settings.weights_dir)
        if os.environ.get(weights_table.TABLE_ENV):  # a test hook: small stand-in files that the preset needs
            files = weights_table.install_table(Path(os.environ[weights_table.TABLE_ENV]))
            weights_config = replace(weights_config, required=tuple(w.name for w in files if w.required))
        weights = WeightsManager(weights_config)
        missing = weights.health()["required_missing"]
        if missing:  # the server starts anyway: /v1/health says what is missing, POST /v1/weights/download fetches it
            log.warning("weight files missing: %s; jobs are refused until they are downloaded", ", ".join(missing))
        elif settings.preload:
            from server.common.errors import CancelledError
            from server.pipeline.loading import loading_observer, progress_lines, stop_on_signals

            # A first load converts Zero123-XL (about a minute): log its steps, and let SIGTERM (the add-on's stop)
            # end it cleanly, the half-written folder removed, before uvicorn owns the signals.
            try:
                with stop_on_signals(), loading_observer(progress_lines(log.info)):
                    manager.preload()
            except (CancelledError, KeyboardInterrupt):
                log.info("stopped while loading the models; nothing half-written was kept")
                return 0
        config = AppConfig(token=token, device=device, preset=settings.preset,
                           max_upload_bytes=int(settings.max_upload_mb * 2**20))
        app = create_app(manager, config, weights)
        sock = bind_socket(settings.host, settings.port)
        port = sock.getsockname()[1]
        host = f"[{settings.host.strip('[]')}]" if ":" in settings.host else settings.host
        ready = {"event": "ready", "url": f"http://{host}:{port}", "pid": os.getpid(), "version": __version__,
                 "device": device, "preset": settings.preset,
                 "token_file": str(token_file) if token_file else None, "jobs_dir": str(jobs_dir)}
        timeouts = settings.timeouts
        server = _Server(uvicorn.Config(app, log_config=None, access_log=True, timeout_graceful_shutdown=5,
                                        lifespan="on", http=timed_h11_protocol(timeouts),
                                        timeout_keep_alive=max(1, round(timeouts.keep_alive_s))), ready, stdout)
        _install_signal_handlers(server)
        if settings.owner_pid is not None:
            watch_owner(settings.owner_pid, lambda: setattr(server, "should_exit", True),
                        lambda: bool(server.should_exit))
        server.run(sockets=[sock])
        return 0 if server.started else EXIT_FAILED
    finally:
        if token_file is not None:
            token_file.unlink(missing_ok=True)


class _Server(uvicorn.Server):
    """uvicorn's Server, printing the ready line once it accepts connections."""

    def __init__(self, config: uvicorn.Config, ready: dict[str, Any], stdout: TextIO) -> None:
        super().__init__(config)
        self.ready = ready
        self.stdout = stdout

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and not self.should_exit:
            self.stdout.write(json.dumps(self.ready) + "\n")
            self.stdout.flush()
            sys.stdout = sys.stderr  # from now on stdout carries nothing but that line
            log.info("ready on %s (jobs in %s)", self.ready["url"], self.ready["jobs_dir"])


def _install_signal_handlers(server: Any) -> None:
    """SIGTERM/SIGINT → a graceful stop; a second SIGINT forces it.

    uvicorn captures these signals itself while it runs and re-raises them once it has stopped, which would kill the
    process with the signal's status; the handlers installed here receive that re-raise and do nothing, so a stop
    asked for by a signal ends with exit status 0.
    """

    def on_signal(sig: int, _: FrameType | None) -> None:
        if server.should_exit and sig == signal.SIGINT:
            server.force_exit = True
        server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; anything else requires ONE2345_TOKEN)")
    p.add_argument("--port", type=int, default=0, help="TCP port; 0 (default) picks a free one")
    p.add_argument("--preset", choices=["paper", "tiny"], default="paper",
                   help="paper: official weights; tiny: small random models, no weights (tests, trying the tool)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, default), cpu, cuda or cuda:N")
    p.add_argument("--weights-dir", type=Path, default=None,
                   help="where downloaded weights live (default: $ONE2345_WEIGHTS or ~/.cache/one2345/weights)")
    p.add_argument("--jobs-dir", type=Path, default=None,
                   help="folder of job folders (default: $ONE2345_JOBS_DIR or ~/.local/share/one2345/jobs)")
    p.add_argument("--preload", action="store_true",
                   help="load the models before announcing ready (default: on the first job; skipped while "
                        "weight files are missing)")
    p.add_argument("--max-queue", type=int, default=8,
                   help="jobs that may wait behind the running one; more are refused with 429 (default 8)")
    p.add_argument("--max-upload-mb", type=float, default=20.0,
                   help="largest accepted image file in MiB; larger uploads are refused with 413 (default 20)")
    p.add_argument("--review-timeout-min", type=float, default=60.0,
                   help="minutes a job submitted with review waits for re-roll or continue before it expires "
                        "(default 60)")
    p.add_argument("--low-vram", action="store_true",
                   help="keep the models in CPU memory and move each to the GPU only for its stage (for GPUs with "
                        "little memory; slower, same result)")
    p.add_argument("--owner-pid", type=int, default=None, metavar="PID",
                   help="stop the server (cleanly, as on SIGTERM) within a second or two of process PID's death; "
                        "the Blender add-on passes its own pid (default: run until stopped)")
    p.add_argument("--max-jobs-gb", type=float, default=20.0,
                   help="size limit of the jobs folder in GiB; the oldest finished jobs not pinned are deleted "
                        "beyond it (default 20; 0: no limit)")


def cmd_serve(args: argparse.Namespace) -> int:
    """The ``serve`` subcommand: run the server; errors become a message on stderr and a non-zero exit code."""
    _configure_logging()
    try:
        return serve(ServeSettings.from_args(args))
    except One2345Error as e:
        print(f"one2345 serve: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT if e.kind == "bad_input" else EXIT_FAILED
    except OSError as e:
        print(f"one2345 serve: error: {e}", file=sys.stderr)
        return EXIT_FAILED


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand to the ``one2345`` command's subparsers; its ``func`` returns an exit code."""
    p = subparsers.add_parser(
        "serve", help="run the HTTP inference server (FastAPI) on loopback",
        description="Serve the image → mesh pipeline over HTTP on loopback. Prints one JSON 'ready' line on stdout "
                    "(url, pid, version, device, token_file); logs go to stderr. The API is described at "
                    "<url>/openapi.json.")
    _add_arguments(p)
    p.set_defaults(func=cmd_serve)
    return p


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    """``python -m server.service.serve [flags]``: the same as ``one2345 serve [flags]``."""
    parser = argparse.ArgumentParser(prog="python -m server.service.serve",
                                     description="Run the One2345 inference server.")
    _add_arguments(parser)
    return cmd_serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
