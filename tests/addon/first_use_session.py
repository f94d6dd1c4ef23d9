"""One headless Blender 5.0 (the bpy wheel) for tests/addon/test_first_use.py: the add-on installed and updated from a
remote extension repository, then its first-use screens against a stand-in server (tests/addon/fake_server.py).

Run as ``<bpy python> first_use_session.py --config CONFIG.json`` with ``BLENDER_USER_RESOURCES`` set to a scratch
folder; it writes one JSON file of observations, scenario by scenario, and the pytest side judges them.

Scenarios, in order: ``repository`` (serve the folder on 127.0.0.1, add it as a remote repository, sync, install)
→ ``update`` (a higher version's zip joins the folder, the index is rewritten, sync again: the update is offered,
then installed) → ``setup_progress`` (a first Generate whose server reports the one-time conversion, stage
``prepare``) → ``weights_import`` (Import from Folder: progress, cancel, the per-file report) → ``download_note`` (a
download that brings Zero123-XL in: the note about the first Generate, which goes once the models are loaded).
"""

from __future__ import annotations

import functools
import http.server
import importlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import bpy

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the stand-ins; not the repository root, so the source add-on stays out of reach
from blender_session import StubLayout, run_session, scenario  # noqa: E402 - after the path
from fake_server import FakeWeights, ScriptedServer, json_reply  # noqa: E402

MODULE: list[str] = []
"""The installed add-on's module name, ``bl_ext.<repository module>.one2345``."""
JOB = "0123456789abcdef0123456789abcdef"
SETUP_LINE = "One-time set-up: converting Zero123-XL from zero123-xl.ckpt (15.5 GB), about a minute…"




def addon(name: str = ""):
    return importlib.import_module(f"{MODULE[0]}.{name}" if name else MODULE[0])


def prefs():
    return bpy.context.preferences.addons[MODULE[0]].preferences


def calls_of(draw) -> list:
    calls: list = []
    draw(StubLayout(calls))
    return calls


def texts(calls: list, kind: str) -> list:
    return [c["kwargs"].get("text", "") for c in calls if c["call"] == kind]


def operators(calls: list) -> list:
    return [c["args"][0] for c in calls if c["call"] == "operator"]


class Repository:
    """The repository folder served over HTTP on 127.0.0.1, recording the paths asked for."""

    def __init__(self, folder: Path) -> None:
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args) -> None:
                outer.requests.append(self.path)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler,
                                                                                          directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/index.json"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def installed_version() -> str | None:
    """The version in the installed add-on's manifest (what Blender unpacked), or None."""
    try:
        text = (Path(addon().__file__).parent / "blender_manifest.toml").read_text()
    except (OSError, ImportError, IndexError):
        return None
    return next((line.split('"')[1] for line in text.splitlines() if line.startswith("version")), None)


def outdated(repo) -> int:
    """Updates Blender offers for the repository (what the Get Extensions page counts)."""
    bl_pkg = sys.modules["bl_pkg"]
    return bl_pkg.repo_stats_calc_outdated_for_repo_directory(bl_pkg.repo_cache_store_ensure(), repo.directory)


