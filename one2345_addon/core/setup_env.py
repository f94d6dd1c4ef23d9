"""Setting up the server's environment: which PyTorch build to install, and the pip commands (standard library only).

The set-up (:func:`run_setup`, called by ``server_process.setup_environment``) runs, each command shown and logged:

1. ``<Blender's python> -m venv <env>`` (once), after checking the folder is short enough for Windows (MAX_PATH);
2. ``<env python> -m pip install "torch>=2.1" --index-url <the right PyTorch index>`` — chosen by
   :func:`choose_torch` from the NVIDIA driver (``nvidia-smi``) and the platform;
3. ``<env python> -m pip install <the server wheel bundled in the zip>`` (its dependencies from PyPI; torch is
   already satisfied, so pip keeps the build from step 2), then ``--force-reinstall --no-deps`` of the same wheel so
   the environment holds exactly the server this add-on was built with, even when the version number is unchanged;
4. ``<env python> -c "import server, torch, fastapi, uvicorn ..."``: the environment works.
"""

from __future__ import annotations

import contextlib
import os
import platform as host_platform
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath

from . import platform_compat
from .client import ServerError

PYTORCH_INDEX = "https://download.pytorch.org/whl/"
TORCH_REQUIREMENT = "torch>=2.1"
WHEEL_FOLDER = Path(__file__).resolve().parent.parent / "server_wheel"  # the add-on folder, above core/
"""Where the build puts the server wheel in the extension: ``server_wheel/one2345_blender-<v>-py3-none-any.whl``."""
CPU_WARNING = ("No NVIDIA GPU driver was found, so the CPU build of PyTorch is installed: generating one mesh will "
               "take hours on the CPU.")


@dataclass(frozen=True)
class CudaBuild:
    """One CUDA flavour of PyTorch's wheels and what it needs from the machine."""

    tag: str
    """Index name under https://download.pytorch.org/whl/, e.g. ``cu128``."""
    cuda: str
    linux_driver: tuple[int, ...]
    """Minimum Linux driver: the "Toolkit Driver Version" of the CUDA GA release in NVIDIA's release notes."""
    windows_driver: tuple[int, ...]
    min_compute: float
    """Oldest GPU architecture (compute capability) PyTorch builds for this CUDA version."""


# Newest first. Driver minimums are NVIDIA's documented "Toolkit Driver Version" per CUDA GA release (CUDA Toolkit
# Release Notes, table "CUDA Toolkit and Corresponding Driver Versions"): 13.0 ≥ 580.65.06 on Linux (Windows listed
# as N/A; NVIDIA's data-center support matrix names the R580 branch as the one for CUDA 13.x, so ≥ 580 there);
# 12.8 ≥ 570.26 / ≥ 570.65; 12.6 ≥ 560.28.03 / ≥ 560.76; 12.4 ≥ 550.54.14 / ≥ 551.61; 12.1 ≥ 530.30.02 / ≥ 531.14;
# 11.8 ≥ 520.61.05 / ≥ 520.06. Architectures: CUDA 13.0 dropped Maxwell, Pascal and Volta (same release notes,
# "Deprecated Architectures"); PyTorch's CUDA 12.8 builds dropped Maxwell and Pascal in 2.8 and Volta in 2.11
# (pytorch/pytorch #157517, #172352), so older GPUs get the CUDA 12.6 build. The CUDA 13.2 build that newer PyTorch
# publishes is left out until its driver minimum is confirmed; drivers that run it also run the 13.0 build.
CUDA_BUILDS: tuple[CudaBuild, ...] = (
    CudaBuild("cu130", "13.0", (580, 65, 6), (580,), 7.5),
    CudaBuild("cu128", "12.8", (570, 26), (570, 65), 7.5),
    CudaBuild("cu126", "12.6", (560, 28, 3), (560, 76), 5.0),
    CudaBuild("cu124", "12.4", (550, 54, 14), (551, 61), 5.0),
    CudaBuild("cu121", "12.1", (530, 30, 2), (531, 14), 5.0),
    CudaBuild("cu118", "11.8", (520, 61, 5), (520, 6), 3.7),
)


