"""Weights integrity end to end (issue #25: problems 4, 6, 7; issue #31 finding 14): the pinned table, damaged files
found and fetched again, `weights verify --all`, LoFTR's old hub location, `weights import` of an official checkout,
and one message with one command for every missing file — against the loopback stand-in hub and tiny files whose pins
are patched into the table (the real pins stay in the table and are checked as such)."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
from collections import namedtuple
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.common import weights
from server.common.errors import MissingWeightsError, StorageError
from server.common.weights import importing as weights_importing
from server.common.weights import integrity as weights_integrity
from server.common.weights import table as weights_table
from server.service.cli import main
from tests.server.fake_hub import FakeHub, serve_hub
from tests.server.test_weights import CONTENT, small_table

REFERENCE_LAYOUT = {  # where an official One-2-3-45 checkout keeps the files (spec §1.1)
    "sam": "sam_vit_h_4b8939.pth",
    "zero123-xl": "zero123-xl.ckpt",
    "loftr": "elevation_estimate/utils/weights/indoor_ds_new.ckpt",
    "reconstruction": "reconstruction/exp/lod0/checkpoints/ckpt_215000.pth",
}


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    small_table(monkeypatch)
    files = {weights.REGISTRY[n].filename: data for n, data in CONTENT.items()}
    with serve_hub(monkeypatch, tmp_path, files, lfs={weights.REGISTRY["zero123-xl"].filename}) as fake:
        yield fake


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "weights"


def put(folder: Path, rel: str, data: bytes) -> Path:
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def local(root: Path, name: str) -> Path:
    return root / weights.REGISTRY[name].local_name


# -- the table (problem 6) --------------------------------------------------------------------------------------------


def test_the_table_pins_the_public_sizes_and_hashes_and_the_hub_cards_licence(tmp_path: Path) -> None:
    table = weights.REGISTRY
    assert (table["zero123-xl"].size_bytes, table["zero123-xl"].sha256) == (
        15_465_973_531, "bc4ea2f8696ed96495a756e178cab659de807bbae2d2df18987cf61c44070696")
    assert (table["sam"].size_bytes, table["sam"].sha256) == (
        2_564_550_879, "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e")
    assert (table["loftr"].size_bytes, table["loftr"].sha256) == (
        46_355_053, "be9ff88b323ec27889114719f668ae41aff7034b56a4c4acbd46b8b180b87ed3")
    assert 5_200_000 < table["reconstruction"].approx_size_bytes < 5_400_000  # ≈ 5.31 MB, not 20 MB
    assert all(w.licence.startswith("MIT (the hub repo's card") for w in weights.WEIGHT_FILES)
    assert table["loftr"].fallback_filenames == ("one2345_elev_est/tools/weights/indoor_ds_new.ckpt",)

    # An empty folder needs ≈ 23 GB: the 15.5 GB checkpoint stays beside its ≈ 5 GB conversion.
    states = weights.inspect_weights(tmp_path)
    assert 18.0e9 < weights.missing_bytes(states) < 18.2e9
    assert 23.0e9 < weights.disk_needed_bytes(states) < 23.2e9


def test_the_hubs_etag_wins_over_a_disagreeing_pin_and_the_disagreement_is_logged(
        hub: FakeHub, root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    wrong = dataclasses.replace(weights.REGISTRY["zero123-xl"], sha256="0" * 64, size_bytes=123)
    monkeypatch.setitem(weights.REGISTRY, "zero123-xl", wrong)
    with caplog.at_level(logging.WARNING, logger="server.common.weights"):
        path = weights.download(["zero123-xl"], root, progress=False)["zero123-xl"]
    assert path.read_bytes() == CONTENT["zero123-xl"]
    logged = caplog.text
    assert "the table's pin 123" in logged and f"SHA-256 {hub.etag('zero123-xl.ckpt')}" in logged
    # The hub's size and hash were recorded: the file is whole by them, not damaged by the wrong pins.
    state = weights.inspect_weights(root, names=["zero123-xl"], verify=True)[0]
    assert (state.state, state.checksum, state.expected_bytes) == ("present", "verified", 60_000)


def test_a_resumed_download_is_verified_whole_against_the_pin_when_the_hub_gives_no_sha256(
        hub: FakeHub, root: Path) -> None:
    hub.etag = lambda name: "a-git-blob-id"  # a non-LFS file: the ETag is no SHA-256, so the pin is the reference
    hub.cut_after, hub.garbage_prefix = 700, True
    with pytest.raises(MissingWeightsError):
        weights.download(["sam"], root, progress=False)
    hub.cut_after = None
    with pytest.raises(weights.CheckpointError, match="SHA-256"):  # the wrong first 700 bytes are found
        weights.download(["sam"], root, progress=False)
    assert not local(root, "sam").exists()
    assert weights.download(["sam"], root, progress=False)["sam"].read_bytes() == CONTENT["sam"]


# -- damaged files (problem 4) ----------------------------------------------------------------------------------------


def test_a_truncated_checkpoint_copied_in_by_hand_is_fetched_again_keeping_it_until_the_new_one_is_whole(
        hub: FakeHub, root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    truncated = put(root, "zero123-xl.ckpt", CONTENT["zero123-xl"][:30_000])
    assert weights.inspect_weights(root, names=["zero123-xl"])[0].state == "corrupt"
    assert main(["weights", "list", "--dir", str(root)]) == 0
    assert "zero123-xl      corrupt" in capsys.readouterr().out

    hub.cut_after = 10_000  # the first fetch is interrupted: the damaged file is still there, untouched
    assert main(["weights", "download", "--only", "zero123-xl", "--dir", str(root)]) == 1
    assert truncated.read_bytes() == CONTENT["zero123-xl"][:30_000]
    assert list(root.glob("zero123-xl.ckpt.*.incomplete"))

    hub.cut_after = None
    assert main(["weights", "download", "--only", "zero123-xl", "--dir", str(root)]) == 0
    assert truncated.read_bytes() == CONTENT["zero123-xl"]
    assert ("GET", "/cdn/zero123-xl.ckpt", None) in hub.requests
    assert not list(root.glob("*.incomplete"))


def test_a_file_of_the_right_size_with_wrong_bytes_is_hashed_once_and_fetched_again(
        hub: FakeHub, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = bytearray(CONTENT["loftr"])
    bad[4000] ^= 0xFF
    put(root, weights.REGISTRY["loftr"].local_name, bytes(bad))
    put(root, weights.REGISTRY["sam"].local_name, CONTENT["sam"])
    reports: list[weights.DownloadProgress] = []
    weights.download(["sam", "loftr"], root, on_progress=reports.append)
    assert local(root, "loftr").read_bytes() == CONTENT["loftr"]
    assert [r for r in hub.requests if r[0] == "GET"] == [
        ("GET", "/One-2-3-45/code/resolve/main/elevation_estimate/utils/weights/indoor_ds_new.ckpt", None)]
    checking = [(r.file, r.hashed) for r in reports if r.phase == "checking"]
    assert ("sam", 3000) in checking and ("loftr", 5000) in checking

    hashed: list[Path] = []
    real = weights.sha256_file
    monkeypatch.setattr(weights_integrity, "sha256_file", lambda path, *a: hashed.append(path) or real(path, *a))
    hub.requests.clear()
    weights.download(["sam", "loftr"], root)
    assert hashed == [] and hub.requests == []  # digests remembered by size and mtime: nothing to do


def test_verify_all_hashes_every_present_file_with_progress_then_is_instant(
        hub: FakeHub, root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("sam", "zero123-xl", "reconstruction"):
        put(root, weights.REGISTRY[name].local_name, CONTENT[name])
    damaged = bytearray(CONTENT["zero123-xl"])
    damaged[0] ^= 1
    put(root, "zero123-xl.ckpt", bytes(damaged))
    hashed: list[str] = []
    real = weights.sha256_file
    monkeypatch.setattr(weights_integrity, "sha256_file", lambda path, *a: hashed.append(path.name) or real(path, *a))

    progress: list[tuple[str, int, int]] = []
    states = {s.name: s for s in weights.verify_all(root, on_hash=lambda *a: progress.append(a))}
    assert {n: (s.state, s.checksum) for n, s in states.items()} == {
        "sam": ("present", "verified"), "zero123-xl": ("corrupt", "mismatch"), "loftr": ("missing", None),
        "reconstruction": ("present", "unavailable")}  # no reference hash known for it: not hashed
    assert sorted(hashed) == ["sam_vit_h_4b8939.pth", "zero123-xl.ckpt"]
    assert ("zero123-xl", 60_000, 60_000) in progress and ("sam", 3000, 3000) in progress

    assert main(["weights", "verify", "--all", "--dir", str(root)]) == 1
    out, err = capsys.readouterr()
    assert "zero123-xl      damaged" in out and "sam             present  verified" in out
    assert "one2345 weights download --only zero123-xl" in err
    assert sorted(hashed) == ["sam_vit_h_4b8939.pth", "zero123-xl.ckpt"]  # the second run hashed nothing
    assert (root / weights.CHECKSUMS_FILE).is_file()

    assert main(["weights", "download", "--dir", str(root), "--only", "zero123-xl"]) == 0
    assert main(["weights", "verify", "--all", "--dir", str(root)]) == 0
    assert main(["weights", "verify"]) == 2  # neither FILE nor --all
    assert main(["weights", "verify", "x.pth", "--all"]) == 2


def test_verify_all_passes_over_a_fifo_without_hanging(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small_table(monkeypatch)
    root.mkdir()
    os.mkfifo(root / "sam_vit_h_4b8939.pth")
    assert weights.verify_all(root)[0].state == "missing"


# -- LoFTR's old hub location (problem 7) -----------------------------------------------------------------------------


def test_loftr_is_taken_from_its_old_hub_location_when_the_current_one_is_missing(
        hub: FakeHub, root: Path) -> None:
    old = "one2345_elev_est/tools/weights/indoor_ds_new.ckpt"
    hub.files[old] = hub.files.pop(weights.REGISTRY["loftr"].filename)
    path = weights.download(["loftr"], root, progress=False)["loftr"]
    assert path == root / "elevation_estimate/utils/weights/indoor_ds_new.ckpt"
    assert path.read_bytes() == CONTENT["loftr"]
    assert [(m, p) for m, p, _ in hub.requests] == [
        ("HEAD", "/One-2-3-45/code/resolve/main/elevation_estimate/utils/weights/indoor_ds_new.ckpt"),
        ("HEAD", f"/One-2-3-45/code/resolve/main/{old}"), ("GET", f"/One-2-3-45/code/resolve/main/{old}")]

    del hub.files[old]
    path.unlink()
    with pytest.raises(MissingWeightsError, match="one2345_elev_est/tools/weights"):
        weights.download(["loftr"], root, progress=False)


# -- import of an existing checkout (problem 7) -----------------------------------------------------------------------


def checkout(folder: Path, layout: dict[str, str] = REFERENCE_LAYOUT) -> Path:
    for name, rel in layout.items():
        put(folder, rel, CONTENT[name])
    return folder


def test_import_of_an_official_checkout_hard_links_each_verified_file_into_place(
        root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    small_table(monkeypatch)
    src = checkout(tmp_path / "One-2-3-45")
    assert main(["weights", "import", str(src), "--dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert "reconstruction  imported (hard link): reconstruction/exp/lod0/checkpoints/ckpt_215000.pth" in out
    for name, rel in REFERENCE_LAYOUT.items():
        placed = local(root, name)
        assert placed.read_bytes() == CONTENT[name]
        assert os.path.samefile(placed, src / rel)  # no second copy of 18 GB
    assert {s.name: s.checksum for s in weights.inspect_weights(root)} == {
        "sam": "verified", "zero123-xl": "verified", "loftr": "verified", "reconstruction": "unavailable"}

    again = weights.import_weights(src, root)
    assert [r.outcome for r in again] == ["already present"] * 4
    assert not list(root.rglob("*.tmp"))

    # A copy left by an import that was killed (its process is gone) is removed by the next import.
    local(root, "loftr").unlink()
    dead = put(root, "elevation_estimate/utils/weights/.indoor_ds_new.ckpt.import-999999999.tmp", b"half")
    assert weights.import_weights(src, root, names=["loftr"])[0].outcome == "imported"
    assert not dead.exists()


def test_import_refuses_a_damaged_file_reports_the_missing_and_keeps_nothing_of_it(
        root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    small_table(monkeypatch)
    src = tmp_path / "flat"  # a flat folder of the files, one damaged, one truncated, one absent
    put(src, "sam_vit_h_4b8939.pth", CONTENT["sam"])
    wrong = bytearray(CONTENT["zero123-xl"])
    wrong[-1] ^= 1
    put(src, "zero123-xl.ckpt", bytes(wrong))
    put(src, "indoor_ds_new.ckpt", CONTENT["loftr"][:-10])
    results = {r.name: r for r in weights.import_weights(src, root)}
    assert {n: r.outcome for n, r in results.items()} == {
        "sam": "imported", "zero123-xl": "damaged", "loftr": "damaged", "reconstruction": "not found"}
    assert "SHA-256" in results["zero123-xl"].detail and "4,990 bytes" in results["loftr"].detail
    assert "reconstruction/exp/lod0/checkpoints/ckpt_215000.pth" in results["reconstruction"].detail
    assert not local(root, "zero123-xl").exists() and not local(root, "loftr").exists()
    assert not list(root.rglob("*.tmp"))
    assert main(["weights", "import", str(src), "--dir", str(root)]) == 1  # a damaged file: exit 1
    assert "zero123-xl      damaged" in capsys.readouterr().out
    assert main(["weights", "import", str(tmp_path / "nope"), "--dir", str(root)]) == 2


def test_import_across_file_systems_copies_with_the_space_check_and_replaces_a_damaged_file(
        root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small_table(monkeypatch)
    src = checkout(tmp_path / "older", {"loftr": "one2345_elev_est/tools/weights/indoor_ds_new.ckpt",
                                        "reconstruction": "SparseNeuS_demo_v1/exp/lod0/checkpoints/ckpt_215000.pth"})
    put(root, weights.REGISTRY["loftr"].local_name, b"x" * 5000)  # damaged: right size, wrong bytes

    def no_link(*_: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(weights_importing.os, "link", no_link)  # as between two disks; ext4/tmpfs lack FICLONE too
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(weights_integrity.shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 100, 100))
    with pytest.raises(StorageError, match="not enough free disk space"):
        weights.import_weights(src, root)
    monkeypatch.setattr(weights_table, "FREE_SPACE_MARGIN_BYTES", 0)
    monkeypatch.setattr(weights_integrity.shutil, "disk_usage", lambda _: usage(10**9, 0, 10**9))

    reports: list[weights.DownloadProgress] = []
    results = {r.name: r for r in weights.import_weights(src, root, on_progress=reports.append)}
    assert results["loftr"].outcome == "imported" and results["loftr"].how in ("copy", "reflink")
    assert results["reconstruction"].source == "SparseNeuS_demo_v1/exp/lod0/checkpoints/ckpt_215000.pth"
    assert local(root, "loftr").read_bytes() == CONTENT["loftr"]
    assert not os.path.samefile(local(root, "loftr"), src / "one2345_elev_est/tools/weights/indoor_ds_new.ckpt")
    if results["loftr"].how == "copy":
        assert any(r.phase == "copying" and r.file == "loftr" and r.file_done == 5000 for r in reports)
    assert reports[-1].phase == "done" and reports[-1].done == reports[-1].total == 45_000
    assert weights.inspect_weights(root, names=["loftr"], verify=True)[0].checksum == "verified"


# -- one message, one command (issue #31 finding 14) ------------------------------------------------------------------


def test_the_paper_preset_names_every_missing_file_with_one_command(root: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from server.pipeline.models import paper_models

    small_table(monkeypatch)
    put(root, weights.REGISTRY["loftr"].local_name, CONTENT["loftr"])
    put(root, "zero123-xl.ckpt", CONTENT["zero123-xl"][:100])  # damaged counts as missing
    with pytest.raises(MissingWeightsError) as info:  # before: only zero123-xl was named, with its own command
        paper_models("cpu", root, download_missing=False)
    message = str(info.value)
    assert "zero123-xl (zero123-xl.ckpt, ~60 kB, damaged: it has 100 bytes" in message
    assert "reconstruction (SparseNeuS_demo_v1/exp/lod0/checkpoints/ckpt_215000.pth, ~40 kB, missing)" in message
    assert "also absent (optional, a weight-free fallback is used): sam (" in message and "loftr (" not in message
    assert f"`one2345 weights download --only zero123-xl --only reconstruction --only sam --dir {root}`" in message
    assert message.count("one2345 weights download") == 1


def test_a_download_that_cannot_reach_the_hub_lists_every_file_with_one_command(hub: FakeHub, root: Path) -> None:
    del hub.files["zero123-xl.ckpt"]
    with pytest.raises(MissingWeightsError) as info:
        weights.download(["zero123-xl", "reconstruction", "loftr", "sam"], root, progress=False)
    message = str(info.value)
    for name in ("zero123-xl", "reconstruction", "loftr", "sam"):
        assert f"{name} (" in message
    assert f"`one2345 weights download --dir {root}`" in message  # all four: no --only at all
    assert message.count("one2345 weights download") == 1


def test_download_command_is_one_command() -> None:
    assert weights.download_command(["zero123-xl", "reconstruction"]) == (
        "one2345 weights download --only zero123-xl --only reconstruction")
    assert weights.download_command(["sam", "zero123-xl", "loftr", "reconstruction"]) == "one2345 weights download"
    assert weights.download_command(["sam"], "/w w") == "one2345 weights download --only sam --dir '/w w'"


def test_cli_generate_offline_names_every_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from server.common.synthetic import write_views_dir

    views = write_views_dir(tmp_path / "views")
    image = next(Path(views).glob("*.png"))
    code = main(["generate", str(image), "-o", str(tmp_path / "out.glb"), "--offline", "--device", "cpu",
                 "--weights-dir", str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert code == 1
    assert "zero123-xl" in err and "reconstruction" in err
    assert f"one2345 weights download --dir {tmp_path / 'empty'}" in err
    assert err.count("one2345 weights download") == 1
