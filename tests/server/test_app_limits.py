"""The upload form and the schema's limits (issue #31, findings 2, 3 and 10): a multipart body cut short is refused
instead of running at the default options, an oversized options part is a clean 400 in a body of any size (never a
reset, even when the client asks to close the connection), and /openapi.json states the limits the server enforces.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.server.inprocess_server import AUTH, live_server, read_response
from tests.server.probe import multipart
from tests.server.test_app import AUTH as AUTH_HEADERS
from tests.server.test_app import FakePipeline, make_client, png_bytes, wait_state

BOUNDARY = "limits-b0undary"
OPTIONS = {"steps_stage1": 9, "resolution": 64, "format": "ply"}


@pytest.fixture
def fake() -> FakePipeline:
    return FakePipeline()


@pytest.fixture
def client(tmp_path, fake):
    with make_client(tmp_path / "jobs", lambda: fake) as c:
        yield c


def post_raw(client, body: bytes):
    return client.post("/v1/jobs", content=body, headers={**AUTH_HEADERS, "Content-Type":
                                                          f"multipart/form-data; boundary={BOUNDARY}"})


def whole_form(image: bytes | None = None, options: bytes | None = None) -> bytes:
    return multipart([("image", "a.png", png_bytes() if image is None else image),
                      ("options", None, json.dumps(OPTIONS).encode() if options is None else options)], BOUNDARY)[0]


@pytest.mark.parametrize("cut", ["closing boundary", "inside options", "after the options part",
                                 "half the closing boundary"])
def test_a_form_cut_short_is_400_and_no_job(client, fake, cut):
    body = whole_form()
    end = body.rindex(f"\r\n--{BOUNDARY}--".encode())
    truncated = {"closing boundary": body[:end], "inside options": body[:body.rindex(b"}")],
                 "after the options part": body[:end + 2], "half the closing boundary": body[:end + 8]}[cut]
    r = post_raw(client, truncated)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["kind"] == "bad_input" and "closing boundary" in error["message"]
    assert client.get("/v1/jobs", headers=AUTH_HEADERS).json()["total"] == 0 and not fake.calls


def test_a_whole_form_runs_with_its_options_and_an_epilogue_is_ignored(client, fake):
    r = post_raw(client, whole_form() + b"\r\nan epilogue, which RFC 2046 allows\r\n")
    assert r.status_code == 202, r.text
    status = wait_state(client, r.json()["id"])
    assert status["state"] == "done" and status["options"]["steps_stage1"] == 9
    assert status["options"]["resolution"] == 64 and status["options"]["format"] == "ply"


def test_an_options_part_over_1_mib_is_400_naming_the_part(client):
    r = post_raw(client, whole_form(options=b'{"seed": 1' + b" " * (2**20 + 10) + b"}"))
    assert r.status_code == 400
    assert "'options'" in r.json()["error"]["message"] and "1024 KiB" in r.json()["error"]["message"]


@pytest.mark.parametrize("image_mib", [2, 7, 15])
@pytest.mark.parametrize("close", [False, True])
def test_a_large_options_part_in_a_large_body_is_a_clean_400_never_a_reset(tmp_path, image_mib, close):
    fake = FakePipeline()
    with live_server(tmp_path / "jobs", lambda: fake) as live:
        image = png_bytes() + os.urandom(image_mib * 2**20)
        for order in ("options first", "image first"):
            parts = [("image", "a.png", image), ("options", None, b'{"seed": 1' + b" " * (3 * 2**20) + b"}")]
            body, ctype = multipart(parts[::-1] if order == "options first" else parts)
            head = (f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\n" + ("Connection: close\r\n" if close else "") + "\r\n").encode()
            with live.connect() as sock:
                sock.sendall(head + body)  # the whole body first, as http.client and urllib do
                status, _, answer = read_response(sock)
                assert status == 400, (order, answer)
                assert json.loads(answer)["error"]["kind"] == "bad_input"
                if not close:  # the connection carries the next request
                    sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
                    assert read_response(sock)[0] == 200


def test_the_schema_states_the_enforced_limits(client):
    schema = client.get("/openapi.json").json()
    (limit,) = [p for p in schema["paths"]["/v1/jobs"]["get"]["parameters"] if p["name"] == "limit"]
    (integer,) = [v for v in limit["schema"]["anyOf"] if v.get("type") == "integer"]
    assert (integer["minimum"], integer["maximum"]) == (1, 1000)
    form = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    form = schema["components"]["schemas"][form["$ref"].rpartition("/")[2]] if "$ref" in form else form
    assert form["properties"]["image"]["minLength"] == 1
    for bad in (0, 1001, -1):
        r = client.get(f"/v1/jobs?limit={bad}", headers=AUTH_HEADERS)
        assert r.status_code == 400 and "limit" in r.json()["error"]["message"]
    assert client.get("/v1/jobs?limit=1000", headers=AUTH_HEADERS).status_code == 200
    r = client.post("/v1/jobs", files={"image": ("a.png", b"", "image/png")}, headers=AUTH_HEADERS)
    assert r.status_code == 400


def test_the_schema_states_the_download_token_pattern(tmp_path):
    from tests.server.test_weights_api import AUTH as WEIGHTS_AUTH
    from tests.server.test_weights_api import make_client as make_weights_client

    with make_weights_client(tmp_path / "jobs", tmp_path / "weights") as c:
        schema = c.get("/openapi.json").json()
        token = schema["components"]["schemas"]["DownloadRequest"]["properties"]["token"]
        (string,) = [v for v in token["anyOf"] if v.get("type") == "string"]
        assert string["pattern"] == "^[!-~]+$"
        r = c.post("/v1/weights/download", json={"token": "has space"}, headers=WEIGHTS_AUTH)
        assert r.status_code == 400 and "printable ASCII" in r.json()["error"]["message"]


def test_no_error_reaches_a_client_without_a_fix():
    """#31: errors raised without a specific fix carry their kind's default, over HTTP and in a job's status."""
    from server.service.jobs import error_dict
    from server.service.jobs.records import DEFAULT_FIX
    from server.service.schemas import STATUS_OF_KIND, error_response

    assert set(STATUS_OF_KIND) <= set(DEFAULT_FIX)
    for kind in STATUS_OF_KIND:
        body = json.loads(error_response(kind, "what went wrong").body)
        assert body["error"]["fix"] == DEFAULT_FIX[kind] and body["error"]["fix"]
        assert error_dict(kind, "what went wrong")["fix"] == DEFAULT_FIX[kind]
    assert error_dict("storage", "full", "free 2 GB")["fix"] == "free 2 GB"  # a specific fix wins
