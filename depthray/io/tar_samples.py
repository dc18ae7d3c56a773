"""WebDataset tar conventions, shared by the input reader and the output writer and reader.

A sample is the run of consecutive tar members sharing a key: the member path up to the
first dot of its file name (`a/b/x.depth.png` -> key `a/b/x`, extension `depth.png`).
"""

from __future__ import annotations

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


def tar_member(name: str, data: bytes) -> list[bytes]:
    """One member as it lies in a POSIX (pax) tar: header(s), data, zero padding to a block
    (pieces, joined once with the whole part: a depth PNG is not copied twice).
    A name that fits ustar (100 bytes, ASCII) gets a plain ustar header, a longer or
    non-ASCII one an extended header that every tar reader (GNU tar, Python's tarfile and
    so webdataset) honours; ustar alone failed on keys from ~85 characters. Members are
    built one by one so a writer can set aside a sample whose member cannot be built
    (depthray/io/sinks.py) and still write the others; bytes as `tarfile` writes them."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")  # TarFile's own defaults
    return [header, data, tarfile.NUL * (-len(data) % tarfile.BLOCKSIZE)]


def tar_join(pieces: Iterable[bytes]) -> bytes:
    """An uncompressed tar of `tar_member` pieces, in the order given, ended as `tarfile`
    ends an archive: two zero blocks, then zeros to a whole record."""
    pieces = list(pieces)
    size = sum(map(len, pieces)) + 2 * tarfile.BLOCKSIZE
    return b"".join(pieces + [tarfile.NUL * (2 * tarfile.BLOCKSIZE + -size % tarfile.RECORDSIZE)])


def tar_bytes(files: Iterable[tuple[str, bytes]]) -> bytes:
    """An uncompressed tar of (name, bytes), in the order given (see `tar_member`)."""
    return tar_join(piece for name, data in files for piece in tar_member(name, data))
