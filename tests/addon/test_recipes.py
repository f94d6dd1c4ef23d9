"""The add-on's standard-library parts of #15 and #10: a GenerateJob through a review against a scripted server,
recipes (Regenerate / Variation), and the pre-flight lines drawn from the last server answers."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from one2345_addon.core import jobs, recipes, server_state
from one2345_addon.core.server_process import Connection
from tests.addon.fake_server import ScriptedServer, json_reply
from tests.addon.test_jobs import DONE, JOB, status


def review(revision: int, seeds: dict | None = None) -> dict:
    views = [0, 1, 2, 3, 8, 9, 10, 11]
    return status("review", "stage1b", 0.4, review={
        "views": [{"name": f"{n}.png", "url": f"/v1/jobs/{JOB}/views/{n}.png?r={revision}"} for n in views],
        "revision": revision, "elevation": -5.0, "elevation_source": "estimated", "elevation_uncertain": True,
        "elevation_confidence": 0.1, "seed": 3, "view_seeds": seeds or {}, "notes": [], "expires_in_s": 3500.0})


class ReviewServer:
    """A job that pauses for review; a re-roll of view 1 bumps the revision; continue finishes it."""

    def __init__(self, refuse_reroll: bool = False) -> None:
        self.state = review(0)
        self.posts: list[tuple[str, dict]] = []
        self.refuse_reroll = refuse_reroll

    def __call__(self, request: dict):
        path, method = request["path"], request["method"]
        if method == "POST" and path == "/v1/jobs":
            return json_reply(202, {"id": JOB, "state": "queued"})
        if method == "POST":
            body = json.loads(request["body"] or b"{}")
            self.posts.append((path.rsplit("/", 1)[1], body))
            if path.endswith("/reroll"):
                if self.refuse_reroll:
                    return json_reply(400, {"error": {"kind": "bad_input", "message": "view 4 is not one of "
                                                      "0, 1, 2, 3, 8, 9, 10, 11", "fix": None}})
                self.state = review(1, {str(v): body.get("seed", 9) for v in body["views"]})
            else:
                self.state = DONE
            return json_reply(202, self.state)
        if method == "DELETE":
            self.state = status("cancelled")
            return json_reply(200, self.state)
        if path == f"/v1/jobs/{JOB}":
            return json_reply(200, self.state)
        if "/views/" in path:
            name, revision = path.rsplit("/", 1)[1].split("?r=")
            return 200, {"Content-Type": "image/png"}, f"png {name} revision {revision}".encode()
        if path.endswith("/result"):
            return 200, {"Content-Type": "application/octet-stream"}, b"ply mesh bytes"
        if path.endswith("/meta"):
            return json_reply(200, {"elevation": 20.0})
        return json_reply(200, {"status": "ok"})  # /v1/health


def start(tmp_path: Path, handler) -> tuple[jobs.GenerateJob, ScriptedServer]:
    server = ScriptedServer(handler).__enter__()
    image = tmp_path / "in.png"
    image.write_bytes(b"png")
    connection = Connection(url=server.url, token="t", local=False)
    job = jobs.GenerateJob(image, {"review": True}, tmp_path / "job", lambda: connection, poll_interval=0.02)
    return job.start(), server


def wait_for(job: jobs.GenerateJob, predicate, timeout: float = 10.0) -> None:
    assert job.wait(timeout=timeout, until=predicate), "timed out"
    assert predicate(), (job.state, job.error)


def test_a_review_pauses_rerolls_the_named_views_and_continues(tmp_path):
    handler = ReviewServer()
    job, server = start(tmp_path, handler)
    try:
        wait_for(job, lambda: job.review is not None)
        first = job.review
        assert first.revision == 0 and first.numbers == (0, 1, 2, 3, 8, 9, 10, 11) and first.elevation == -5.0
        assert [p.read_bytes() for p in first.views[:2]] == [b"png 0.png revision 0", b"png 1.png revision 0"]
        assert first.views[0].parent.name == "r0" and not job.finished
        job.reroll([1, 9], seed=7)
        assert job.review is None  # until the server shows the next revision
        wait_for(job, lambda: job.review is not None)
        second = job.review
        assert second.revision == 1 and second.view_seeds == {"1": 7, "9": 7}
        assert second.views[1].read_bytes() == b"png 1.png revision 1" and second.views[1].parent.name == "r1"
        assert first.views[1].read_bytes() == b"png 1.png revision 0"  # each revision keeps its own files
        job.proceed(elevation=20.0)
        assert job.wait(timeout=10) and job.state == "done", job.error
        assert handler.posts == [("reroll", {"views": [1, 9], "seed": 7}), ("continue", {"elevation": 20.0})]
        assert job.result.mesh.read_bytes() == b"ply mesh bytes" and job.result.input == tmp_path / "in.png"
    finally:
        server.__exit__()


def test_a_refused_reroll_becomes_a_note_and_the_review_stays(tmp_path):
    job, server = start(tmp_path, ReviewServer(refuse_reroll=True))
    try:
        wait_for(job, lambda: job.review is not None)
        job.reroll([4])
        wait_for(job, lambda: job.review is not None and job.notes)
        assert "view 4 is not one of" in job.notes[0] and job.review.revision == 0 and not job.finished
        job.cancel()
        assert job.wait(timeout=15) and job.state == "cancelled"
    finally:
        server.__exit__()


RECIPE = {"input_sha256": "ab" * 32, "elevation": 12.0, "options": {
    "seed": 5, "view_seeds": {"1": 7}, "review": True, "resolution": 64, "format": "ply"}}


def test_recipe_options_repeat_exactly_and_a_variation_draws_a_new_seed():
    again = recipes.recipe_options(RECIPE)
    assert again == {**RECIPE["options"], "review": False}  # a recipe never waits for a review
    variation = recipes.recipe_options(RECIPE, variation=True)
    assert variation["seed"] != 5 and variation["view_seeds"] is None and variation["resolution"] == 64
    assert recipes.recipe_options(RECIPE, variation=True, seed=11)["seed"] == 11
    assert RECIPE["options"]["review"] is True  # the recipe itself is left as it was


def test_a_recipe_that_is_not_one_says_what_is_missing():
    with pytest.raises(jobs.JobFailed, match="not valid JSON"):
        recipes.parse_recipe("{oops")
    with pytest.raises(jobs.JobFailed, match=r"lacks \['input_sha256'\]"):
        recipes.parse_recipe({"options": {}})
    assert recipes.parse_recipe(json.dumps(RECIPE)) == RECIPE


def test_the_input_must_be_the_very_file_the_object_was_made_from(tmp_path):
    source = tmp_path / "input.png"
    source.write_bytes(b"the image")
    digest = hashlib.sha256(b"the image").hexdigest()
    copy = recipes.recipe_input(source, digest, tmp_path / "new")
    assert copy.read_bytes() == b"the image" and copy.parent == tmp_path / "new"
    source.write_bytes(b"painted over")
    with pytest.raises(jobs.JobFailed, match="has changed since the object was made"):
        recipes.recipe_input(source, digest, tmp_path / "new2")
    with pytest.raises(jobs.JobFailed, match="is gone"):
        recipes.recipe_input(tmp_path / "missing.png", digest, tmp_path / "new3")


def test_preflight_lines_from_the_last_answers():
    state = server_state.ServerState()
    assert state.preflight()[0][1].startswith("Server not asked yet")
    state.health = {"version": "0.1.0", "preset": "paper", "models_loaded": {}, "recent_job_s": None,
                    "run_needs_bytes": 6_335_076_761,
                    "device_info": {"name": "NVIDIA H200", "kind": "cuda", "memory_free_bytes": 4_000_000_000},
                    "weights": {"ready": False, "complete": False, "required_missing": ["zero123-xl"]}}
    state.weights = {"download_bytes": 15_500_000_000}
    lines = state.preflight()
    assert lines[1] == (False, "Weights missing: zero123-xl (15.5 GB to download)")
    assert lines[2] == (False, "NVIDIA H200 · 4.0 GB free, a run needs ≈ 6.3 GB")  # not enough free memory
    assert lines[3][1].startswith("Time: unknown until the first run")
    state.health = {**state.health, "recent_job_s": 100.0, "weights": {"ready": True, "complete": True},
                    "device_info": {"name": "NVIDIA H200", "kind": "cuda", "memory_free_bytes": 140_000_000_000}}
    assert state.preflight()[1:] == [(True, "Weights complete"), (True, "NVIDIA H200 · 140.0 GB free, a run needs "
                                                                       "≈ 6.3 GB"), (True, "≈ 1 min 40 s per mesh "
                                                                                           "(recent runs)")]
    state.health["device_info"] = {"name": "x86_64", "kind": "cpu", "memory_free_bytes": None}
    assert state.preflight()[2] == (False, "CPU (x86_64) — very slow")


def test_sizes_and_durations_in_words():
    assert [server_state.human_bytes(n) for n in (0, 999, 18_130_550_879, None)] == ["0 B", "999 B", "18.1 GB", "?"]
    assert [server_state.format_seconds(s) for s in (4.2, 100, 4000, None)] == ["4 s", "1 min 40 s", "1 h 6 min", "?"]


def test_wait_until_returns_when_the_condition_holds(tmp_path):
    task = jobs.FunctionTask("sleepy", lambda t: t.sleep(5.0))
    task.start()
    started = time.monotonic()
    flag = {"set": False}
    assert task.wait(timeout=5, until=lambda: flag.__setitem__("set", True) or True)
    assert time.monotonic() - started < 1.0 and not task.finished
    task.cancel()
    assert task.wait(timeout=5)
