"""Output side: part files of depth results and of errors, named after their input shard.

A sink turns a group of rows from one input shard into one part file's bytes; the base
class names the part and writes it atomically. Part names are a hash of the keys they
hold, so a retried write task rewrites the same file instead of adding a duplicate:

    {output}/{shard}.parts/{name}.part-{hash}.parquet|.tar     depth results
    {output}/_errors/{shard}.parts/{name}.part-{hash}.parquet   error records (any output format)
    {output}/_errors/empty.parquet                               0 rows, so `_errors/` always reads
    {output}/{shard}.parts/{name}.part-{hash}.{run_id}.parquet   `output.format: delta` (depthray/io/table.py)

({name}: the shard name's last component.) A shard's parts share one folder so that on
local disk the commit makes them visible with one directory rename (depthray/io/commit.py).
Parts are written under `{output}/_staging/` (readers skip `_` folders: pyarrow's dataset
discovery, depthray's own readers) and moved to the names above only when their shard
commits, so nobody reads a shard still in flight. A Delta table's parts are written to
their final names at once: the table lists them only when their shard's transaction commits.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from depthray.config import OutputConfig, StorageConfig
from depthray.io import records, row_meta
from depthray.io.fs import filesystem, join, write_atomic
from depthray.io.table import part_rel as table_part_rel
from depthray.io.tar_samples import tar_join, tar_member

ERRORS_DIR = "_errors"
STAGING_DIR = "_staging"
SHARD_DIR = ".parts"  # a shard's parts lie in {shard}.parts/
PART_RE = re.compile(r"^(?P<shard>.+)\.parts/[^/]+\.part-(?P<hash>[0-9a-f]{16})\.(?P<ext>parquet|tar)$")
# Parts of outputs written before shard folders: {shard}.part-{hash}.{ext}, side by side.
FLAT_PART_RE = re.compile(r"^(?P<shard>.+)\.part-(?P<hash>[0-9a-f]{16})\.(?P<ext>parquet|tar)$")


def part_rel(shard: str, digest: str, extension: str, subdir: str = "") -> str:
    """A part's path relative to the output (and to `_staging/`)."""
    rel = f"{shard}{SHARD_DIR}/{shard.rsplit('/', 1)[-1]}.part-{digest}.{extension}"
    return f"{subdir}/{rel}" if subdir else rel


def part_shard(rel: str) -> str | None:
    """The shard a part belongs to, from its path relative to the output (staged, error or
    result part, either layout); None for anything else."""
    for prefix in (STAGING_DIR + "/", ERRORS_DIR + "/"):
        rel = rel[len(prefix):] if rel.startswith(prefix) else rel
    m = PART_RE.match(rel) or FLAT_PART_RE.match(rel)
    return m.group("shard") if m else None

OUTPUT_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("depth", pa.binary()),  # 16-bit PNG, depth * 65535, 0 = near
        ("uncertainty", pa.binary()),  # 16-bit PNG, uncertainty / uncertainty_scale * 65535
        ("uncertainty_scale", pa.float32()),
        ("uncertainty_mean", pa.float32()),
        ("model", pa.string()),
        ("config_hash", pa.string()),
        ("ensemble_size", pa.int32()),
        ("num_views", pa.int32()),
        ("meta", pa.string()),  # JSON: decode facts (exif_orientation, frames, ...), flags
    ]
)
# pipelines/metric_depth.py's outputs: one more column (depthray/io/metric_labels.py)
METRIC_OUTPUT_SCHEMA = OUTPUT_SCHEMA.append(pa.field("metric_depth", pa.binary()))  # PNG, metres / scale


def part_hash(keys: list[str]) -> str:
    return hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()[:16]


def safe_key(key: str) -> str:
    """A file-name-safe WebDataset key: no dots, slashes or odd characters; a changed key
    gets a hash suffix so two keys never collide. The original key stays in the JSON."""
    clean = re.sub(r"[^A-Za-z0-9_\-]", "_", key)[:150]
    return clean if clean == key else f"{clean}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


