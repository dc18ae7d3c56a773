"""Fixtures for the reliability suite: a fault-injecting HTTP proxy in front of the moto S3
server, job configs, and the exactly-once check (the shared local Ray, `ray_session`, is
tests/conftest.py's).

Everything is real: Ray workers, the S3 protocol (moto over HTTP), files, processes.
"""

from __future__ import annotations

import http.client
import io
import json
import random
import tarfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import pyarrow.parquet as pq
import pytest

from depthray.config import config_from_dict

REPO = Path(__file__).resolve().parents[2]


def job_config(input_url: str, output_url: str, model: dict, executor: str = "ray", **sections) -> Any:
    """A validated job config. `executor="local"` runs the stage chain in this process (for
    tests whose subject is not Ray: the commit, the inputs, the stages); "ray" is the real job."""
    data: dict[str, Any] = {
        "input": {"url": input_url},
        "output": {"url": output_url},
        "model": model,
        "inference": {"ensemble_size": 1, "tiling": {"mode": "off"}},
        "compute": {"images_per_batch": 4, "executor": executor},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return config_from_dict(data, require_io=True)


def local_job_config(input_url: str, output_url: str, model: dict, **sections) -> Any:
    """`job_config` with the local executor: the stage chain in this process, no Ray."""
    return job_config(input_url, output_url, model, executor="local", **sections)


def double_model(**options) -> dict:
    return {"factory": "tests.reliability.doubles:make", "options": options}


# ---------------------------------------------------------------- odd input images


def enc(img, fmt: str, **kw) -> bytes:
    """A PIL image encoded as `fmt` (PIL save options in kw)."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise_rgb(rng, h: int, w: int):
    """An h x w RGB PIL image of uniform noise from `rng` (each module keeps its own)."""
    import numpy as np
    from PIL import Image

    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


# ---------------------------------------------------------------- reading outputs back


def read_outputs(fs, root: str, fmt: str = "parquet") -> tuple[list[dict], list[dict]]:
    """(output rows, error rows) under `root`, read with stock pyarrow / tarfile.

    Output rows: {source, key, width, height, meta(dict), name(file name stem)}.
    Read as a plain reader does: files under final names only (temporary names start with
    '.'), nothing under `_` folders (`_staging/`, `_manifest/`, `_jobs/`; errors come from
    `_errors/` separately).
    """
    fs.invalidate_cache()
    outs: list[dict] = []
    files = [p for p in fs.find(root) if not p.split("/")[-1].startswith(".")]
    for p in files:
        rel = p[len(root.rstrip("/")) + 1:]
        if any(part.startswith("_") for part in rel.split("/")):
            continue
        if fmt == "parquet" and p.endswith(".parquet"):
            with fs.open(p, "rb") as f:
                for r in pq.read_table(f, columns=["source", "key", "width", "height", "meta"]).to_pylist():
                    r["meta"] = json.loads(r["meta"] or "{}")
                    r["name"] = r["key"]
                    outs.append(r)
        elif fmt == "webdataset" and p.endswith(".tar"):
            with tarfile.open(fileobj=io.BytesIO(fs.cat_file(p))) as tar:
                for m in tar.getmembers():
                    assert "/" not in m.name and not m.name.startswith(".."), m.name
                    if m.name.endswith(".json"):
                        meta = json.loads(tar.extractfile(m).read())
                        outs.append({"source": meta["source"], "key": meta["key"], "width": meta["width"],
                                     "height": meta["height"], "meta": meta, "name": m.name[:-5]})
    errors: list[dict] = []
    for p in files:
        if p.startswith(root.rstrip("/") + "/_errors/") and p.endswith(".parquet"):
            with fs.open(p, "rb") as f:
                errors += pq.read_table(f).to_pylist()
    return outs, errors


def assert_exactly_once(expected: dict[str, set[str]], outs: list[dict], errors: list[dict]) -> None:
    """Every (shard, key) of the input appears exactly once across outputs and `_errors/`,
    and nothing else appears (shard-level records use key '<shard>')."""
    seen = Counter((r["source"], r["key"]) for r in outs) + Counter((e["source"], e["key"]) for e in errors)
    dupes = {k: n for k, n in seen.items() if n > 1}
    assert not dupes, f"duplicated: {dupes}"
    want = {(s, k) for s, keys in expected.items() for k in keys}
    assert set(seen) == want, f"missing: {sorted(want - set(seen))}; unexpected: {sorted(set(seen) - want)}"


# Committed shards' manifests under `_manifest/`: a driver killed mid-commit leaves its
# temporary `.tmp-<id>-<shard>.json` there, which commits nothing (Path.glob matches dot names).
COMMITTED = "[!.]*.json"


def assert_no_partial_files(fs, root: str) -> None:
    fs.invalidate_cache()
    names = [p.split("/")[-1] for p in fs.find(root)]
    assert not [n for n in names if n.startswith(".tmp-") or n.startswith(".probe-")], names


# ---------------------------------------------------------------- fault-injecting proxy


_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


class FaultProxy:
    """HTTP proxy on 127.0.0.1 in front of an S3 endpoint that injects faults.

    `rule(method, path) -> None | int | "drop"` decides per request: None forwards it, an
    int answers with that HTTP status and an S3 error body, "drop" closes the connection
    without an answer. Helpers build bounded rules; `injected` counts faults served.
    Loopback only; stops with the fixture.
    """

    def __init__(self, upstream: str):
        host, port = upstream.split("://", 1)[1].split(":")
        self.upstream = (host, int(port))
        self.rule: Callable[[str, str], Any] = lambda m, p: None
        self.injected: Counter = Counter()
        self.requests = 0
        self.slow_s = 4.0  # how late a "slow" answer comes
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _handle(self):
                body = self._body()
                with proxy.lock:
                    proxy.requests += 1
                    action = proxy.rule(self.command, self.path)
                    if action is not None:
                        proxy.injected[action] += 1
                if action == "slow":  # answer late: the client times out, retries
                    time.sleep(proxy.slow_s)
                    action = None
                    try:
                        self._forward(body)
                    except OSError:  # the client gave up and closed the connection
                        self.close_connection = True
                    return
                if action == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if action == "cut":  # promise the whole body, send half, hang up
                    self._forward(body, cut=True)
                    return
                if isinstance(action, int):
                    code = {403: "AccessDenied", 404: "NoSuchBucket", 503: "SlowDown"}.get(action, "InternalError")
                    payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                               f"<Message>injected {action}</Message></Error>").encode()
                    self.send_response(action)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload) if self.command != "HEAD" else 0))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                self._forward(body)

            def _forward(self, body: bytes, cut: bool = False):
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                if body or "content-length" in {k.lower() for k in headers}:
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if cut:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    # bounded rules ---------------------------------------------------------
    def flaky(self, fraction: float, budget: int, actions=(503, 500, "drop"), seed: int = 0,
              match: Callable[[str, str], bool] = lambda m, p: True) -> None:
        """Fail `fraction` of matching requests (cycling through `actions`), at most
        `budget` times in all; then forward everything."""
        rng = random.Random(seed)
        count = [0]

        def rule(method, path):
            if count[0] < budget and match(method, path) and rng.random() < fraction:
                count[0] += 1
                return actions[count[0] % len(actions)]
            return None

        self.rule = rule

    def cut_bodies(self, budget: int, match: Callable[[str, str], bool]) -> None:
        """The first `budget` matching requests get half their body, then a closed connection."""
        count = [0]

        def rule(method, path):
            if count[0] < budget and match(method, path):
                count[0] += 1
                return "cut"
            return None

        self.rule = rule

    def always(self, status: int, match: Callable[[str, str], bool]) -> None:
        self.rule = lambda m, p: status if match(m, p) else None

    def clear(self) -> None:
        self.rule = lambda m, p: None

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fault_proxy(s3_endpoint):
    proxy = FaultProxy(s3_endpoint)
    try:
        yield proxy
    finally:
        proxy.stop()
