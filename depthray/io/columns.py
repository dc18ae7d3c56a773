"""Columnar inputs: Parquet files and Arrow IPC files (what Hugging Face `datasets` writes
with `to_parquet` and `save_to_disk`), and the image column read by its *type*:

- binary: the encoded image;
- a struct with `bytes` and/or `path` (datasets' `Image()` feature): the bytes when there
  are any, else the file at the path (`cast_column("image", Image())` + `to_parquet`
  leaves the bytes null and keeps the path as it was given);
- string: a path or URL of the image file.

A relative path resolves against `input.image_root`, else the folder of the shard that
names it; an absolute one is a local file; a URL (`s3://`, `gs://`, `https://`, ...) is
read as it is, with the job's `storage:` settings (the S3 endpoint included).
"""

from __future__ import annotations

import posixpath
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import pyarrow as pa

from depthray.config import StorageConfig
from depthray.io.fs import filesystem
from depthray.io.listing import _strip_ext

ACCEPTED = "binary (encoded image bytes), a struct with bytes/path fields (Hugging Face Image) " \
           "or string (a path or URL of the image file)"


def image_kind(tp: pa.DataType) -> str | None:
    """"bytes", "struct" or "path" for an image column of type `tp`; None: not one we read."""
    if pa.types.is_binary(tp) or pa.types.is_large_binary(tp) or _is(tp, "is_binary_view") \
            or pa.types.is_fixed_size_binary(tp):
        return "bytes"
    if pa.types.is_string(tp) or pa.types.is_large_string(tp) or _is(tp, "is_string_view"):
        return "path"
    if pa.types.is_struct(tp):
        fields = {tp.field(i).name: tp.field(i).type for i in range(tp.num_fields)}
        ok_bytes = "bytes" not in fields or image_kind(fields["bytes"]) == "bytes"
        ok_path = "path" not in fields or image_kind(fields["path"]) == "path"
        if ("bytes" in fields or "path" in fields) and ok_bytes and ok_path:
            return "struct"
    return None


# pipelines/metric_depth.py: the column of each row's sparse metric depth (metric.column)
SPARSE_ACCEPTED = "binary (a PNG or .npy file's bytes, as metric.encoding says) or a struct with a " \
                  "binary `bytes` field (Hugging Face Image)"


def sparse_kind(tp: pa.DataType) -> str | None:
    """"bytes" or "struct" for a sparse depth column of type `tp`; None: not one we read
    (its values are read from their bytes only: a file path is not fetched)."""
    kind = image_kind(tp)
    if kind == "struct" and any(tp.field(i).name == "bytes" for i in range(tp.num_fields)):
        return kind
    return kind if kind == "bytes" else None


def _is(tp: pa.DataType, test: str) -> bool:
    check = getattr(pa.types, test, None)  # string/binary views: newer pyarrow only
    return bool(check and check(tp))


# ---------------------------------------------------------------------------- table files

# An Arrow IPC *file* (Feather v2) starts with this; datasets' save_to_disk writes the
# *stream* format, which starts with a continuation marker instead.
_ARROW_FILE_MAGIC = b"ARROW1"


class TableFile:
    """One Parquet or Arrow IPC file opened for reading: its schema, and its rows in
    batches of at most `batch_size`, only the columns asked for (one record batch of the
    file in memory at a time)."""

    def __init__(self, f, fmt: str):
        self.fmt = fmt
        if fmt == "parquet":
            import pyarrow.parquet as pq

            self._pf = pq.ParquetFile(f)
            self.schema = self._pf.schema_arrow
            return
        head = f.read(len(_ARROW_FILE_MAGIC))
        f.seek(0)
        if head == _ARROW_FILE_MAGIC:
            self._ipc = pa.ipc.open_file(f)
        else:
            self._ipc = pa.ipc.open_stream(f)
        self.schema = self._ipc.schema

    def batches(self, columns: list[str], batch_size: int) -> Iterator[pa.RecordBatch]:
        if self.fmt == "parquet":
            yield from self._pf.iter_batches(batch_size=batch_size, columns=columns)
            return
        if isinstance(self._ipc, pa.ipc.RecordBatchFileReader):
            stream = (self._ipc.get_batch(i) for i in range(self._ipc.num_record_batches))
        else:
            stream = iter(self._ipc)
        for batch in stream:
            batch = batch.select(columns)
            for start in range(0, batch.num_rows, batch_size):
                yield batch.slice(start, batch_size)


