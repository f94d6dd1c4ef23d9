"""Watching and stopping a model load: what the one-time Zero123-XL conversion reports while the models load (stage
``prepare``), who receives it (:func:`loading_observer`, per thread), and how a signal stops it.

Kept apart from :mod:`.models` and free of torch and diffusers so that the service can set an observer around any
pipeline loader (the worker does, for each job's first load) without importing the model libraries for it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from server.common.errors import CancelledError
from server.pipeline.options import Progress

PREPARE_STAGE = "prepare"
"""The :class:`Progress` stage of the one-time Zero123 conversion while models load."""

_observer = threading.local()


@contextlib.contextmanager
def loading_observer(progress: Callable[[Progress], None] | None = None,
                     should_cancel: Callable[[], bool] | None = None) -> Iterator[None]:
    """Within the block, model loading in this thread (``One2345Pipeline.from_preset``) reports a one-time
    conversion to ``progress`` (stage ``prepare``) and stops it, with :class:`CancelledError`, when
    ``should_cancel()`` turns true. Thread-local, so one job's observer never sees another thread's load."""
    previous = getattr(_observer, "value", None)
    _observer.value = (progress, should_cancel)
    try:
        yield
    finally:
        _observer.value = previous


def observed() -> tuple[Callable[[Progress], None] | None, Callable[[], bool] | None]:
    """The ``(progress, should_cancel)`` of the enclosing :func:`loading_observer` in this thread; ``(None, None)``
    outside one."""
    return getattr(_observer, "value", None) or (None, None)


def conversion_progress(progress: Callable[[Progress], None] | None) -> Callable[[Any], None] | None:
    """A conversion report → :class:`Progress` of stage ``prepare`` (fraction 0: no part of the run is done yet; the
    conversion's own progress is step/total and the message)."""
    if progress is None:
        return None

    def forward(event: Any) -> None:
        progress(Progress(stage=PREPARE_STAGE, step=event.step, total=event.total, fraction=0.0,
                          message=event.message))

    return forward


def progress_lines(write: Callable[[str], None]) -> Callable[[Progress], None]:
    """A progress callback that writes each new message once (the conversion repeats its message while writing)."""
    last: list[str] = []

    def on_progress(p: Progress) -> None:
        if p.message and p.message not in last[-1:]:
            last.append(p.message)
            write(p.message)

    return on_progress


@contextlib.contextmanager
def stop_on_signals(signals: tuple[int, ...] = (signal.SIGTERM,)) -> Iterator[threading.Event]:
    """SIGTERM during the block stops the main thread's work with :class:`CancelledError`, as Ctrl-C does with
    KeyboardInterrupt (whose default stays), so a one-time conversion removes its temporary folder before the process
    ends instead of dying with it; the yielded event is set as well, for work running in other threads. Later signals
    are ignored while that clean-up runs. Outside the main thread nothing is installed (Python delivers signals to
    the main thread only)."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def on_signal(sig: int, _: FrameType | None) -> None:
        if stop.is_set():
            return
        stop.set()
        raise CancelledError(f"stopped by {signal.Signals(sig).name} while loading the models; nothing half-written "
                             "was kept")

    previous = {sig: signal.signal(sig, on_signal) for sig in signals}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)
