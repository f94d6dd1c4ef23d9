"""Property-based fuzzing of a live server against its own OpenAPI schema (schemathesis), on loopback only.

Schemathesis generates requests for every operation of ``/openapi.json`` — schema-conforming ones and deliberately
broken ones (wrong types, missing parts, odd strings in paths) — sends them with the right token, and runs its
checks on every answer. Bounded: a fixed number of examples, a fixed seed, and a wall-clock budget.

Checked: no 5xx at all (no allowance is needed: the documented 5xx, 503 missing_weights and 507 storage, cannot occur
with the weight-free ``tiny`` preset on a healthy disk), every status code and content type is one the schema
declares, every JSON body matches its declared schema, malformed requests are refused with 4xx, auth is enforced; and
afterwards ``/v1/health`` still answers 200. Not checked: ``positive_data_acceptance`` — a schema-valid upload is any
byte string, which is (rightly) refused unless it happens to be an image.
"""

from __future__ import annotations

import time

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS, load_all_checks

from tests.server.test_serve_process import TOKEN, start_server, stop

MAX_EXAMPLES = 200
TIME_BUDGET_S = 90.0
"""Requests stop being sent after this long (the generated examples that remain are then no-ops)."""
EXCLUDED_CHECKS = ("positive_data_acceptance", "max_response_time")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    srv = start_server(root / "jobs", root / "server.log")
    yield srv
    if srv.proc.poll() is None:
        stop(srv)


def test_fuzz_the_openapi_schema(server):
    url = server.ready["url"]
    assert url.startswith("http://127.0.0.1:")  # loopback only
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", timeout=30)
    strategy = st.one_of(schema.as_strategy(generation_mode=GenerationMode.POSITIVE),
                         schema.as_strategy(generation_mode=GenerationMode.NEGATIVE))
    load_all_checks()
    checks = [c for c in CHECKS.get_all() if c.__name__ not in EXCLUDED_CHECKS]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    sent: list[int] = []
    failures: list[str] = []
    start = time.monotonic()

    @hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                         phases=[Phase.explicit, Phase.generate],
                         suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def fuzz(case):
        if time.monotonic() - start > TIME_BUDGET_S:
            return
        response = case.call(base_url=url, headers=auth, timeout=30)
        sent.append(response.status_code)
        try:
            case.validate_response(response, checks=checks, headers=auth, transport_kwargs={"base_url": url})
        except Exception as e:  # schemathesis raises a group of failures; collect them all, fail once at the end
            failures.append(f"{case.method} {case.formatted_path} → {response.status_code}: {e}"[:1500])

    fuzz()
    by_class = {f"{code // 100}xx": sum(c // 100 == code // 100 for c in sent) for code in (200, 400, 500)}
    print(f"\nchecks: {sorted(c.__name__ for c in checks)}")
    print(f"fuzzed {len(sent)} requests in {time.monotonic() - start:.0f} s: {by_class}, "
          f"{len(failures)} check failures")
    assert len(sent) >= 50, f"only {len(sent)} requests were sent"
    assert not failures, "\n\n".join(failures[:5])
    assert by_class["5xx"] == 0
    assert httpx.get(f"{url}/v1/health", timeout=30).status_code == 200
