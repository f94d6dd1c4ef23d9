"""Text to 3D's client side without Blender (issue #30): the requests, the images job against a scripted server, the
candidate sets, the mesh job from a candidate, and whether the text model's weights are there."""

from __future__ import annotations

import json
from pathlib import Path

from one2345_addon.core import images, jobs, recipes
from one2345_addon.core.client import Client
from one2345_addon.core.server_process import Connection
from tests.addon.fake_server import ScriptedServer, json_reply
from tests.addon.test_client import parse_multipart
from tests.addon.test_jobs import DONE, JOB, Script, status

IMAGES = "b" * 32
REQUEST = {"prompt": "a rusty fire hydrant", "count": 2, "seed": 7, "negative_prompt": None}


class ImagesServer:
    """An images job that runs for two polls, then is done with two candidates (or fails as told)."""

    def __init__(self, error: dict | None = None, submit_error: tuple | None = None) -> None:
        self.polls = 0
        self.error, self.submit_error = error, submit_error
        self.deleted = False

    def __call__(self, request: dict):
        path, method = request["path"], request["method"]
        if path == "/v1/health":
            return json_reply(200, {"status": "ok", "preset": "tiny"})
        if method == "POST" and path == "/v1/images":
            return self.submit_error or json_reply(202, {"id": IMAGES, "state": "queued"})
        if method == "DELETE":
            self.deleted = True
            return json_reply(200, {"id": IMAGES, "state": "cancelled"})
        if path == f"/v1/jobs/{IMAGES}":
            self.polls += 1
            base = {"id": IMAGES, "kind": "images", "stage": "text_to_image", "step": 1, "total": 4,
                    "fraction": 0.5, "previews": [], "images": {**REQUEST}, "result": None, "error": None}
            if self.deleted:
                return json_reply(200, {**base, "state": "cancelled"})
            if self.polls < 3:
                return json_reply(200, {**base, "state": "running"})
            if self.error:
                return json_reply(200, {**base, "state": "failed", "error": self.error})
            return json_reply(200, {**base, "state": "done", "fraction": 1.0, "result": {"seed": 7, "candidates": [
                {"name": f"{i}.png", "url": f"/v1/jobs/{IMAGES}/candidates/{i}.png"} for i in range(2)]}})
        if "/candidates/" in path:
            return 200, {"Content-Type": "image/png"}, f"png {path.rsplit('/', 1)[1]}".encode()
        return json_reply(404, {"error": {"kind": "not_found", "message": path, "fix": None}})


def images_job(tmp_path: Path, url: str) -> images.ImagesJob:
    connection = Connection(url=url, token="t", local=False)
    return images.ImagesJob(REQUEST, tmp_path / "candidates", lambda: connection, poll_interval=0.02)


def test_submit_images_sends_the_prompt_as_typed():
    with ScriptedServer(lambda r: json_reply(202, {"id": IMAGES, "state": "queued"})) as server:
        client = Client(server.url, "t")
        client.submit_images("  a lamp ", 3, 11, "blurry")
        client.submit_images("a lamp", 1)
    first, second = (json.loads(r["body"]) for r in server.requests)
    assert first == {"prompt": "  a lamp ", "count": 3, "seed": 11, "negative_prompt": "blurry"}
    assert second == {"prompt": "a lamp", "count": 1}  # no seed: the server draws one
    assert all(r["path"] == "/v1/images" and r["headers"]["Content-Type"] == "application/json"
               for r in server.requests)


def test_submit_candidate_names_it_by_reference_without_an_image_part():
    with ScriptedServer(lambda r: json_reply(202, {"id": JOB, "state": "queued"})) as server:
        Client(server.url, "t").submit_candidate(IMAGES, 2, {"resolution": 64, "review": True})
    (request,) = server.requests
    parts = parse_multipart(request["body"], request["headers"]["Content-Type"])
    assert set(parts) == {"options"} and request["path"] == "/v1/jobs"
    assert json.loads(parts["options"][1]) == {"resolution": 64, "review": True, "image_of": IMAGES, "index": 2}


