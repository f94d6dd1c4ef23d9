"""The adversarial probe of :mod:`tests.server.probe`, bounded for CI: a few thousand crafted and fuzzed requests from
20 threads against a real server. The full probe (12,000 requests) is ``python -m tests.server.probe``."""

from __future__ import annotations

from tests.server.probe import probe


def test_probe_finds_no_5xx_no_dropped_response_and_no_traceback():
    report = probe(requests=3000, threads=20, seed=2)
    print(f"\n{report}")
    assert report["requests"] >= 3000
    assert report["undocumented_5xx"] == 0, report["examples"]
    assert report["dropped"] == 0, report["examples"]
    assert report["health_failures"] == 0 and report["health_after"] == 200
    assert report["server_tracebacks"] == 0
    codes = report["codes"]
    assert codes.get(400, 0) > 0 and codes.get(401, 0) > 0 and codes.get(404, 0) > 0 and codes.get(405, 0) > 0
    assert codes.get(202, 0) > 0 and codes.get(429, 0) > 0  # real jobs were queued, and the queue overflowed
