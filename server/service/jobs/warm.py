"""The pipeline a server keeps warm (:class:`WarmPipeline`): loaded once, on the first job that needs it or at start-up
(``--preload``), then kept. A load that fails for missing weights is remembered: for a while the jobs that need the
models are refused (503 with Retry-After, time enough to fetch the files) instead of each failing its own load, until
the wait ends or the weights are completed (:meth:`WarmPipeline.forget_failure`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from server.common.errors import One2345Error
from server.service.jobs.records import ApiError
from server.service.jobs.worker import Pipeline

log = logging.getLogger(__package__)


class WarmPipeline:
    """The loaded pipeline, or how to load it and why the last load failed.

    Args:
        load: builds the pipeline (loads the models): called by :meth:`get` in the worker thread, or by
            :meth:`preload`.
        lock: the job manager's lock (its state and this one's change together).
        retry_s: how long a load that failed for missing weights refuses new jobs before loading is tried again.
    """

    def __init__(self, load: Callable[[], Pipeline], lock: threading.RLock, retry_s: float) -> None:
        self._load, self._lock, self.retry_s = load, lock, retry_s
        self.pipeline: Pipeline | None = None
        self.preflight: Callable[[], None] | None = None
        """Run before a job is accepted while the models are not loaded; raises to refuse it (the weights
        manager's ``require_ready``: 503 missing_weights naming the download endpoint)."""
        self._failure: tuple[float, One2345Error] | None = None

    def preload(self) -> Pipeline:
        """Load the models now instead of on the first job. Errors propagate to the caller."""
        with self._lock:
            if self.pipeline is None:
                self.pipeline = self._load()
            return self.pipeline

    def get(self) -> Pipeline:
        """The pipeline, loaded now if it is not yet (outside the lock: loading takes seconds to minutes). A load
        that fails for missing weights is remembered for :meth:`refuse_if_unloadable`."""
        if self.pipeline is not None:
            return self.pipeline
        try:
            pipe = self._load()
        except One2345Error as e:
            if e.kind == "missing_weights":  # MissingWeightsError or CheckpointError: the same remedy
                with self._lock:
                    self._failure = (time.monotonic(), e)
            raise
        with self._lock:
            self.pipeline = pipe
        log.info("models loaded: %s", pipe.models_loaded())
        return pipe

    def refuse_if_unloadable(self) -> None:
        """Refuse a job that needs the models (lock held): the preflight's refusal while nothing is loaded, or the
        last load's missing-weights error with the seconds left of its wait as Retry-After.

        Raises:
            ApiError: the last load failed for missing weights less than :attr:`retry_s` ago.
            One2345Error: whatever the preflight raises.
        """
        if self.pipeline is None and self.preflight is not None:
            self.preflight()
        if self._failure is not None:
            when, error = self._failure
            left = self.retry_s - (time.monotonic() - when)
            if left > 0:
                raise ApiError(error.kind, error.message, fix=error.fix,
                               headers={"Retry-After": str(max(1, round(left)))})
            self._failure = None

    def forget_failure(self) -> None:
        """Weight files were just completed: forget a load that failed for missing weights, so the next job loads the
        models at once rather than after the refusal's Retry-After."""
        with self._lock:
            self._failure = None
