"""Whether a host is this machine (:func:`server.common.net.is_loopback`): the one rule ``serve`` (a long token off
loopback) and the weights import (only from the server's own machine) both use."""

from __future__ import annotations

import pytest

from server.common.net import is_loopback


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.3.2.1", "::1", "[::1]"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host) is True


@pytest.mark.parametrize("host", ["", "0.0.0.0", "::", "192.168.1.20", "10.0.0.1", "[2001:db8::1]", "example.org",
                                  "LOCALHOST.example", "testclient"])
def test_other_hosts(host: str) -> None:
    assert is_loopback(host) is False
