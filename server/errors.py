"""The errors the product raises on purpose.

Every error carries a ``kind`` that the HTTP API and the Blender add-on map to a message and, where one exists, a fix
(see architecture.md, "Seams"). Messages name the offending value and what is allowed, so a user can act on them
without reading a traceback.
"""

from __future__ import annotations


class One2345Error(Exception):
    """Base class. ``kind`` is one of ``bad_input``, ``missing_weights``, ``out_of_memory``, ``cancelled``,
    ``internal``."""

    kind: str = "internal"

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix
        """A short instruction that resolves the problem (a command to run, a setting to change), if one exists."""

    def __str__(self) -> str:
        return f"{self.message}\n  fix: {self.fix}" if self.fix else self.message


class BadInputError(One2345Error, ValueError):
    """An input file, option or argument that cannot be used as given."""

    kind = "bad_input"


class MissingWeightsError(One2345Error, FileNotFoundError):
    """A model weight file that is not on disk (the message names the file and the command that fetches it)."""

    kind = "missing_weights"


class CheckpointError(One2345Error):
    """A checkpoint file that exists but cannot be used: truncated, of another network, or with wrong keys/shapes.

    It shares ``missing_weights`` with :class:`MissingWeightsError` because the fix is the same: fetch the file again
    (or point to the right one).
    """

    kind = "missing_weights"


class EmptySurfaceError(One2345Error):
    """Marching cubes found no zero crossing of the SDF: writing an empty mesh file would only hide the failure."""

    kind = "bad_input"


class CancelledError(One2345Error):
    """The job was cancelled by the user; raised between stages or denoising steps."""

    kind = "cancelled"
