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
"cancelled" on disk), queued jobs are cancelled, and the process exits with status 0.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import math
import os
import secrets
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO

import uvicorn

from server import __version__
from server.common.errors import BadInputError, One2345Error
from server.common.fsutil import check_folder_path

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
                   low_vram=args.low_vram)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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
    from server.service.jobs import JobManager
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

        manager = JobManager(jobs_dir, load, settings.jobs_config)
        weights_config = WeightsConfig.for_preset(settings.preset, settings.weights_dir)
        if os.environ.get(weights_table.TABLE_ENV):  # a test hook: small stand-in files that the preset needs
            files = weights_table.install_table(Path(os.environ[weights_table.TABLE_ENV]))
            weights_config = replace(weights_config, required=tuple(w.name for w in files if w.required))
        weights = WeightsManager(weights_config)
        missing = weights.health()["required_missing"]
        if missing:  # the server starts anyway: /v1/health says what is missing, POST /v1/weights/download fetches it
            log.warning("weight files missing: %s; jobs are refused until they are downloaded", ", ".join(missing))
        elif settings.preload:
            manager.preload()
        config = AppConfig(token=token, device=device, preset=settings.preset,
                           max_upload_bytes=int(settings.max_upload_mb * 2**20))
        app = create_app(manager, config, weights)
        sock = bind_socket(settings.host, settings.port)
        port = sock.getsockname()[1]
        host = f"[{settings.host.strip('[]')}]" if ":" in settings.host else settings.host
        ready = {"event": "ready", "url": f"http://{host}:{port}", "pid": os.getpid(), "version": __version__,
                 "device": device, "preset": settings.preset,
                 "token_file": str(token_file) if token_file else None, "jobs_dir": str(jobs_dir)}
        server = _Server(uvicorn.Config(app, log_config=None, access_log=True, timeout_graceful_shutdown=5,
                                        lifespan="on"), ready, stdout)
        _install_signal_handlers(server)
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
