"""Weights registry and download, against a local stand-in of the hub's ``resolve`` endpoint (no real network)."""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest
from huggingface_hub import constants as hf_constants

from server import weights
from server.errors import BadInputError, CheckpointError, MissingWeightsError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


@dataclass
class FakeHub:
    """Serves ``files`` (repo path → bytes) like huggingface.co: HEAD/GET on ``/{repo}/resolve/{rev}/{file}``.

    Files named in ``lfs`` are served like LFS files on the real hub: the resolve HEAD answers 302 with
    ``X-Linked-Etag``/``X-Linked-Size`` and a ``Location`` on a "CDN" path, where the bytes live. ``/api/...`` requests
    (huggingface_hub's own telemetry) get a 404 and are counted apart.
    """

    files: dict[str, bytes]
    lfs: set[str] = field(default_factory=set)
    repo_id: str = weights.HUB_REPO_ID
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    """(method, path, Range header) of every file request."""
    api_requests: list[str] = field(default_factory=list)
    cut_after: int | None = None
    """When set, a GET without Range sends only this many bytes, then drops the connection; Range GETs get a 500."""
    garbage_prefix: bool = False
    """When set (with cut_after), the bytes sent before the cut are wrong."""
    url: str = ""

    def etag(self, name: str) -> str:
        return hashlib.sha256(self.files[name]).hexdigest()


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep pytest output clean
            pass

        def _lookup(self) -> tuple[str, bool] | None:
            path = unquote(self.path)
            if path.startswith("/cdn/"):
                return path.removeprefix("/cdn/"), True
            m = RESOLVE.match(path)
            if m is None or m["repo"] != hub.repo_id or m["rev"] != weights.HUB_REVISION:
                return None
            return m["file"], False

        def _not_found(self) -> None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_HEAD(self) -> None:
            hub.requests.append(("HEAD", self.path, self.headers.get("Range")))
            found = self._lookup()
            if found is None or found[0] not in hub.files:
                self._not_found()
                return
            name, on_cdn = found
            data = hub.files[name]
            if name in hub.lfs and not on_cdn:
                self.send_response(302)
                self.send_header("Location", f"{hub.url}/cdn/{name}")
                self.send_header("X-Linked-Etag", f'"{hub.etag(name)}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("ETag", '"git-blob-of-the-lfs-pointer"')
            else:
                self.send_response(200)
                self.send_header("ETag", f'"{hub.etag(name)}"')
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()

        def do_GET(self) -> None:
            if self.path.startswith("/api/"):
                hub.api_requests.append(self.path)
                self._not_found()
                return
            range_header = self.headers.get("Range")
            hub.requests.append(("GET", self.path, range_header))
            found = self._lookup()
            if found is None or found[0] not in hub.files:
                self._not_found()
                return
            data = hub.files[found[0]]
            if hub.cut_after is not None:
                if range_header is not None:
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                sent = data[: hub.cut_after]
                self.wfile.write(bytes(255 - b for b in sent) if hub.garbage_prefix else sent)
                self.wfile.flush()
                self.close_connection = True
                return
            start = 0
            if range_header is not None:
                start = int(re.fullmatch(r"bytes=(\d+)-", range_header)[1])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            self.wfile.write(data[start:])

    return Handler


def _payload(n: int, seed: int) -> bytes:
    """Deterministic, non-repeating bytes (so a resume at a wrong offset changes the hash)."""
    out = bytearray()
    block = seed.to_bytes(4, "little")
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:n])


SAM_BYTES = _payload(3000, 1)
LOFTR_BYTES = _payload(5000, 2)
RECON_BYTES = _payload(40_000, 3)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    files = {
        weights.REGISTRY["sam"].filename: SAM_BYTES,
        weights.REGISTRY["loftr"].filename: LOFTR_BYTES,
        weights.REGISTRY["reconstruction"].filename: RECON_BYTES,
    }
    fake = FakeHub(files=files, lfs={weights.REGISTRY["reconstruction"].filename})
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    # Every hub access of the code under test must land on the stand-in, even one that ignores `endpoint=`.
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setattr(hf_constants, "ENDPOINT", fake.url)
    monkeypatch.setattr(
        hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", fake.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    # Small chunks so that an interrupted transfer has written something (httpx drops a partly received chunk).
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 512)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(hf_constants, "AGENT_HARNESSES_PATH", str(tmp_path / "hf_home" / "agents.json"), raising=False)
    yield fake
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


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
    assert "one2345 weights download --only loftr" in message
    assert "indoor_ds_new.ckpt" in message and str(root) in message
    assert "--only sam" not in message

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
    assert {w.name: w.filename for w in weights.WEIGHT_FILES} == expected
    assert all(w.repo_id == "One-2-3-45/code" and w.local_name == w.filename for w in weights.WEIGHT_FILES)
