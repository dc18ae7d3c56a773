"""Filesystems for any fsspec URL, with S3 endpoint handling and atomic writes.

Every stage calls `filesystem(url, storage)` itself instead of receiving a filesystem
object, so Ray workers build their own clients (fsspec caches them per process).
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import Any

import fsspec
from fsspec.core import split_protocol, url_to_fs

from depthray.config import StorageConfig

_S3_PROTOCOLS = ("s3", "s3a")


def storage_options(url: str, storage: StorageConfig) -> dict[str, Any]:
    """fsspec options for `url`: the S3 endpoint, region, retries; nothing for other URLs."""
    protocol = split_protocol(url)[0] or "file"
    if protocol not in _S3_PROTOCOLS:
        return {}
    # botocore reads AWS_ENDPOINT_URL itself in recent versions, but not every version
    # does, so pass it explicitly; the config wins over the environment.
    endpoint = (
        storage.endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    opts: dict[str, Any] = {
        "anon": storage.anon,
        # Adaptive mode retries 5xx, throttling and timeouts with backoff.
        "config_kwargs": {"retries": {"max_attempts": max(1, storage.retries), "mode": "adaptive"}},
    }
    if storage.timeout_s is not None:  # a stalled request times out and is retried
        opts["config_kwargs"].update(connect_timeout=storage.timeout_s, read_timeout=storage.timeout_s)
    if endpoint:
        opts["endpoint_url"] = endpoint
    if storage.region:
        opts["client_kwargs"] = {"region_name": storage.region}
    return opts


def filesystem(url: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path without protocol) for `url`; local paths need no protocol."""
    return url_to_fs(url, **storage_options(url, storage or StorageConfig()))


def full_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path from `fs` back to a URL another process can open (protocol included)."""
    return fs.unstrip_protocol(path)


def join(base: str, *parts: str) -> str:
    """Join URL/path segments with '/' (never os.sep: object stores use '/')."""
    return posixpath.join(base.rstrip("/"), *[p.strip("/") for p in parts])


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes, durable: bool = True) -> None:
    """Make `path` appear complete or not at all.

    Object stores: one PUT (an object is never visible half-written). Local and other
    filesystems: write a hidden temporary sibling, then rename over the final name.
    `durable=False` skips the two fsyncs: still never half-written for a reader or after a
    killed process, but a power loss may lose the file. For files a re-run simply writes
    again (`depthray predict`'s folder), where the fsyncs cost more than the rest of
    writing (io/sinks.py FolderSink).
    """
    parent = posixpath.dirname(path)
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    fs.makedirs(parent, exist_ok=True)
    tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())  # the bytes reach the disk before the name does
        os.replace(tmp, path)
        if durable:
            fsync_dir(parent)  # ... and the new name survives a power loss
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def fsync_dir(path: str) -> None:
    """Make a rename or a new file in `path` durable (local filesystems only)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; nothing more to do there
    finally:
        os.close(fd)


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Write `path` only if it does not exist; False if it does. Atomic where the store
    supports it: O_EXCL on local disk, a conditional PUT (If-None-Match) on S3. Elsewhere
    an exists-then-write, which two writers can race (docs/reliability.md says so)."""
    if is_local(fs):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(posixpath.dirname(path))
        return True
    if "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        try:
            fs.pipe_file(path, data, mode="create")
            return True
        except Exception as e:  # 412 Precondition Failed: somebody created it first
            if "PreconditionFailed" in repr(e) or "412" in repr(e) or isinstance(e, FileExistsError):
                return False
            raise
    if fs.exists(path):
        return False
    fs.pipe_file(path, data)
    return True
