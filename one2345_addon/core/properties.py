"""Per-scene job settings (``scene.one2345``) and the one function that turns them into request options.

The option properties are declared once in :class:`JobOptions` and shared by the scene's property group and the
``one2345.generate_mesh`` operator, so a script can override any of them (``generate_mesh(resolution=64)``) while
the panel edits the scene's copy. :func:`to_request` is the only place that maps them onto the HTTP contract's
``options`` object.
"""

# No `from __future__ import annotations`: Blender reads property annotations as objects, not strings.

from typing import Any

import bpy
from bpy.props import (
    BoolProperty,
    BoolVectorProperty,
    EnumProperty,
    FloatProperty,
    IntProperty,
    PointerProperty,
    StringProperty,
)

QUALITY_STEPS = {"FAST": (25, 15), "BALANCED": (50, 30), "PAPER": (75, 50)}
"""Quality preset → (stage-1 DDIM steps, stage-2 DDIM steps). PAPER is the reference's 75/50 (spec §1)."""

OPTION_NAMES = ("elevation_mode", "elevation", "use_random_seed", "seed", "quality", "steps_stage1", "steps_stage2",
                "guidance", "resolution", "remove_background", "mesh_format", "colours", "texture_size",
                "target_faces", "review")
"""Every option property; the operator overrides the scene's value for the ones a caller sets explicitly."""


class JobOptions:
    """Annotations shared by the scene settings and the operator (the contract's request options)."""

    elevation_mode: EnumProperty(
        name="Elevation", description="Camera elevation of the input image",
        items=(("AUTO", "Auto", "Estimate the elevation from the generated views"),
               ("MANUAL", "Manual", "Use the elevation given below")),
        default="AUTO")
    elevation: FloatProperty(
        name="Elevation (°)", description="Camera elevation above the horizon in degrees (−60…70)",
        default=0.0, min=-60.0, max=70.0)
    use_random_seed: BoolProperty(
        name="Random Seed", description="Let the server pick a new seed for every run", default=False)
    seed: IntProperty(name="Seed", description="Seed of the multi-view diffusion (same seed, same result)",
                      default=0, min=0)
    quality: EnumProperty(
        name="Quality", description="Diffusion steps: more steps are slower and cleaner",
        items=(("FAST", "Fast", "25 + 15 steps"), ("BALANCED", "Balanced", "50 + 30 steps"),
               ("PAPER", "Paper", "75 + 50 steps, as in the paper"), ("CUSTOM", "Custom", "Choose the steps")),
        default="PAPER")
    steps_stage1: IntProperty(name="Steps (Stage 1)", description="DDIM steps for the first four views",
                              default=75, min=1, max=200)
    steps_stage2: IntProperty(name="Steps (Stage 2)", description="DDIM steps for the nearby views",
                              default=50, min=1, max=200)
    guidance: FloatProperty(name="Guidance", description="Classifier-free guidance scale", default=3.0,
                            min=1.0, max=20.0)
    resolution: IntProperty(name="Mesh Resolution", description="Marching-cubes grid size per axis (32…512)",
                            default=256, min=32, max=512)
    remove_background: BoolProperty(name="Remove Background",
                                    description="Cut the object out of the background (off: use the image's alpha)",
                                    default=True)
    mesh_format: EnumProperty(
        name="Format", description="Mesh file kept in the job folder (all three import with colours)",
        items=(("PLY", "PLY", "Vertex colours, z-up (recommended)"), ("GLB", "glTF Binary", "glTF 2.0 binary"),
               ("OBJ", "OBJ", "Wavefront OBJ with vertex colours")),
        default="PLY")
    colours: EnumProperty(
        name="Colours", description="How the mesh carries its colours",
        items=(("VERTEX", "Vertex Colours", "A colour per vertex (the raw marching-cubes mesh keeps every detail)"),
               ("TEXTURE", "Texture", "A UV texture baked from the generated views (a glTF file with an image)")),
        default="VERTEX")
    texture_size: EnumProperty(
        name="Texture Size", description="Side of the baked texture in pixels",
        items=(("512", "512", ""), ("1024", "1024", "The default"), ("2048", "2048", ""), ("4096", "4096", "")),
        default="1024")
    target_faces: IntProperty(
        name="Target Faces", description="Polygon budget: decimate the mesh to this many faces (0 keeps every face; "
                                         "else 1000…2000000)",
        default=0, min=0, max=2_000_000, soft_max=200_000)
    review: BoolProperty(
        name="Review Views", description="Stop after the eight generated views so you can re-roll the ones you do "
                                         "not like before the mesh is made",
        default=False)


