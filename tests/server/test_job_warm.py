"""The warm pipeline (:mod:`server.service.jobs.warm`) on its own: loaded once and kept; a load that failed for missing
weights refuses the jobs that need the models for its wait (503 with the seconds left as Retry-After), then lets the
next load be tried; completed weights lift the refusal at once; the preflight is asked only while nothing is loaded.

The same rules seen through the HTTP API are in test_app.py and test_weights_api.py.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from server.common.errors import BadInputError, MissingWeightsError
from server.service.jobs import ApiError
from server.service.jobs import warm as warm_module
from server.service.jobs.warm import WarmPipeline
from tests.server.test_app import FakePipeline


class Loader:
    """Loads by popping ``outcomes``: an exception is raised, anything else returned."""

    def __init__(self, *outcomes: object) -> None:
        self.outcomes, self.calls = list(outcomes), 0

    def __call__(self) -> FakePipeline:
        self.calls += 1
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(warm_module, "time", SimpleNamespace(monotonic=clock))  # this module's clock only
    return clock


def test_the_pipeline_is_loaded_once_and_kept() -> None:
    fake = FakePipeline()
    loader = Loader(fake)
    warm = WarmPipeline(loader, threading.RLock(), retry_s=30.0)
    assert warm.pipeline is None
    assert warm.get() is fake and warm.get() is fake and warm.preload() is fake
    assert loader.calls == 1 and warm.pipeline is fake


def test_preload_loads_at_once_and_its_errors_reach_the_caller() -> None:
    warm = WarmPipeline(Loader(MissingWeightsError("no zero123-xl.ckpt")), threading.RLock(), retry_s=30.0)
    with pytest.raises(MissingWeightsError, match="zero123-xl"):
        warm.preload()
    assert warm.pipeline is None


def test_a_missing_weights_failure_refuses_jobs_for_its_wait_then_loading_is_tried_again(clock: Clock) -> None:
    fake = FakePipeline()
    loader = Loader(MissingWeightsError("no zero123-xl.ckpt", fix="download it"), fake)
    warm = WarmPipeline(loader, threading.RLock(), retry_s=30.0)
    warm.refuse_if_unloadable()  # nothing failed yet
    with pytest.raises(MissingWeightsError):
        warm.get()
    clock.now += 10.4
    with pytest.raises(ApiError) as refused:
        warm.refuse_if_unloadable()
    assert refused.value.kind == "missing_weights" and refused.value.message == "no zero123-xl.ckpt"
    assert refused.value.fix == "download it" and refused.value.headers == {"Retry-After": "20"}
    clock.now += 20.0
    warm.refuse_if_unloadable()  # the wait is over: the next job may try the load
    assert warm.get() is fake and loader.calls == 2
    warm.refuse_if_unloadable()


def test_completed_weights_lift_the_refusal_at_once(clock: Clock) -> None:
    warm = WarmPipeline(Loader(MissingWeightsError("no ckpt")), threading.RLock(), retry_s=600.0)
    with pytest.raises(MissingWeightsError):
        warm.get()
    with pytest.raises(ApiError):
        warm.refuse_if_unloadable()
    warm.forget_failure()
    warm.refuse_if_unloadable()


def test_other_load_failures_are_not_remembered(clock: Clock) -> None:
    warm = WarmPipeline(Loader(BadInputError("bad preset"), RuntimeError("a bug")), threading.RLock(), retry_s=600.0)
    with pytest.raises(BadInputError):
        warm.get()
    with pytest.raises(RuntimeError):
        warm.get()
    warm.refuse_if_unloadable()


def test_the_preflight_is_asked_only_while_nothing_is_loaded() -> None:
    asked: list[int] = []

    def preflight() -> None:
        asked.append(1)
        if len(asked) == 1:
            raise MissingWeightsError("reconstruction is missing")

    warm = WarmPipeline(Loader(FakePipeline()), threading.RLock(), retry_s=30.0)
    warm.preflight = preflight
    with pytest.raises(MissingWeightsError, match="reconstruction"):
        warm.refuse_if_unloadable()
    warm.refuse_if_unloadable()
    warm.get()
    warm.refuse_if_unloadable()
    assert len(asked) == 2
