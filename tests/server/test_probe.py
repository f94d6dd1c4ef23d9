"""The adversarial probe of :mod:`tests.server.probe`, bounded for CI: 1,500 crafted and fuzzed requests from 20
threads against a real server, with damaged job records and a hard link planted, forms cut short, large option
parts, and the slow-client checks beside the load. The full probe is ``python -m tests.server.probe --requests N``."""

from __future__ import annotations

from tests.server.probe import DAMAGED_FIELDS, FAILURE_COUNTS, clean, probe, totals_line


def test_probe_finds_no_5xx_no_dropped_response_no_dead_worker_and_no_traceback():
    report = probe(requests=1500, threads=20, seed=2)
    print(f"\n{report}\n{totals_line(report)}")
    assert report["requests"] >= 1500
    for name in FAILURE_COUNTS:
        assert report[name] == 0, (name, report["examples"])
    assert clean(report) and report["health_after"] == 200
    assert set(report["slow_clients"]) == {"dripped headers", "stalled body", "over-long content-length",
                                           "idle connection"}
    codes, families = report["codes"], report["families"]
    assert codes.get(400, 0) > 0 and codes.get(401, 0) > 0 and codes.get(404, 0) > 0 and codes.get(405, 0) > 0
    assert codes.get(202, 0) > 0 and codes.get(429, 0) > 0  # real jobs were queued, and the queue overflowed
    assert families.get("forms", 0) > 0 and families.get("planted", 0) > 0
    assert len(DAMAGED_FIELDS) >= 30
