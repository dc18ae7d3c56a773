"""`output.format: delta`: the output folder is a Delta Lake table (delta-rs, `deltalake`),
and each shard's results enter it in one transaction.

Why a table format: on S3 no listing of plain files is atomic across several parts, so a
plain reader can see part of a shard while its parts are copied (docs/reliability.md). A
Delta reader (deltalake, Polars, DuckDB over its dataset, Spark) reads only the files the
table's log lists at one version, and a version appears by one conditional PUT of
`_delta_log/{version}.json` (`If-None-Match: *` on S3, create-exclusive on local disk), so it
sees all of a shard's rows or none.

The table is partitioned by `source` (the shard): a shard's rows are its partition, so
replacing a shard is removing its partition's files, whatever rewrote them since (Delta's
OPTIMIZE compacts within a partition and writes `source=.../` folders of its own). The write
stage writes each result part as a Parquet file (without the `source` column: the partition
value stands for it) straight to its final name in the table folder,
`{shard}.parts/{name}.part-{hash}.{run_id}.parquet` (the run id keeps an overwrite's new files
apart from the live ones they replace; a retried task rewrites its own name). Nothing reads
it until the shard's commit (depthray/io/commit.py) adds it: one transaction that removes
every file of the shard's partition the table still lists (an overwrite, a redone shard)
and adds the new ones, with an application transaction
`depthray:{shard}` whose version the commit record notes. That is how the next run knows
whether a cut commit got into the table (`committed`), and it is what Delta's conflict
check refuses when two writers commit one shard at once (ConcurrentTransaction).

Files a version no longer lists stay until `DeltaTable(url).vacuum()` (Delta's retention),
so a reader holding an older version keeps reading; depthray never deletes a file the table
lists.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from depthray.config import ConfigError, StorageConfig
from depthray.io.fs import filesystem, join, storage_options

TABLE_LOG = "_delta_log"
APP_PREFIX = "depthray:"
SHARD_DIR = ".parts"
PARTITION = "source"  # the shard name: one partition per shard


def require_deltalake() -> None:
    try:
        import deltalake  # noqa: F401
    except ImportError as e:
        raise ConfigError("output.format: delta needs the deltalake package: pip install 'depthray[delta]'") from e


def table_options(url: str, storage: StorageConfig | None) -> dict[str, str]:
    """delta-rs storage options for `url`: the S3 endpoint (plain HTTP allowed for it, as for
    moto or MinIO), region; the credentials come from the usual AWS_* variables."""
    opts = storage_options(url, storage or StorageConfig())
    out: dict[str, str] = {}
    if opts.get("endpoint_url"):
        out["AWS_ENDPOINT_URL"] = opts["endpoint_url"]
        if opts["endpoint_url"].startswith("http://"):
            out["AWS_ALLOW_HTTP"] = "true"
    region = (storage.region if storage else None) or os.environ.get("AWS_REGION") \
        or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        out["AWS_REGION"] = region
    if storage is not None and storage.anon:
        out["AWS_SKIP_SIGNATURE"] = "true"
    return out


def table_uri(url: str) -> str:
    """delta-rs wants local tables as absolute paths and S3 ones as s3:// URLs."""
    if "://" in url and not url.startswith("file://"):
        return url.rstrip("/")
    return os.path.abspath(url.removeprefix("file://")).rstrip("/")


def is_table(fs, root: str) -> bool:
    return fs.exists(join(root, TABLE_LOG))


def app_id(shard: str) -> str:
    return APP_PREFIX + shard


def part_rel(shard: str, digest: str, run_id: str) -> str:
    """A result part's path in the table, relative to the output."""
    return f"{shard}{SHARD_DIR}/{shard.rsplit('/', 1)[-1]}.part-{digest}.{run_id}.parquet"


def is_data_file(rel: str) -> bool:
    """A Parquet file in the table folder (not under `_delta_log/`, `_errors/`, ...)."""
    return rel.endswith(".parquet") and not any(c[:1] in "_." for c in rel.split("/"))