class Sink:
    """Writes one part file per call; subclasses say how a row becomes this format's sample
    (`sample`, one row at a time) and how samples become a part's bytes (`encode`)."""

    extension = ""
    subdir = ""
    kind = ""  # what an unwritable row's message says it could not become

    def __init__(self, url: str, storage: StorageConfig):
        self.url = url
        self.storage = storage

    def sample(self, row: dict[str, Any]) -> Any:
        """`row` as this format stores it; raises for a row the format cannot hold."""
        return row

    def encode(self, samples: list[Any]) -> bytes:
        raise NotImplementedError

    def write(self, shard: str, rows: list[dict[str, Any]], digest: str) -> tuple[str, int]:
        """Write `rows` (all from input shard `shard`) as one staged part; returns its path
        relative to the output (where it goes on commit) and its size in bytes. Raises for
        a row the format cannot hold: `write_batch` sets those aside first (`writable`)."""
        return self.write_samples(shard, [self.sample(r) for r in rows], digest)

    def write_samples(self, shard: str, samples: list[Any], digest: str) -> tuple[str, int]:
        rel = part_rel(shard, digest, self.extension, self.subdir)
        fs, root = filesystem(self.url, self.storage)
        data = self.encode(samples)
        write_atomic(fs, join(root, STAGING_DIR, rel), data)
        return rel, len(data)


def _parquet_bytes(table: pa.Table) -> bytes:
    """Binary columns (PNG depth, uncertainty, images) are stored as they are: they are
    compressed already, and zstd, dictionary and statistics over them cost ~8 ms of CPU per
    640x480 image for < 0.1 % of size (docs/scale.md). The rest is zstd."""
    blobs = {f.name for f in table.schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)}
    other = [n for n in table.column_names if n not in blobs]
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression={n: "none" if n in blobs else "zstd" for n in table.column_names},
                   use_dictionary=other, write_statistics=other)
    return buf.getvalue().to_pybytes()


class ParquetSink(Sink):
    extension = "parquet"
    kind = "a Parquet row"

    def __init__(self, url, storage, model: str, config_hash: str, metric: bool = False):
        super().__init__(url, storage)
        self.extra = {"model": model, "config_hash": config_hash}
        self.schema = METRIC_OUTPUT_SCHEMA if metric else OUTPUT_SCHEMA

    def sample(self, row):
        # the output's `meta` column: the typed facts as JSON text, the column every reader knows
        return {**row, **self.extra, "meta": row_meta.to_json(row), KEPT: kept_columns(row)}

    def encode(self, samples):
        return _parquet_bytes(with_kept_columns(records.to_table(samples, self.schema), samples))


class TableSink(ParquetSink):
    """`output.format: delta`: the job's Parquet part (less `source`, the table's partition
    column), written straight to its name in the table folder (no staging: the table does
    not list it before its shard's transaction).
    The run id in the name keeps a relabelled part apart from the live one it replaces."""

    def __init__(self, url, storage, model: str, config_hash: str, run_id: str, metric: bool = False):
        super().__init__(url, storage, model, config_hash, metric)
        self.run_id = run_id

    def encode(self, samples):
        # a column the table lacks (metric_depth, kept input columns) is added at the shard's
        # commit (table.ShardTable._add_columns)
        table = with_kept_columns(records.to_table(samples, self.schema), samples)
        # `source` is the table's partition value (the log holds it), not a column of its files
        return _parquet_bytes(table.drop_columns(["source"]))

    def write_samples(self, shard, samples, digest):
        rel = table_part_rel(shard, digest, self.run_id)
        fs, root = filesystem(self.url, self.storage)
        data = self.encode(samples)
        write_atomic(fs, join(root, rel), data)
        return rel, len(data)


KEPT = "_kept_columns"  # a Parquet sample's kept input columns, parsed (no output column)


def kept_columns(row: dict[str, Any]) -> dict[str, Any]:
    """A row's `input.keep_columns` values (carried in its meta as "columns"), each checked
    to become an Arrow value: after the reader's JSON some cannot (a map's [int, str]
    entries, a uint64 past int64's range), and one such value must cost its row, not the part."""
    kept = row_meta.get(row).get("columns") or {}
    for name, value in kept.items():
        try:
            pa.array([value])
        except Exception as e:
            raise ValueError(f"input column {name!r} value {str(value)[:200]}: {type(e).__name__}: {e}") from e
    return kept