def test_images_job_follows_progress_and_downloads_the_candidates(tmp_path):
    script = ImagesServer()
    with ScriptedServer(script) as server:
        job = images_job(tmp_path, server.url).start()
        stages = []
        job.on("progress", lambda p: stages.append(p.stage))
        assert job.wait(timeout=20)
    assert job.state == "done", job.error
    found = job.result
    assert (found.job_id, found.prompt, found.seed) == (IMAGES, "a rusty fire hydrant", 7)
    assert [p.read_bytes() for p in found.paths] == [b"png 0.png", b"png 1.png"]
    assert found.paths[0].parent == tmp_path / "candidates" / IMAGES
    assert "Text to image" in stages


def test_a_refused_prompt_keeps_the_servers_message(tmp_path):
    refusal = json_reply(400, {"error": {"kind": "bad_input", "message": "the prompt is 212 tokens; the text "
                                         "encoder takes at most 77 tokens", "fix": "shorten it"}})
    with ScriptedServer(ImagesServer(submit_error=refusal)) as server:
        job = images_job(tmp_path, server.url).start()
        assert job.wait(timeout=20)
    assert job.state == "failed" and job.error.kind == "bad_input"
    assert "77 tokens" in job.error.message and job.error.fix == "shorten it"


def test_missing_text_weights_get_their_own_kind_and_fix(tmp_path):
    error = {"kind": "missing_weights", "message": "text-to-image/unet is missing", "fix": "run `one2345 …`"}
    with ScriptedServer(ImagesServer(error=error)) as server:
        job = images_job(tmp_path, server.url).start()
        assert job.wait(timeout=20)
    assert job.state == "failed" and job.error.kind == "missing_text_weights"
    assert "text-to-image/unet" in job.error.message and "Model Weights" in job.error.fix


def test_cancelling_an_images_job_deletes_it_on_the_server(tmp_path):
    script = ImagesServer()
    script.polls = -1000  # runs until cancelled
    with ScriptedServer(script) as server:
        job = images_job(tmp_path, server.url).start()
        job.wait(timeout=5, until=lambda: script.polls > -998)
        job.cancel()
        assert job.wait(timeout=20)
    assert job.state == "cancelled" and script.deleted


def test_a_candidates_mesh_falls_back_to_the_kept_picture_when_the_images_job_is_gone(tmp_path):
    gone = json_reply(404, {"error": {"kind": "not_found", "message": f"no job {IMAGES}", "fix": None}})
    script = Script([status(), DONE], submit=[gone])
    with ScriptedServer(script) as server:
        image = tmp_path / "job" / "input.png"
        image.parent.mkdir(parents=True)
        image.write_bytes(b"the picture")
        connection = Connection(url=server.url, token="t", local=False)
        job = jobs.GenerateJob(image, {"resolution": 32}, tmp_path / "job", lambda: connection,
                               poll_interval=0.02, candidate=(IMAGES, 1)).start()
        assert job.wait(timeout=20)
    assert job.state == "done", job.error
    posts = [r for r in server.requests if r["method"] == "POST"]
    first = parse_multipart(posts[0]["body"], posts[0]["headers"]["Content-Type"])
    second = parse_multipart(posts[1]["body"], posts[1]["headers"]["Content-Type"])
    assert json.loads(first["options"][1])["image_of"] == IMAGES and "image" not in first
    assert second["image"] == ("input.png", b"the picture")
    assert any("no longer has images job" in note for note in job.notes)
    assert job.result.candidate is None


def test_a_candidates_mesh_records_its_candidate(tmp_path):
    with ScriptedServer(Script([status(), DONE])) as server:
        connection = Connection(url=server.url, token="t", local=False)
        job = jobs.GenerateJob(tmp_path / "in.png", {}, tmp_path / "job", lambda: connection, poll_interval=0.02,
                               candidate=(IMAGES, 0)).start()
        assert job.wait(timeout=20)
    assert job.state == "done" and job.result.candidate == (IMAGES, 0)


