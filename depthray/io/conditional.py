"""Compare-and-swap on one small file: the output lease (depthray/job/lease.py).

`read_versioned` returns a file's bytes with a version; `write_if` replaces the file only
if it still has that version (None: only if it does not exist), and returns the new
version, or None when somebody else wrote it first. Of several writers holding the same
version, exactly one succeeds.

- S3: the version is the object's ETag; the write is a PUT with `If-Match` (`If-None-Match: *`
  to create), which S3 evaluates atomically on the server (moto does too).
- Local disk: the version is a hash of the bytes; read-compare-replace runs under an
  exclusive `flock` on a hidden sibling lock file, so processes on this host (and NFSv4
  clients, whose locks the server arbitrates) take turns.
- Other fsspec stores: read-compare-write without a lock; two writers in the same instant
  can both win there (docs/reliability.md says so).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import posixpath

from depthray.io.fs import create_exclusive, is_local, write_atomic


def _is_s3(fs) -> bool:
    return "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _precondition_failed(e: BaseException) -> bool:
    """412 (the ETag moved on) or 404 (the object went away): somebody else wrote first."""
    cause = getattr(e, "__cause__", None) or e
    code = str((getattr(cause, "response", None) or {}).get("Error", {}).get("Code", ""))
    return isinstance(e, (FileNotFoundError, FileExistsError)) or code in ("PreconditionFailed", "412") \
        or "PreconditionFailed" in repr(e)


@contextlib.contextmanager
def _locked(path: str):
    lock = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.lock")
    os.makedirs(posixpath.dirname(path), exist_ok=True)
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _local_read(path: str) -> tuple[bytes | None, str | None]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None, None
    return data, hashlib.sha1(data).hexdigest()


def read_versioned(fs, path: str) -> tuple[bytes | None, str | None]:
    """(bytes, version) of `path`, or (None, None) when it does not exist."""
    if is_local(fs):
        return _local_read(path)
    if _is_s3(fs):
        from fsspec.asyn import sync

        bucket, key, _ = fs.split_path(path)

        async def get():
            resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
            try:
                return await resp["Body"].read(), resp["ETag"]
            finally:
                resp["Body"].close()

        try:
            return sync(fs.loop, get)
        except FileNotFoundError:
            return None, None
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None, None
    return data, hashlib.sha1(data).hexdigest()


def write_if(fs, path: str, data: bytes, version: str | None) -> str | None:
    """Write `data` if `path` still has `version` (None: does not exist); the new version,
    or None if the precondition failed."""
    if is_local(fs):
        with _locked(path):
            if _local_read(path)[1] != version:
                return None
            write_atomic(fs, path, data)
        return hashlib.sha1(data).hexdigest()
    if _is_s3(fs):
        try:
            if version is None:
                out = fs.pipe_file(path, data, mode="create")
            else:
                out = fs.pipe_file(path, data, IfMatch=version)
        except Exception as e:
            if _precondition_failed(e):
                return None
            raise
        return (out or {}).get("ETag") or read_versioned(fs, path)[1]
    if version is None:
        return hashlib.sha1(data).hexdigest() if create_exclusive(fs, path, data) else None
    if read_versioned(fs, path)[1] != version:
        return None
    fs.pipe_file(path, data)
    return hashlib.sha1(data).hexdigest()


def delete_if(fs, path: str, version: str) -> bool:
    """Delete `path` if it still has `version`; False if it changed or is gone."""
    if is_local(fs):
        with _locked(path):
            if _local_read(path)[1] != version:
                return False
            os.remove(path)
        return True
    if _is_s3(fs):
        bucket, key, _ = fs.split_path(path)
        try:
            fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
        except Exception as e:
            if _precondition_failed(e):
                return False
            raise
        fs.invalidate_cache(path)
        return True
    if read_versioned(fs, path)[1] != version:
        return False
    fs.rm_file(path)
    return True