def read_schema(url: str, fmt: str, storage: StorageConfig) -> pa.Schema:
    fs, path = filesystem(url, storage)
    with fs.open(path, "rb") as f:
        return TableFile(f, fmt).schema


# ---------------------------------------------------------------------------- image paths


def resolve(value: str, base: str) -> str:
    """The URL of an image path as a table holds it: URLs as they are, absolute paths as
    local files, relative ones joined to `base` (a folder URL) with `..` folded."""
    if "://" in value:
        return value
    if value.startswith("/"):
        return "file://" + posixpath.normpath(value)
    proto, _, rest = base.rstrip("/").rpartition("://")
    joined = posixpath.normpath(posixpath.join(rest or "/", value))
    return f"{proto}://{joined}" if proto else joined


def base_folder(shard_url: str, image_root: str | None) -> str:
    """What relative image paths of a shard resolve against: `input.image_root` (a local
    path made absolute, so the folder the job runs in never decides), else the shard's
    own folder."""
    if image_root:
        if "://" in image_root:
            return image_root
        import os

        return "file://" + os.path.abspath(os.path.expanduser(image_root))
    return shard_url.rsplit("/", 1)[0]


def fetch(urls: list[str], storage: StorageConfig, threads: int = 16) -> list[bytes | BaseException]:
    """Each URL's bytes, or the exception reading it raised; several at once, since a
    block of rows on object storage is one request each."""

    def one(url: str) -> bytes | BaseException:
        try:
            fs, path = filesystem(url, storage)
            return fs.cat_file(path)
        except Exception as e:  # judged by the caller: a missing file is the row's, a dropped connection the shard's
            return e

    if len(urls) <= 1:
        return [one(u) for u in urls]
    with ThreadPoolExecutor(min(threads, len(urls))) as pool:
        return list(pool.map(one, urls))


def key_of_path(value: str) -> str:
    """A row key from an image path or URL: without scheme, leading '/' and extension."""
    return _strip_ext(value.split("://", 1)[-1].lstrip("/"))


def image_value(value: Any, kind: str) -> tuple[bytes | None, str | None]:
    """(bytes, path) of one cell of an image column of `kind`: bytes win over the path."""
    if kind == "bytes":
        return (bytes(value) if value else None), None
    if kind == "path":
        return None, (value or None)
    if not isinstance(value, dict):
        return None, None
    data = value.get("bytes")
    return (bytes(data) if data else None), (value.get("path") or None)


def sparse_column_kind(schema: pa.Schema, column: str) -> str:
    """The kind of `column`'s values (sparse_kind); raises ValueError naming what is wrong."""
    if column not in schema.names:
        raise ValueError(f"no column {column!r} (metric.column; columns: {', '.join(schema.names)})")
    kind = sparse_kind(schema.field(column).type)
    if kind is None:
        raise ValueError(f"column {column!r} (metric.column) is {schema.field(column).type}, not {SPARSE_ACCEPTED}")
    return kind


def with_sparse(row: dict[str, Any], cell: Any, column: str, kind: str) -> dict[str, Any]:
    """The row with its frame's sparse metric depth in `sparse`, or an error row where the
    cell holds none (never a relative-only label in a metric output)."""
    if row.get("error"):
        return row
    data, path = image_value(cell, kind)
    if data:
        row["sparse"] = data
        return row
    why = f"holds only a path ({path!r}), which is not read" if path else "is null"
    return {"key": row["key"], "error": "no_sparse_depth", "message": f"column {column!r} (metric.column) {why}"}