def listing(*states: str) -> dict:
    files = [{"name": "sam", "state": "present", "expected_bytes": 10, "bytes_on_disk": 10}]
    files += [{"name": f"text-to-image/part{i}", "state": s, "expected_bytes": 1000, "bytes_on_disk": 400}
              for i, s in enumerate(states)]
    return {"files": files}


def test_text_block_reason_follows_the_listing_and_the_preset():
    paper = {"preset": "paper"}
    assert images.text_missing(listing("present", "partial", "missing")) == (
        ["text-to-image/part1", "text-to-image/part2"], 600 + 1000)
    reason = images.text_block_reason(paper, listing("present", "missing"))
    assert "not downloaded (1 files, 1.0 kB)" in reason and "Model Weights" in reason
    assert images.text_block_reason(paper, listing("present", "present")) is None
    assert images.text_block_reason({"preset": "tiny"}, listing("missing")) is None  # tiny needs no weights
    assert images.text_block_reason(paper, None) is None  # not known yet: the server's answer will say
    assert "no text-to-image model" in images.text_block_reason(paper, listing())


def test_sets_newest_first_replacing_the_same_job_and_capped():
    images.clear_sets()
    made = [images.CandidateSet(f"{i:032x}", "a lamp", None, i, (Path(f"{i}.png"),)) for i in range(8)]
    for found in made:
        images.add_set(found)
    assert [s.seed for s in images.sets()] == [7, 6, 5, 4, 3, 2][:images.MAX_SETS]
    images.add_set(made[4])
    assert [s.seed for s in images.sets()][:2] == [4, 7] and len(images.sets()) == images.MAX_SETS
    assert images.find_set(made[6].job_id) is made[6] and images.find_set("0" * 32) is None
    images.clear_sets()
    assert images.sets() == []


def test_running_a_candidates_recipe_again_names_the_candidate_so_the_prompt_is_kept(tmp_path):
    """History's Regenerate of a mesh made from a candidate (``recipe_of``): the server recorded the images job in
    the recipe's text, so the new job names that candidate again instead of uploading the fetched picture."""
    source = "c" * 32
    recipe = {"input_sha256": "0" * 64, "options": {"seed": 3, "resolution": 32},
              "text": {"prompt": "a rusty fire hydrant", "seed": 7, "index": 1, "images_job": IMAGES}}
    script = Script([status(), DONE])

    def server(request: dict):
        path = request["path"]
        if path == f"/v1/jobs/{source}":
            return json_reply(200, {**DONE, "id": source})
        if path == f"/v1/jobs/{source}/input":
            return 200, {"Content-Type": "image/png"}, b"the picture"
        if path == f"/v1/jobs/{source}/meta":
            return json_reply(200, {"recipe": recipe})
        return script(request)

    with ScriptedServer(server) as server_:
        connection = Connection(url=server_.url, token="t", local=False)
        job = jobs.GenerateJob(None, {}, tmp_path / "job", lambda: connection, poll_interval=0.02,
                               recipe_of=source).start()
        assert job.wait(timeout=20)
    assert job.state == "done", job.error
    posts = [r for r in server_.requests if r["method"] == "POST"]
    assert len(posts) == 1
    form = parse_multipart(posts[0]["body"], posts[0]["headers"]["Content-Type"])
    options = json.loads(form["options"][1])
    assert "image" not in form and (options["image_of"], options["index"]) == (IMAGES, 1)
    assert options["seed"] == 3 and job.result.candidate == (IMAGES, 1)


def test_a_recipe_names_its_candidate_only_when_the_server_recorded_it():
    assert recipes.recipe_candidate({"text": {"images_job": IMAGES, "index": 2}}) == (IMAGES, 2)
    for text in (None, {"prompt": "x", "index": 2}, {"images_job": IMAGES, "index": True},
                 {"images_job": "", "index": 0}, {"images_job": IMAGES, "index": -1}, "a prompt"):
        assert recipes.recipe_candidate({"text": text}) is None, text
    assert recipes.recipe_candidate(None) is None