def with_kept_columns(table: pa.Table, samples: list[dict[str, Any]]) -> pa.Table:
    """`input.keep_columns` (`kept_columns` of each sample) as real columns; a name the
    output already uses gets an `input_` prefix. Values stay in `meta` as well."""
    kept = [s[KEPT] for s in samples]
    names = list(dict.fromkeys(c for k in kept for c in k))
    for c in names:
        values = pa.array([k.get(c) for k in kept])
        if pa.types.is_null(values.type):
            values = values.cast(pa.string())
        table = table.append_column(f"input_{c}" if c in table.column_names else c, values)
    return table


class WebDatasetSink(Sink):
    """`{key}.depth.png`, `{key}.uncertainty.png`, `{key}.json`, `{key}.metric_depth.png`
    when the row has one (pipelines/metric_depth.py), and optionally the input image as
    `{key}.{ext}` (its original encoding and extension)."""

    extension = "tar"
    kind = "a WebDataset sample"

    def __init__(self, url, storage, model: str, config_hash: str, include_image: bool):
        super().__init__(url, storage)
        self.extra = {"model": model, "config_hash": config_hash}
        self.include_image = include_image

    def sample(self, row):
        """(key, the sample's tar members as pieces of bytes)."""
        return row["key"], [piece for name, data in self._files(row) for piece in tar_member(name, data)]

    def encode(self, samples):
        return tar_join(piece for _, pieces in sorted(samples, key=lambda s: s[0]) for piece in pieces)

    def _files(self, r):
        name = safe_key(r["key"])
        meta = {k: r.get(k) for k in ("key", "source", "width", "height", "uncertainty_scale",
                                      "uncertainty_mean", "ensemble_size", "num_views")}
        meta.update(self.extra, **row_meta.get(r))
        yield f"{name}.depth.png", r["depth"]
        yield f"{name}.uncertainty.png", r["uncertainty"]
        if r.get("metric_depth") is not None:
            yield f"{name}.metric_depth.png", r["metric_depth"]
        yield f"{name}.json", json.dumps(meta, sort_keys=True).encode()
        if self.include_image and r.get("data"):
            ext = {"jpeg": "jpg"}.get(r.get("ext") or "jpg", r.get("ext") or "jpg")
            yield f"{name}.{ext}", r["data"]


class FolderSink(Sink):
    """`depthray predict`'s output folder: per image `{key}.depth.png` (the encode stage's
    bytes, what a job stores for the image) and `{key}.preview.png` (the row's `preview`,
    PNG bytes the caller rendered), each file written atomically. No parts, no staging, no
    commit: a folder of loose files is for one machine's images, not a job's output, so
    `make_sink` never returns it and no `output.format` selects it."""

    kind = "image files"

    def __init__(self, url: str, storage: StorageConfig):
        super().__init__(url, storage)
        self.fs, self.root = filesystem(url, storage)

    def sample(self, row):
        """(file name, bytes) per file of the row; raises for a row without both, or whose
        key would put its files in another folder."""
        key = row["key"]
        if "/" in key or "\\" in key:
            raise ValueError("the key names a folder: its files would land outside the output folder")
        missing = [c for c in ("depth", "preview") if row.get(c) is None]
        if missing:
            raise ValueError(f"no {' and no '.join(missing)} PNG")
        return [(f"{key}.depth.png", row["depth"]), (f"{key}.preview.png", row["preview"])]

    def write_files(self, samples: list[Any]) -> int:
        """Writes every sample's files; returns the bytes written."""
        size = 0
        for files in samples:
            for name, data in files:
                # Atomic (never half-written) but not fsynced: no commit protocol rests on
                # these files and a power loss costs a re-run, while the fsyncs cost ~10 ms a
                # file (measured, #27): more than the preview's re-decode that #27 removed.
                write_atomic(self.fs, join(self.root, name), bytes(data), durable=False)
                size += len(data)
        return size

    def write_samples(self, shard, samples, digest):
        """The files in the folder itself: `shard` and `digest` name no part here."""
        return "", self.write_files(samples)


EMPTY_ERRORS = "empty.parquet"  # `_errors/empty.parquet`: 0 rows, the schema


def ensure_errors_file(url: str, storage: StorageConfig) -> str:
    """`_errors/` exists from a job's start, holding at least an empty Parquet file with
    the error schema, so `pq.read_table("{output}/_errors/")` reads 0 rows instead of
    failing when nothing failed. (Its name is no part name: resume never deletes it.)"""
    fs, root = filesystem(url, storage)
    path = join(root, ERRORS_DIR, EMPTY_ERRORS)
    if not fs.exists(path):
        write_atomic(fs, path, _parquet_bytes(records.to_table([], records.ERRORS)))
    return path