class ShardTable:
    """The output's Delta table: open, create, commit one shard, say what a shard holds."""

    def __init__(self, url: str, storage: StorageConfig | None):
        self.url, self.storage = url, storage or StorageConfig()
        self.uri = table_uri(url)
        self.options = table_options(url, self.storage)
        self.fs, self.root = filesystem(url, self.storage)
        self._dt = None

    def exists(self) -> bool:
        self.fs.invalidate_cache()
        return is_table(self.fs, self.root)

    def ensure(self, schema: pa.Schema) -> None:
        """Create the table (version 0, no rows) if the output has none yet."""
        from deltalake import DeltaTable

        if not self.exists():
            DeltaTable.create(self.uri, schema, mode="ignore", partition_by=[PARTITION], storage_options=self.options)

    def table(self):
        """The table at its latest version (one handle, brought up to date per call)."""
        from deltalake import DeltaTable

        if self._dt is None:
            self._dt = DeltaTable(self.uri, storage_options=self.options)
        else:
            self._dt.update_incremental()
        return self._dt

    def version(self) -> int:
        return self.table().version()

    def _adds(self) -> pa.Table:
        return pa.table(self.table().get_add_actions(flatten=True))

    def files(self) -> dict[str, int]:
        """Every data file the latest version lists, relative path -> size."""
        adds = self._adds()
        return dict(zip(adds.column("path").to_pylist(), adds.column("size_bytes").to_pylist()))

    def shard_files(self, shard: str) -> dict[str, int]:
        """The files of the shard's partition the latest version lists."""
        adds = self._adds()
        return {p: s for p, s, v in zip(adds.column("path").to_pylist(), adds.column("size_bytes").to_pylist(),
                                         adds.column(f"partition.{PARTITION}").to_pylist()) if v == shard}

    def committed(self, shard: str, txn: int) -> bool:
        """Whether the commit that noted application version `txn` for this shard got in."""
        done = self.table().transaction_version(app_id(shard))
        return done is not None and done >= txn

    def next_txn(self) -> int:
        """An application version above every earlier commit's of any shard: the table's next
        version (an earlier commit of this shard was planned against a lower one)."""
        return self.version() + 1

    def commit(self, shard: str, parts: dict[str, int], txn: int) -> int:
        """One transaction: the shard's partition's files the table lists now out, `parts` in, and the
        application version `txn`. Returns the table version it made. A concurrent commit of
        this shard makes it raise (delta-rs' CommitFailedError: concurrent transaction)."""
        from deltalake import CommitProperties, Transaction
        from deltalake.transaction import AddAction, RemoveAction

        dt = self.table()
        now = int(time.time() * 1000)
        old = self.shard_files(shard)
        actions: list[Any] = [RemoveAction(p, True, now, s) for p, s in sorted(old.items()) if p not in parts]
        schemas = []
        for rel, size in sorted(parts.items()):
            if rel in old:  # listed already (never the case for a new run's names)
                continue
            stats, schema = self._stats(rel)
            schemas.append(schema)
            actions.append(AddAction(rel, size, {PARTITION: shard}, now, True, stats))
        self._add_columns(dt, schemas)
        dt.create_write_transaction(
            actions, "append", dt.schema(), partition_by=[PARTITION],
            commit_properties=CommitProperties(app_transactions=[Transaction(app_id(shard), txn, now)],
                                               custom_metadata={"depthray.shard": shard}))
        dt.update_incremental()  # the handle does not move to the version it made by itself
        return dt.version()

    def _stats(self, rel: str) -> tuple[str, pa.Schema]:
        """Delta file statistics from the part's footer: row count and `key` bounds, so a
        reader looking up a key opens only the file that can hold it."""
        path = join(self.root, rel)
        self.fs.invalidate_cache(posixpath.dirname(path))  # a listing cached before the part was written
        with self.fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
            schema = meta.schema.to_arrow_schema()
        lo: dict[str, Any] = {}
        hi: dict[str, Any] = {}
        names = schema.names
        for col in ("key",):
            if col not in names or meta.num_rows == 0:
                continue
            i = names.index(col)
            bounds = [meta.row_group(g).column(i).statistics for g in range(meta.num_row_groups)]
            if all(b is not None and b.has_min_max for b in bounds):
                lo[col], hi[col] = min(b.min for b in bounds), max(b.max for b in bounds)
        stats = {"numRecords": meta.num_rows, "minValues": lo, "maxValues": hi, "nullCount": {}}
        return json.dumps(stats), schema

    @staticmethod
    def _add_columns(dt, schemas: list[pa.Schema]) -> None:
        """`input.keep_columns` and the metric pipeline's `metric_depth` are columns of the parts:
        columns the table lacks are added first (a schema change of their own; a file without
        them reads them as null)."""
        from deltalake import Field
        from deltalake.schema import Schema

        have = {f.name for f in dt.schema().fields}
        new: dict[str, pa.Field] = {}
        for schema in schemas:
            for f in schema:
                if f.name not in have and f.name not in new:
                    new[f.name] = f.with_nullable(True)
        if new:
            fields = Schema.from_arrow(pa.schema(list(new.values()))).fields
            dt.alter.add_columns([Field(f.name, f.type, nullable=True) for f in fields])


def has_table(listing: dict[str, int]) -> bool:
    return any(rel.startswith(TABLE_LOG + "/") for rel in listing)


def check_format(fmt: str, url: str, listing: dict[str, int]) -> None:
    """A Delta output takes only Delta runs, and a Delta run only a Delta (or new) output:
    plain parts beside a table would be read by nobody, and a table's files by plain
    readers as if every version's were current."""
    if has_table(listing) and fmt != "delta":
        raise ConfigError(f"output.url {url!r} is a Delta table: set output.format: delta (or use another output)")
    if fmt == "delta" and not has_table(listing) and any(r.startswith("_manifest/") for r in listing):
        raise ConfigError(f"output.url {url!r} holds Parquet or WebDataset shards, not a Delta table: "
                          "output.format: delta needs another output")


def table_listing(url: str, storage: StorageConfig | None, listing: dict[str, int]) -> dict[str, int]:
    """`listing` with a Delta output's data files the latest version does not list left out:
    a manifest naming such a file proves nothing (the table no longer holds the shard)."""
    if not has_table(listing):
        return listing
    listed = ShardTable(url, storage).files()
    return {rel: size for rel, size in listing.items() if not is_data_file(rel) or rel in listed}
