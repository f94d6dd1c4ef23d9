"""Image previews for the panels: the generated views and History's thumbnails, each file loaded once into the
add-on's preview collection (freed on unregister)."""

from __future__ import annotations

from pathlib import Path

import bpy
import bpy.utils.previews

_PREVIEWS: dict[str, bpy.utils.previews.ImagePreviewCollection] = {}


def preview_icon(path: Path) -> int:
    """The icon id of an image file, loaded once into the add-on's preview collection."""
    collection = _PREVIEWS["views"]
    key = str(path)
    if key not in collection:
        collection.load(key, key, "IMAGE")
    return collection[key].icon_id


def register() -> None:
    """Create the preview collection."""
    _PREVIEWS["views"] = bpy.utils.previews.new()


def unregister() -> None:
    """Free the previews."""
    for collection in _PREVIEWS.values():
        bpy.utils.previews.remove(collection)
    _PREVIEWS.clear()