def run(config: dict) -> None:
    work = Path(config["work"])
    served = Repository(Path(config["repo_dir"]))
    found: dict = {}

    @scenario
    def repository(record):
        record["online_before"] = bpy.app.online_access
        bpy.context.preferences.system.use_online_access = True  # what Preferences > System > Network does
        record["online_after"] = bpy.app.online_access
        record["add"] = sorted(bpy.ops.preferences.extension_repo_add(
            name="One2345", remote_url=served.url, type="REMOTE", use_sync_on_startup=False))
        repos = bpy.context.preferences.extensions.repos
        index = next(i for i, r in enumerate(repos) if r.remote_url == served.url)
        found["index"], found["repo"] = index, repos[index]
        record["sync"] = sorted(bpy.ops.extensions.repo_sync(repo_index=index))
        record["install"] = sorted(bpy.ops.extensions.package_install(repo_index=index, pkg_id="one2345",
                                                                      enable_on_install=True))
        MODULE[:] = [f"bl_ext.{repos[index].module}.one2345"]
        record["module"] = MODULE[0]
        record["enabled"] = MODULE[0] in bpy.context.preferences.addons
        record["version"] = installed_version()
        record["generate_registered"] = hasattr(bpy.types, "ONE2345_OT_generate_mesh")
        record["outdated"] = outdated(repos[index])
        record["requests"] = list(served.requests)

    @scenario
    def update(record):
        repo_dir = Path(config["repo_dir"])
        shutil.copyfile(config["bumped_zip"], repo_dir / Path(config["bumped_zip"]).name)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        done = subprocess.run([config["build_python"], "-S", "-m", "one2345_addon.build", "--repo", str(repo_dir),
                               "--index-only"], cwd=config["repo_root"], env=env, capture_output=True, text=True,
                              timeout=120, check=False)
        record["index_rc"], record["index_stderr"] = done.returncode, done.stderr
        record["index_versions"] = [e["version"] for e in json.loads((repo_dir / "index.json").read_text())["data"]]
        served.requests.clear()
        record["sync"] = sorted(bpy.ops.extensions.repo_sync(repo_index=found["index"]))
        record["outdated"] = outdated(found["repo"])
        record["upgrade"] = sorted(bpy.ops.extensions.package_upgrade_all())
        record["version"] = installed_version()
        record["enabled"] = MODULE[0] in bpy.context.preferences.addons
        record["generate_registered"] = hasattr(bpy.types, "ONE2345_OT_generate_mesh")
        record["outdated_after"] = outdated(found["repo"])
        record["requests"] = list(served.requests)

    if not MODULE or MODULE[0] not in bpy.context.preferences.addons:  # judge the rest on a plain install
        bpy.ops.extensions.package_install_files(filepath=config["fallback_zip"], repo="user_default",
                                                 enable_on_install=True)
        MODULE[:] = ["bl_ext.user_default.one2345"]

    # From here on the add-on talks to a stand-in server on 127.0.0.1.
    state = {"weights": FakeWeights(polls=8), "models_loaded": {}, "job": "prepare", "polls": 0}

    def handler(request: dict):
        path, method = request["path"].split("?", 1)[0], request["method"]
        if path == "/v1/health":
            return json_reply(200, {"status": "ok", "version": installed_version(), "device": "cpu",
                                    "preset": "paper", "models_loaded": state["models_loaded"], "queue_length": 0,
                                    "running": None, "weights": state["weights"].health()})
        reply = state["weights"].handle(request)
        if reply is not None:
            return reply
        if path == "/v1/jobs" and method == "POST":
            return json_reply(202, {"id": JOB, "state": "queued", "url": f"/v1/jobs/{JOB}"})
        if path == f"/v1/jobs/{JOB}" and method == "DELETE":
            state["job"] = "cancelled"
            return json_reply(200, {"id": JOB, "state": "cancelled"})
        if path == f"/v1/jobs/{JOB}":
            state["polls"] += 1
            first = state["polls"] <= 2
            running = state["job"] == "prepare"
            return json_reply(200, {
                "id": JOB, "state": "running" if running else "cancelled", "stage": "prepare",
                "step": 1 if first else 3, "total": 6, "fraction": 0.0, "elapsed_s": 2.0, "eta_s": None,
                "message": SETUP_LINE if first else "converting the UNet (3.4 GB)", "previews": [],
                "error": None if running else {"kind": "cancelled", "message": "the job was cancelled", "fix": None},
                "result": None})
        return json_reply(404, {"error": {"kind": "not_found", "message": path, "fix": None}})

    fake = ScriptedServer(handler).__enter__()
    p = prefs()
    p.server_mode, p.server_url, p.server_token = "REMOTE", fake.url, "token"

    @scenario
    def setup_progress(record):
        generate, jobs = addon("ops.generate"), addon("core.jobs")
        settings = bpy.context.scene.one2345
        settings.image_source, settings.filepath = "FILE", config["image"]
        job = generate.start_generation(bpy.context)
        seen = []
        job.on("progress", lambda progress: seen.append(progress))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not job.drain():
            if job.progress.setup and job.progress.step == 3:
                break
            time.sleep(0.05)
        panel = addon("ui.panels").ONE2345_PT_generate
        calls = calls_of(lambda layout: panel.draw(SimpleNamespace(layout=layout), bpy.context))
        record["bars"] = [{"factor": c["kwargs"].get("factor"), "text": c["kwargs"].get("text")}
                          for c in calls if c["call"] == "progress"]
        record["labels"] = texts(calls, "label")
        record["operators"] = operators(calls)
        record["first_setup"] = next((jobs.bar(s) for s in seen if s.setup), None)
        record["cancel"] = sorted(bpy.ops.one2345.cancel_job())
        job.wait(timeout=20)
        record["state"] = job.state
        generate.finish_generation(bpy.context, job)

    weights_ops = addon("ops.weights")
    preferences_ui = addon("ui.preferences")
    folder = work / "one2345-checkout"
    folder.mkdir(exist_ok=True)
    (folder / "zero123-xl.ckpt").write_bytes(b"weights")
    (folder / "sam_vit_h_4b8939.pth").write_bytes(FakeWeights.DAMAGED)

    @scenario
    def weights_import(record):
        record["refresh"] = sorted(bpy.ops.one2345.refresh_weights())
        before = calls_of(preferences_ui.draw_weights)
        record["buttons_before"] = operators(before)
        record["poll_local"] = bpy.ops.one2345.import_weights.poll()
        p.server_url = "http://192.0.2.7:8000"  # a server on another machine cannot read this machine's folder
        record["poll_other_machine"] = bpy.ops.one2345.import_weights.poll()
        p.server_url = fake.url
        record["not_a_folder"] = sorted(bpy.ops.one2345.import_weights(directory=str(work / "nope")))
        # Mid-way: the progress bar and Cancel, then cancel it (nothing is imported).
        connect, _ = addon("core.settings").connector(p)
        task = weights_ops.WeightsImport(connect, str(folder), poll_interval=0.05)
        weights_ops._DOWNLOAD[:] = [task]
        task.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not task.drain():
            if "Copying" in task.progress.stage:
                break
            time.sleep(0.02)
        during = calls_of(preferences_ui.draw_weights)
        record["progress_during"] = texts(during, "progress")
        record["buttons_during"] = [(c["args"][0], c["kwargs"].get("text")) for c in during if c["call"] == "operator"]
        record["download_poll_during"] = bpy.ops.one2345.download_weights.poll()
        record["cancel"] = sorted(bpy.ops.one2345.cancel_weights_download())
        task.wait(timeout=20)
        record["after_cancel"] = task.state
        # The whole import through the operator (synchronous in background mode).
        record["import"] = sorted(bpy.ops.one2345.import_weights(directory=str(folder)))
        record["status_text"] = p.status_text
        after = calls_of(preferences_ui.draw_weights)
        record["labels_after"] = [(c["kwargs"].get("text"), c["kwargs"].get("icon")) for c in after
                                  if c["call"] == "label"]
        record["buttons_after"] = operators(after)
        record["states_after"] = {f["name"]: f["state"] for f in weights_ops.STATE.weights["files"]}
        record["posted_paths"] = state["weights"].paths
        p.python_path, p.weights_dir = "/opt/one2345 env/bin/python", "/data/weights"
        record["prepare_command"] = weights_ops.prepare_command(p)
        record["copy"] = sorted(bpy.ops.one2345.copy_prepare_command())
        record["clipboard"] = bpy.context.window_manager.clipboard
        p.python_path, p.weights_dir = "", ""

    @scenario
    def download_note(record):
        state["weights"] = FakeWeights(polls=3)
        record["download"] = sorted(bpy.ops.one2345.download_weights())
        record["status_text"] = p.status_text
        record["labels"] = texts(calls_of(preferences_ui.draw_weights), "label")
        state["models_loaded"] = {"zero123": "converted zero123-xl"}  # the first Generate has run
        bpy.ops.one2345.refresh_weights()
        record["labels_after_load"] = texts(calls_of(preferences_ui.draw_weights), "label")

    fake.__exit__(None, None, None)


if __name__ == "__main__":
    run_session(run)
