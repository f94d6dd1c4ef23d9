"""One headless Blender (a bpy wheel) for tests/addon/test_addon_text.py: text to 3D (issue #30) through the
installed extension against the real server on loopback (``tiny`` preset, CPU, its tiny random text-to-image model).

Run as ``<bpy python> text_session.py --config CONFIG.json`` with ``BLENDER_USER_RESOURCES`` set to a scratch folder.
Scenarios, in order: ``images`` (a prompt → candidates, drawn large with Use This) → ``same_seed`` → ``more`` (a new
seed, the earlier sets kept) → ``errors`` (an empty and an over-long prompt: the server's message, nothing lost) →
``use_this`` (a candidate → mesh in the scene) → ``review`` (Use This with Review Views, then Continue) →
``regenerate`` (Regenerate and Variation of the text-made object) → ``history`` (the images job listed, its
candidates shown again) → ``no_weights`` (a ``paper`` server without the text model: greyed out with the reason, the
Weights box offers the text model's download).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import bpy
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the session helpers; not the repository root, so the source add-on stays out of reach
from blender_session import (  # noqa: E402 - after the path
    RESULTS,
    addon,
    draw_panel,
    draw_preferences,
    prefs,
    run_session,
    scenario,
)

PROMPT = "a rusty fire hydrant"


def digests(found) -> list[str]:
    return [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in found.paths]


def coords(obj) -> list:
    values = np.empty(len(obj.data.vertices) * 3, np.float64)
    obj.data.vertices.foreach_get("co", values)
    return values.round(6).tolist()


def last_error() -> str | None:
    task = addon("core.jobs").last()
    return str(task.error) if task is not None and task.error is not None else None


def run(config: dict) -> None:
    work = Path(config["work"])
    bpy.ops.extensions.package_install_files(filepath=config["zip"], repo="user_default", enable_on_install=True)
    p = prefs()
    p.server_mode, p.python_path, p.preset, p.device = "LOCAL", config["server_python"], "tiny", "cpu"
    p.weights_dir, p.keep_warm, p.import_size = str(work / "weights"), True, 1.0
    settings = bpy.context.scene.one2345
    settings.quality = "CUSTOM"
    settings.steps_stage1, settings.steps_stage2, settings.resolution, settings.seed = 2, 2, 32, 0
    # The tiny model's random pictures have no plain background to cut out without SAM: use them whole.
    settings.remove_background = False
    settings.input_mode, settings.prompt, settings.image_count = "PROMPT", PROMPT, 3
    settings.use_random_image_seed, settings.image_seed = False, 5
    for obj in list(bpy.data.objects):
        bpy.data.objects.remove(obj)
    images = addon("core.images")

    @scenario
    def images_set(record):
        record["poll"] = bpy.ops.one2345.generate_images.poll()
        record["result"] = sorted(bpy.ops.one2345.generate_images())
        found = images.sets()[0]
        record["count"], record["seed"], record["prompt"] = len(found.paths), found.seed, found.prompt
        record["digests"] = digests(found)
        record["in_user_dir"] = all(str(work / "blender-user") in str(path) for path in found.paths)
        calls = draw_panel()
        record["icons"] = [c["kwargs"].get("scale") for c in calls if c["call"] == "template_icon"]
        record["use_this"] = [c["props"] for c in calls if c["call"] == "operator" and c["args"][:1] == [
            "one2345.use_candidate"]]
        record["more_button"] = any(c["call"] == "operator" and c["args"][:1] == ["one2345.generate_images"]
                                    and c.get("props", {}).get("more") for c in calls)

    @scenario
    def same_seed(record):
        record["result"] = sorted(bpy.ops.one2345.generate_images())
        record["digests"] = digests(images.sets()[0])
        record["job_ids_differ"] = images.sets()[0].job_id != images.sets()[1].job_id

    @scenario
    def more(record):
        record["result"] = sorted(bpy.ops.one2345.generate_images(more=True))
        shown = images.sets()
        record["seed"], record["prompt"], record["digests"] = shown[0].seed, shown[0].prompt, digests(shown[0])
        record["sets"] = len(shown)

    @scenario
    def errors(record):
        before = [s.job_id for s in images.sets()]
        for name, prompt in (("empty", ""), ("long", "cat " * 200)):
            record[f"{name}_result"] = sorted(bpy.ops.one2345.generate_images(prompt=prompt))
            record[f"{name}_error"] = last_error()
            record[f"{name}_kind"] = addon("core.jobs").last().error.kind
        record["kept"] = [s.job_id for s in images.sets()] == before
        calls = draw_panel()
        record["labels"] = " ".join(c["kwargs"].get("text", "") for c in calls if c["call"] == "label")

    @scenario
    def use_this(record):
        first = images.sets()[-1]  # the first set (seed 5): an earlier set is still usable
        record["result"] = sorted(bpy.ops.one2345.use_candidate(job_id=first.job_id, index=1))
        obj = bpy.context.active_object
        RESULTS["_text_object"] = obj.name
        record["name"], record["type"] = obj.name, obj.type
        record["vertices"] = len(obj.data.vertices)
        record["prompt"] = obj.get("one2345_prompt")
        record["image_of"], record["index"] = obj.get("one2345_image_of"), obj.get("one2345_index")
        record["recipe"] = obj.get("one2345_recipe")
        record["images_job"] = first.job_id
        job_dir = Path(obj["one2345_job_dir"])
        record["kept_candidates"] = sorted(p.name for p in (job_dir / "candidates").glob("*.png"))
        record["input_is_candidate"] = (job_dir / "input.png").read_bytes() == Path(first.paths[1]).read_bytes()

    @scenario
    def review(record):
        settings.review = True
        newest = images.sets()[0]
        record["result"] = sorted(bpy.ops.one2345.use_candidate(job_id=newest.job_id, index=0))
        job = addon("core.jobs").active()
        record["reviewing"] = job is not None and job.review is not None
        record["views"] = len(job.review.views) if record["reviewing"] else 0
        record["continue"] = sorted(bpy.ops.one2345.continue_job())
        record["prompt"] = bpy.context.active_object.get("one2345_prompt")
        settings.review = False

    @scenario
    def regenerate(record):
        source = bpy.data.objects[RESULTS["_text_object"]]
        for other in bpy.context.view_layer.objects.selected:
            other.select_set(False)
        source.select_set(True)
        bpy.context.view_layer.objects.active = source
        record["result"] = sorted(bpy.ops.one2345.regenerate())
        again = bpy.context.active_object
        record["new_object"] = again.name != source.name
        record["same_mesh"] = coords(again) == coords(source)
        record["prompt"] = again.get("one2345_prompt")
        bpy.context.view_layer.objects.active = source
        record["variation"] = sorted(bpy.ops.one2345.regenerate(variation=True, seed=99))
        varied = bpy.context.active_object
        record["variation_prompt"] = varied.get("one2345_prompt")
        record["variation_differs"] = coords(varied) != coords(source)

    @scenario
    def history(record):
        images.clear_sets()
        record["refresh"] = sorted(bpy.ops.one2345.refresh_history())
        items = bpy.context.window_manager.one2345_history
        record["kinds"] = [item.kind for item in items]
        record["settings"] = [item.settings for item in items if item.kind == "images"]
        record["thumbs"] = [bool(item.input_thumb) for item in items if item.kind == "images"]
        job_id = next(item.job_id for item in items if item.kind == "images")
        record["import_images_job"] = sorted(bpy.ops.one2345.history_job(job_id=job_id, action="IMPORT"))
        record["import_error"] = last_error()
        record["show"] = sorted(bpy.ops.one2345.show_candidates(job_id=job_id))
        record["shown"] = [s.job_id for s in images.sets()] == [job_id]

    @scenario
    def no_weights(record):
        record["stop"] = sorted(bpy.ops.one2345.stop_server())
        prefs().preset = "paper"  # a paper server without any weights: the text model is missing too
        record["refresh"] = sorted(bpy.ops.one2345.refresh_weights())
        state = addon("core.server_state").STATE
        record["preset"] = (state.health or {}).get("preset")
        record["poll"] = bpy.ops.one2345.generate_images.poll()
        record["reason"] = images.text_block_reason(state.health, state.weights)
        calls = draw_panel()
        record["panel_labels"] = " ".join(c["kwargs"].get("text", "") for c in calls if c["call"] == "label")
        calls = draw_preferences()
        record["download_buttons"] = [c["kwargs"].get("text") for c in calls if c["call"] == "operator"
                                      and c["args"][:1] == ["one2345.download_text_weights"]]
        record["text_rows"] = [c["kwargs"].get("text") for c in calls if c["call"] == "label"
                               and "text-to-image" in c["kwargs"].get("text", "")]
        record["script_call"] = sorted(bpy.ops.one2345.generate_images()) if record["poll"] else None
        bpy.ops.one2345.stop_server()


if __name__ == "__main__":
    run_session(run)
