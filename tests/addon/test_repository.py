"""A remote extension repository from ``python -m one2345_addon.build --repo DIR`` (#25 item 8): the zip and an
``index.json`` equal to what Blender 4.2's and 5.0's ``server-generate`` write for the same folder; only the newest
version of an id is listed; bad folders are refused naming the file. The round trip inside Blender (add the
repository, sync, install, update) is in ``test_first_use.py``."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from one2345_addon import build, repository
from tests.addon.test_build import BPY_ENVS, bpy_python, plain_env

REPO_ROOT = Path(__file__).resolve().parents[2]


def bumped(src: Path, dest_dir: Path, version: str) -> Path:
    """A copy of an extension zip whose manifest says ``version`` (a later release, for update tests)."""
    dest = dest_dir / f"one2345-{version}.zip"
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as b:
        for info in a.infolist():
            data = a.read(info)
            if info.filename == "blender_manifest.toml":
                text = data.decode()
                old = f'version = "{build.server_version()}"'
                assert old in text
                data = text.replace(old, f'version = "{version}"', 1).encode()
            b.writestr(info, data)
    return dest


def run_repo_build(*args: str, hide_tomllib: bool = False) -> subprocess.CompletedProcess:
    """The build as a fresh clone runs it: plain Python, standard library only (``-S``), optionally without
    tomllib (Python 3.10)."""
    prefix = ("import runpy, sys; sys.modules['tomllib'] = None; " if hide_tomllib else "import runpy, sys; ")
    code = prefix + "sys.argv = ['build', *sys.argv[1:]]; runpy.run_module('one2345_addon.build', run_name='__main__')"
    return subprocess.run([sys.executable, "-S", "-c", code, *args], cwd=REPO_ROOT, env=plain_env(),
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("repo")
    done = run_repo_build("--repo", str(folder), "--no-blender")
    assert done.returncode == 0, done.stderr
    zip_path, index = (Path(line) for line in done.stdout.strip().splitlines()[-2:])
    assert zip_path == folder / f"one2345-{build.server_version()}.zip" and index == folder / "index.json"
    assert "Add Remote Repository" in done.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["index.json", zip_path.name]  # no stage, no temp files
    return folder


def blender_index(version: str, folder: Path) -> dict:
    """What ``blender_ext.py server-generate`` of that Blender writes for ``folder`` (run on a copy)."""
    validator = build.validator_from_python(bpy_python(version))
    done = subprocess.run([*validator.prefix, "server-generate", "--repo-dir", str(folder)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0 and "FATAL" not in done.stdout, done.stdout + done.stderr
    return json.loads((folder / "index.json").read_text())


@pytest.mark.parametrize("version", list(BPY_ENVS))
def test_the_index_is_what_blenders_server_generate_writes(repo, version, tmp_path):
    ours = json.loads((repo / "index.json").read_text())
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in repo.glob("*.zip"):
        (copy / path.name).write_bytes(path.read_bytes())
    assert ours == blender_index(version, copy)
    (entry,) = ours["data"]
    assert entry["archive_url"] == f"./one2345-{build.server_version()}.zip"
    assert entry["archive_hash"].startswith("sha256:") and entry["archive_size"] > 100_000
    network = entry["permissions"]["network"]
    assert "packages" in network and "weights" in network  # what the network is used for (#25 item 8)


def test_only_the_newest_version_is_listed_and_older_zips_stay(repo, tmp_path):
    folder = tmp_path / "repo"
    folder.mkdir()
    original = next(repo.glob("*.zip"))
    (folder / original.name).write_bytes(original.read_bytes())
    for version in ("0.1.10", "0.1.9", "0.1.10-rc.1"):
        bumped(original, folder, version)
    done = run_repo_build("--repo", str(folder), "--index-only", hide_tomllib=True)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip().splitlines()[-1]) == folder / "index.json"
    index = json.loads((folder / "index.json").read_text())
    assert [(e["version"], e["archive_url"]) for e in index["data"]] == [("0.1.10", "./one2345-0.1.10.zip")]
    assert "not listed" in done.stderr and "one2345-0.1.9.zip" in done.stderr
    assert len(list(folder.glob("*.zip"))) == 4  # nothing published is deleted
    assert repository.version_key("0.1.10") > repository.version_key("0.1.10-rc.1") > repository.version_key("0.1.9")


def test_bad_repository_folders_are_refused_naming_the_file(repo, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    done = run_repo_build("--repo", str(empty), "--index-only")
    assert done.returncode == 1 and "holds no extension zip" in done.stderr
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.zip").write_bytes(b"not a zip")
    done = run_repo_build("--repo", str(junk), "--index-only")
    assert done.returncode == 1 and "notes.zip cannot be read as an extension zip" in done.stderr
    twice = tmp_path / "twice"
    twice.mkdir()
    original = next(repo.glob("*.zip"))
    (twice / original.name).write_bytes(original.read_bytes())
    (twice / "copy.zip").write_bytes(original.read_bytes())
    with pytest.raises(repository.RepositoryError, match=r"are both one2345 .*remove one"):
        repository.write_index(twice)
    assert not (twice / "index.json").exists()
    done = run_repo_build("--index-only", "--out", str(tmp_path / "x"))
    assert done.returncode == 2 and "--index-only" in done.stderr
