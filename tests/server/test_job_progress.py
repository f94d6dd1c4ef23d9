"""What a job's status shows while it runs: the one-time Zero123-XL conversion of a first load (issue #25), and
previews that match the files on disk (issue #31, finding 17).

Before: the conversion ran inside the worker's model loading unseen (the job said ``running`` with no stage for a
minute) and could not be cancelled; a re-mesh job listed no previews although it starts from a copy of its source's
views; and after ring 2 moved (an elevation set on continue), the old ring's views stayed listed though the pipeline
had deleted them (404 for a client that fetched them).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from server.common import weights as weights_table
from server.pipeline import GenerateResult, One2345Pipeline, Progress, models
from server.stages.multiview import convert
from server.stages.multiview.convert import folder as convert_folder
from tests.server.multiview.test_convert import TINY, make_state_dict, write_ckpt
from tests.server.test_app import AUTH, FakePipeline, make_client, submit, wait_state
from tests.server.test_review import FAST, post, send, tiny_client, wait

REPO = Path(__file__).resolve().parents[2]

CONVERTED = "zero123-xl-diffusers"
"""The converted folder of ``zero123-xl.ckpt`` under ``<weights>/converted``."""


# -- the one-time conversion of a first load (issue #25) ------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A tiny Zero123 checkpoint with the full key layout (the real conversion runs on it in well under a second)."""
    return write_ckpt(tmp_path_factory.mktemp("ckpt") / "zero123-tiny.ckpt", make_state_dict()).read_bytes()


class Converted(Exception):
    """The conversion finished: the stand-in loader stops the paper loading there and returns its fake pipeline."""