@dataclass(frozen=True)
class GpuInfo:
    """What ``nvidia-smi`` says about the machine's NVIDIA GPUs."""

    driver: str
    """Driver version, e.g. ``570.86.15`` (Linux) or ``572.16`` (Windows)."""
    names: tuple[str, ...] = ()
    compute: float | None = None
    """The lowest compute capability among the GPUs, when this nvidia-smi reports it."""


@dataclass(frozen=True)
class TorchChoice:
    """Which PyTorch build to install and why."""

    kind: str
    """``cuda``, ``default`` (PyPI's own wheels: Apple silicon) or ``cpu``."""
    index_url: str | None
    """PyTorch's wheel index, or None for PyPI."""
    reason: str
    """One sentence for the progress line and the log."""
    warning: str | None = None
    """What the user must be told (generation on the CPU takes hours; the driver is too old)."""

    def pip_args(self) -> list[str]:
        """Arguments that point pip at this build's index."""
        return ["--index-url", self.index_url] if self.index_url else []


def parse_version(text: str) -> tuple[int, ...]:
    """``"570.86.15"`` → ``(570, 86, 15)``.

    Raises:
        ValueError: not dot-separated numbers.
    """
    parts = text.strip().split(".")
    if not text.strip() or not all(p.isdigit() for p in parts):
        raise ValueError(f"not a driver version: {text!r} (expected numbers separated by dots, e.g. 570.86.15)")
    return tuple(int(p) for p in parts)


def choose_torch(platform: str, machine: str, gpu: GpuInfo | None) -> TorchChoice:
    """Pick the PyTorch build for a machine (a pure function of its inputs).

    Args:
        platform: ``sys.platform`` (``linux``, ``win32``, ``darwin``).
        machine: ``platform.machine()`` (``x86_64``, ``AMD64``, ``arm64``, ``aarch64``).
        gpu: the NVIDIA driver found, or None.

    Returns:
        The CUDA build of the newest CUDA version the driver supports (and the GPUs' architecture) when a driver
        is present on Linux or Windows; PyPI's wheels on Apple silicon; else the CPU build, with a warning.
    """
    if platform == "darwin":
        if machine.lower() in ("arm64", "aarch64"):
            return TorchChoice("default", None, "Apple silicon: PyPI's PyTorch wheels (GPU through Metal/MPS).")
        return TorchChoice("default", None, "Intel Mac: PyPI's PyTorch wheels (CPU only).",
                           "This Mac has no GPU PyTorch can use: generating one mesh will take hours on the CPU.")
    cpu = TorchChoice("cpu", PYTORCH_INDEX + "cpu", "No NVIDIA driver found: PyTorch's CPU build.", CPU_WARNING)
    if gpu is None:
        return cpu
    try:
        driver = parse_version(gpu.driver)
    except ValueError:
        return TorchChoice("cpu", cpu.index_url, f"nvidia-smi reported an unreadable driver version {gpu.driver!r}: "
                           "PyTorch's CPU build.", CPU_WARNING)
    windows = platform_compat.is_windows(platform)
    for build in CUDA_BUILDS:
        needed = build.windows_driver if windows else build.linux_driver
        if driver < needed:
            continue
        if gpu.compute is not None and gpu.compute < build.min_compute:
            continue
        gpus = f" ({', '.join(gpu.names)})" if gpu.names else ""
        return TorchChoice("cuda", PYTORCH_INDEX + build.tag,
                           f"NVIDIA driver {gpu.driver}{gpus} supports CUDA {build.cuda}: PyTorch's {build.tag} build.")
    oldest = CUDA_BUILDS[-1]
    needed = ".".join(map(str, oldest.windows_driver if windows else oldest.linux_driver))
    return TorchChoice("cpu", cpu.index_url, f"NVIDIA driver {gpu.driver} is older than any CUDA build of PyTorch "
                       f"supports: PyTorch's CPU build.",
                       f"The NVIDIA driver {gpu.driver} is too old for PyTorch's CUDA builds (they need {needed} or "
                       "newer), so the CPU build is installed and generating one mesh will take hours. Update the "
                       "driver and run Set Up Server Environment again.")


