"""The server environment's set-up: which PyTorch build (driver version and platform → wheel index), the exact
commands per platform (Windows: ``Scripts\\python.exe``), paths that fit Windows' MAX_PATH, and a whole set-up run
offline against a local folder of stand-in wheels, installing the server wheel the build makes. Nothing is downloaded.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path, PureWindowsPath

import pytest

from one2345_addon import build, build_rules
from one2345_addon.core import platform_compat, server_process, server_slots, setup_env
from one2345_addon.core.client import ServerError
from one2345_addon.core.setup_env import GpuInfo, TorchChoice, choose_torch

INDEX = setup_env.PYTORCH_INDEX


@pytest.mark.parametrize(("platform", "driver", "compute", "expected"), [
    ("linux", "580.65.06", 8.9, "cu130"),  # CUDA 13.0 needs ≥ 580.65.06 on Linux
    ("linux", "580.65.05", 8.9, "cu128"),
    ("linux", "570.26", 9.0, "cu128"),  # CUDA 12.8 needs ≥ 570.26
    ("linux", "570.25.99", 9.0, "cu126"),
    ("linux", "580.95.05", 6.1, "cu126"),  # Pascal: CUDA 13 and PyTorch's 12.8 builds dropped it
    ("linux", "580.95.05", 7.0, "cu126"),  # Volta: dropped from PyTorch's 12.8 builds in 2.11
    ("linux", "580.95.05", None, "cu130"),  # an nvidia-smi without compute_cap: the driver decides alone
    ("linux", "560.28.03", 8.6, "cu126"),
    ("linux", "550.54.14", 8.6, "cu124"),
    ("linux", "535.104.05", 8.0, "cu121"),
    ("linux", "525.60.13", 8.0, "cu118"),
    ("win32", "570.64", 8.9, "cu126"),  # Windows needs ≥ 570.65 for CUDA 12.8
    ("win32", "570.65", 8.9, "cu128"),
    ("win32", "581.57", 12.0, "cu130"),  # R580 on Windows: CUDA 13
    ("win32", "560.76", 7.5, "cu126"),
    ("win32", "551.61", 7.5, "cu124"),
    ("win32", "531.14", 7.5, "cu121"),
    ("win32", "520.06", 7.5, "cu118"),
])
def test_driver_version_chooses_the_newest_cuda_index_it_supports(platform, driver, compute, expected):
    choice = choose_torch(platform, "x86_64", GpuInfo(driver, ("NVIDIA GeForce RTX 4090",), compute))
    assert choice.kind == "cuda" and choice.index_url == INDEX + expected and choice.warning is None
    assert driver in choice.reason and expected in choice.reason
    assert choice.pip_args() == ["--index-url", INDEX + expected]


def test_no_driver_or_a_too_old_one_installs_the_cpu_build_with_a_warning():
    for platform in ("linux", "win32"):
        none = choose_torch(platform, "x86_64", None)
        assert none.kind == "cpu" and none.index_url == INDEX + "cpu" and "hours" in none.warning
        old = choose_torch(platform, "AMD64", GpuInfo("470.82.01"))
        assert old.kind == "cpu" and "470.82.01" in old.warning and "too old" in old.warning
        assert "hours" in old.warning and "Update the driver" in old.warning
    garbled = choose_torch("linux", "x86_64", GpuInfo("N/A"))
    assert garbled.kind == "cpu" and "'N/A'" in garbled.reason and garbled.warning


def test_apple_silicon_gets_pypis_wheels_and_intel_macs_a_warning():
    silicon = choose_torch("darwin", "arm64", None)
    assert silicon.kind == "default" and silicon.index_url is None and silicon.pip_args() == []
    assert silicon.warning is None
    intel = choose_torch("darwin", "x86_64", None)
    assert intel.index_url is None and "hours" in intel.warning


def test_nvidia_smi_output_and_the_fallback_for_old_nvidia_smi(monkeypatch):
    two = setup_env.parse_nvidia_smi("570.86.15, NVIDIA GeForce RTX 4090, 8.9\n570.86.15, Tesla P40, 6.1\n")
    assert two == GpuInfo("570.86.15", ("NVIDIA GeForce RTX 4090", "Tesla P40"), 6.1)
    assert setup_env.parse_nvidia_smi("572.16\n") == GpuInfo("572.16", (), None)
    assert setup_env.parse_nvidia_smi("NVIDIA-SMI has failed because it couldn't communicate with the driver") is None
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        if "compute_cap" in cmd[1]:  # an nvidia-smi from before 2021 does not know the field
            return subprocess.CompletedProcess(cmd, 6, "", 'Field "compute_cap" is not a valid field to query.')
        return subprocess.CompletedProcess(cmd, 0, "535.104.05\n", "")

    monkeypatch.setattr(setup_env.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    assert setup_env.detect_gpu("linux", run=fake_run) == GpuInfo("535.104.05", (), None)
    assert calls[0] == ["/usr/bin/nvidia-smi", "--query-gpu=driver_version,name,compute_cap", "--format=csv,noheader"]
    assert calls[1] == ["/usr/bin/nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
    monkeypatch.setattr(setup_env.shutil, "which", lambda name: None)
    assert setup_env.detect_gpu("linux", run=fake_run) is None  # no nvidia-smi: no NVIDIA driver


def test_windows_looks_for_nvidia_smi_in_system32_and_nvsmi(monkeypatch):
    monkeypatch.setattr(setup_env.shutil, "which", lambda name: None)
    monkeypatch.setenv("SystemRoot", r"C:\Windows")
    monkeypatch.setenv("ProgramFiles", r"C:\Program Files")
    found = setup_env.nvidia_smi_candidates("win32")
    assert [Path(p).name for p in found] == ["nvidia-smi.exe", "nvidia-smi.exe"]
    assert "System32" in found[0] and "NVSMI" in found[1]
    assert setup_env.nvidia_smi_candidates("linux") == []


@pytest.mark.parametrize("platform", ["linux", "win32", "darwin"])
def test_the_commands_of_a_set_up_per_platform(platform):
    venv = PureWindowsPath(r"C:\Users\me\AppData\Local\One2345") if platform == "win32" else Path("/home/me/env")
    choice = choose_torch(platform, "arm64" if platform == "darwin" else "x86_64", GpuInfo("575.57.08", (), 8.9))
    wheel = Path("/x/server_wheel/one2345_blender-0.1.0-py3-none-any.whl")
    plan = setup_env.plan_setup(venv, "blender-python", [str(wheel)], choice, platform=platform,
                                reinstall_wheel=wheel)
    python = str(venv / "Scripts" / "python.exe") if platform == "win32" else str(venv / "bin" / "python")
    assert str(plan.python) == python
    purposes = [purpose for purpose, _ in plan.steps]
    assert purposes == ["create the environment", f"install PyTorch ({choice.kind})",
                        "install the server and its dependencies", "install exactly this server build",
                        "check the environment"]
    commands = [cmd for _, cmd in plan.steps]
    assert commands[0] == ["blender-python", "-m", "venv", str(venv)]
    torch_cmd = [python, "-m", "pip", "install", "torch>=2.1"]
    if platform == "darwin":
        assert commands[1] == torch_cmd  # PyPI's wheels: no index
    else:
        assert commands[1] == [*torch_cmd, "--index-url", INDEX + "cu128"]
    assert commands[2] == [python, "-m", "pip", "install", "--upgrade", str(wheel)]
    assert commands[3] == [python, "-m", "pip", "install", "--force-reinstall", "--no-deps", str(wheel)]
    assert commands[4][:2] == [python, "-c"] and "import server, torch, fastapi, uvicorn" in commands[4][2]
    again = setup_env.plan_setup(venv, "blender-python", ["my-server"], choice, platform=platform, exists=True)
    assert again.steps[0][0].startswith("install PyTorch") and len(again.steps) == 3
    if platform == "win32":
        shown = platform_compat.join_args(commands[1], platform)
        assert shown.startswith(r"C:\Users\me\AppData\Local\One2345\Scripts\python.exe -m pip install torch>=2.1")


def test_windows_environment_goes_to_a_short_folder_that_fits_max_path():
    user = "C:\\Users\\" + "a" * 20  # a long-ish user name
    # Blender's extension user folder on Windows (bpy.utils.extension_path_user for the user_default repository)
    ext = PureWindowsPath(user, "AppData", "Roaming", "Blender Foundation", "Blender", "5.0", "extensions", ".user",
                          "user_default", "one2345")
    venv = platform_compat.default_venv_dir(ext, "win32", {"LOCALAPPDATA": user + r"\AppData\Local"})
    assert str(venv) == user + r"\AppData\Local\One2345"
    deepest_env = len(str(venv)) + 1 + platform_compat.VENV_DEEPEST_RELATIVE  # with the constant's headroom
    assert deepest_env < platform_compat.MAX_PATH, deepest_env
    platform_compat.check_venv_path(venv, "win32", read_registry=lambda: 0)  # fits without long paths
    beside = ext / "server-env"  # where it used to go: over the limit
    assert len(str(beside)) + 1 + platform_compat.VENV_DEEPEST_RELATIVE >= platform_compat.MAX_PATH
    with pytest.raises(ServerError) as caught:
        platform_compat.check_venv_path(beside, "win32", read_registry=lambda: 0)
    assert caught.value.kind == "setup_failed" and str(beside) in caught.value.message
    assert "LongPathsEnabled" in caught.value.fix
    platform_compat.check_venv_path(beside, "win32", read_registry=lambda: 1)  # long paths enabled: fine
    platform_compat.check_venv_path("/" + "x" * 300, "linux")  # no MAX_PATH elsewhere
    assert platform_compat.default_venv_dir("/home/me/ext", "linux") == Path("/home/me/ext/server-env")
    # Server jobs: the deepest file is <job id: 32 hex>/run/views/.pose.json.<8 hex>.tmp (66 characters, the
    # atomic write's temporary name), in the last slot's jobs folder.
    jobs = server_slots.slot_paths(ext, server_slots.MAX_SLOTS)[1]
    deepest_job = len(str(jobs)) + 1 + len(f"{'0' * 32}/run/views/.pose.json.{'0' * 8}.tmp")
    assert deepest_job <= 200, deepest_job


def test_the_venv_deepest_path_constant_covers_this_environment():
    """VENV_DEEPEST_RELATIVE against the real thing: the deepest file of this test environment (torch and the
    server's dependencies), in Windows' layout (``Lib/site-packages`` instead of ``lib/python3.X/site-packages``)."""
    root = Path(sys.prefix)
    deepest = ""
    for folder, _, names in os.walk(root):
        for name in names:
            rel = os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
            rel = re.sub(r"^lib/python3\.\d+/", "Lib/", rel)
            if len(rel) > len(deepest):
                deepest = rel
    assert "site-packages/torch" in deepest or len(deepest) < 150, deepest  # torch nests deepest
    assert len(deepest) + 2 <= platform_compat.VENV_DEEPEST_RELATIVE, (len(deepest), deepest)  # +cu130 vs +cpu


def test_no_bundled_wheel_is_explained(tmp_path):
    with pytest.raises(ServerError) as caught:
        setup_env.bundled_wheel(tmp_path)
    assert caught.value.kind == "setup_failed" and "one2345_addon.build" in caught.value.message
    assert "Server Package" in caught.value.fix


def stand_in_wheels(folder: Path) -> None:
    """A tiny wheel for every requirement of the server wheel (lowest allowed version), and importable torch,
    fastapi and uvicorn for the check step."""
    modules = {"torch": "__version__ = '2.1.0'\nclass cuda:\n    @staticmethod\n    def is_available():\n"
                        "        return False\n",
               "fastapi": "__version__ = '0.110'\n", "uvicorn": "__version__ = '0.29'\n"}
    pyproject = build_rules.load_toml(build.PYPROJECT)
    for requirement in pyproject["project"]["optional-dependencies"]["server"]:
        name = re.match(r"[A-Za-z0-9._-]+", requirement).group()
        lower = re.search(r">=\s*([0-9][0-9.]*)", requirement)
        version = lower.group(1) if lower else "1.0"
        files = {f"{name}/__init__.py": modules[name].encode()} if name in modules else {}
        build.write_wheel(folder, name, version, files)


def test_a_whole_set_up_offline_installs_the_bundled_server_wheel(tmp_path):
    stubs, wheel_folder = tmp_path / "index", tmp_path / "server_wheel"
    stand_in_wheels(stubs)
    version = build.server_version()
    wheel = build.build_server_wheel(wheel_folder, build_rules.load_toml(build.PYPROJECT), version)
    cpu = TorchChoice("cpu", None, "test: the CPU build from a local folder", setup_env.CPU_WARNING)
    lines, notes = [], []
    log = tmp_path / "logs" / "setup.log"
    python = server_process.setup_environment(
        tmp_path / "env", sys.executable, "", log, progress=lambda line, n: lines.append(line), torch=cpu,
        wheel_folder=wheel_folder, pip_options=("--no-index", "--find-links", str(stubs)), notes=notes)
    assert python == tmp_path / "env" / "bin" / "python" and python.is_file()
    assert notes == [setup_env.CPU_WARNING]
    text = log.read_text()
    shown = [line for line in lines if "$ " in line]
    assert len(shown) == 5 and all(line in text for line in shown)  # every command shown and logged
    assert f"$ {python} -m pip install 'torch>=2.1' --no-index --find-links {stubs}" in text
    assert f"--force-reinstall --no-deps {wheel}" in text and f"WARNING: {setup_env.CPU_WARNING}" in text
    assert f"server import OK: server {version} | torch 2.1.0 | CUDA False" in text
    # run from a neutral folder so the checkout cannot stand in for the installed server
    done = subprocess.run([str(python), "-c", "import server; print(server.__version__, server.__file__)"],
                          capture_output=True, text=True, cwd=tmp_path, check=True)
    installed_version, installed_file = done.stdout.split()
    assert installed_version == version and Path(installed_file).is_relative_to(tmp_path / "env")
    assert (tmp_path / "env" / "bin" / "one2345").is_file()  # the console script of the wheel
    # run again (an update): no new venv, the same commands otherwise
    before = len(text)
    server_process.setup_environment(tmp_path / "env", sys.executable, "", log, torch=cpu, wheel_folder=wheel_folder,
                                     pip_options=("--no-index", "--find-links", str(stubs)))
    rerun = log.read_text()[before:]
    assert "create the environment" not in rerun and "install exactly this server build" in rerun