class ConvertingLoader:
    """Stands in for the paper preset's first load: it runs the real model loading (``models.paper_models``) of a
    weights folder holding a tiny ``zero123-xl.ckpt``, so the real conversion reports through whatever observer the
    worker set. The conversion holds at its first weight-file write (its temporary folder on disk) until ``gate`` is
    set or it is cancelled; once converted, the loader returns ``fake``."""

    def __init__(self, root: Path, fake: FakePipeline, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root, self.fake = root, fake
        self.gate, self.holding = threading.Event(), threading.Event()
        self.calls = 0
        real = convert.ensure_converted

        def held(ckpt_path, cache_dir, *, progress=None, should_cancel=None, **kwargs):
            cancelled = should_cancel or (lambda: False)

            def on_progress(event: convert.ConversionProgress) -> None:
                if progress is not None:
                    progress(event)
                if event.phase == "write" and not self.holding.is_set():
                    self.holding.set()
                    deadline = time.monotonic() + 20  # never hangs a broken run: its assertions fail instead
                    while not (self.gate.is_set() or cancelled()) and time.monotonic() < deadline:
                        time.sleep(0.01)

            real(ckpt_path, cache_dir, progress=on_progress, should_cancel=should_cancel, architecture=TINY)
            raise Converted

        monkeypatch.setattr(convert, "ensure_converted", held)
        monkeypatch.setattr(convert_folder, "ZERO123_XL", TINY)
        monkeypatch.setattr(weights_table, "require", lambda *a, **k: None)  # only zero123-xl.ckpt is there

    def __call__(self) -> FakePipeline:
        self.calls += 1
        self.holding.clear()
        try:
            models.paper_models("cpu", self.root, download_missing=False)
        except Converted:
            return self.fake
        raise AssertionError("the stand-in conversion always ends with Converted or CancelledError")


@pytest.fixture
def loader(tmp_path: Path, ckpt_bytes: bytes, monkeypatch: pytest.MonkeyPatch) -> ConvertingLoader:
    root = tmp_path / "weights"
    root.mkdir()
    (root / "zero123-xl.ckpt").write_bytes(ckpt_bytes)
    return ConvertingLoader(root, FakePipeline(), monkeypatch)


def leftovers(root: Path) -> list[str]:
    """What a conversion left under ``<weights>/converted``: the converted folder, temporary folders, lock files."""
    folder = root / "converted"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_a_first_job_shows_the_conversion_and_cancelling_it_cancels_the_conversion(tmp_path, loader):
    jobs_dir = tmp_path / "jobs"
    with make_client(jobs_dir, loader) as client:
        job = submit(client).json()["id"]
        assert loader.holding.wait(30), "the conversion never started"
        assert leftovers(loader.root), "the conversion holds mid-way, its temporary folder on disk"
        status = client.get(f"/v1/jobs/{job}", headers=AUTH).json()
        assert status["state"] == "running" and status["stage"] == "prepare" and status["fraction"] == 0.0
        assert status["message"].startswith("writing unet/") and 1 <= status["step"] < status["total"]
        assert str(loader.root) not in status["message"]
        log_txt = (jobs_dir / job / "log.txt").read_text()
        assert "stage prepare (overall 0%): One-time set-up: converting Zero123-XL from zero123-xl.ckpt" in log_txt
        assert json.loads((jobs_dir / job / "status.json").read_text())["stage"] == "prepare"

        cancelled = client.delete(f"/v1/jobs/{job}", headers=AUTH).json()
        assert cancelled["state"] == "cancelled" and cancelled["error"]["kind"] == "cancelled"
        assert cancelled["message"] is None
        assert leftovers(loader.root) == []  # nothing of the conversion was kept
        assert client.get("/v1/health").json()["models_loaded"] == {}

        # The next job loads again; this time the conversion runs to its end and the job to its result.
        loader.gate.set()
        done = wait_state(client, submit(client).json()["id"])
        assert done["state"] == "done" and done["stage"] == "export" and done["message"] is None
        assert loader.calls == 2 and leftovers(loader.root) == [CONVERTED]
        assert (loader.root / "converted" / CONVERTED / "unet" / "config.json").is_file()


def test_a_server_stop_during_the_conversion_records_the_job_cancelled(tmp_path, loader):
    jobs_dir = tmp_path / "jobs"
    with make_client(jobs_dir, loader) as client:
        job = submit(client).json()["id"]
        assert loader.holding.wait(30), "the conversion never started"
        assert client.get(f"/v1/jobs/{job}", headers=AUTH).json()["stage"] == "prepare"
    record = json.loads((jobs_dir / job / "status.json").read_text())
    assert record["state"] == "cancelled" and "server was stopped" in record["error"]["message"]
    assert record["message"] is None
    assert leftovers(loader.root) == []



_ANY_LOADER_PROBE = """
import io, json, sys
from PIL import Image
from server.common.errors import MissingWeightsError
from server.pipeline import Progress
from server.pipeline.loading import observed
from server.service.jobs import JobManager, check_options

seen = {}

def loader():
    progress, should_cancel = observed()
    seen.update(observed=progress is not None and should_cancel is not None,
                models_imported="server.pipeline.models" in sys.modules)
    if progress is not None:
        progress(Progress("prepare", 1, 2, 0.0, message="One-time set-up: a stand-in step"))
    raise MissingWeightsError("the stand-in loads nothing")

manager = JobManager(sys.argv[1], loader)
manager.start()
png = io.BytesIO()
Image.new("RGB", (64, 64), "white").save(png, format="PNG")
job = manager.submit(png.getvalue(), "png", "x", check_options({}))["id"]
manager._jobs[job].finished.wait(60)
manager.stop()
heavy = sorted(m for m in ("server.pipeline.models", "diffusers") if m in sys.modules)
print(json.dumps({**seen, "heavy": heavy, "state": manager.status(job)["state"],
                  "log": (manager.jobs_dir / job / "log.txt").read_text()}))
"""


def test_any_pipeline_loader_sees_the_jobs_loading_observer_without_the_model_modules(tmp_path):
    """The worker sets the loading observer around every first load, not only once ``server.pipeline.models``
    happens to be imported: a loader in a fresh process (nothing imported the models module) receives the job's
    progress and cancel flag, and its ``prepare`` report reaches the job, with neither the models module nor
    diffusers imported for it.

    Before: the worker looked the models module up in ``sys.modules`` and observed nothing when it was absent."""
    done = subprocess.run([sys.executable, "-c", _ANY_LOADER_PROBE, str(tmp_path / "jobs")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["observed"] is True and report["models_imported"] is False and report["heavy"] == []
    assert report["state"] == "failed"
    assert "stage prepare (overall 0%): One-time set-up: a stand-in step" in report["log"]


# -- previews that match the files (issue #31, finding 17) -----------------------------------------------------------


class RemeshingFake(FakePipeline):
    """The stand-in pipeline with a re-mesh: a box mesh from the copied run folder."""

    def remesh(self, run_dir, options, progress=None, should_cancel=None) -> GenerateResult:
        run_dir = Path(run_dir)
        progress(Progress("reconstruct", 1, 1, 0.5))
        mesh = trimesh.creation.box()
        mesh_path = run_dir / f"mesh.{options.format}"
        mesh.export(mesh_path)
        return GenerateResult(mesh_path=mesh_path, views_dir=run_dir / "views", elevation=12.5, polar=77.5,
                              elevation_source="given", background="none", timings={}, meta_path=run_dir / "meta.json",
                              vertices=len(mesh.vertices), faces=len(mesh.faces), seed=1)


def test_a_remesh_job_lists_the_copied_views_as_previews(tmp_path):
    jobs_dir = tmp_path / "jobs"
    with make_client(jobs_dir, lambda: RemeshingFake()) as client:
        source = wait_state(client, submit(client).json()["id"])
        assert [p["name"] for p in source["previews"]] == ["input_256.png", "0.png"]
        views = jobs_dir / source["id"] / "run" / "views"
        (views / "pose.json").write_text("{}")
        for name in ("3_1.png", "10.png", "3.png"):
            Image.new("RGB", (8, 8)).save(views / name)
        (views / "notes.png.txt").write_text("not a view")
        r = client.post(f"/v1/jobs/{source['id']}/remesh", json={"resolution": 64}, headers=AUTH)
        assert r.status_code == 202, r.text
        expected = ["input_256.png", "0.png", "3.png", "3_1.png", "10.png"]
        status = wait_state(client, r.json()["id"])
        assert status["state"] == "done" and status["remesh_of"] == source["id"]
        assert [p["name"] for p in status["previews"]] == expected
        for preview in status["previews"]:
            assert client.get(preview["url"], headers=AUTH).status_code == 200


def test_a_remesh_job_is_queued_with_its_previews(tmp_path):
    """At submission, before the worker touches it: the queued job's own status lists the copied views."""
    jobs_dir = tmp_path / "jobs"
    fake = RemeshingFake()
    fake.actions = ["ok", "gate"]  # the second job holds the worker, so the re-mesh stays queued
    with make_client(jobs_dir, lambda: fake) as client:
        source = wait_state(client, submit(client).json()["id"])
        (jobs_dir / source["id"] / "run" / "views" / "pose.json").write_text("{}")
        blocker = submit(client).json()["id"]
        wait_state(client, blocker, ("running",))
        remesh = client.post(f"/v1/jobs/{source['id']}/remesh", json={}, headers=AUTH).json()["id"]
        status = client.get(f"/v1/jobs/{remesh}", headers=AUTH).json()
        assert status["state"] == "queued" and [p["name"] for p in status["previews"]] == ["input_256.png", "0.png"]
        assert json.loads((jobs_dir / remesh / "status.json").read_text())["previews"] == ["input_256.png", "0.png"]
        fake.gate.set()
        assert wait_state(client, remesh)["state"] == "done"


class ForgetfulFake(FakePipeline):
    """Reports a view as a preview and then deletes it, as a moved ring 2 does with its old views."""

    def __call__(self, image, run_dir, options=None, progress=None, should_cancel=None) -> GenerateResult:
        (Path(run_dir) / "views").mkdir(parents=True, exist_ok=True)
        gone = Path(run_dir) / "views" / "4.png"
        Image.new("RGB", (8, 8)).save(gone)
        progress(Progress("stage1b", 1, 1, 0.3, preview=gone))
        gone.unlink()
        return super().__call__(image, run_dir, options, progress, should_cancel)


def test_previews_whose_file_is_gone_are_dropped_when_the_task_ends(tmp_path):
    with make_client(tmp_path / "jobs", lambda: ForgetfulFake()) as client:
        status = wait_state(client, submit(client).json()["id"])
        assert status["state"] == "done"
        assert [p["name"] for p in status["previews"]] == ["input_256.png", "0.png"]
        record = json.loads((tmp_path / "jobs" / status["id"] / "status.json").read_text())
        assert record["previews"] == ["input_256.png", "0.png"]


@pytest.fixture(scope="module")
def tiny_pipe() -> One2345Pipeline:
    return One2345Pipeline.from_preset("tiny", device="cpu")


@pytest.fixture(scope="module")
def photo() -> bytes:
    img = np.full((160, 160, 3), 255, np.uint8)
    yy, xx = np.mgrid[:160, :160]
    img[(yy - 80) ** 2 + (xx - 80) ** 2 < 50**2] = (40, 160, 60)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def test_after_ring_two_moves_on_continue_the_previews_list_only_existing_views(tmp_path, tiny_pipe, photo):
    jobs_dir = tmp_path / "jobs"
    old_ring, new_ring = {f"{i}.png" for i in range(4, 8)}, {f"{i}.png" for i in range(8, 12)}
    with tiny_client(jobs_dir, tiny_pipe) as client:
        job = send(client, photo, {**FAST, "review": True})  # elevation 15° (polar 75): ring 2 is views 4–7
        status = wait(client, job)
        assert status["state"] == "review"
        assert old_ring <= {p["name"] for p in status["previews"]}
        # −20° is polar 110: ring 2 moves to views 8–11 and views 4–7 are deleted.
        assert post(client, job, "continue", {"elevation": -20}).status_code == 202
        status = wait(client, job, ("done", "failed"))
        assert status["state"] == "done", status["error"]
        names = [p["name"] for p in status["previews"]]
        assert not old_ring & set(names) and new_ring <= set(names) and "input_256.png" in names
        for preview in status["previews"]:
            assert client.get(preview["url"], headers=AUTH).status_code == 200, preview["name"]
        assert json.loads((jobs_dir / job / "status.json").read_text())["previews"] == names
