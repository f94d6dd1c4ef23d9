"""Weights registry and download, against a local stand-in of the hub's ``resolve`` endpoint (no real network)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.common import weights
from server.common.errors import BadInputError, CancelledError, CheckpointError, MissingWeightsError
from server.common.weights import table as weights_table
from tests.server.fake_hub import FakeHub, payload, serve_hub

SAM_BYTES = payload(3000, 1)
LOFTR_BYTES = payload(5000, 2)
RECON_BYTES = payload(40_000, 3)
ZERO123_BYTES = payload(60_000, 4)
CONTENT = {"sam": SAM_BYTES, "zero123-xl": ZERO123_BYTES, "loftr": LOFTR_BYTES, "reconstruction": RECON_BYTES}


def small_table(monkeypatch: pytest.MonkeyPatch, pinned: tuple[str, ...] = ("sam", "zero123-xl", "loftr")) -> None:
    """The real table with the pins (exact size, SHA-256) of the small stand-ins; like the real table, the
    reconstruction file has no pin unless named in ``pinned``."""
    small = tuple(dataclasses.replace(
        w, approx_size_bytes=len(CONTENT[w.name]), derived_bytes=0,
        size_bytes=len(CONTENT[w.name]) if w.name in pinned else None,
        sha256=hashlib.sha256(CONTENT[w.name]).hexdigest() if w.name in pinned else None) for w in weights.WEIGHT_FILES
        if w.name in CONTENT)
    monkeypatch.setattr(weights_table, "WEIGHT_FILES", small)
    monkeypatch.setattr(weights_table, "REGISTRY", {w.name: w for w in small})


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    small_table(monkeypatch)
    files = {
        weights.REGISTRY["sam"].filename: SAM_BYTES,
        weights.REGISTRY["loftr"].filename: LOFTR_BYTES,
        weights.REGISTRY["reconstruction"].filename: RECON_BYTES,
    }
    with serve_hub(monkeypatch, tmp_path, files, lfs={weights.REGISTRY["reconstruction"].filename}) as fake:
        yield fake


def test_download_two_files_to_repo_paths_then_skip(hub: FakeHub, tmp_path: Path) -> None:
    root = tmp_path / "weights"
    paths = weights.download(["sam", "reconstruction"], root, endpoint=hub.url, progress=False)

    assert paths == {
        "sam": root / "sam_vit_h_4b8939.pth",
        "reconstruction": root / "SparseNeuS_demo_v1/exp/lod0/checkpoints/ckpt_215000.pth",
    }
    assert paths["sam"].read_bytes() == SAM_BYTES
    assert paths["reconstruction"].read_bytes() == RECON_BYTES
    assert not list(root.rglob("*.incomplete"))
    gets = [p for method, p, _ in hub.requests if method == "GET"]
    assert sorted(gets) == sorted(
        [
            "/One-2-3-45/code/resolve/main/sam_vit_h_4b8939.pth",
            "/cdn/SparseNeuS_demo_v1/exp/lod0/checkpoints/ckpt_215000.pth",
        ]
    )

    n_requests = len(hub.requests)
    again = weights.download(["sam", "reconstruction"], root, endpoint=hub.url, progress=False)
    assert again == paths
    assert len(hub.requests) == n_requests  # present files: not even a HEAD

    assert weights.resolve("sam", root) == paths["sam"]


def test_interrupted_download_resumes_with_range(hub: FakeHub, tmp_path: Path) -> None:
    root = tmp_path / "weights"
    hub.cut_after = 1234
    with pytest.raises(MissingWeightsError) as info:
        weights.download(["loftr"], root, endpoint=hub.url, progress=False)
    assert "one2345 weights download --only loftr" in str(info.value)
    partials = list(root.rglob("*.incomplete"))
    assert len(partials) == 1
    kept = partials[0].stat().st_size
    assert 0 < kept <= 1234
    assert partials[0].read_bytes() == LOFTR_BYTES[:kept]
    assert not (root / weights.REGISTRY["loftr"].local_name).exists()

    hub.cut_after = None
    hub.requests.clear()
    path = weights.download(["loftr"], root, endpoint=hub.url, progress=True)["loftr"]

    assert path == root / "elevation_estimate/utils/weights/indoor_ds_new.ckpt"
    assert path.read_bytes() == LOFTR_BYTES
    assert [r for r in hub.requests if r[0] == "GET"] == [
        ("GET", "/One-2-3-45/code/resolve/main/elevation_estimate/utils/weights/indoor_ds_new.ckpt", f"bytes={kept}-")
    ]
    assert not list(root.rglob("*.incomplete"))


def test_resumed_download_with_wrong_bytes_fails_hash_check(hub: FakeHub, tmp_path: Path) -> None:
    root = tmp_path / "weights"
    hub.cut_after, hub.garbage_prefix = 1000, True
    with pytest.raises(MissingWeightsError):
        weights.download(["sam"], root, endpoint=hub.url, progress=False)

    hub.cut_after = None
    with pytest.raises(CheckpointError, match="SHA-256"):
        weights.download(["sam"], root, endpoint=hub.url, progress=False)
    assert not list(root.rglob("*.incomplete"))
    assert not (root / "sam_vit_h_4b8939.pth").exists()

    assert weights.download(["sam"], root, endpoint=hub.url, progress=False)["sam"].read_bytes() == SAM_BYTES


def test_offline_never_touches_network(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "weights"
    (root / "sam_vit_h_4b8939.pth").parent.mkdir(parents=True)
    (root / "sam_vit_h_4b8939.pth").write_bytes(b"already here")

    with pytest.raises(MissingWeightsError) as info:
        weights.download(["sam", "loftr"], root, offline=True, endpoint=hub.url)
    message = str(info.value)
    assert "indoor_ds_new.ckpt" in message and str(root) in message

    assert "sam" in message and "damaged: it has 12 bytes, the hub's file has 3,000" in message
    assert "one2345 weights download --only sam --only loftr" in message  # one command for both
    assert "offline=True" not in message

    (root / "sam_vit_h_4b8939.pth").write_bytes(SAM_BYTES)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert weights.download(["sam"], root, endpoint=hub.url) == {"sam": root / "sam_vit_h_4b8939.pth"}
    with pytest.raises(MissingWeightsError, match="--only reconstruction"):
        weights.download(["reconstruction"], root, endpoint=hub.url)
    assert hub.requests == []


def test_file_missing_on_hub_is_missing_weights(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(MissingWeightsError, match=r"zero123-xl\.ckpt") as info:
        weights.download(["zero123-xl"], tmp_path, endpoint=hub.url, progress=False)
    assert "one2345 weights download --only zero123-xl" in str(info.value)
    assert [m for m, _, _ in hub.requests] == ["HEAD"]


def test_resolve_errors(tmp_path: Path) -> None:
    with pytest.raises(MissingWeightsError) as info:
        weights.resolve("zero123-xl", tmp_path)
    message = str(info.value)
    assert "zero123-xl.ckpt" in message
    assert str(tmp_path) in message
    assert "one2345 weights download --only zero123-xl" in message
    assert info.value.kind == "missing_weights"

    with pytest.raises(BadInputError) as bad:
        weights.resolve("zero123", tmp_path)
    for known in ("sam", "zero123-xl", "loftr", "reconstruction"):
        assert known in str(bad.value)
    with pytest.raises(BadInputError):
        weights.download(["nope"], tmp_path, offline=True)


def test_default_weights_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ONE2345_WEIGHTS", str(tmp_path / "w"))
    assert weights.default_weights_dir() == tmp_path / "w"
    monkeypatch.delenv("ONE2345_WEIGHTS")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert weights.default_weights_dir() == tmp_path / ".cache/one2345/weights"

    (tmp_path / ".cache/one2345/weights/zero123-xl.ckpt").parent.mkdir(parents=True)
    (tmp_path / ".cache/one2345/weights/zero123-xl.ckpt").write_bytes(b"x")
    assert weights.resolve("zero123-xl") == tmp_path / ".cache/one2345/weights/zero123-xl.ckpt"


def test_registry_matches_spec_table() -> None:
    expected = {
        "sam": "sam_vit_h_4b8939.pth",
        "zero123-xl": "zero123-xl.ckpt",
        "loftr": "elevation_estimate/utils/weights/indoor_ds_new.ckpt",
        "reconstruction": "SparseNeuS_demo_v1/exp/lod0/checkpoints/ckpt_215000.pth",
    }
    reference = [w for w in weights.WEIGHT_FILES if not w.on_demand]  # the text-to-image files come on demand
    assert {w.name: w.filename for w in reference} == expected
    assert all(w.repo_id == "One-2-3-45/code" and w.local_name == w.filename for w in reference)


def test_cli_list_shows_every_state(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from server.service.cli import main

    small_table(monkeypatch, pinned=())
    monkeypatch.setattr(weights_table, "REGISTRY", {**weights.REGISTRY, "zero123-xl": dataclasses.replace(
        weights.REGISTRY["zero123-xl"], approx_size_bytes=15_465_973_531, derived_bytes=5_000_000_000)})
    monkeypatch.setattr(weights_table, "WEIGHT_FILES", tuple(weights.REGISTRY.values()))
    root = tmp_path / "weights"
    (root / "sam_vit_h_4b8939.pth").parent.mkdir(parents=True)
    (root / "sam_vit_h_4b8939.pth").write_bytes(SAM_BYTES)
    partial = root / "elevation_estimate/utils/weights/indoor_ds_new.ckpt.etag.incomplete"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(LOFTR_BYTES[:100])

    assert main(["weights", "list", "--dir", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines[:4]] == [
        ["sam", "present"], ["zero123-xl", "missing"], ["loftr", "partial"], ["reconstruction", "missing"]]
    assert "unavailable" in lines[0]  # copied by hand, and the table knows no SHA-256 for it
    assert lines[-1].startswith(f"weights folder: {root}; ~15.5 GB still to download, ~20.5 GB of disk")

    assert main(["weights", "list", "--dir", str(root), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(f["name"], f["state"], f["bytes_on_disk"]) for f in listed] == [
        ("sam", "present", 3000), ("zero123-xl", "missing", 0), ("loftr", "partial", 100),
        ("reconstruction", "missing", 0)]


def test_download_reports_progress_and_cancels_keeping_the_partial(hub: FakeHub, tmp_path: Path) -> None:
    root = tmp_path / "weights"
    reports: list[weights.DownloadProgress] = []
    with pytest.raises(CancelledError):
        weights.download(["loftr", "reconstruction"], root, on_progress=reports.append,
                         should_cancel=lambda: sum(r.transferred > 0 for r in reports) > 3)
    assert reports[0].phase == "downloading" and reports[0].total == 45_000 and reports[0].files_total == 2
    partial = next(root.rglob("*.incomplete"))
    assert 0 < partial.stat().st_size < 5000 and partial.read_bytes() == LOFTR_BYTES[:partial.stat().st_size]

    reports.clear()
    weights.download(["loftr", "reconstruction"], root, on_progress=reports.append)
    phases = [(r.file, r.phase) for r in reports if r.phase != "downloading"]
    assert list(dict.fromkeys(phases)) == [
        ("loftr", "verifying"), ("loftr", "done"), ("reconstruction", "verifying"), ("reconstruction", "done")]
    verifying = [r.hashed for r in reports if r.phase == "verifying" and r.file == "loftr"]
    assert verifying[0] == 0 and verifying[-1] == 5000  # the whole file, the resumed part included
    assert reports[-1].done == reports[-1].total == 45_000 and reports[-1].files_done == 2
    assert reports[-1].transferred == 45_000 - partial_size_of(reports)


def partial_size_of(reports: list[weights.DownloadProgress]) -> int:
    """Bytes that were on disk before the first report of a resumed download."""
    first = reports[0]
    return first.done - first.transferred


def test_a_weights_table_replaces_the_files_for_client_tests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$ONE2345_WEIGHTS_TABLE (a test hook of `serve`): small stand-in files that the server then treats as its own."""
    monkeypatch.setattr(weights_table, "WEIGHT_FILES", weights.WEIGHT_FILES)
    monkeypatch.setattr(weights_table, "REGISTRY", weights.REGISTRY)
    table = tmp_path / "table.json"
    table.write_text(json.dumps([{"name": "a", "filename": "dir/a.bin", "size_bytes": 10},
                                 {"name": "b", "filename": "b.bin", "size_bytes": 3, "required": False}]))
    files = weights.install_table(table)
    assert [w.name for w in weights.WEIGHT_FILES] == ["a", "b"] and weights.weight_file("a").size_bytes == 10
    assert [w.required for w in files] == [True, False]
    (tmp_path / "w" / "dir").mkdir(parents=True)
    (tmp_path / "w" / "dir" / "a.bin").write_bytes(b"0123456789")
    states = {s.name: s.state for s in weights.inspect_weights(tmp_path / "w")}
    assert states == {"a": "present", "b": "missing"}
    table.write_text(json.dumps([{"name": "a"}]))
    with pytest.raises(BadInputError, match=r"ONE2345_WEIGHTS_TABLE.*size_bytes"):
        weights.install_table(table)
