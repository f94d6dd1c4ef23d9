"""Slow and stuck clients on a real socket (issue #31, finding 8): dripped headers, a stalled body, an idle
connection, an over-long Content-Length, a refused upload that is never read, a client that goes away mid-body.

The server runs in process (tests/server/inprocess_server.py) with the protocol of ``one2345 serve`` and deadlines
scaled down from the defaults (10 s headers, 30 s body stall, 5 s idle) so that each case takes about a second; one
test checks that ``one2345 serve`` uses the defaults.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import time

import pytest

from server.service.serve import ClientTimeouts, ServeSettings
from tests.server.inprocess_server import AUTH, closed_by_peer, live_server, read_response
from tests.server.probe import multipart
from tests.server.test_app import FakePipeline, png_bytes

TIMEOUTS = ClientTimeouts(headers_s=1.5, body_stall_s=1.5, keep_alive_s=0.6)


@pytest.fixture
def live(tmp_path):
    fake = FakePipeline()
    with live_server(tmp_path / "jobs", lambda: fake, TIMEOUTS) as server:
        yield server


def test_the_defaults_are_the_documented_ones():
    timeouts = ServeSettings().timeouts
    assert (timeouts.headers_s, timeouts.body_stall_s, timeouts.keep_alive_s) == (10.0, 30.0, 5.0)


def test_dripped_headers_are_answered_408_and_closed(live):
    sock = live.connect()
    start = time.monotonic()
    sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
    while not _readable(sock) and time.monotonic() - start < 10:  # a header line every 0.1 s, never the end
        sock.sendall(b"X-Drip: 1\r\n")
        time.sleep(0.1)
    elapsed = time.monotonic() - start
    status, headers, _ = read_response(sock)
    assert status == 408 and headers["connection"] == "close"
    assert TIMEOUTS.headers_s - 0.1 <= elapsed < TIMEOUTS.headers_s + 1.5, elapsed
    assert closed_by_peer(sock, 2) is not None


def test_a_partial_head_gets_a_408_naming_the_deadline(live):
    sock = live.connect()
    sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
    status, headers, body = read_response(sock, timeout=TIMEOUTS.headers_s + 3)
    assert status == 408 and headers["connection"] == "close"
    assert "headers" in json.loads(body)["error"]["message"]
    assert closed_by_peer(sock, 2) is not None


def test_an_idle_connection_is_closed_before_and_after_a_request(live):
    sock = live.connect()
    assert closed_by_peer(sock, 5) == pytest.approx(TIMEOUTS.keep_alive_s, abs=0.5)
    sock = live.connect()
    sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response(sock)[0] == 200
    assert closed_by_peer(sock, 5) == pytest.approx(TIMEOUTS.keep_alive_s, abs=0.6)


def test_a_stalled_body_is_answered_408_and_the_server_logs_one_line(live, caplog):
    caplog.set_level(logging.INFO)
    sock = live.connect()
    body, ctype = multipart([("image", "a.png", png_bytes())])
    head = (f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body) + 5000}\r\n\r\n").encode()
    sock.sendall(head + body)  # 5000 bytes short: an over-long Content-Length whose rest never comes
    start = time.monotonic()
    status, headers, answer = read_response(sock, timeout=TIMEOUTS.body_stall_s + 5)
    assert status == 408 and headers["connection"] == "close", answer
    assert time.monotonic() - start == pytest.approx(TIMEOUTS.body_stall_s, abs=1.0)
    assert "request body" in json.loads(answer)["error"]["message"]
    assert closed_by_peer(sock, 2) is not None
    time.sleep(0.3)
    assert "Traceback" not in caplog.text and "unhandled error" not in caplog.text
    assert "request body stalled" in caplog.text
    assert live.manager.list_jobs()["total"] == 0


def test_a_slow_but_steady_body_is_not_a_stall(live):
    sock = live.connect()
    body, ctype = multipart([("image", "a.png", png_bytes())])
    sock.sendall((f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH}\r\nContent-Type: {ctype}\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n").encode())
    pieces = [body[i:i + len(body) // 6 + 1] for i in range(0, len(body), len(body) // 6 + 1)]
    for piece in pieces:  # 6+ pauses of 0.5 s: longer in all than the stall deadline, never one stall
        time.sleep(0.5)
        sock.sendall(piece)
    status, _, answer = read_response(sock)
    assert status == 202, answer


def test_an_over_long_content_length_is_answered_408_after_the_stall(live):
    # The route reads no body, but the answer waits for the declared one (the connection could carry nothing else):
    # not for ever.
    sock = live.connect()
    start = time.monotonic()
    sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nabc")
    status, headers, _ = read_response(sock, timeout=TIMEOUTS.body_stall_s + 5)
    assert status == 408 and headers["connection"] == "close"
    assert time.monotonic() - start == pytest.approx(TIMEOUTS.body_stall_s, abs=1.0)
    assert closed_by_peer(sock, 2) is not None


def test_a_wrong_token_with_a_huge_declared_body_is_answered_and_closed_unread(live):
    sock = live.connect()
    declared = 600 * 2**20
    sock.sendall((f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
                  f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {declared}\r\n\r\n").encode())
    status, headers, body = read_response(sock)
    assert status == 401 and headers["connection"] == "close"
    assert json.loads(body)["error"]["kind"] == "unauthorized"
    sent = 0
    with pytest.raises(OSError):  # the server reads none of it: the connection is gone long before 600 MiB
        sock.settimeout(5)
        while sent < declared:
            sock.sendall(b"\0" * 2**20)
            sent += 2**20
    assert sent < 64 * 2**20


def test_a_wrong_token_with_a_small_body_keeps_the_connection(live):
    sock = live.connect()
    body, ctype = multipart([("image", "a.png", png_bytes())])
    request = (f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\nContent-Type: {ctype}\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    sock.sendall(request)
    status, headers, _ = read_response(sock)
    assert status == 401 and headers.get("connection") != "close"
    sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")  # the same connection carries the next request
    assert read_response(sock)[0] == 200


def test_a_client_gone_mid_body_is_one_log_line(live, caplog):
    caplog.set_level(logging.INFO)
    for path in ("/v1/jobs", "/v1/jobs/" + "a" * 32 + "/reroll"):
        sock = live.connect()
        sock.sendall((f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH}\r\n"
                      "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n"
                      "--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\nxyz").encode())
        time.sleep(0.3)
        sock.close()
    time.sleep(0.5)
    assert "Traceback" not in caplog.text and "unhandled error" not in caplog.text, caplog.text
    assert caplog.text.count("went away in the middle of POST /v1/jobs/") == 1, caplog.text
    with socket.create_connection((live.host, live.port), timeout=10) as sock:
        sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock)[0] == 200


def _readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])
