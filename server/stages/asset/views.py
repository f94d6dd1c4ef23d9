"""The posed views an asset is coloured from (:class:`BakeViews`), read from a run's views folder or taken from the
views in memory, in the bake's pixel convention: pixel (i, j) of a view is centred at (j + 0.5, i + 0.5)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from server.common.cameras import PoseFile, opengl_to_opencv
from server.common.errors import BadInputError

if TYPE_CHECKING:

    from server.common.views import ViewSet



_VIEW_FILE = re.compile(r"^\d+(_\d+)?\.png$")
"""Image ids the pipeline writes beside pose.json: stage-1 ``<i>.png`` and nearby ``<i>_<j>.png``."""


# ----------------------------------------------------------------------------------------------------------------------
# Views
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class BakeViews:
    """Posed sRGB images in the mesh's frame (the pose.json world), the bake's input."""

    ids: tuple[str, ...]
    """The V image ids."""
    images: tuple[np.ndarray, ...]
    """V arrays [H_v, W_v, 3] uint8 sRGB; pixel (i, j) is centred at (j + 0.5, i + 0.5) in pixel units."""
    intrinsics: np.ndarray
    """[V, 3, 3] pixel intrinsics, each for its own image's size, in the pixel convention of the module docstring
    (a point projecting to (j + 0.5, i + 0.5) reads pixel (i, j); a centred camera's principal point is (W/2, H/2))."""
    w2c: np.ndarray
    """[V, 4, 4] OpenCV world-to-camera (x right, y down, looking along +z) in the pose.json world."""

    def __post_init__(self) -> None:
        count = len(self.ids)
        if count == 0:
            raise BadInputError("no views to bake from; allowed: at least one posed image")
        if len(self.images) != count or np.shape(self.intrinsics) != (count, 3, 3) or \
                np.shape(self.w2c) != (count, 4, 4):
            raise BadInputError(f"{count} view ids but {len(self.images)} images, intrinsics of shape "
                                f"{np.shape(self.intrinsics)} and w2c of shape {np.shape(self.w2c)}; allowed: V "
                                "images, [V, 3, 3] and [V, 4, 4]")
        for view_id, image in zip(self.ids, self.images, strict=True):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 2:
                raise BadInputError(f"view {view_id!r} has shape {image.shape} and dtype {image.dtype}; allowed: "
                                    "[H, W, 3] uint8 sRGB with H, W ≥ 2")

    def select(self, ids: Sequence[str]) -> BakeViews:
        """The views named by ``ids``, in that order.

        Raises:
            BadInputError: no ids, a repeated id, or an id that is not one of these views.
        """
        ids = list(ids)
        unknown = [i for i in ids if i not in self.ids]
        if not ids or unknown or len(set(ids)) != len(ids):
            what = f"unknown ids {unknown[:8]}" if unknown else ("no ids" if not ids else f"repeated ids in {ids}")
            raise BadInputError(f"cannot select views: {what}; allowed: distinct ids among "
                                f"{', '.join(self.ids[:8])}{'…' if len(self.ids) > 8 else ''}")
        index = [self.ids.index(i) for i in ids]
        return BakeViews(tuple(ids), tuple(self.images[i] for i in index), self.intrinsics[index], self.w2c[index])

    @classmethod
    def from_pose_file(cls, poses: PoseFile, images: Mapping[str, np.ndarray]) -> BakeViews:
        """Views from pose.json cameras and images keyed by id (in pose.json order).

        pose.json's intrinsics describe images whose principal point is at their centre (256×256 for the pipeline);
        an image of another size gets them scaled by its width / (2·cx) and height / (2·cy), keeping the field of
        view (as :func:`server.common.synthetic.render_views` does).

        Raises:
            BadInputError: an image id without a pose.
        """
        poses.require(images)
        ids = tuple(i for i in poses.c2ws if i in images)
        k = poses.intrinsics
        intrinsics = []
        for view_id in ids:
            height, width = images[view_id].shape[:2]
            intrinsics.append(np.diag([width / (2 * k[0, 2]), height / (2 * k[1, 2]), 1.0]) @ k)
        w2c = np.linalg.inv(opengl_to_opencv(np.stack([poses.c2ws[i] for i in ids])))
        return cls(ids, tuple(np.asarray(images[i]) for i in ids), np.stack(intrinsics), w2c)

    @classmethod
    def from_view_set(cls, views: ViewSet) -> BakeViews:
        """The reconstruction's input (32 nearby views, normalised-frame cameras) as bake views in pose.json world.

        The normalised camera c2w (R, C) becomes (R_ref·R, to_world(C)); the intrinsics are unchanged because the
        normalisation only scales and moves the scene. Images go back to the bytes they were read from (x·255 is
        exact for x = byte/255).
        """
        cams = views.cameras
        images = (views.images.permute(0, 2, 3, 1).double() * 255.0).round().clamp(0, 255).byte().numpy()
        rotation = cams.ref_c2w[:3, :3] @ cams.c2w[:, :3, :3]
        centres = cams.to_world(cams.centres)
        w2c = np.zeros((len(views.ids), 4, 4))
        w2c[:, :3, :3] = np.swapaxes(rotation, 1, 2)
        w2c[:, :3, 3] = -np.einsum("vji,vj->vi", rotation, centres)
        w2c[:, 3, 3] = 1.0
        return cls(tuple(views.ids), tuple(images), np.asarray(cams.intrinsics, dtype=np.float64), w2c)


def load_bake_views(
    views_dir: str | os.PathLike[str],
    arrays: dict[str, np.ndarray] | None = None,
    ids: Sequence[str] | None = None,
) -> BakeViews:
    """The posed views of a run's ``views/`` folder: by default every one present (the 32 nearby views and the
    stage-1 views), or the subset ``ids``.

    Reads ``pose.json`` and each image id it lists that names a file of the pipeline's layout (``<i>.png``,
    ``<i>_<j>.png``) present in the folder; other ids are ignored (never a path outside the folder). ``arrays``
    holds views already in memory by file name (the pipeline's, while their PNGs are still being written): they
    count as present and are not read. The intrinsics follow the pixel convention of the module docstring.

    Args:
        views_dir: the folder.
        arrays: views in memory by file name.
        ids: only these views (e.g. ``["0.png", "1_2.png"]``), in pose.json's order; each must be present.

    Raises:
        BadInputError: no folder, no or a broken pose.json, no posed image present, an unreadable image, or a
            selected id that is not a present view of the folder.
    """
    from server.common.views import read_rgb  # torch-free import path for callers that only bake

    folder = Path(views_dir)
    if not folder.is_dir():
        raise BadInputError(f"views folder {folder} does not exist or is not a folder")
    poses = PoseFile.read(folder / "pose.json")
    arrays = arrays or {}
    present = [i for i in poses.c2ws if _VIEW_FILE.match(i) and (i in arrays or (folder / i).is_file())]
    if ids is not None:
        wanted = list(ids)
        missing = [i for i in wanted if i not in present]
        if not wanted or missing:
            raise BadInputError(f"views {missing[:8] if missing else 'none'} were selected but {folder} "
                                f"{'lacks them' if missing else 'needs at least one'}; allowed: ids of present "
                                f"views ({', '.join(present[:8])}{'…' if len(present) > 8 else ''})")
        present = [i for i in present if i in set(wanted)]
    if not present:
        raise BadInputError(f"{folder} holds none of the {len(poses.c2ws)} images pose.json lists "
                            f"({', '.join(list(poses.c2ws)[:4])}…); allowed: a views folder of `one2345 generate`")
    return BakeViews.from_pose_file(poses, {i: arrays[i] if i in arrays else read_rgb(folder / i) for i in present})