class ErrorSink(Sink):
    extension = "parquet"
    subdir = ERRORS_DIR

    def encode(self, samples):
        return _parquet_bytes(records.to_table(samples, records.ERRORS))


def make_sink(cfg: OutputConfig, storage: StorageConfig, model: str, config_hash: str, run_id: str = "",
              metric: bool = False) -> Sink:
    """`metric`: the rows carry metric depth (pipelines/metric_depth.py): Parquet and Delta
    parts get its column (WebDataset writes the member whenever a row has one)."""
    if cfg.format == "delta":
        if not run_id:  # two runs must never write one name: the second's would replace a live file
            raise ValueError("output.format delta: the write stage needs the run id")
        return TableSink(cfg.url, storage, model, config_hash, run_id, metric)
    if cfg.format == "webdataset":
        return WebDatasetSink(cfg.url, storage, model, config_hash, cfg.include_image)
    return ParquetSink(cfg.url, storage, model, config_hash, metric)


def unlabelled_members(rows: list[dict[str, Any]]) -> Counter:
    """Image members the reader left beside the one it chose, by extension (row meta
    `unlabelled_members`, io/sources.py), so the job summary can say they were not labelled."""
    found: Counter = Counter()
    for r in rows:
        found.update(row_meta.get(r).get("unlabelled_members") or [])
    return found


def writable(sink: Sink, rows: list[dict[str, Any]]) -> tuple[list[Any], list[dict[str, Any]]]:
    """The rows' samples, and an error row for each row the sink cannot hold: a part encoded
    whole would raise for one such row, Ray would retry the same rows until the dataset
    ended, and no shard of the job would ever commit. Only encoding is guarded: the part's
    write to storage comes after, and its failures still fail the task (Ray retries it;
    the commit protocol keeps the outputs exactly once)."""
    samples, failed = [], []
    for row in rows:
        try:
            samples.append(sink.sample(row))
        except MemoryError:  # the worker's trouble, not this row's
            raise
        except Exception as e:
            failed.append(records.error_row(row, "write", "unwritable", f"key {row['key']!r} cannot be written "
                                            f"as {sink.kind}: {type(e).__name__}: {e}"))
    return samples, failed


def write_batch(batch: pa.Table, cfg: OutputConfig, storage: StorageConfig, model: str,
                config_hash: str, run_id: str = "", metric: bool = False) -> pa.Table:
    """Ray Data UDF: ENCODED rows -> parts on storage, and one ACK row per source shard."""
    sink = make_sink(cfg, storage, model, config_hash, run_id, metric)
    errors_sink = ErrorSink(cfg.url, storage)
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in batch.to_pylist():
        groups[row["source"]].append(row)
    acks = []
    for shard, rows in groups.items():
        trailer = next((r for r in rows if records.is_trailer(r)), None)
        labelled = [r for r in rows if not records.is_trailer(r) and r.get("error") is None]
        errors = [r for r in rows if records.is_error(r)]
        digest = part_hash([r["key"] for r in labelled + errors])  # of the batch: a retry's names
        outputs, unwritable = writable(sink, labelled)
        errors += unwritable
        part = sink.write_samples(shard, outputs, digest) if outputs else None
        error_part = errors_sink.write(shard, errors, digest) if errors else None
        acks.append(
            {
                "source": shard,
                "rows": len(rows),
                "outputs": len(outputs),
                "errors": len(errors),
                "shard_total": trailer["shard_total"] if trailer else None,
                "shard_error": trailer.get("message") if trailer and trailer.get("error") else None,
                "parts": [part[0]] if part else [],
                "part_bytes": [part[1]] if part else [],
                "error_parts": [error_part[0]] if error_part else [],
                "error_part_bytes": [error_part[1]] if error_part else [],
                "error_reasons": json.dumps(Counter(f"{r['stage']}:{r['error']}" for r in errors)),
                "infer_s": float(sum(r.get("infer_s") or 0.0 for r in labelled)),
                "unlabelled_members": json.dumps(unlabelled_members(rows)),
            }
        )
    return records.to_table(acks, records.ACK)
