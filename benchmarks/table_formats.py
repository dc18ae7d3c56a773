"""Delta Lake (`deltalake`, delta-rs) against Lance (`pylance`) as the job's table output
(issue #24 item E), on rows like the job's: a 640x480 16-bit depth PNG, an uncertainty PNG
and the metadata columns (depthray/io/sinks.py's OUTPUT_SCHEMA), realistic maps
(benchmarks/scale.py), on local disk and on a moto S3 server in its own process.

Each format is driven the way depthray would drive it: data files written first (Delta:
the job's own write stage, its Parquet parts; Lance: `write_fragments` of the same rows),
then one transaction per shard (Delta: `create_write_transaction` with the shard's adds in
its partition, `source`, and an app transaction id; Lance: `LanceDataset.commit` of an
Append), and an overwrite of one shard as one transaction (Delta: its partition's files
removed, new ones added; Lance: `Update` removing its fragments).

    python -m benchmarks.table_formats [--shards 6] [--rows 48] [--part-rows 16] [--commits 200]
                                       [--formats delta,lance]

Measured, per format: per shard, seconds to write its data and to commit it (local, moto);
the overwrite commit; a training loader's scan (key, depth, uncertainty, meta in batches of
32: rows/s, MB/s; PNG decoding left out, it is the same for both); random access by key
(median ms per lookup of 24 random keys; Lance also with a BTREE index on `key`); and how a
commit's cost grows with the table: `--commits` one-row shard commits on local disk, median
ms of the first and last 20, and a fresh reader's open time after them. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402


def encoded_maps(n_maps: int) -> pa.Table:
    """ENCODED rows (the job's encode stage run on realistic 640x480 maps), one per map."""
    from benchmarks.scale import realistic_maps

    rows = [{"source": "s", "key": f"m{i}", "height": 480, "width": 640, "meta": {"output_space": "depth"},
             "depth_f32": d.tobytes(), "uncertainty_f32": u.tobytes(), "num_views": 1, "ensemble_size": 1,
             "infer_s": 0.0} for i, (_, d, u) in enumerate(realistic_maps(n_maps))]
    return stage_fn("encode")(pa.Table.from_pylist(rows))  # meta: the typed facts, as a stage gets them


def stage_fn(name: str, url: str = "/nonexistent", fmt: str = "parquet", run_id: str = "bench"):
    """The job's own stage function (depthray/job/stages.py) for an output at `url`."""
    from depthray.config import config_from_dict
    from depthray.job.stages import job_stages, stage

    cfg = config_from_dict({"input": {"url": "/nonexistent/in.tar"}, "output": {"url": url, "format": fmt},
                            "model": {"factory": "x:y"}}, require_io=True)
    return stage(job_stages(cfg, run_id), name).make()


def shard_rows(shard: str, n: int, maps: pa.Table) -> pa.Table:
    """n encoded rows of `shard`, cycling through the maps."""
    rows = maps.take([i % maps.num_rows for i in range(n)])
    rows = rows.set_column(rows.schema.get_field_index("key"), "key", pa.array([f"{shard}/img{i:05d}" for i in range(n)]))
    return rows.set_column(rows.schema.get_field_index("source"), "source", pa.array([shard] * n))


# ---------------------------------------------------------------------------------- stores
class Store:
    """Local folder or moto bucket: the URL each library takes, and an fsspec handle."""

    def __init__(self, kind: str, tmp: Path, endpoint: str | None = None):
        import fsspec

        self.kind, self.tmp, self.endpoint = kind, tmp, endpoint
        self.fs = fsspec.filesystem("s3" if kind == "s3" else "file")

    def url(self, name: str) -> str:
        return f"s3://bench/{name}" if self.kind == "s3" else str(self.tmp / name)

    def delta_options(self) -> dict:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ALLOW_HTTP": "true"} if self.kind == "s3" else {}

    def lance_options(self) -> dict:
        return ({"endpoint": self.endpoint, "allow_http": "true", "region": "us-east-1"}
                if self.kind == "s3" else {})

    def root(self, url: str) -> str:
        return url.split("://", 1)[-1]


# ----------------------------------------------------------------------------------- delta
class Delta:
    """Data: the job's write stage with `output.format: delta` (its Parquet parts, written
    to their names in the table folder). Commit: one transaction per shard."""

    name = "delta"

    def __init__(self, store: Store, uri: str):
        self.store, self.uri, self.table = store, uri, None
        self.write = stage_fn("write", uri, "delta")

    def write_data(self, shard: str, parts: list[pa.Table]) -> dict[str, int]:
        from deltalake import DeltaTable

        acks = [self.write(t).to_pylist()[0] for t in parts]
        written = {p: b for a in acks for p, b in zip(a["parts"], a["part_bytes"])}
        if self.table is None:  # created with the first data, as Lance's dataset is; one partition a shard
            schema = self._footer(next(iter(written))).schema.to_arrow_schema().append(pa.field("source", pa.string()))
            DeltaTable.create(self.uri, schema, partition_by=["source"], storage_options=self.store.delta_options())
            self.table = DeltaTable(self.uri, storage_options=self.store.delta_options())
        return written

    def _footer(self, rel: str):
        import pyarrow.parquet as pq

        with self.store.fs.open(f"{self.store.root(self.uri)}/{rel}", "rb") as f:
            return pq.ParquetFile(f).metadata

    def commit(self, shard: str, parts: dict[str, int], replace: bool = False) -> None:
        from deltalake import CommitProperties, DeltaTable, Transaction
        from deltalake.transaction import AddAction, RemoveAction

        now = int(time.time() * 1000)
        adds = []
        for rel, size in parts.items():  # stats from the footer, as depthray/io/table.py does
            meta = self._footer(rel)
            key = meta.schema.to_arrow_schema().names.index("key")
            bounds = [meta.row_group(g).column(key).statistics for g in range(meta.num_row_groups)]
            stats = {"numRecords": meta.num_rows, "minValues": {"key": min(b.min for b in bounds)},
                     "maxValues": {"key": max(b.max for b in bounds)}, "nullCount": {}}
            adds.append(AddAction(rel, size, {"source": shard}, now, True, json.dumps(stats)))
        self.table.update_incremental()
        removes = []
        if replace:
            old = pa.table(self.table.get_add_actions(flatten=True)).to_pydict()
            removes = [RemoveAction(p, True, now, s) for p, s, v in zip(old["path"], old["size_bytes"],
                                                                        old["partition.source"]) if v == shard]
        txn = Transaction(f"depthray:{shard}", self.table.version() + 1)
        self.table.create_write_transaction([*removes, *adds], "append", self.table.schema(), partition_by=["source"],
                                            commit_properties=CommitProperties(app_transactions=[txn]))

    def open(self):
        from deltalake import DeltaTable

        return DeltaTable(self.uri, storage_options=self.store.delta_options())

    def rows(self, columns: list[str]) -> pa.Table:
        return self.open().to_pyarrow_table(columns=columns)

    def scan(self, columns: list[str]):
        return self.open().to_pyarrow_dataset().to_batches(columns=columns, batch_size=32)

    def lookup(self, opened, key: str) -> pa.Table:
        return opened.to_table(filter=pc.field("key") == key, columns=["key", "depth"])

    def lookup_handle(self):
        return self.open().to_pyarrow_dataset()


# ----------------------------------------------------------------------------------- lance
class Lance:
    """Data: `write_fragments` of the same rows as the job's Parquet parts. Commit: an
    Append per shard, an Update (its fragments out, new ones in) for an overwrite."""

    name = "lance"

    def __init__(self, store: Store, uri: str):
        self.store, self.uri, self.created = store, uri, False
        self.frags: dict[str, list[int]] = {}
        self.to_rows = stage_fn("write", str(store.tmp / f"rows-{uri.rsplit('/', 1)[-1]}"), "delta")

    def output_rows(self, t: pa.Table) -> pa.Table:
        """The rows the job stores (OUTPUT_SCHEMA: model, config hash ...), as the Parquet sink
        writes them; made outside the timing."""
        import pyarrow.parquet as pq

        (rel,) = self.to_rows(t).to_pylist()[0]["parts"]
        rows = pq.read_table(f"{self.store.tmp}/rows-{self.uri.rsplit('/', 1)[-1]}/{rel}")
        return rows.append_column("source", t.column("source"))  # Delta keeps it as the partition value

    def write_data(self, shard: str, parts: list[pa.Table]) -> list:
        import lance
        from lance.fragment import write_fragments

        rows = [self.output_rows(t) for t in parts]
        t0 = time.perf_counter()
        if not self.created:
            lance.write_dataset(rows[0].schema.empty_table(), self.uri, storage_options=self.store.lance_options())
            self.created = True
        frags = [f for t in rows for f in write_fragments(t, self.uri, schema=t.schema,
                                                          storage_options=self.store.lance_options())]
        self.last_write_s = time.perf_counter() - t0
        return frags

    def commit(self, shard: str, frags: list, replace: bool = False) -> None:
        import lance

        ds = lance.dataset(self.uri, storage_options=self.store.lance_options())
        before = set(list(ds.fragment_ids()))  # fragment ids are given at commit: the shard's are the new ones
        if replace:
            op = lance.LanceOperation.Update(removed_fragment_ids=sorted(self.frags.get(shard, [])),
                                             new_fragments=frags)
        else:
            op = lance.LanceOperation.Append(frags)
        done = lance.LanceDataset.commit(self.uri, op, read_version=ds.version,
                                         storage_options=self.store.lance_options())
        self.frags[shard] = sorted(set(list(done.fragment_ids())) - before)

    def open(self):
        import lance

        return lance.dataset(self.uri, storage_options=self.store.lance_options())

    def rows(self, columns: list[str]) -> pa.Table:
        return self.open().to_table(columns=columns)

    def scan(self, columns: list[str]):
        return self.open().to_batches(columns=columns, batch_size=32)

    def lookup(self, opened, key: str) -> pa.Table:
        return opened.to_table(filter=f"key = '{key}'", columns=["key", "depth"])

    def lookup_handle(self):
        return self.open()


# ------------------------------------------------------------------------------- measures
def timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t0, out


def write_shard(fmt, shard: str, table: pa.Table, part_rows: int):
    """(seconds writing the shard's data, what its commit takes)."""
    parts = [table.slice(i, part_rows) for i in range(0, table.num_rows, part_rows)]
    t, written = timed(fmt.write_data, shard, parts)
    return getattr(fmt, "last_write_s", t), written


def run_format(cls, store: Store, args, maps: pa.Table) -> dict:
    fmt = cls(store, store.url(f"{cls.name}-main"))
    data_s, commit_s, rows_total, keys = [], [], 0, []
    for s in range(args.shards):
        shard = f"shard{s:03d}"
        table = shard_rows(shard, args.rows, maps)
        keys += table.column("key").to_pylist()
        t_data, written = write_shard(fmt, shard, table, args.part_rows)
        data_s.append(t_data)
        commit_s.append(timed(fmt.commit, shard, written)[0])
        rows_total += table.num_rows
    if cls is Delta:  # an overwrite is another run: its parts get other names than the live ones
        fmt.write = stage_fn("write", fmt.uri, "delta", run_id="bench-overwrite")
    new = shard_rows("shard000", args.rows, maps)
    new = new.set_column(new.schema.get_field_index("ensemble_size"), "ensemble_size",
                         pa.array([2] * new.num_rows, pa.int32()))
    t_over = timed(fmt.commit, "shard000", write_shard(fmt, "shard000", new, args.part_rows)[1], replace=True)[0]
    table = fmt.rows(["key", "ensemble_size"])
    assert table.num_rows == rows_total and len(set(table.column("key").to_pylist())) == rows_total
    assert set(table.filter(pc.starts_with(table.column("key"), "shard000/")).column("ensemble_size").to_pylist()) \
        == {2}
    scans = []
    for _ in range(2):
        t0, n, nbytes = time.perf_counter(), 0, 0
        for b in fmt.scan(["key", "depth", "uncertainty", "meta"]):
            n += b.num_rows
            nbytes += b.nbytes
        scans.append((time.perf_counter() - t0, n, nbytes))
    best = min(scans)
    assert best[1] == rows_total
    probe = random.Random(0).sample(keys, min(24, len(keys)))
    handle = fmt.lookup_handle()
    lookups = []
    for k in probe:
        t, out = timed(fmt.lookup, handle, k)
        assert out.num_rows == 1, (k, out.num_rows)
        lookups.append(t)
    res = {
        "data_s_per_shard": round(statistics.median(data_s), 4),
        "commit_s_per_shard": round(statistics.median(commit_s), 4),
        "overwrite_commit_s": round(t_over, 4),
        "scan_rows_per_s": round(best[1] / best[0], 1),
        "scan_mb_per_s": round(best[2] / best[0] / 1e6, 1),
        "lookup_ms": round(1000 * statistics.median(lookups), 2),
    }
    if cls is Lance:
        ds = fmt.open()
        t_index, _ = timed(ds.create_scalar_index, "key", "BTREE")
        ds = fmt.open()
        indexed = [timed(fmt.lookup, ds, k)[0] for k in probe]
        res.update(index_build_s=round(t_index, 3), lookup_ms_indexed=round(1000 * statistics.median(indexed), 2))
    return res


def commit_growth(cls, store: Store, n: int, maps: pa.Table) -> dict:
    """n one-row shard commits into a fresh table: what the n-th commit costs against the first."""
    tiny = maps.slice(0, 1)
    for col in ("depth", "uncertainty"):
        tiny = tiny.set_column(tiny.schema.get_field_index(col), col, pa.array([b"x"], pa.binary()))
    fmt = cls(store, store.url(f"{cls.name}-growth"))
    times = []
    for i in range(n):
        shard = f"g{i:05d}"
        written = write_shard(fmt, shard, shard_rows(shard, 1, tiny), 1)[1]
        times.append(timed(fmt.commit, shard, written)[0])
    t_open, _ = timed(fmt.open)
    return {"commit_ms_first20": round(1000 * statistics.median(times[:20]), 2),
            "commit_ms_last20": round(1000 * statistics.median(times[-20:]), 2),
            "commit_ms_max": round(1000 * max(times), 2), "open_ms_after": round(1000 * t_open, 2),
            "commits": n}


def moto_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1")
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    return proc, endpoint


def ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b else float("inf")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=6)
    ap.add_argument("--rows", type=int, default=48, help="rows per shard")
    ap.add_argument("--part-rows", type=int, default=16, help="rows per part file / fragment")
    ap.add_argument("--commits", type=int, default=200, help="one-row commits for the growth measure (local)")
    ap.add_argument("--maps", type=int, default=8, help="distinct realistic maps the rows cycle through")
    ap.add_argument("--formats", default="delta,lance",
                    help="delta needs deltalake (the test install), lance needs pylance (pip install pylance)")
    args = ap.parse_args(argv)
    formats = [{"delta": Delta, "lance": Lance}[f] for f in args.formats.split(",")]
    maps = encoded_maps(args.maps)
    row_bytes = (pc.sum(pc.binary_length(maps.column("depth"))).as_py()
                 + pc.sum(pc.binary_length(maps.column("uncertainty"))).as_py()) / maps.num_rows
    print(f"rows: 640x480, depth + uncertainty PNG {row_bytes / 1e3:.0f} kB per row; {args.shards} shards x "
          f"{args.rows} rows, {args.part_rows} rows per part", flush=True)
    out: dict = {"row_png_kb": round(row_bytes / 1e3, 1), "shards": args.shards, "rows": args.rows,
                 "part_rows": args.part_rows, "load": os.getloadavg()[0]}
    proc, endpoint = moto_server()
    try:
        with tempfile.TemporaryDirectory(prefix="drtable-") as tmp:
            for kind in ("local", "s3"):
                store = Store(kind, Path(tmp), endpoint)
                for cls in formats:
                    res = run_format(cls, store, args, maps)
                    out[f"{cls.name}_{kind}"] = res
                    print(f"{cls.name:5s} {kind:5s} {res}", flush=True)
            store = Store("local", Path(tmp))
            for cls in formats:
                res = commit_growth(cls, store, args.commits, maps)
                out[f"{cls.name}_growth"] = res
                print(f"{cls.name:5s} growth {res}", flush=True)
    finally:
        proc.terminate()
    if len(formats) < 2:
        print(json.dumps(out))
        return 0
    print("ratios delta/lance (below 1: delta cheaper or faster-to-finish; scan: above 1 = delta faster):")
    for kind in ("local", "s3"):
        d, la = out[f"delta_{kind}"], out[f"lance_{kind}"]
        out[f"ratio_{kind}"] = r = {
            "commit_s": ratio(d["commit_s_per_shard"], la["commit_s_per_shard"]),
            "data_s": ratio(d["data_s_per_shard"], la["data_s_per_shard"]),
            "overwrite_commit_s": ratio(d["overwrite_commit_s"], la["overwrite_commit_s"]),
            "scan_rows_per_s": ratio(d["scan_rows_per_s"], la["scan_rows_per_s"]),
            "lookup_ms": ratio(d["lookup_ms"], la["lookup_ms"]),
            "lookup_ms_vs_lance_indexed": ratio(d["lookup_ms"], la["lookup_ms_indexed"]),
        }
        print(f"  {kind}: {r}")
    g = {"commit_last20": ratio(out["delta_growth"]["commit_ms_last20"], out["lance_growth"]["commit_ms_last20"]),
         "open_after": ratio(out["delta_growth"]["open_ms_after"], out["lance_growth"]["open_ms_after"])}
    out["ratio_growth"] = g
    print(f"  growth: {g}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
