"""The commit path as the driver runs it, timed per shard (issue #24: it runs once per shard).

    .venv/bin/python tests/reliability/bench_commit.py local 100   # a temp folder
    .venv/bin/python tests/reliability/bench_commit.py s3 50       # a moto S3 server on 127.0.0.1

Each shard: two 200 kB result parts and a 1 kB error part staged, then `Committer.commit`
with the lease's fence (a lease read, the commit record, the parts moved, the manifest).
Prints one JSON line: median milliseconds per shard and the total. Not a pytest module.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from depthray.config import StorageConfig  # noqa: E402
from depthray.io.commit import Committer  # noqa: E402
from depthray.io.fs import join, write_atomic  # noqa: E402
from depthray.io.manifest import ManifestStore  # noqa: E402
from depthray.io.sinks import part_rel  # noqa: E402
from depthray.job.lease import OutputLease  # noqa: E402


def stage(store: ManifestStore, shard: str) -> dict:
    blob = os.urandom(200_000)
    parts = {part_rel(shard, f"{i:016x}", "parquet"): len(blob) for i in range(2)}
    errors = {part_rel(shard, f"{0:016x}", "parquet", "_errors"): 1000}
    for rel, size in {**parts, **errors}.items():
        write_atomic(store.fs, join(store.root, "_staging", rel), blob[:size])
    return {"shard": shard, "status": "complete", "parts": parts, "error_parts": errors, "config_hash": "x"}


def bench(url: str, shards: int) -> dict:
    store = ManifestStore(url, StorageConfig())
    lease = OutputLease(url, StorageConfig(), "bench").acquire()
    committer = Committer(store, fence=lease.verify)
    staged = [stage(store, f"{s:05d}") for s in range(shards)]
    times = []
    for m in staged:
        t0 = time.perf_counter()
        committer.commit(m["shard"], m, [])
        times.append(time.perf_counter() - t0)
    lease.release()
    return {"shards": shards, "median_ms": round(statistics.median(times) * 1000, 2), "total_s": round(sum(times), 3)}


def main() -> None:
    where, shards = sys.argv[1], int(sys.argv[2])
    if where == "local":
        print(json.dumps({"store": "local", **bench(tempfile.mkdtemp(prefix="commit-bench-"), shards)}))
        return
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="t",
                      AWS_SECRET_ACCESS_KEY="t", AWS_DEFAULT_REGION="us-east-1")
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    try:
        print(json.dumps({"store": "moto s3", **bench(f"s3://{bucket}/out", shards)}))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