def skip_save_options() -> dict[str, Any]:
    """The :class:`JobOptions` annotations with ``SKIP_SAVE``, for operators: a call that does not set an option must
    take the scene's value, not the one remembered from the previous call."""
    annotations = {}
    for name, deferred in JobOptions.__annotations__.items():
        keywords = dict(deferred.keywords)
        keywords["options"] = set(keywords.get("options", ())) | {"SKIP_SAVE"}
        annotations[name] = deferred.function(**keywords)
    return annotations


class ONE2345_PG_settings(JobOptions, bpy.types.PropertyGroup):
    """The panel's settings, stored in the scene."""

    input_mode: EnumProperty(
        name="Input", description="What the mesh is made from",
        items=(("IMAGE", "Image", "A picture of the object"),
               ("PROMPT", "Prompt", "A text prompt: pick one of a few generated pictures, then make its mesh")),
        default="IMAGE")
    prompt: StringProperty(name="Prompt", description="What to make, e.g. 'a rusty fire hydrant' (the server adds "
                                                      "'whole object, centred, plain background')")
    negative_prompt: StringProperty(name="Negative Prompt",
                                    description="What the pictures should not show (empty: the server's default)")
    image_count: IntProperty(name="Images", description="Candidate pictures per set (1…8)", default=4, min=1, max=8)
    image_seed: IntProperty(name="Image Seed", description="Seed of the pictures (same prompt and seed, same "
                                                          "pictures); More takes a new one", default=0, min=0)
    use_random_image_seed: BoolProperty(name="Random Image Seed", default=True,
                                        description="Let the server pick a new seed for every set of pictures")
    image_source: EnumProperty(
        name="Image", description="Where the input image comes from",
        items=(("FILE", "File", "An image file on disk"),
               ("IMAGE", "Image", "An image loaded in this file"),
               ("ACTIVE", "Active Empty", "The image of the active image empty or reference image")),
        default="FILE")
    filepath: StringProperty(name="Image File", description="Input image file", subtype="FILE_PATH")
    image: PointerProperty(name="Image", description="Input image datablock", type=bpy.types.Image)
    review_selected: BoolVectorProperty(
        name="Re-roll", description="Views to generate again with a new seed", size=12, default=(False,) * 12)
    review_elevation: FloatProperty(
        name="Elevation (°)", description="The elevation the mesh will be made with (edit it before Continue)",
        default=0.0, min=-60.0, max=70.0)
    review_seed: IntProperty(name="Re-roll Seed", description="Seed for the re-rolled views (0: a new random one)",
                             default=0, min=0)


def option_values(settings: Any, override: Any = None) -> dict[str, Any]:
    """The option properties of ``settings``, with those set explicitly on ``override`` (an operator) winning."""
    values = {name: getattr(settings, name) for name in OPTION_NAMES}
    if override is not None:
        for name in OPTION_NAMES:
            if override.properties.is_property_set(name):
                values[name] = getattr(override, name)
    return values


def to_request(settings: Any, override: Any = None) -> dict[str, Any]:
    """Turn the settings into the contract's ``options`` object for ``POST /v1/jobs``.

    Args:
        settings: anything with the :class:`JobOptions` attributes (``scene.one2345``).
        override: an operator whose explicitly set option properties replace the settings' values.

    Returns:
        ``{"elevation": float | None, "seed": int | None, "steps_stage1", "steps_stage2", "guidance",
        "resolution", "format": "ply" | "glb" | "obj", "remove_background", "target_faces": int | None,
        "texture_size": int | None, "review": bool}``. A textured result is always glTF binary (the one format of
        the server's HTTP results that carries an image).
    """
    v = option_values(settings, override)
    textured = v["colours"] == "TEXTURE"
    steps = (v["steps_stage1"], v["steps_stage2"]) if v["quality"] == "CUSTOM" else QUALITY_STEPS[v["quality"]]
    # Explicit step counts from a script win over the quality preset (nobody passes steps to be ignored).
    if override is not None:
        steps = tuple(getattr(override, name) if override.properties.is_property_set(name) else step
                      for name, step in zip(("steps_stage1", "steps_stage2"), steps, strict=True))
    return {
        "elevation": float(v["elevation"]) if v["elevation_mode"] == "MANUAL" else None,
        "seed": None if v["use_random_seed"] else int(v["seed"]),
        "steps_stage1": int(steps[0]),
        "steps_stage2": int(steps[1]),
        "guidance": float(v["guidance"]),
        "resolution": int(v["resolution"]),
        "format": "glb" if textured else str(v["mesh_format"]).lower(),
        "remove_background": bool(v["remove_background"]),
        "target_faces": int(v["target_faces"]) or None,
        "texture_size": int(v["texture_size"]) if textured else None,
        "review": bool(v["review"]),
    }


CLASSES = (ONE2345_PG_settings,)


def register() -> None:
    """Register the property group and attach it to scenes."""
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.one2345 = PointerProperty(type=ONE2345_PG_settings)


def unregister() -> None:
    """Detach and unregister."""
    del bpy.types.Scene.one2345
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
