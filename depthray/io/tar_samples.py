"""WebDataset tar conventions, shared by the input reader and the output writer and reader.

A sample is the run of consecutive tar members sharing a key: the member path up to the
first dot of its file name (`a/b/x.depth.png` -> key `a/b/x`, extension `depth.png`).
"""

from __future__ import annotations

import io
import posixpath
import tarfile
from typing import IO, Iterable, Iterator


def split_key(name: str) -> tuple[str, str]:
    """Tar member name -> (sample key, extension), the WebDataset way (lower-case extension)."""
    head, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(head, stem) if head else stem), ext.lower()


def iter_samples(fileobj: IO[bytes]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream (key, {extension: bytes}) from a tar, one sample at a time; directories and
    hidden files (`._x.jpg` from macOS, `.DS_Store`) are skipped."""
    for key, members, _ in iter_samples_placed(fileobj):
        yield key, members


def iter_samples_placed(fileobj: IO[bytes]) -> Iterator[tuple[str, dict[str, bytes], dict[str, tuple[str, int, int]]]]:
    """`iter_samples` plus where each member lies: {extension: (member name, offset of its
    data in the uncompressed tar stream, size)}. For an uncompressed tar the offset is the
    file's byte offset, so a label leads back to its image with one range read."""
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        key, members, places = None, {}, {}
        for m in tar:
            if not m.isfile() or posixpath.basename(m.name).startswith("."):
                continue
            k, ext = split_key(m.name)
            if k != key and key is not None:
                yield key, members, places
                members, places = {}, {}
            key = k
            members[ext] = tar.extractfile(m).read()
            places[ext] = (m.name, m.offset_data, m.size)
        if key is not None:
            yield key, members, places


def tar_bytes(files: Iterable[tuple[str, bytes]]) -> bytes:
    """An uncompressed tar of (name, bytes), in the order given. POSIX (pax) format: a member
    name that fits ustar (100 bytes, ASCII) gets a plain ustar header, a longer or non-ASCII
    one an extended header that every tar reader (GNU tar, Python's tarfile and so
    webdataset) honours; ustar alone failed on keys from ~85 characters."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
