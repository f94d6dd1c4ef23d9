"""Run a BlenderProc script in-process on the ``bpy`` 4.2 wheel, without a Blender download and without internet.

``blenderproc run script.py ARGS`` downloads Blender 4.2.1 (first use), pip-installs BlenderProc's requirements into
Blender's Python, and then runs ``blender --background --python script.py -- script.py TEMP_DIR ARGS``. Users with
internet can do exactly that with :mod:`training.render.render_views`. This launcher gives the same environment to a
plain Python 3.11 interpreter that has ``bpy==4.2.0`` installed (``.venv-bpy42``, built by ``.ci/blender-envs``)::

    .venv-bpy42/bin/python training/render/launch_inprocess.py training/render/render_views.py ARGS

It removes three obstacles, each narrowly (see ``shared/notes/blender-and-blenderproc-offline.md``):

1. BlenderProc only imports its API when ``INSIDE_OF_THE_INTERNAL_BLENDER_PYTHON_ENVIRONMENT`` is set, and then
   (a) removes the parent folder of the ``blenderproc`` package from ``sys.path`` — which is why BlenderProc lives in
   its own folder (``pip install --target .venv-bpy42/blenderproc``) and never in site-packages — and (b) pip-installs
   its requirements into "Blender's Python" through ``SetupUtility.setup_pip``. The launcher sets the variable, puts
   the BlenderProc folder first on ``sys.path`` and replaces ``setup_pip`` (through an import hook, because the package
   ``__init__`` calls it during the import) by a function that installs nothing: the requirements are already in the
   environment. ``sys.argv`` is shaped like Blender's (``--background -- SCRIPT TEMP_DIR ARGS``) so that BlenderProc's
   own argument handling and temporary-directory setup run unchanged.
2. ``bproc.init()`` sets the UI language to ``en_US``, which the wheel does not have (only ``DEFAULT``): Blender
   raises ``TypeError: ... enum "en_US" not found``. The wrapper catches exactly that error and runs the rest of
   BlenderProc 2.8.0's ``init`` (Cycles, render devices, default parameters, the optional seed, the "initialised"
   flag). The language only affects UI strings, so nothing else changes.
3. OpenCV only reads and writes OpenEXR (BlenderProc's depth output) when ``OPENCV_IO_ENABLE_OPENEXR=1`` is set before
   ``cv2`` is first imported; the launcher sets it first thing (an OpenCV 4.x wheel is needed: 5.x has no EXR at all).

Locations: the BlenderProc folder is ``$ONE2345_BLENDERPROC_PATH`` if set, else ``<sys.prefix>/blenderproc`` (the
venv's own folder). The temporary directory (BlenderProc renders frames there before loading them) is created under
``/dev/shm`` when it exists, as ``blenderproc run`` does, and removed on exit (folders of killed runs are removed by
the next launch).

This file must not import anything outside the standard library at module level: it runs before ``bpy`` and
BlenderProc are importable.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import runpy
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

BLENDERPROC_PATH_ENV = "ONE2345_BLENDERPROC_PATH"
"""Environment variable naming the folder that holds the ``blenderproc`` package (pip ``--target`` folder)."""

TEMP_PREFIX = "blender_proc_one2345_"
"""Prefix of the launcher's temporary folders, followed by the owning pid."""

_SETUP_UTILITY = "blenderproc.python.utility.SetupUtility"
_LANGUAGE_ERROR_MARK = '"en_US" not found'
"""Text of Blender's TypeError when the language enum lacks ``en_US``: the only error the init wrapper swallows."""


def blenderproc_folder() -> Path:
    """The folder that contains the ``blenderproc`` package (see the module docstring for the lookup order)."""
    configured = os.environ.get(BLENDERPROC_PATH_ENV)
    return Path(configured) if configured else Path(sys.prefix) / "blenderproc"


def _installed_packages_path() -> str:
    """What the replaced ``setup_pip`` returns: the environment's own site-packages (already on ``sys.path``)."""
    return sysconfig.get_paths()["purelib"]


def _setup_pip_offline(*_args: object, **_kwargs: object) -> str:
    """Stand-in for ``SetupUtility.setup_pip``: BlenderProc's requirements are preinstalled, so install nothing."""
    return _installed_packages_path()