def nvidia_smi_candidates(platform: str) -> list[str]:
    """Where nvidia-smi lives: on PATH; on Windows also System32 (DCH drivers) and the older NVSMI folder."""
    found = [shutil.which("nvidia-smi")] if shutil.which("nvidia-smi") else []
    if platform_compat.is_windows(platform):
        for root, sub in (("SystemRoot", "System32"), ("ProgramFiles", r"NVIDIA Corporation\NVSMI")):
            if os.environ.get(root):
                found.append(os.path.join(os.environ[root], sub, "nvidia-smi.exe"))
    return found


def parse_nvidia_smi(output: str) -> GpuInfo | None:
    """Read ``nvidia-smi --query-gpu=driver_version,name,compute_cap --format=csv,noheader`` (or just
    ``driver_version``): one line per GPU, e.g. ``570.86.15, NVIDIA GeForce RTX 4090, 8.9``."""
    rows = [[cell.strip() for cell in line.split(",")] for line in output.strip().splitlines() if line.strip()]
    if not rows or not re.fullmatch(r"\d+(\.\d+)*", rows[0][0]):
        return None
    names = tuple(row[1] for row in rows if len(row) > 1 and row[1])
    caps = [float(row[2]) for row in rows if len(row) > 2 and re.fullmatch(r"\d+\.\d+", row[2])]
    return GpuInfo(rows[0][0], names, min(caps) if caps else None)


