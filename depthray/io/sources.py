"""Input side: list shards from a URL pattern, and read a shard into sample rows.

A shard is the unit of work (one WebDataset .tar, one Parquet file, or one folder of
image files). Readers implement `samples(fs, path)`; the base class handles batching,
trailers, and turning storage failures into records instead of exceptions.
"""

from __future__ import annotations

import logging
import posixpath
import re
import time
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa

from depthray.config import ConfigError, InputConfig, StorageConfig
from depthray.io import records
from depthray.io.decode import IMAGE_EXTS
from depthray.io.fs import filesystem, full_url
from depthray.io.tar_samples import iter_samples

log = logging.getLogger(__name__)

SHARD_EXTS = {"tar": "webdataset", "parquet": "parquet"}
LIST_FILE_EXTS = (".txt", ".lst", ".list")
SHARD_KEY = "<shard>"  # key of an error record about a whole shard (e.g. truncated tar)


@dataclass(frozen=True)
class Shard:
    name: str  # relative path without extension; names output parts and manifests
    url: str  # full URL (file://, s3://, ...) of the file, or of the folder for images
    format: str  # webdataset | parquet | images


# ---------------------------------------------------------------------------- listing


def expand_braces(pattern: str) -> list[str]:
    """Expand `{a,b}` alternatives and `{000..099}` zero-padded ranges (shell style)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    elif "," in body:
        options = body.split(",")
    else:  # a literal brace, not an expansion
        return [head + "{" + body + "}" + t for t in expand_braces(tail)]
    return [e for opt in options for e in expand_braces(head + opt + tail)]


def _ext(path: str) -> str:
    base = posixpath.basename(path.rstrip("/"))
    return base.rsplit(".", 1)[-1].lower() if "." in base else ""


def _has_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _strip_ext(rel: str) -> str:
    head, base = posixpath.split(rel)
    if "." in base:
        base = base.rsplit(".", 1)[0]
    return posixpath.join(head, base) if head else base


def safe_name(rel: str) -> str:
    """A shard name usable as a relative output path: no '..', no leading '/', and no part
    starting with '_' or '.' (readers skip those: pyarrow discovery would hide the shard)."""
    parts = [p for p in rel.replace("\\", "/").split("/") if p not in ("", ".")]
    parts = ["up" if p == ".." else re.sub(r"[^\w.\-=+@]", "_", p) for p in parts]
    return "/".join(f"x{p}" if p.startswith(("_", ".")) else p for p in parts) or "shard"


def _name_shards(urls: list[str], formats: list[str], base: str | None = None) -> list[Shard]:
    paths = [u.split("://", 1)[-1].rstrip("/") for u in urls]
    if base is None:
        base = posixpath.commonpath(paths) if len(paths) > 1 else posixpath.dirname(paths[0])
        if base in paths:  # a single folder shard
            base = posixpath.dirname(base)
    shards = []
    for url, path, fmt in zip(urls, paths, formats):
        rel = posixpath.relpath(path, base) if base else path
        name = rel if fmt == "images" else _strip_ext(rel)
        shards.append(Shard(name=safe_name(name), url=url, format=fmt))
    seen: dict[str, str] = {}
    for s in shards:
        if s.name in seen:
            raise ConfigError(f"input.url: shards {seen[s.name]} and {s.url} map to the same name {s.name!r}")
        seen[s.name] = s.url
    return shards


def _format_of(path: str, declared: str) -> str:
    if declared != "auto":
        return declared
    ext = _ext(path)
    if ext in SHARD_EXTS:
        return SHARD_EXTS[ext]
    raise ConfigError(f"input.format: cannot tell the format of {path!r}; set input.format")


def _list_folder(fs, root: str, declared: str) -> tuple[list[str], list[str]]:
    """Shard files in a folder, or (for image folders) every folder that holds images."""
    files = sorted(p for p in fs.find(root) if not posixpath.basename(p).startswith((".", "_")))
    shard_files = [p for p in files if _ext(p) in SHARD_EXTS and declared in ("auto", SHARD_EXTS[_ext(p)])]
    if shard_files and declared != "images":
        return [full_url(fs, p) for p in shard_files], [SHARD_EXTS[_ext(p)] for p in shard_files]
    dirs = sorted({posixpath.dirname(p) for p in files if _ext(p) in IMAGE_EXTS})
    return [full_url(fs, d) for d in dirs], ["images"] * len(dirs)


def list_shards(cfg: InputConfig, storage: StorageConfig) -> list[Shard]:
    """Resolve `input.url` (glob, brace range, list file or folder) to shards, in order.

    Brace-expanded names are not checked for existence here (that would be one request
    per shard); a missing shard is reported by the reader and retried on the next run.
    """
    url = cfg.url
    list_base = None
    if url.lower().endswith(LIST_FILE_EXTS):
        fs, path = filesystem(url, storage)
        lines = fs.cat_file(path).decode().splitlines()
        patterns = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
        # A list file's entries are named relative to the list file's own folder, never to
        # whatever folder they happen to share: an entry added from elsewhere renames nothing.
        list_base = posixpath.dirname(path)
    else:
        patterns = [url]
    urls: list[str] = []
    formats: list[str] = []
    # Names are relative to the fixed part of input.url (the folder before any wildcard or
    # brace), not to whatever happened to match, so they stay the same from run to run
    # (resume depends on it).
    base = None
    if len(patterns) == 1:
        fixed = re.split(r"[*?\[{]", patterns[0], maxsplit=1)[0]
        if fixed != patterns[0]:
            # (+ "x": resolves a relative local path while keeping a trailing "/" meaningful)
            base = posixpath.dirname(filesystem(fixed + "x", storage)[1])
    for pattern in patterns:
        for item in expand_braces(pattern):
            fs, path = filesystem(item, storage)
            if _has_glob(path):
                for p in sorted(fs.glob(path)):
                    urls.append(full_url(fs, p))
                    formats.append("images" if fs.isdir(p) else _format_of(p, cfg.format))
            elif _ext(path) in SHARD_EXTS or (cfg.format in SHARD_EXTS.values() and not fs.isdir(path)):
                urls.append(full_url(fs, path))
                formats.append(_format_of(path, cfg.format))
            elif fs.isdir(path):
                found, fmts = _list_folder(fs, path, cfg.format)
                urls += found
                formats += fmts
                if len(patterns) == 1:
                    base = path.rstrip("/")  # names relative to the folder given
            else:
                raise ConfigError(f"input.url: {item} is neither a shard file nor a folder")
    if not urls:
        raise ConfigError(f"input.url: nothing matches {url!r}")
    if base is not None:
        paths = [u.split("://", 1)[-1].rstrip("/") for u in urls]
        if base in paths:  # images directly in the folder given: one shard named after it
            base = posixpath.dirname(base)
    return _name_shards(urls, formats, list_base if list_base is not None else base)


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
                    size += len(row.get("data") or b"")
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


def _unique(key: str, seen: dict[str, int]) -> tuple[str, bool]:
    """Keys are unique per shard: a repeat gets a `~dupN` suffix and becomes an error."""
    n = seen.get(key, 0)
    seen[key] = n + 1
    return (key, False) if n == 0 else (f"{key}~dup{n}", True)


class WebDatasetReader(Reader):
    """Tar members grouped by WebDataset key (path up to the first dot of the basename)."""

    def _sample(self, key: str, members: dict[str, bytes], seen: dict[str, int]) -> dict[str, Any]:
        key, dup = _unique(key, seen)
        if dup:
            return {"key": key, "error": "duplicate_key",
                    "message": "key already seen in this shard (tar members not grouped by key?)"}
        for ext, data in members.items():
            if ext.rsplit(".", 1)[-1] in IMAGE_EXTS:
                return {"key": key, "data": data, "ext": ext.rsplit(".", 1)[-1]}
        return {"key": key, "error": "no_image",
                "message": f"sample has no image member (members: {', '.join(sorted(members))})"}

    def samples(self, fs, path):
        seen: dict[str, int] = {}
        with fs.open(path, "rb") as f:
            for key, members in iter_samples(f):
                yield self._sample(key, members, seen)


class ParquetReader(Reader):
    """Rows of a Parquet file: `input.image_column` (bytes, or a {bytes, path} struct as
    Hugging Face datasets write it) and `input.key_column` (row number when absent)."""

    def samples(self, fs, path):
        import pyarrow.parquet as pq

        seen: dict[str, int] = {}
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            if self.cfg.image_column not in names:
                raise ValueError(f"no column {self.cfg.image_column!r} (columns: {', '.join(names)})")
            has_key = self.cfg.key_column in names
            cols = [self.cfg.image_column] + ([self.cfg.key_column] if has_key else [])
            index = 0
            for batch in pf.iter_batches(batch_size=self.rows_per_block, columns=cols):
                images = batch.column(self.cfg.image_column).to_pylist()
                keys = batch.column(self.cfg.key_column).to_pylist() if has_key else [None] * len(images)
                for raw_key, value in zip(keys, images):
                    key, dup = _unique(str(raw_key) if raw_key is not None else f"{index:08d}", seen)
                    index += 1
                    if isinstance(value, dict):
                        value = value.get("bytes")
                    if dup:
                        yield {"key": key, "error": "duplicate_key", "message": "key already seen in this shard"}
                    elif not value:
                        yield {"key": key, "error": "no_image", "message": "image column is empty"}
                    else:
                        yield {"key": key, "data": bytes(value), "ext": None}


class ImageFolderReader(Reader):
    """Image files directly inside one folder; key = file name without extension."""

    def samples(self, fs, path):
        files = sorted(p for p in fs.ls(path, detail=False)
                       if _ext(p) in IMAGE_EXTS and not posixpath.basename(p).startswith("."))
        seen: dict[str, int] = {}
        for p in files:
            key, dup = _unique(_strip_ext(posixpath.basename(p)), seen)
            if dup:
                yield {"key": key, "error": "duplicate_key",
                       "message": f"{posixpath.basename(p)}: another file has the same name stem"}
                continue
            yield {"key": key, "data": fs.cat_file(p), "ext": _ext(p)}


READERS = {"webdataset": WebDatasetReader, "parquet": ParquetReader, "images": ImageFolderReader}


def read_shards(batch: pa.Table, cfg: InputConfig, storage: StorageConfig) -> Iterator[pa.Table]:
    """Ray Data UDF: a block of shard descriptors -> streamed blocks of sample rows."""
    for item in batch.to_pylist():
        shard = Shard(name=item["name"], url=item["url"], format=item["format"])
        yield from READERS[shard.format](cfg, storage).read(shard)
