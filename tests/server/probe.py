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
  submissions that fill the queue (429);
- forms: multipart bodies cut short before their closing boundary (must be 400, never a job at default options), and
  options parts over 1 MiB in 2–15 MB bodies, some with ``Connection: close`` (a clean 400, never a reset);
- planted: job folders planted before the server starts with a status.json damaged in one field (wrong type, missing,
  null, a CR/LF download name, a result without elevation …) and one whose mesh is a hard link to a file outside
  the jobs folder: statuses, lists, downloads and health must answer without 5xx, and the linked file is never
  served;
- slow clients, beside the load, each on its own connection: dripped headers, a stalled body, an over-long
  Content-Length, an idle connection; each must be closed (with a 408 where a request was under way) within its
  deadline (``one2345 serve``'s defaults: 10 s, 30 s, 30 s, 5 s) plus a margin.

Not simulated: storage faults on pin, reroll and continue (a full or read-only disk). The probe runs as whatever user
runs the tests, often root, which file modes do not stop, and it cannot mount a small filesystem;
test_serve_storage.py and test_app_faults.py make those faults from inside.

Every 50th request of a worker is a health check; one that answers other than 200 ``ok`` with a live worker counts
as a health failure, and one that reports the worker thread dead as a worker death. A response counts as *dropped*
when the connection fails before a whole response is read. Printed at the end, one JSON line: requests, status-code
histogram, 5xx other than the documented 503/507, dropped, worker deaths, health failures, forms accepted though cut
short, linked files served, slow clients not closed in time. Exit status 0 only if all of those are zero.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import random
import socket
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
SECRET = b"a file outside the jobs folder, hard-linked into one: never to be served\n"
_RESULT = {"format": "ply", "elevation": 10.0, "vertices": 8, "faces": 12, "mesh": "run/mesh.ply",
           "meta": "run/meta.json"}
DAMAGED_FIELDS: list[tuple[str, object]] = [
    ("created", 5), ("created", None), ("created", "yesterday"), ("elapsed_s", "x"), ("elapsed_s", None),
    ("elapsed_s", [1]), ("fraction", "x"), ("fraction", None), ("step", "x"), ("step", 1.5), ("total", None),
    ("options", 5), ("options", []), ("options", {"format": 5}), ("error", 5), ("error", "x"),
    ("error", {"kind": 5}), ("result", {k: v for k, v in _RESULT.items() if k != "elevation"}),
    ("result", {**_RESULT, "elevation": "x"}), ("result", {**_RESULT, "vertices": None}), ("result", 5),
    ("state", "bogus"), ("state", 5), ("stage", 5), ("previews", 5), ("previews", ["../status.json"]),
    ("pinned", "yes"), ("download_stem", "a\r\nb"), ("download_stem", 5), ("input_file", None),
    ("remesh_of", 5), ("id", "0" * 32), ("review", 5), ("<missing>", "created"), ("<missing>", "state"),
    ("<missing>", "result"), ("<not an object>", [1, 2]), ("<not JSON>", "{"),
]
"""(field, bad value) of each planted damaged status.json; ``<missing>`` drops the named field."""
SLOW_MARGIN_S = 8.0
"""How much later than its deadline a slow client may be closed (a busy machine, the probe's own load)."""


def plant_damaged_jobs(jobs_dir: Path, first_seed: int) -> list[str]:
    """Finished job folders whose status.json is damaged in one field each (:data:`DAMAGED_FIELDS`)."""
    ids = []
    for n, (name, value) in enumerate(DAMAGED_FIELDS):
        job_id, _ = write_done_job(jobs_dir, first_seed + n, mesh_bytes=1024)
        status = jobs_dir / job_id / "status.json"
        record = json.loads(status.read_text())
        if name == "<missing>":
            del record[value]
        elif name == "<not an object>":
            record = value
        if name == "<not JSON>":
            status.write_text(str(value))
        else:
            if not name.startswith("<"):
                record[name] = value
            status.write_text(json.dumps(record))
        ids.append(job_id)
    return ids


def plant_hard_link(jobs_dir: Path, seed: int, secret: Path) -> str:
    """A finished job whose mesh is a hard link to ``secret`` (a file outside the jobs folder)."""
    job_id, _ = write_done_job(jobs_dir, seed, mesh_bytes=1024)
    mesh = jobs_dir / job_id / "run" / "mesh.ply"
    mesh.unlink()
    os.link(secret, mesh)
    return job_id


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
    def __init__(self, url: str, done_jobs: list[str], seed: int, planted: list[str] | None = None,
                 linked: str | None = None) -> None:
        self.url = urlparse(url)
        self.done_jobs = done_jobs
        self.planted = planted or []
        self.linked = linked
        self.seed = seed
        self.worker_deaths = 0
        self.truncated_accepted: list[str] = []
        self.links_served = 0
        self.slow: dict[str, str] = {}
        self.codes: Counter[int] = Counter()
        self.families: Counter[str] = Counter()
        self.dropped: list[str] = []
        self.bad_5xx: list[str] = []
        self.health_failures = 0
        self.lock = threading.Lock()

    # -- one request ----------------------------------------------------------------------------------------------

    def send(self, conn: list, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None, family: str = "") -> tuple[int, bytes] | None:
        """Send on the worker's keep-alive connection (reopened when the server closed it); count the answer and
        return it (None when the connection failed)."""
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
        return status, data

    # -- the families -----------------------------------------------------------------------------------------------

    def one(self, rng: random.Random, conn: list) -> None:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        job = rng.choice(self.done_jobs)
        family = rng.choices(["auth", "paths", "methods", "uploads", "pollers", "races", "forms", "planted"],
                             [2, 2, 1, 3, 2, 1, 1, 1])[0]
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
        elif family == "forms":
            self.forms(rng, conn, auth)
        elif family == "planted":
            self.planted_jobs(rng, conn, auth)
        else:  # races: download a finished job while another worker may be deleting it
            what = rng.choice(["result", "meta", "views/0.png", "delete"])
            if what == "delete":
                self.send(conn, "DELETE", f"/v1/jobs/{job}", None, auth, family)
            else:
                self.send(conn, "GET", f"/v1/jobs/{job}/{what}", None, auth, family)

    def forms(self, rng: random.Random, conn: list, auth: dict[str, str]) -> None:
        if rng.random() < 0.85:  # a valid form cut short: refused, never a job at the default options
            body, ctype = multipart([("image", "a.png", PNG), ("options", None, json.dumps(FAST).encode())])
            end = body.rindex(b"\r\n--probe-b0undary--")
            cut = rng.choice([end, end + 2, end + 10, body.rindex(b"}"), body.index(b"options") + 20])
            answer = self.send(conn, "POST", "/v1/jobs", body[:cut], {**auth, "Content-Type": ctype}, "forms")
            if answer is not None and answer[0] == 202:
                with self.lock:
                    self.truncated_accepted.append(f"cut at {cut} of {len(body)}: {answer[1][:200]!r}")
            return
        # An options part over 1 MiB inside a 2–15 MB body: a clean 400, also when the client closes after it.
        image = PNG + os.urandom(rng.choice([1, 6, 14]) * 2**20)
        parts = [("image", "a.png", image), ("options", None, b'{"seed": 1' + b" " * (2**20 + 100) + b"}")]
        body, ctype = multipart(parts if rng.random() < 0.5 else parts[::-1])
        close = {"Connection": "close"} if rng.random() < 0.5 else {}
        self.send(conn, "POST", "/v1/jobs", body, {**auth, "Content-Type": ctype, **close}, "forms")

    def planted_jobs(self, rng: random.Random, conn: list, auth: dict[str, str]) -> None:
        if self.linked is not None and rng.random() < 0.2:
            what = rng.choice(["result", "meta", "views/0.png", "input", ""])
            answer = self.send(conn, "GET", f"/v1/jobs/{self.linked}/{what}".rstrip("/"), None, auth, "planted")
            if answer is not None and SECRET in answer[1]:
                with self.lock:
                    self.links_served += 1
            return
        job = rng.choice(self.planted) if self.planted else "0" * 32
        path = rng.choice([f"/v1/jobs/{job}", f"/v1/jobs/{job}/result", f"/v1/jobs/{job}/meta", "/v1/jobs",
                           "/v1/jobs?limit=5", "/v1/health", f"/v1/jobs/{job}/views/0.png"])
        self.send(conn, "GET", path, None, auth if path != "/v1/health" else {}, "planted")

    def slow_clients(self) -> None:
        """The slow-client checks, each in its own thread, beside the load; results in ``self.slow``."""
        body, ctype = multipart([("image", "a.png", PNG), ("options", None, json.dumps(FAST).encode())])
        post = (f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body) + 4096}\r\n\r\n").encode() + body
        cases = {  # name: (what is sent, drip a header line every second, deadline in s, a 408 expected)
            "dripped headers": (b"GET /v1/health HTTP/1.1\r\nHost: x\r\n", True, 10.0, True),
            "stalled body": (post, False, 30.0, True),
            "over-long content-length": (b"GET /v1/health HTTP/1.1\r\nHost: x\r\nContent-Length: 999999\r\n\r\n"
                                         b"abc", False, 30.0, True),
            "idle connection": (b"", False, 5.0, False),
        }

        def check(name: str, data: bytes, drip: bool, deadline: float, expect_408: bool) -> None:
            try:
                with socket.create_connection((self.url.hostname, self.url.port), timeout=5) as sock:
                    start = time.monotonic()
                    sock.sendall(data)
                    received = b""
                    sock.settimeout(1.0)
                    while time.monotonic() - start < deadline + SLOW_MARGIN_S:
                        try:
                            chunk = sock.recv(65536)
                        except TimeoutError:
                            if drip:
                                sock.sendall(b"X-Drip: 1\r\n")
                            continue
                        except ConnectionResetError:
                            chunk = b""
                        if not chunk:
                            took = time.monotonic() - start
                            ok = received.startswith(b"HTTP/1.1 408") if expect_408 else received == b""
                            result = "ok" if ok else f"closed after {took:.1f} s with {received[:80]!r}"
                            break
                        received += chunk
                    else:
                        result = f"still open after {deadline + SLOW_MARGIN_S:g} s"
            except OSError as e:
                result = f"{type(e).__name__}: {e}"
            with self.lock:
                self.slow[name] = result

        threads = [threading.Thread(target=check, args=(name, *case)) for name, case in cases.items()]
        for t in threads:
            t.start()
        self._slow_threads = threads

    def worker(self, index: int, count: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        conn: list = [None]
        for i in range(count):
            if i % 50 == 0:
                self.check_health(conn)
            self.one(rng, conn)
        if conn[0] is not None:
            conn[0].close()

    def check_health(self, conn: list) -> None:
        answer = self.send(conn, "GET", "/v1/health", None, {}, "health")
        health = json.loads(answer[1]) if answer is not None and answer[0] == 200 else {}
        with self.lock:
            if health.get("worker_alive") is False:
                self.worker_deaths += 1
            if health.get("status") != "ok" or health.get("worker_alive") is False:
                self.health_failures += 1

    def run(self, requests: int, threads: int, slow_clients: bool = True) -> dict:
        start = time.monotonic()
        self._slow_threads: list[threading.Thread] = []
        if slow_clients:
            self.slow_clients()
        per = -(-requests // threads)
        workers = [threading.Thread(target=self.worker, args=(i, per)) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        for t in self._slow_threads:
            t.join()
        conn: list = [None]
        self.check_health(conn)  # once more after the load
        total = sum(self.codes.values()) + len(self.dropped)
        slow_failures = [f"{name}: {result}" for name, result in self.slow.items() if result != "ok"]
        return {"requests": total, "seconds": round(time.monotonic() - start, 1),
                "codes": dict(sorted(self.codes.items())), "families": dict(sorted(self.families.items())),
                "undocumented_5xx": len(self.bad_5xx), "dropped": len(self.dropped),
                "worker_deaths": self.worker_deaths, "health_failures": self.health_failures,
                "truncated_forms_accepted": len(self.truncated_accepted), "linked_files_served": self.links_served,
                "slow_clients": dict(sorted(self.slow.items())), "slow_client_failures": len(slow_failures),
                "examples": (self.bad_5xx + self.dropped + self.truncated_accepted + slow_failures)[:8]}


def probe(requests: int, threads: int, seed: int, done_jobs: int = 30, root: Path | None = None,
          slow_clients: bool = True) -> dict:
    """Start a server, probe it, stop it; the report (see the module docstring), plus the server's tracebacks."""
    with tempfile.TemporaryDirectory() as tmp:
        root = root or Path(tmp)
        jobs_dir = root / "jobs"
        ids = [write_done_job(jobs_dir, s, mesh_bytes=256 * 1024)[0] for s in range(done_jobs)]
        planted = plant_damaged_jobs(jobs_dir, first_seed=1000)
        secret = root / "secret.txt"
        secret.write_bytes(SECRET)
        linked = plant_hard_link(jobs_dir, 2000, secret)
        server = start_server(jobs_dir, root / "server.log", "--max-queue", "2")
        try:
            report = Probe(server.ready["url"], ids, seed, planted, linked).run(requests, threads, slow_clients)
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
    print(totals_line(report))
    return 0 if clean(report) else 1


FAILURE_COUNTS = ("undocumented_5xx", "dropped", "worker_deaths", "health_failures", "truncated_forms_accepted",
                  "linked_files_served", "slow_client_failures", "server_tracebacks")


def clean(report: dict) -> bool:
    """No failure of any kind, and the server answered health after the load."""
    return not any(report[name] for name in FAILURE_COUNTS) and report["health_after"] == 200


def totals_line(report: dict) -> str:
    return f"totals: requests {report['requests']}, " + ", ".join(
        f"{name.replace('_', ' ')} {report[name]}" for name in FAILURE_COUNTS)


if __name__ == "__main__":
    sys.exit(main())