def detect_gpu(platform: str, run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> GpuInfo | None:
    """The NVIDIA driver on this machine, via nvidia-smi (None when there is none or it does not answer)."""
    queries = ("driver_version,name,compute_cap", "driver_version")  # compute_cap needs a 2021+ nvidia-smi
    for exe in nvidia_smi_candidates(platform):
        for query in queries:
            try:
                done = run([exe, f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True,
                           timeout=20, check=False, **platform_compat.no_window(platform))
            except (OSError, subprocess.SubprocessError):
                break
            if done.returncode == 0 and (info := parse_nvidia_smi(done.stdout)) is not None:
                return info
    return None


def bundled_wheel(folder: Path = WHEEL_FOLDER) -> Path:
    """The server wheel the build put into the extension.

    Raises:
        ServerError: ``setup_failed`` when there is none (the add-on runs from a source folder, not from the zip).
    """
    wheels = sorted(folder.glob("one2345_blender-*-py3-none-any.whl")) if folder.is_dir() else []
    if not wheels:
        raise ServerError("setup_failed", f"No server wheel is bundled in {folder}: this add-on was not installed "
                          "from a zip made by `python -m one2345_addon.build`.",
                          "Install the zip made by the build, or set 'Server Package' in the add-on preferences to "
                          "a path, wheel or URL of the server")
    return wheels[-1]


@dataclass
class SetupPlan:
    """The commands of one set-up, in order, with what they are for."""

    python: PurePath
    """The environment's interpreter (what the preferences' Server Python becomes)."""
    steps: list[tuple[str, list[str]]] = field(default_factory=list)
    """(what it does, command) pairs."""
    choice: TorchChoice | None = None


def plan_setup(venv_dir: PurePath, base_python: str, requirement: Sequence[str], choice: TorchChoice, *,
               platform: str | None = None, exists: bool = False, reinstall_wheel: Path | None = None,
               pip_options: Sequence[str] = ()) -> SetupPlan:
    """The commands that set up (or update) the environment; a pure function.

    Args:
        venv_dir: the environment's folder.
        base_python: the interpreter that creates it.
        requirement: what pip installs after torch: the bundled wheel, or the user's "Server Package" words.
        choice: the PyTorch build.
        platform: ``sys.platform`` of the target (Windows: ``Scripts\\python.exe``).
        exists: the environment is already there (no ``venv`` step).
        reinstall_wheel: the bundled wheel, reinstalled without dependencies after the install.
        pip_options: more options for every ``pip install`` (tests: ``--no-index --find-links DIR``).
    """
    python = platform_compat.venv_python(venv_dir, platform)
    plan = SetupPlan(python=python, choice=choice)
    py = str(python)
    if not exists:
        plan.steps.append(("create the environment", [base_python, "-m", "venv", str(venv_dir)]))
    plan.steps.append((f"install PyTorch ({choice.kind})",
                       [py, "-m", "pip", "install", TORCH_REQUIREMENT, *choice.pip_args(), *pip_options]))
    plan.steps.append(("install the server and its dependencies",
                       [py, "-m", "pip", "install", "--upgrade", *requirement, *pip_options]))
    if reinstall_wheel is not None:
        plan.steps.append(("install exactly this server build",
                           [py, "-m", "pip", "install", "--force-reinstall", "--no-deps", str(reinstall_wheel),
                            *pip_options]))
    plan.steps.append(("check the environment", [py, "-c", _CHECK]))
    return plan


_CHECK = ("import server, torch, fastapi, uvicorn; "
          "print('server import OK: server', server.__version__, '| torch', torch.__version__, '| CUDA', "
          "torch.cuda.is_available())")


def run_setup(venv_dir: Path, base_python: str, package: str, log_path: Path,
              progress: Callable[[str, int], None], cancelled: Callable[[], bool], *,
              choice: TorchChoice | None = None, wheel_folder: Path = WHEEL_FOLDER,
              pip_options: Sequence[str] = (), platform: str | None = None, notes: list[str] | None = None,
              processes: set[subprocess.Popen[str]] | None = None) -> Path:
    """Create or update the environment; return its Python. See ``server_process.setup_environment``."""
    platform = platform_compat.current(platform)
    platform_compat.check_venv_path(venv_dir, platform)
    if choice is None:
        choice = choose_torch(platform, host_platform.machine(), detect_gpu(platform))
    wheel = None if package.strip() else bundled_wheel(wheel_folder)
    requirement = [str(wheel)] if wheel is not None else platform_compat.split_args(package, platform)
    python = Path(platform_compat.venv_python(venv_dir, platform))
    plan = plan_setup(venv_dir, base_python, requirement, choice, platform=platform, exists=python.exists(),
                      reinstall_wheel=wheel, pip_options=pip_options)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    lines = 0
    with open(log_path, "a", encoding="utf-8") as log:
        def say(text: str) -> None:
            nonlocal lines
            log.write(text + "\n")
            log.flush()
            lines += 1
            progress(text, lines)

        say(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} setting up {venv_dir}")
        say(f"PyTorch: {choice.reason}")
        if choice.warning:
            say(f"WARNING: {choice.warning}")
            if notes is not None:
                notes.append(choice.warning)
        for purpose, cmd in plan.steps:
            say(f"--- {purpose}: $ {platform_compat.join_args(cmd, platform)}")
            code = _run_step(cmd, log, log_path, say, cancelled, platform, processes)
            if code != 0:
                log.flush()
                raise ServerError("setup_failed", f"'{platform_compat.join_args(cmd[:5], platform)} ...' failed (exit "
                                  f"code {code}) while trying to {purpose}. Last lines of the log:\n"
                                  f"{_tail(log_path)}",
                                  "Open the set-up log; check the network connection (PyPI and "
                                  "download.pytorch.org) and the disk space")
    return Path(plan.python)


def _run_step(cmd: list[str], log, log_path: Path, say: Callable[[str], None], cancelled: Callable[[], bool],
              platform: str, processes: set[subprocess.Popen[str]] | None) -> int:
    # Blender's own interpreter settings must not leak into the environment's tools.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH")}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, encoding="utf-8", errors="replace", env=env, cwd=log_path.parent,
                            **platform_compat.no_window(platform))
    if processes is not None:
        processes.add(proc)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            say(line.rstrip())
            if cancelled():
                proc.terminate()
                raise ServerError("cancelled", "Setting up the server environment was cancelled.")
        return proc.wait()
    finally:
        if processes is not None:
            processes.discard(proc)
        if proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
