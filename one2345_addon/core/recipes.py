"""Recipes: how a result was made (meta.json's ``recipe``, kept on the object), to make it again — checked, turned
into job options (the same seeds, or a new one for a Variation), the input image checked against its SHA-256, and
the prompt of a result made from text. Standard library only."""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
from pathlib import Path
from typing import Any

from .errors import JobError, JobFailed

RECIPE_KEYS = ("input_sha256", "options")
"""What a recipe (meta.json's ``recipe``) must hold for Regenerate."""


def parse_recipe(text: str | dict[str, Any]) -> dict[str, Any]:
    """A recipe from an object's custom property (JSON text) or meta.json, checked.

    Raises:
        JobFailed: ``bad_input`` when it is not a recipe (naming what is missing).
    """
    try:
        recipe = json.loads(text) if isinstance(text, str) else dict(text)
    except (ValueError, TypeError) as exc:
        raise JobFailed(JobError("bad_input", f"The object's One2345 recipe is not valid JSON ({exc}).")) from exc
    missing = [key for key in RECIPE_KEYS if key not in recipe]
    if missing or not isinstance(recipe.get("options"), dict):
        raise JobFailed(JobError("bad_input", f"The object's One2345 recipe lacks {missing or ['options']}; it was "
                                              "made by an older version.", "Generate it again from its image"))
    return recipe


def recipe_options(recipe: dict[str, Any], variation: bool = False, seed: int | None = None) -> dict[str, Any]:
    """The job options that make a recipe's result again: exactly its options (with their actual seed and the seeds
    of re-rolled views), never pausing for review. A variation takes another seed (``seed``, else a random one) and
    drops the per-view seeds, so every view is new."""
    options = dict(recipe["options"])
    options["review"] = False
    if variation:
        old = options.get("seed")
        while seed is None or seed == old:
            seed = secrets.randbelow(2**31)
        options["seed"], options["view_seeds"] = int(seed), None
    return options


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def recipe_input(source: Path, expected_sha256: str, job_dir: Path) -> Path:
    """Copy an object's input image into ``job_dir``, after checking it is the very file the object was made from.

    (The recipe's own ``input_sha256`` is of the server's re-encoded copy; the add-on records the upload's hash.)

    Raises:
        JobFailed: ``bad_input`` when the file is gone or has changed.
    """
    source = Path(source)
    if not source.is_file():
        raise JobFailed(JobError("bad_input", f"The input image of this object, {str(source)!r}, is gone.",
                                 "Use History to regenerate it from the server's copy, or generate it again"))
    digest = file_sha256(source)
    if expected_sha256 and digest != expected_sha256:
        raise JobFailed(JobError("bad_input", f"The input image {str(source)!r} has changed since the object was "
                                              f"made (SHA-256 {digest[:12]}…, recorded {expected_sha256[:12]}…).",
                                 "Generate it again from the image as it is now"))
    job_dir.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(source, job_dir / source.name))



def recipe_prompt(recipe: dict[str, Any] | None) -> str | None:
    """The prompt a result was made from (the recipe's ``text``, written by the server for a candidate's mesh), or
    None for a result made from an image."""
    text = (recipe or {}).get("text")
    prompt = text.get("prompt") if isinstance(text, dict) else None
    return prompt if isinstance(prompt, str) else None


def recipe_candidate(recipe: dict[str, Any] | None) -> tuple[str, int] | None:
    """(images job id, index) of the candidate a result was made from, when the server recorded it (the recipe's
    ``text.images_job``), so running the recipe again can name the same picture and keep the prompt; else None."""
    text = (recipe or {}).get("text")
    if not isinstance(text, dict):
        return None
    job, index = text.get("images_job"), text.get("index")
    if isinstance(job, str) and job and isinstance(index, int) and not isinstance(index, bool) and index >= 0:
        return job, index
    return None
