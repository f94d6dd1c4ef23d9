"""Why a task ended without a result: :class:`JobError` (a kind that drives the fix-it buttons, a message, a fix)
and :class:`JobFailed`, the exception a worker raises to end its task with one. Standard library only."""

from __future__ import annotations

from dataclasses import dataclass

from .client import ServerError


@dataclass(frozen=True)
class JobError:
    """Why a task ended without a result: a kind (drives the fix-it buttons), a message and an optional fix."""

    kind: str
    message: str
    fix: str | None = None

    @classmethod
    def from_exception(cls, exc: ServerError) -> JobError:
        """The error of a failed request."""
        return cls(exc.kind, exc.message, exc.fix)

    def __str__(self) -> str:
        return f"{self.message} Fix: {self.fix}." if self.fix else self.message


class JobFailed(Exception):
    """Raised inside a worker to end the task with a :class:`JobError`."""

    def __init__(self, error: JobError) -> None:
        super().__init__(error.message)
        self.error = error

