"""The pre-flight's host-RAM check (issue #25): a paper run on the CPU needs the measured peak heap."""

from __future__ import annotations

import sys

import pytest

from server.pipeline import models
from server.pipeline.models import HOST_RAM_NEEDED_BYTES, available_host_memory, host_memory_warning


def test_warns_with_the_numbers_when_ram_is_short() -> None:
    needed = HOST_RAM_NEEDED_BYTES[("paper", "cpu")]
    warning = host_memory_warning("paper", "cpu", available=2 * 2**30)
    assert warning is not None
    assert "2.0 GiB of RAM available" in warning and f"needs about {needed / 2**30:.1f} GiB" in warning
    assert host_memory_warning("paper", "cpu", available=needed) is None
    assert host_memory_warning("tiny", "cpu", available=1) is None  # no measured need: nothing claimed
    assert host_memory_warning("paper", "cuda:0", available=1) is None


def test_available_memory_from_proc_meminfo_without_psutil(monkeypatch: pytest.MonkeyPatch) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("/proc/meminfo is Linux's")
    monkeypatch.setitem(sys.modules, "psutil", None)  # `import psutil` raises ImportError
    available = available_host_memory()
    assert available is not None and available > 0
    with open("/proc/meminfo") as meminfo:
        total = int(next(line for line in meminfo if line.startswith("MemTotal:")).split()[1]) * 1024
    assert available <= total


def test_paper_models_record_the_warning(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The warning reaches the loaded models' descriptions (the health endpoint's ``models_loaded``) before any
    weight is read: here loading stops at the first missing file."""
    from server.common.errors import MissingWeightsError

    monkeypatch.setattr(models, "available_host_memory", lambda: 1 * 2**30)
    records: list[str] = []
    monkeypatch.setattr(models.log, "info", lambda fmt, *args: records.append(fmt % args))
    with pytest.raises(MissingWeightsError):
        models.paper_models("cpu", tmp_path, download_missing=False)
    assert records and "1.0 GiB of RAM available" in records[0]
