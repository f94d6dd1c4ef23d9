"""The add-on's standard-library HTTP client against a scripted stand-in server (no Blender, no torch)."""

from __future__ import annotations

import json
import socket
from email.parser import BytesParser
from email.policy import HTTP

import pytest

from one2345_addon.core.client import Client, ServerError, encode_multipart
from tests.addon.fake_server import FakeWeights, ScriptedServer, json_reply


def parse_multipart(body: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    """Independent parser (the email package): part name → (file name, content)."""
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    return {part.get_param("name", header="content-disposition"): (part.get_filename(), part.get_payload(decode=True))
            for part in message.iter_parts()}


def test_multipart_round_trip_with_binary_content():
    png = bytes(range(256)) * 3 + b"\r\n--not-a-boundary\r\n"
    body, ctype = encode_multipart({"options": '{"seed": 1}'}, {"image": ('we"ird\nname.png', png, "image/png")})
    parts = parse_multipart(body, ctype)
    assert parts["options"] == (None, b'{"seed": 1}')
    assert parts["image"] == ("we_ird_name.png", png)


def test_submit_sends_image_options_and_token(tmp_path):
    image = tmp_path / "cat.png"
    image.write_bytes(b"\x89PNG fake bytes")
    reply = {"id": "a" * 32, "state": "queued", "url": f"/v1/jobs/{'a' * 32}"}
    with ScriptedServer(lambda request: json_reply(202, reply)) as server:
        answer = Client(server.url, "s3cret").submit(image, {"resolution": 64, "elevation": None})
    assert answer == reply
    (request,) = server.requests
    assert request["method"] == "POST" and request["path"] == "/v1/jobs"
    assert request["headers"]["Authorization"] == "Bearer s3cret"
    parts = parse_multipart(request["body"], request["headers"]["Content-Type"])
    assert parts["image"] == ("cat.png", b"\x89PNG fake bytes")
    assert json.loads(parts["options"][1]) == {"resolution": 64, "elevation": None}


def test_health_needs_no_token():
    with ScriptedServer(lambda request: json_reply(200, {"status": "ok"})) as server:
        assert Client(server.url, "tok").health() == {"status": "ok"}
    assert "Authorization" not in server.requests[0]["headers"]


@pytest.mark.parametrize(("status", "payload", "headers", "kind", "fix", "retry"), [
    (400, {"error": {"kind": "bad_input", "message": "resolution 9 < 32", "fix": "use 32…512"}}, {}, "bad_input",
     "use 32…512", None),
    (429, {"error": {"kind": "queue_full", "message": "8 jobs waiting", "fix": None}}, {"Retry-After": "3"},
     "queue_full", None, 3.0),
    (507, {"error": {"kind": "out_of_memory", "message": "CUDA OOM", "fix": "lower the resolution"}}, {},
     "out_of_memory", "lower the resolution", None),
])
def test_error_bodies_become_server_errors(status, payload, headers, kind, fix, retry):
    with ScriptedServer(lambda request: json_reply(status, payload, headers)) as server, \
            pytest.raises(ServerError) as caught:
        Client(server.url, "t").status("b" * 32)
    assert (caught.value.kind, caught.value.status, caught.value.fix, caught.value.retry_after) == (
        kind, status, fix, retry)
    assert caught.value.message == payload["error"]["message"]


def test_non_json_error_falls_back_to_the_status_code():
    with ScriptedServer(lambda request: (401, {"Content-Type": "text/plain"}, b"nope")) as server, \
            pytest.raises(ServerError) as caught:
        Client(server.url, "t").jobs()
    assert caught.value.kind == "unauthorized" and "401" in caught.value.message


def test_unreachable_server():
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ServerError) as caught:
        Client(f"http://127.0.0.1:{port}", timeout=2).health()
    assert caught.value.kind == "unreachable" and f"127.0.0.1:{port}" in caught.value.message


def test_loopback_requests_ignore_proxy_settings(monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:1")  # would refuse the connection if used
    with ScriptedServer(lambda request: json_reply(200, {"status": "ok"})) as server:
        assert Client(server.url).health()["status"] == "ok"


def test_download_writes_the_bytes_and_no_partial_file(tmp_path):
    data = bytes(range(256)) * 100
    with ScriptedServer(lambda request: (200, {"Content-Type": "application/octet-stream"}, data)) as server:
        path = Client(server.url, "t").download("/v1/jobs/x/result", tmp_path / "sub" / "mesh.ply")
    assert path.read_bytes() == data and sorted(p.name for p in path.parent.iterdir()) == ["mesh.ply"]


def test_delete_of_a_finished_job_returns_none():
    with ScriptedServer(lambda request: (204, {}, b"")) as server:
        assert Client(server.url, "t").cancel("c" * 32) is None
    assert server.requests[0]["method"] == "DELETE"


def test_weights_import_start_progress_outcome_and_cancel(tmp_path):
    """#25: the import routes (``POST/GET/DELETE /v1/weights/import``) with the token, the path in a JSON body."""
    (tmp_path / "zero123-xl.ckpt").write_bytes(b"weights")
    (tmp_path / "sam_vit_h_4b8939.pth").write_bytes(FakeWeights.DAMAGED)
    fake = FakeWeights(polls=2)
    with ScriptedServer(fake.handle) as server:
        client = Client(server.url, "t")
        started = client.start_weights_import(str(tmp_path))
        assert started["state"] == "running" and started["operation"] == "import"
        request = server.requests[-1]
        assert (request["method"], request["path"]) == ("POST", "/v1/weights/import")
        assert json.loads(request["body"]) == {"path": str(tmp_path)}
        assert request["headers"]["Authorization"] == "Bearer t"
        with pytest.raises(ServerError) as busy:  # one task at a time, shared with the download
            client.start_weights_download()
        assert busy.value.kind == "conflict"
        while (status := client.weights_import())["state"] == "running":
            pass
        assert {i["name"]: i["outcome"] for i in status["imported"]} == {
            "sam": "damaged", "zero123-xl": "imported", "loftr": "not found", "reconstruction": "not found"}
        with pytest.raises(ServerError) as idle:
            client.cancel_weights_import()
        assert idle.value.kind == "conflict"
        client.start_weights_import(str(tmp_path))
        assert client.cancel_weights_import()["state"] == "cancelled"
        assert [r["method"] for r in server.requests if r["path"] == "/v1/weights/import"][-1] == "DELETE"


def test_the_fake_weights_routes_answer_in_the_real_servers_shapes(tmp_path):
    """The stand-in the Blender tests use must not drift from ``server/service/weights_api.py``."""
    from server.service.weights_api import DownloadStatus, WeightsListing

    (tmp_path / "zero123-xl.ckpt").write_bytes(b"weights")
    fake = FakeWeights(polls=2)
    statuses = [fake.listing()["download"], json.loads(fake.handle({"method": "POST", "path": "/v1/weights/import",
                                                                     "body": json.dumps({"path": str(tmp_path)})})[2])]
    while statuses[-1]["state"] == "running":
        statuses.append(fake.progress())
    for status in statuses:
        assert DownloadStatus.model_validate(status).model_dump(exclude_none=True).keys() <= status.keys()
    assert set(DownloadStatus.model_fields) == set(statuses[-1])
    listing = fake.listing()
    WeightsListing.model_validate(listing)
    assert set(WeightsListing.model_fields) == set(listing)
