"""Input side: list shards from a URL pattern, and read a shard into sample rows.

A shard is the unit of work (one WebDataset .tar, one Parquet file, or up to
`input.images_per_shard` image files of one folder); listing lives in depthray/io/listing.py. Readers implement `samples(fs, path)`; the base class handles batching,
trailers, and turning storage failures into records instead of exceptions.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
from typing import Any, Iterator

import pyarrow as pa

from depthray.config import InputConfig, StorageConfig
from depthray.io import records, row_meta
from depthray.io.columns import (
    ACCEPTED, TableFile, base_folder, fetch, image_kind, image_value, key_of_path, resolve, sparse_column_kind, with_sparse)
from depthray.io.decode import IMAGE_EXTS
from depthray.io.folders import file_ext as _ext, select, split_url
from depthray.io.fs import filesystem
from depthray.io.listing import (  # noqa: F401  (the listing API, re-exported)
    LIST_FILE_EXTS, SHARD_EXTS, SHARD_KEY, Listing, Shard, _strip_ext, expand_braces, list_shards, safe_name)
from depthray.io.tar_samples import iter_samples_placed

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- readers


def is_transient(e: BaseException) -> bool:
    """A failure that reading again may not meet: a dropped or timed-out connection, a 5xx
    or throttling answer, from any storage client (aiohttp's ClientPayloadError is not an
    OSError; botocore's errors are neither). Missing files and refused permissions are not."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            return False
        name = type(e).__name__
        module = type(e).__module__ or ""
        if isinstance(e, (ConnectionError, TimeoutError)) or name in _TRANSIENT_NAMES:
            return True
        if module.startswith(("aiohttp", "botocore", "urllib3", "requests", "http.client")) and \
                "Credential" not in name and "ParamValidation" not in name:
            code = str(getattr(e, "response", {}).get("Error", {}).get("Code", "")) if hasattr(e, "response") else ""
            return not code or code in _TRANSIENT_CODES or code.startswith("5")
        if isinstance(e, OSError) and getattr(e, "errno", None) in _TRANSIENT_ERRNOS:
            return True
        e = e.__cause__ or e.__context__
    return False


_TRANSIENT_NAMES = {"FSTimeoutError", "ClientPayloadError", "ServerDisconnectedError", "IncompleteRead",
                    "ReadTimeoutError", "ProtocolError", "ResponseStreamingError", "ContentLengthError"}
_TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling", "503", "500"}
_TRANSIENT_ERRNOS = {5, 32, 104, 110, 111, 113}  # EIO, EPIPE, ECONNRESET, ETIMEDOUT, ECONNREFUSED, EHOSTUNREACH


class Reader:
    """Turns one shard into sample rows; subclasses implement `samples`.

    The base class batches rows into Arrow blocks (bounded by rows and bytes, so a shard
    never sits in memory whole), appends the trailer, and classifies failures:
    - transient (dropped connection, timeout, 5xx): the shard is read again from the start,
      skipping the samples already emitted, up to `storage.retries` times; if it keeps
      failing the shard is marked failed (no manifest; the next run redoes it), never
      committed short;
    - missing file, refused permission: the shard is marked failed at once;
    - anything else (bad tar, bad Parquet): read once more to rule out a transport glitch
      that looked like bad data; if it fails again at the same sample it is corrupt: a
      shard-level error row naming the last good key, and the shard completes with what
      was read (re-reading would not help).
    """

    def __init__(self, cfg: InputConfig, storage: StorageConfig, rows_per_block: int = 32,
                 bytes_per_block: int = 64 << 20):
        self.cfg = cfg
        self.storage = storage
        self.rows_per_block = rows_per_block
        self.bytes_per_block = bytes_per_block

    def samples(self, fs, path: str) -> Iterator[dict[str, Any]]:
        """Yield {"key", "data", "ext"} or error fields ({"key", "error", "message"})."""
        raise NotImplementedError

    def read(self, shard: Shard) -> Iterator[pa.Table]:
        rows: list[dict[str, Any]] = []
        size = total = 0
        shard_error = None
        last_key: str | None = None
        retries, corrupt_at = 0, None
        while True:
            try:
                fs, path = filesystem(shard.url, self.storage)
                for i, row in enumerate(self.samples(fs, path)):
                    if i < total:  # emitted before the break: the reader is deterministic
                        continue
                    row["source"] = shard.name
                    if row.get("error"):
                        row["stage"] = "read"
                    rows.append(row)
                    total += 1
                    last_key = row.get("key", last_key)
                    size += len(row.get("data") or b"") + len(row.get("sparse") or b"")
                    if len(rows) >= self.rows_per_block or size >= self.bytes_per_block:
                        yield records.to_table(rows, records.SAMPLE)
                        rows, size = [], 0
                break
            except Exception as e:
                what = f"{type(e).__name__}: {e}"
                transient = is_transient(e)
                if transient and retries < max(1, self.storage.retries):
                    retries += 1
                    log.warning("shard %s: read broke after %d samples (%s); reading again (%d/%d)",
                                shard.name, total, what, retries, max(1, self.storage.retries))
                    time.sleep(min(0.2 * 2 ** retries, 5.0))
                    continue
                if transient or isinstance(e, OSError):
                    shard_error = f"{what} (after {retries} retries)" if transient else what
                    log.warning("shard %s could not be read (the next run retries it): %s", shard.name, shard_error)
                    break
                if corrupt_at != total:  # first sight of bad data here: rule out a glitch
                    corrupt_at = total
                    log.warning("shard %s: bad data after %d samples (%s); reading once more", shard.name, total, what)
                    continue
                after = f"after key {last_key!r}" if last_key is not None else "before its first sample"
                rows.append({"source": shard.name, "key": SHARD_KEY, "stage": "read", "error": "corrupt_shard",
                             "message": f"{what} ({after}; {total} sample(s) read)"})
                total += 1
                break
        rows.append({"source": shard.name, "key": None, "shard_total": total,
                     "error": "read_failed" if shard_error else None, "message": shard_error})
        yield records.to_table(rows, records.SAMPLE)


def _utf8_key(key: str) -> tuple[str, str]:
    """(key, "") or, for a tar member name that is not UTF-8 (tarfile reads its bytes as lone
    surrogates, which no Arrow string, Parquet column or JSON reader takes: the whole shard's
    block failed), (its bytes escaped as text, why it is an error row)."""
    try:
        key.encode("utf-8")
        return key, ""
    except UnicodeEncodeError:
        raw = key.encode("utf-8", "surrogateescape")
        shown = raw.decode("utf-8", "backslashreplace")
        return shown, (f"member name {raw!r} is not UTF-8 (a latin-1 or other legacy encoding?); "
                       f"the key is shown escaped as {shown!r}: rename the members in UTF-8 to label them")


def _unique(key: str, seen: dict[str, int]) -> tuple[str, bool]:
    """Keys are unique per shard: a repeat gets a `~dupN` suffix and becomes an error."""
    n = seen.get(key, 0)
    seen[key] = n + 1
    return (key, False) if n == 0 else (f"{key}~dup{n}", True)


# The photo formats a WebDataset sample's image is looked for among, by default.
DEFAULT_IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp", "gif", "ppm", "pgm", "pnm")


def choose_member(members: list[str], wanted: list[str] | None) -> tuple[str | None, str | None, str]:
    """(extension of the image member, error reason, message) for a sample's members.

    Extensions match whole: "seg.png" matches only an entry "seg.png", never "png". With
    `wanted` given, its order decides; with the default list, a sample holding more than one
    photo member is ambiguous (an error row, never a silent pick)."""
    order = list(wanted) if wanted else list(DEFAULT_IMAGE_MEMBERS)
    found = sorted((order.index(e), e) for e in members if e in order)
    listed = ", ".join(sorted(members))
    if not found:
        return None, "no_image", (f"no member with an extension in input.image_member={order} (members: {listed})")
    if not wanted and len(found) > 1:
        return None, "ambiguous_image", (f"several image members ({', '.join(e for _, e in found)}); "
                                         f"set input.image_member to the one to label (members: {listed})")
    return found[0][1], None, ""


class WebDatasetReader(Reader):
    """Tar members grouped by WebDataset key (path up to the first dot of the basename);
    the image member is chosen by `input.image_member` (choose_member). Each row's meta says
    where its image lies: `source_url` (the tar), `source_member`, and for an uncompressed
    tar `source_offset`/`source_size`, the member's bytes in it (one range read back).
    With `sparse_member` (metric.member, set by the metric pipeline's read stage) that
    member's bytes go along in the row's `sparse` column; a sample without it is an error."""

    sparse_member: str | None = None

    def read(self, shard: Shard) -> Iterator[pa.Table]:
        self.shard_url = shard.url
        yield from super().read(shard)

    def _sample(self, key: str, members: dict[str, bytes], places: dict[str, tuple[str, int, int]],
                seen: dict[str, int]) -> dict[str, Any]:
        key, not_utf8 = _utf8_key(key)
        key, dup = _unique(key, seen)  # after escaping: an escaped name equal to a real key is a repeat
        if dup:
            return {"key": key, "error": "duplicate_key",
                    "message": "key already seen in this shard (tar members not grouped by key?)"}
        if not_utf8:
            return {"key": key, "error": "bad_key", "message": not_utf8}
        sparse = self.sparse_member  # never the image, even where its extension is a photo's
        ext, reason, message = choose_member([m for m in members if m != sparse], self.cfg.image_member)
        if reason:
            return {"key": key, "error": reason, "message": message}
        name, offset, size = places[ext]
        row = {"key": key, "data": members[ext], "ext": ext.rsplit(".", 1)[-1]}
        if sparse:  # pipelines/metric_depth.py: the frame's sparse metric depth travels with it
            if sparse not in members:
                return {"key": key, "error": "no_sparse_depth",
                        "message": f"no member {sparse!r} (metric.member) in the sample (members: "
                                   f"{', '.join(sorted(members))})"}
            row["sparse"] = members[sparse]
        row_meta.put(row, source_url=self.shard_url, source_member=name)
        if not _compressed(self.shard_url):  # a gzipped tar's offsets are in the inflated stream
            row_meta.put(row, source_offset=offset, source_size=size)
        others = sorted(e for e in members if e not in (ext, sparse) and e.rsplit(".", 1)[-1] in IMAGE_EXTS)
        if others:
            row_meta.put(row, image_member=ext, unlabelled_members=others)
        return row

    def samples(self, fs, path):
        seen: dict[str, int] = {}
        with fs.open(path, "rb") as f:
            for key, members, places in iter_samples_placed(f):
                yield self._sample(key, members, places, seen)


def _compressed(url: str) -> bool:
    return not url.split("?", 1)[0].lower().endswith(".tar")


class ParquetReader(Reader):
    """Rows of a Parquet or Arrow IPC file (depthray/io/columns.py): `input.image_column`
    by its type (bytes; a {bytes, path} struct as Hugging Face datasets write it, the
    path read when the bytes are null; a path or URL string) and the key:
    `input.key_column`, else a "key" column, else the image's path (without extension),
    else "{shard}/{row}"; keys are unique across the dataset. Every row's meta keeps the
    source key or path, `source_url` when the image was read from a path (else
    `source_table`/`source_row`/`source_column`: the value in this file), and the columns
    `input.keep_columns` names. An image path that cannot be read is that row's error.
    With `sparse_column` (metric.column, the metric pipeline's) that column's bytes go along
    in the row's `sparse`; a row whose value is null is an error."""

    sparse_column: str | None = None

    def read(self, shard: Shard) -> Iterator[pa.Table]:
        self.shard_name, self.table_format, self.shard_url = shard.name, shard.format, shard.url
        self.base = base_folder(shard.url, self.cfg.image_root)
        yield from super().read(shard)

    def samples(self, fs, path):
        seen: dict[str, int] = {}
        with fs.open(path, "rb") as f:
            table = TableFile(f, getattr(self, "table_format", "parquet"))
            names = table.schema.names
            if self.cfg.image_column not in names:
                raise ValueError(f"no column {self.cfg.image_column!r} (columns: {', '.join(names)})")
            kind = image_kind(table.schema.field(self.cfg.image_column).type)
            if kind is None:
                raise ValueError(f"column {self.cfg.image_column!r} is "
                                 f"{table.schema.field(self.cfg.image_column).type}, not {ACCEPTED}")
            key_column = self.cfg.key_column or "key"
            if self.cfg.key_column and key_column not in names:
                raise ValueError(f"no key column {key_column!r} (columns: {', '.join(names)})")
            has_key = key_column in names
            keep = [c for c in self.cfg.keep_columns if c in names and c not in (self.cfg.image_column, key_column)]
            sparse = self.sparse_column
            sparse_as = sparse_column_kind(table.schema, sparse) if sparse else None
            cols = list(dict.fromkeys([self.cfg.image_column] + ([key_column] if has_key else []) + keep
                                      + ([sparse] if sparse else [])))
            index = 0
            for batch in table.batches(cols, self.rows_per_block):
                images = batch.column(self.cfg.image_column).to_pylist()
                keys = batch.column(key_column).to_pylist() if has_key else [None] * len(images)
                kept = {c: batch.column(c).to_pylist() for c in keep}
                cells = batch.column(sparse).to_pylist() if sparse else None
                rows = []
                for i, (raw_key, value) in enumerate(zip(keys, images)):
                    row = self._row(raw_key, *image_value(value, kind), index, seen,
                                    {c: _jsonable(v[i]) for c, v in kept.items()})
                    rows.append(with_sparse(row, cells[i], sparse, sparse_as) if sparse else row)
                    index += 1
                yield from self._fetched(rows)

    def _row(self, raw_key, data: bytes | None, src_path: str | None, index: int, seen: dict[str, int],
             kept: dict[str, Any]) -> dict[str, Any]:
        meta: dict[str, Any] = {"source_row": index}
        if raw_key is not None:
            key = str(raw_key)
            meta["source_key"] = key
        elif src_path:
            key = key_of_path(src_path)
        else:
            key = f"{getattr(self, 'shard_name', 'shard')}/{index:08d}"
        if src_path:
            meta["source_path"] = src_path
        if kept:
            meta["columns"] = kept
        key, dup = _unique(key, seen)
        if dup:
            return {"key": key, "error": "duplicate_key", "message": "key already seen in this shard"}
        if data:  # the way back to the image: this file's row, in the image column
            meta.update(source_table=getattr(self, "shard_url", None), source_column=self.cfg.image_column)
            return {"key": key, "data": data, "ext": None, "meta": meta}
        if src_path:  # read in _fetched, with the rest of its block
            url = resolve(src_path, self.base)
            meta["source_url"] = url
            return {"key": key, "url": url, "ext": _ext(url) if _ext(url) in IMAGE_EXTS else None, "meta": meta}
        return {"key": key, "error": "no_image", "message": "image column is empty"}

    def _fetched(self, rows: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The block's rows in order, path-valued images read meanwhile. A missing or
        unreadable file is its row's error, naming the URL; a transient failure (dropped
        connection, 5xx) is raised, so the shard is read again (Reader.read)."""
        pending = [r for r in rows if "url" in r]
        for r, got in zip(pending, fetch([r["url"] for r in pending], self.storage)):
            url = r.pop("url")
            if not isinstance(got, BaseException):
                r["data"] = got
            elif is_transient(got):
                raise got
            else:
                reason = "missing_image" if isinstance(got, FileNotFoundError) else "image_unreadable"
                r.update(error=reason, message=f"{url}: {type(got).__name__}: {got}"[:2000])
                r.pop("meta"), r.pop("ext")
        for r in rows:
            if "meta" in r:
                facts, r["meta"] = r["meta"], None
                row_meta.put(r, **facts)
            yield r


def _jsonable(v: Any) -> Any:
    return v.hex() if isinstance(v, (bytes, bytearray)) else v


class ImageFolderReader(Reader):
    """Image files directly inside one folder (the part of it a shard's URL selects,
    depthray/io/folders.py); key = file name without extension."""

    selection: dict | None = None

    def read(self, shard: Shard) -> Iterator[pa.Table]:
        folder, self.selection = split_url(shard.url)
        yield from super().read(Shard(shard.name, folder, shard.format))

    def samples(self, fs, path):
        files = select(fs.ls(path, detail=False), self.selection)
        seen: dict[str, int] = {}
        for p in files:
            key, dup = _unique(_strip_ext(posixpath.basename(p)), seen)
            if dup:
                yield {"key": key, "error": "duplicate_key",
                       "message": f"{posixpath.basename(p)}: another file has the same name stem"}
                continue
            row = {"key": key, "data": fs.cat_file(p), "ext": _ext(p)}
            row_meta.put(row, source_url=fs.unstrip_protocol(p))
            yield row


# Arrow IPC files (Hugging Face save_to_disk) are tables as Parquet files are: one reader.
READERS = {"webdataset": WebDatasetReader, "parquet": ParquetReader, "arrow": ParquetReader,
           "images": ImageFolderReader}


def read_shards(batch: pa.Table, cfg: InputConfig, storage: StorageConfig,
                sparse_member: str | None = None, sparse_column: str | None = None) -> Iterator[pa.Table]:
    """Ray Data UDF: a block of shard descriptors -> streamed blocks of sample rows.
    `sparse_member` / `sparse_column`: a WebDataset member / a Parquet or Arrow column carried
    along in `sparse` (the metric pipeline's)."""
    for item in batch.to_pylist():
        shard = Shard(name=item["name"], url=item["url"], format=item["format"])
        reader = READERS[shard.format](cfg, storage)
        if sparse_member and hasattr(reader, "sparse_member"):
            reader.sparse_member = sparse_member
        if sparse_column and hasattr(reader, "sparse_column"):
            reader.sparse_column = sparse_column
        yield from reader.read(shard)
