"""The worker thread (:mod:`server.service.jobs.worker`): it survives whatever goes wrong in one job's housekeeping,
and health says when it is not alive (issue #31, finding 1).

Before: an exception in the size-limit clean-up after a job ended the thread; new jobs then got 202 and stayed
queued for ever while health kept saying "ok".
"""

from __future__ import annotations

import threading
import time

import pytest

from server.service.jobs import manager as manager_module
from server.service.jobs import review as review_rules
from server.service.jobs.records import Job
from server.service.jobs.store import JobStore
from server.service.jobs.worker import JobQueue, Worker
from tests.server.test_app import AUTH, FakePipeline, make_client, submit, wait_state


@pytest.fixture
def fake() -> FakePipeline:
    return FakePipeline()


def test_the_worker_survives_a_failing_size_limit_clean_up(tmp_path, fake, monkeypatch):
    calls = []

    def broken(self, jobs, limit):
        calls.append(len(jobs))
        raise TypeError("'<' not supported between instances of 'int' and 'str'")

    monkeypatch.setattr(JobStore, "enforce_size_limit", broken)
    with make_client(tmp_path / "jobs", lambda: fake) as client:
        first = wait_state(client, submit(client).json()["id"])
        assert first["state"] == "done" and first["result"] is not None
        second = wait_state(client, submit(client).json()["id"])
        assert second["state"] == "done"
        health = client.get("/v1/health").json()
        assert health["worker_alive"] is True and health["status"] == "ok" and len(calls) == 2


def test_the_worker_survives_an_exception_while_recording_an_outcome(tmp_path, fake, monkeypatch):
    real = manager_module.JobManager._complete
    failures = [RuntimeError("a bug in the bookkeeping")]

    def flaky(self, job, result, error):
        if failures:
            raise failures.pop()
        return real(self, job, result, error)

    monkeypatch.setattr(manager_module.JobManager, "_complete", flaky)
    with make_client(tmp_path / "jobs", lambda: fake) as client:
        lost = wait_state(client, submit(client).json()["id"], ("done", "failed"))
        assert lost["state"] == "failed" and lost["error"]["kind"] == "internal"
        assert "RuntimeError" in lost["error"]["message"] and "bookkeeping" not in lost["error"]["message"]
        assert wait_state(client, submit(client).json()["id"])["state"] == "done"
        assert client.get("/v1/health").json()["worker_alive"] is True


def test_the_worker_survives_failing_review_housekeeping(tmp_path, fake, monkeypatch):
    real_due = review_rules.due
    failures = [OSError("clock gone")]

    def flaky(jobs, now):
        if failures:
            raise failures.pop()
        return real_due(jobs, now)

    monkeypatch.setattr(review_rules, "due", flaky)
    with make_client(tmp_path / "jobs", lambda: fake) as client:
        assert wait_state(client, submit(client).json()["id"])["state"] == "done"
        assert not failures


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the death is the point
def test_health_says_when_the_worker_has_died_and_jobs_are_refused(tmp_path, fake, monkeypatch):
    def die(self, job):
        raise SystemExit("the thread ends here")  # not an Exception: nothing in the loop may swallow it

    monkeypatch.setattr(Worker, "run", die)
    with make_client(tmp_path / "jobs", lambda: fake) as client:
        assert client.get("/v1/health").json()["worker_alive"] is True
        submit(client)
        deadline = time.monotonic() + 10
        while client.get("/v1/health").json()["worker_alive"] and time.monotonic() < deadline:
            time.sleep(0.02)
        health = client.get("/v1/health")
        assert health.status_code == 200
        assert health.json()["worker_alive"] is False and health.json()["status"] == "degraded"
        r = submit(client)
        assert r.status_code == 500 and "worker thread has stopped" in r.json()["error"]["message"]
        assert "restart the server" in r.json()["error"]["fix"]
        assert client.get("/v1/jobs", headers=AUTH).status_code == 200


def test_the_queue_hands_out_jobs_in_order_and_none_once_stopping(tmp_path):
    lock = threading.RLock()
    queue = JobQueue(lock)
    jobs = [Job(id=f"{i:032x}", folder=tmp_path, created="2026-01-01T00:00:00", options={}, input_file="input.png",
                download_stem="x") for i in range(3)]
    with lock:
        for job in jobs:
            queue.put(job)
        queue.remove(jobs[1])
        assert len(queue) == 2
        seen = []
        assert queue.take(lambda: seen.append(1)) is jobs[0] and seen == [1]
        assert queue.drain() == [jobs[2]] and len(queue) == 0
        queue.stopping = True
        assert queue.take(lambda: None) is None


def test_the_queue_wait_survives_failing_housekeeping(tmp_path):
    lock = threading.RLock()
    queue = JobQueue(lock)
    job = Job(id="a" * 32, folder=tmp_path, created="2026-01-01T00:00:00", options={}, input_file="input.png",
              download_stem="x")
    calls = []

    def housekeeping():
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("once")
        return 0.01

    threading.Timer(0.1, lambda: (lock.acquire(), queue.put(job), lock.release())).start()
    with lock:
        assert queue.take(housekeeping) is job
    assert len(calls) >= 2
