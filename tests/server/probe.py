"""An adversarial probe of a real ``one2345 serve`` on loopback: crafted and fuzzed requests from many threads at once,
counting every answer. Run by hand for the full probe, bounded in CI by test_probe.py:

    python -m tests.server.probe --requests 12000 --threads 20 --seed 1

It starts its own server (tiny preset, CPU, ``--max-queue 2``) on a jobs folder seeded with finished jobs, then sends,
from ``--threads`` workers, requests drawn from these families:

- auth: no header, wrong or empty tokens, other schemes, tokens with spaces, on every route;
- paths: traversal (plain and percent-encoded), NUL bytes, 8 KiB paths, non-ASCII, odd ids and view names;
- methods: every method on every route;
- uploads: empty, garbage, truncated, bomb headers, stray or repeated parts, non-multipart bodies, fuzzed options;
- pollers and races: job lists and statuses, downloads of finished jobs while other workers DELETE them, and valid
  submissions that fill the queue (429).

Every 50th request of a worker is a health check. A response counts as *dropped* when the connection fails before a
whole response is read. Printed at the end, one JSON line: requests, status-code histogram, 5xx other than the
documented 503/507, dropped, health failures. Exit status 0 only if those last three are all zero.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import random
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from pathlib import Path
from urllib.parse import quote, urlparse

from PIL import Image

from tests.server.test_serve_process import TOKEN, ball_png, start_server, stop
from tests.server.test_serve_races import write_done_job

DOCUMENTED_5XX = {503, 507}
FAST = {"steps_stage1": 2, "steps_stage2": 2, "resolution": 32, "elevation": 20.0}


def _png(size=(48, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 60, 40)).save(buf, format="PNG")
    return buf.getvalue()


def _bomb() -> bytes:
    data = bytearray(_png((16, 16)))
    data[16:24] = (60000).to_bytes(4, "big") * 2
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


PNG = ball_png()  # an object on white: a valid upload runs the real pipeline (and fills the queue)
BOMB = _bomb()


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "probe-b0undary") -> tuple[bytes, str]:
    """(body, content type) of a multipart form with (field name, file name or None, bytes) parts."""
    out = io.BytesIO()
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out.write(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode())
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def fuzz_json(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, -1, 2**31, 2**64, -(2**63), rng.randrange(-10**6, 10**6)])
    if kind == 2:
        return rng.choice([0.5, -0.0, 1e308, 3.0, 1e-320, rng.uniform(-1e3, 1e3)])
    if kind == 3:
        return rng.choice(["", "glb", "ply", "obj", "x" * 300, "\u0000", "é", "../x"])
    if kind in (4, 5):
        keys = ["elevation", "seed", "steps_stage1", "steps_stage2", "guidance", "resolution", "format",
                "remove_background"]
        return {rng.choice(keys): fuzz_json(rng, depth + 1) for _ in range(rng.randrange(1, 5))}
    if kind == 6:
        return [fuzz_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {str(rng.randrange(100)): fuzz_json(rng, depth + 1)}


def crafted_options(rng: random.Random) -> str:
    return rng.choice([
        lambda: json.dumps(fuzz_json(rng)),
        lambda: '{"seed": 1' + "0" * rng.choice([4300, 5000]) + "}",
        lambda: "[" * 50_000 + "]" * 50_000,
        lambda: '{"guidance": NaN}',
        lambda: '{"elevation": Infinity}',
        lambda: "{" * rng.randrange(1, 40),
        lambda: json.dumps({**FAST, "format": rng.choice(["glb", "ply", "obj"])}),
        lambda: "\xff\xfe",
    ])()


class Probe:
    def __init__(self, url: str, done_jobs: list[str], seed: int) -> None:
        self.url = urlparse(url)
        self.done_jobs = done_jobs
        self.seed = seed
        self.codes: Counter[int] = Counter()
        self.families: Counter[str] = Counter()
        self.dropped: list[str] = []
        self.bad_5xx: list[str] = []
        self.health_failures = 0
        self.lock = threading.Lock()

    # -- one request ----------------------------------------------------------------------------------------------

    def send(self, conn: list, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None, family: str = "") -> int | None:
        """Send on the worker's keep-alive connection (reopened when the server closed it); count the answer."""
        if conn[0] is None:
            conn[0] = http.client.HTTPConnection(self.url.hostname, self.url.port, timeout=60)
        try:
            conn[0].putrequest(method, path, skip_accept_encoding=True)
            for name, value in (headers or {}).items():
                conn[0].putheader(name, value)
            if body is not None:
                conn[0].putheader("Content-Length", str(len(body)))
            conn[0].endheaders(body)
            response = conn[0].getresponse()
            data = response.read()
            status = response.status
            if response.will_close:
                conn[0].close()
                conn[0] = None
        except (http.client.HTTPException, OSError) as e:
            if conn[0] is not None:
                conn[0].close()
            conn[0] = None
            with self.lock:
                self.dropped.append(f"{family} {method} {path[:80]}: {type(e).__name__}: {e}")
            return None
        with self.lock:
            self.codes[status] += 1
            self.families[family] += 1
            if status >= 500 and status not in DOCUMENTED_5XX:
                self.bad_5xx.append(f"{family} {method} {path[:80]} → {status}: {data[:300]!r}")
        return status

    # -- the families -----------------------------------------------------------------------------------------------

    def one(self, rng: random.Random, conn: list) -> None:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        job = rng.choice(self.done_jobs)
        family = rng.choices(["auth", "paths", "methods", "uploads", "pollers", "races"], [2, 2, 1, 3, 2, 1])[0]
        if family == "auth":
            header = rng.choice([None, "Bearer", "Bearer ", "Bearer wrong", f"Basic {TOKEN}", f"bearer  {TOKEN}  ",
                                 f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x", "Bearer \t", "Token " + TOKEN])
            path = rng.choice(["/v1/jobs", f"/v1/jobs/{job}", f"/v1/jobs/{job}/result", f"/v1/jobs/{job}/meta",
                               f"/v1/jobs/{job}/views/0.png"])
            method = rng.choice(["GET", "GET", "DELETE", "POST"])
            body = multipart([("image", "a.png", PNG)])[0] if method == "POST" else None
            self.send(conn, method, path, body, {"Authorization": header} if header else {}, family)
        elif family == "paths":
            tail = rng.choice([
                "../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2e%2e/%2e%2e", job + "/views/..%2Fstatus.json",
                job + "/views/%2e%2e%2fstatus.json", job + "%00", job.upper(), job + "/", "/" + job, "a" * 8000,
                "%ff%fe", quote("ジョブ"), job + "/views/0.png%00.txt", job + "/views/" + "9" * 300 + ".png",
                job + "/views/input_256.png", job + "/result/../meta", "", job + "//result", job + "/views/",
            ])
            self.send(conn, rng.choice(["GET", "DELETE"]) if "passwd" not in tail else "GET", "/v1/jobs/" + tail,
                      None, auth, family)
        elif family == "methods":
            method = rng.choice(["PUT", "PATCH", "OPTIONS", "HEAD", "TRACE", "POST", "DELETE", "GET"])
            path = rng.choice(["/v1/health", "/v1/jobs", f"/v1/jobs/{job}", f"/v1/jobs/{job}/result",
                               f"/v1/jobs/{job}/meta", f"/v1/jobs/{job}/views/0.png", "/openapi.json", "/"])
            if method == "DELETE" and path.startswith(f"/v1/jobs/{job}"):
                path = "/v1/jobs/" + "0" * 32  # deletes belong to the races family
            self.send(conn, method, path, b"" if method in ("PUT", "PATCH", "POST") else None, auth, family)
        elif family == "uploads":
            image = rng.choice([PNG, b"", b"\x00" * 64, PNG[:70], BOMB, b"GIF89a", PNG + b"trailing", _png((8, 8))])
            parts = [("image", rng.choice(["a.png", "../../x.png", "a" * 300, "é.png", None]), image)]
            if rng.random() < 0.8:
                parts.append(("options", None, crafted_options(rng).encode("utf-8", "surrogatepass")))
            if rng.random() < 0.1:
                parts.append((rng.choice(["image", "options", "extra", ""]), "b.png", PNG))
            body, ctype = multipart(parts)
            if rng.random() < 0.1:
                body, ctype = rng.choice([(b'{"image": 1}', "application/json"), (body, "text/plain"),
                                          (body[: len(body) // 2], ctype), (body, "multipart/form-data")])
            # A valid one is a real job: it queues (429 once two wait) and runs; all are cancelled at the end.
            self.send(conn, "POST", "/v1/jobs", body, {**auth, "Content-Type": ctype}, family)
        elif family == "pollers":
            path = rng.choice(["/v1/jobs", f"/v1/jobs/{job}", "/v1/health", f"/v1/jobs/{job}/meta"])
            self.send(conn, "GET", path, None, auth, family)
        else:  # races: download a finished job while another worker may be deleting it
            what = rng.choice(["result", "meta", "views/0.png", "delete"])
            if what == "delete":
                self.send(conn, "DELETE", f"/v1/jobs/{job}", None, auth, family)
            else:
                self.send(conn, "GET", f"/v1/jobs/{job}/{what}", None, auth, family)

    def worker(self, index: int, count: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        conn: list = [None]
        for i in range(count):
            if i % 50 == 0:
                status = self.send(conn, "GET", "/v1/health", None, {}, "health")
                if status != 200:
                    with self.lock:
                        self.health_failures += 1
            self.one(rng, conn)
        if conn[0] is not None:
            conn[0].close()

    def run(self, requests: int, threads: int) -> dict:
        start = time.monotonic()
        per = -(-requests // threads)
        workers = [threading.Thread(target=self.worker, args=(i, per)) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        total = sum(self.codes.values()) + len(self.dropped)
        return {"requests": total, "seconds": round(time.monotonic() - start, 1),
                "codes": dict(sorted(self.codes.items())), "families": dict(sorted(self.families.items())),
                "undocumented_5xx": len(self.bad_5xx), "dropped": len(self.dropped),
                "health_failures": self.health_failures, "examples": (self.bad_5xx + self.dropped)[:5]}


def probe(requests: int, threads: int, seed: int, done_jobs: int = 30, root: Path | None = None) -> dict:
    """Start a server, probe it, stop it; the report (see the module docstring), plus the server's tracebacks."""
    with tempfile.TemporaryDirectory() as tmp:
        root = root or Path(tmp)
        jobs_dir = root / "jobs"
        ids = [write_done_job(jobs_dir, s, mesh_bytes=256 * 1024)[0] for s in range(done_jobs)]
        server = start_server(jobs_dir, root / "server.log", "--max-queue", "2")
        try:
            report = Probe(server.ready["url"], ids, seed).run(requests, threads)
            for job in server.client.get("/v1/jobs").json()["jobs"]:  # cancel what the valid uploads queued
                server.client.delete(f"/v1/jobs/{job['id']}")
            report["health_after"] = server.client.get("/v1/health").status_code
        finally:
            stop(server)
        report["server_tracebacks"] = (root / "server.log").read_text(errors="replace").count("Traceback")
        return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=12000)
    parser.add_argument("--threads", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    report = probe(args.requests, args.threads, args.seed)
    print(json.dumps(report))
    clean = not (report["undocumented_5xx"] or report["dropped"] or report["health_failures"]
                 or report["server_tracebacks"]) and report["health_after"] == 200
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