class _SetupPipPatcher(importlib.abc.MetaPathFinder):
    """Import hook: once ``SetupUtility`` is executed, replace its ``setup_pip`` before the package ``__init__`` uses
    it (the ``__init__`` imports the module and calls ``SetupUtility.setup`` in the same statement sequence)."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != _SETUP_UTILITY:
            return None
        sys.meta_path.remove(self)  # let the normal finders locate the real module, and patch only once
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        execute = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            module.SetupUtility.setup_pip = staticmethod(_setup_pip_offline)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _patch_init(bproc: ModuleType) -> None:
    """Wrap ``bproc.init`` so the missing ``en_US`` language is the only thing skipped (obstacle 2)."""
    import bpy  # importable only after BlenderProc set up the environment
    from blenderproc.python.renderer import RendererUtility
    from blenderproc.python.utility import Initializer
    from blenderproc.python.utility.GlobalStorage import GlobalStorage

    original = Initializer.init

    def init(clean_up_scene: bool = True) -> None:
        try:
            original(clean_up_scene)
        except TypeError as err:
            if _LANGUAGE_ERROR_MARK not in str(err):
                raise
            # The remainder of BlenderProc 2.8.0's init(), after the language assignment that failed.
            bpy.context.scene.render.engine = "CYCLES"
            RendererUtility.set_render_devices()
            Initializer._Initializer.set_default_parameters()
            seed = os.getenv("BLENDER_PROC_RANDOM_SEED")
            if seed:
                import random

                import numpy as np

                random.seed(int(seed))
                np.random.seed(int(seed))
            GlobalStorage.add("bproc_init_complete", True)

    init.__doc__ = original.__doc__
    Initializer.init = init
    bproc.init = init


def prepare(script: str, script_args: Sequence[str], temp_dir: str) -> ModuleType:
    """Make ``import blenderproc as bproc`` work in this interpreter as it does inside Blender.

    Args:
        script: path of the BlenderProc script that will run (BlenderProc records it as ``sys.argv[0]``).
        script_args: the script's own arguments.
        temp_dir: BlenderProc's temporary directory (must exist).

    Returns:
        The imported ``blenderproc`` package, with ``init`` wrapped.

    Raises:
        RuntimeError: the BlenderProc folder or ``bpy`` is missing (the message says how to build the environment).
    """
    os.environ["OPENCV_IO_ENABLE_OPENEXR"] = "1"  # before anything imports cv2
    folder = blenderproc_folder().resolve()
    if not (folder / "blenderproc" / "__init__.py").is_file():
        raise RuntimeError(
            f"BlenderProc is not installed in {folder}: run .ci/blender-envs (it installs blenderproc==2.8.0 with "
            f"pip --target into .venv-bpy42/blenderproc), or set {BLENDERPROC_PATH_ENV} to the folder that holds it"
        )
    if importlib.util.find_spec("bpy") is None:
        raise RuntimeError(f"{sys.executable} has no bpy module: run BlenderProc scripts with .venv-bpy42/bin/python")
    os.environ["INSIDE_OF_THE_INTERNAL_BLENDER_PYTHON_ENVIRONMENT"] = "1"
    # BlenderProc removes exactly os.path.abspath(<parent of its package>) from sys.path on import.
    sys.path.insert(0, os.path.abspath(folder))
    sys.meta_path.insert(0, _SetupPipPatcher())
    sys.argv = [sys.executable, "--background", "--", script, temp_dir, *script_args]
    import blenderproc  # runs BlenderProc's setup, which rewrites sys.argv to [script, *args]

    _patch_init(blenderproc)
    return blenderproc


def remove_stale_temp_dirs(parent: Path) -> None:
    """Delete temporary folders of launcher processes that no longer exist (killed runs cannot clean up; under
    ``/dev/shm`` they would hold memory until reboot). Folder names carry the owner's pid."""
    for folder in parent.glob(f"{TEMP_PREFIX}*_*"):
        pid_text = folder.name[len(TEMP_PREFIX) :].split("_", 1)[0]
        if not pid_text.isdigit():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:
            continue  # alive, owned by another user


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``argv[0]`` (a BlenderProc script) with the arguments ``argv[1:]``; returns its exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: launch_inprocess.py SCRIPT [SCRIPT ARGS...]", file=sys.stderr)
        return 2
    script = str(Path(args[0]).resolve())
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    remove_stale_temp_dirs(Path(shm or tempfile.gettempdir()))
    temp_dir = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}_", dir=shm)
    try:
        prepare(script, args[1:], temp_dir)
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as done:
            code = done.code
            return code if isinstance(code, int) else (0 if code is None else 1)
        return 0
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    status = main()
    # The bpy 4.2 wheel can crash (SIGSEGV) in its interpreter-exit teardown after a run that finished cleanly, which
    # would turn success into failure. All output is written and the temporary folder is gone: leave without teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
