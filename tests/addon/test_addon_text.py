"""Issue #30 in the add-on, in the bpy wheels of Blender 4.2 and 5.0: a prompt → candidate pictures → Use This → a
mesh in the scene, against the real server on loopback (``tiny`` preset on the CPU: its tiny random text-to-image
model needs no weights), one ``text_session.py`` per version, both at once. Then a ``paper`` server without any
weights: Generate Images greyed out with the reason, and the Weights box offering the text model's download.
A missing bpy environment fails the tests; it is never a skip.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.addon.test_blender import VERSIONS, built_zip, run_in_both_blenders  # noqa: F401 - the zip fixture

HERE = Path(__file__).resolve().parent
SESSION = HERE / "text_session.py"


@pytest.fixture(scope="module")
def sessions(built_zip: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:  # noqa: F811 - the fixture
    """Run the session in both bpy versions at once; version → observations."""
    server_python = os.environ.get("ONE2345_SERVER_PYTHON") or sys.executable
    return run_in_both_blenders(SESSION, tmp_path_factory, "text",
                                lambda version, work: {"zip": str(built_zip), "server_python": server_python},
                                env={"HF_HUB_OFFLINE": "1"})


def observed(session: dict, name: str) -> dict:
    record = session.get(name)
    assert record is not None, f"scenario {name} did not run:\n{session['_log'][-3000:]}"
    assert "exception" not in record, record["exception"] + session["_log"][-2000:]
    return record


VERSION_IDS = list(VERSIONS)


@pytest.mark.parametrize("version", VERSION_IDS)
def test_a_prompt_gives_candidates_shown_large_with_use_this(sessions, version):
    record = observed(sessions[version], "images_set")
    assert record["poll"] is True and record["result"] == ["FINISHED"]
    assert record["count"] == 3 and record["seed"] == 5 and record["prompt"] == "a rusty fire hydrant"
    assert len(set(record["digests"])) == 3 and record["in_user_dir"]
    # as large as the review of views (scale 5) or larger, one Use This per picture naming its set and index
    assert record["icons"] == [6.0, 6.0, 6.0]
    assert [u["index"] for u in record["use_this"]] == [0, 1, 2]
    assert len({u["job_id"] for u in record["use_this"]}) == 1 and record["more_button"]


@pytest.mark.parametrize("version", VERSION_IDS)
def test_the_same_seed_gives_the_same_candidates(sessions, version):
    first = observed(sessions[version], "images_set")
    record = observed(sessions[version], "same_seed")
    assert record["result"] == ["FINISHED"] and record["job_ids_differ"]
    assert record["digests"] == first["digests"]


@pytest.mark.parametrize("version", VERSION_IDS)
def test_more_gives_other_candidates_and_keeps_the_earlier_sets(sessions, version):
    first = observed(sessions[version], "images_set")
    record = observed(sessions[version], "more")
    assert record["result"] == ["FINISHED"] and record["prompt"] == first["prompt"]
    assert record["seed"] != 5 and not set(record["digests"]) & set(first["digests"])
    assert record["sets"] == 3


@pytest.mark.parametrize("version", VERSION_IDS)
def test_bad_prompts_show_the_servers_error_and_lose_nothing(sessions, version):
    record = observed(sessions[version], "errors")
    assert record["empty_result"] == ["CANCELLED"] and record["long_result"] == ["CANCELLED"]
    assert record["empty_kind"] == record["long_kind"] == "bad_input"
    assert "prompt" in record["empty_error"]
    assert "77 tokens" in record["long_error"]
    assert record["kept"]
    assert "77 tokens" in record["labels"]


@pytest.mark.parametrize("version", VERSION_IDS)
def test_use_this_makes_the_mesh_and_the_recipe_records_the_prompt(sessions, version):
    record = observed(sessions[version], "use_this")
    assert record["result"] == ["FINISHED"] and record["type"] == "MESH" and record["vertices"] > 0
    assert record["name"].startswith("a_rusty_fire_hydrant")
    assert record["prompt"] == "a rusty fire hydrant"
    assert record["image_of"] == record["images_job"] and record["index"] == 1
    text = json.loads(record["recipe"])["text"]
    assert (text["prompt"], text["seed"], text["index"]) == ("a rusty fire hydrant", 5, 1)
    assert record["kept_candidates"] == ["0.png", "1.png", "2.png"] and record["input_is_candidate"]


@pytest.mark.parametrize("version", VERSION_IDS)
def test_use_this_with_review_views_pauses_then_continues(sessions, version):
    record = observed(sessions[version], "review")
    assert record["result"] == ["FINISHED"] and record["reviewing"] and record["views"] > 0
    assert record["continue"] == ["FINISHED"] and record["prompt"] == "a rusty fire hydrant"


@pytest.mark.parametrize("version", VERSION_IDS)
def test_regenerate_and_variation_of_a_text_object(sessions, version):
    record = observed(sessions[version], "regenerate")
    assert record["result"] == ["FINISHED"] and record["new_object"] and record["same_mesh"]
    assert record["prompt"] == "a rusty fire hydrant"  # named by reference again: the new recipe keeps it
    assert record["variation"] == ["FINISHED"] and record["variation_prompt"] == "a rusty fire hydrant"
    assert record["variation_differs"]


@pytest.mark.parametrize("version", VERSION_IDS)
def test_history_lists_the_images_job_and_shows_its_candidates(sessions, version):
    record = observed(sessions[version], "history")
    assert record["refresh"] == ["FINISHED"] and "images" in record["kinds"] and "mesh" in record["kinds"]
    assert all("a rusty fire hydrant" in s for s in record["settings"]) and all(record["thumbs"])
    assert record["import_images_job"] == ["CANCELLED"] and "not a mesh" in record["import_error"]
    assert record["show"] == ["FINISHED"] and record["shown"]


@pytest.mark.parametrize("version", VERSION_IDS)
def test_without_the_text_models_weights_generate_images_is_greyed_out(sessions, version):
    record = observed(sessions[version], "no_weights")
    assert record["refresh"] == ["FINISHED"] and record["preset"] == "paper"
    assert record["poll"] is False and record["script_call"] is None
    assert "text-to-image model is not downloaded" in record["reason"]
    assert "text-to-image model is not downloaded" in record["panel_labels"]
    assert len(record["download_buttons"]) == 1 and record["download_buttons"][0].startswith("Download Text Model")
    assert record["text_rows"] and "missing" in record["text_rows"][0]
