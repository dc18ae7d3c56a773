"""Depth encodings: 16-bit PNG depth, and uncertainty PNG with its scale.

Readers need nothing from depthray to decode these: `np.asarray(Image.open(f)) / 65535`
gives depth in [0,1]; uncertainty is `png / 65535 * scale`, with `scale` stored in the PNG's
text chunk "depthray_uncertainty_scale", in the Parquet column `uncertainty_scale` and in
the WebDataset JSON. Colour maps for previews: depthray/visualize.py.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

try:  # ISA-L's deflate: same zlib stream, ~4x faster than zlib's fastest (docs/scale.md)
    from isal import isal_zlib as _isal
except ImportError:  # pragma: no cover - isal is a dependency; stock zlib still works
    _isal = None

from depthray.io import records, row_meta
from depthray.quality import assess, row_verdict

SCALE_KEY = "depthray_uncertainty_scale"
SPACE_KEY = "depthray_output_space"  # what a depth PNG holds: depth (0 = near) or disparity (1 = near)


_crc32 = _isal.crc32 if _isal is not None else zlib.crc32  # ISA-L's: ~4x faster, same value


def _chunk(tag: bytes, data: bytes) -> list[bytes]:
    """A PNG chunk as pieces, joined once by the caller (an IDAT is ~0.5 MB: no copies)."""
    return [struct.pack(">I", len(data)), tag, data, struct.pack(">I", _crc32(data, _crc32(tag)))]


def _deflate(data: bytes) -> bytes:
    """A zlib stream of `data`: ISA-L level 1 where installed (~2 ms per 640x480 map),
    else zlib level 1 with its run-length strategy (~8 ms); same size within 0.1 %."""
    if _isal is not None:
        return _isal.compress(data, 1)
    z = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    return z.compress(data) + z.flush()


def _quantize16(values: np.ndarray) -> np.ndarray:
    """[0,1] floats -> the uint16 levels a 16-bit PNG of them holds."""
    v = np.clip(values, 0.0, 1.0)  # a new array: scaled and rounded in place
    v *= 65535.0
    return np.rint(v, out=v).astype(np.uint16)


def _png16(values: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    """A standard 16-bit grayscale PNG (any reader opens it), written here because PIL's
    writer spent ~45 ms per 640x480 map: every row gets PNG's "Up" filter (byte-wise
    difference to the row above, in numpy) and the rows are deflated fast (`_deflate`):
    smaller than PIL at level 3 and ~10x faster (benchmarks/scale.py prints the table;
    docs/scale.md)."""
    q = _quantize16(values).astype(">u2")  # [H,W] big-endian, as PNG stores it
    h, w = q.shape
    raw = q.view(np.uint8).reshape(h, w * 2)
    rows = np.empty((h, w * 2 + 1), np.uint8)
    rows[:, 0] = 2  # filter type Up (the first row's "above" is zeros: it stays as is)
    rows[0, 1:] = raw[0]
    np.subtract(raw[1:], raw[:-1], out=rows[1:, 1:])  # uint8 wrap-around = PNG's mod 256
    idat = _deflate(rows.data)
    pieces = [b"\x89PNG\r\n\x1a\n", *_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0))]
    for k, t in (text or {}).items():
        pieces += _chunk(b"tEXt", k.encode("latin-1") + b"\0" + t.encode("latin-1"))
    return b"".join(pieces + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))


encode_png16 = _png16  # [0,1] floats (+ text chunks) -> 16-bit PNG: the metric labels' writer too


def encode_depth_png16(depth: np.ndarray, output_space: str | None = None) -> bytes:
    """float [H,W] in [0,1] -> 16-bit grayscale PNG of depth * 65535. `output_space`
    ("depth": 0 = near, "disparity": 1 = near) goes into the PNG's text chunk, so a file that
    leaves its row (`depthray predict`'s folder, a copied PNG) still says what it holds."""
    return _png16(depth, {SPACE_KEY: output_space} if output_space else None)


def decode_depth_png16(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.float32) / 65535.0


def depth_as_stored(depth: np.ndarray) -> np.ndarray:
    """float [H,W] -> what `decode_depth_png16` reads back from `encode_depth_png16(depth)`,
    value for value, without writing or decoding the PNG."""
    return _quantize16(depth).astype(np.float32) / 65535.0


def depth_png_space(data: bytes) -> str | None:
    """The output space a depth PNG's text chunk records (None: not a PNG, or written without)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    return getattr(Image.open(io.BytesIO(data)), "text", {}).get(SPACE_KEY)


def decode_depth(data: bytes) -> np.ndarray:
    """Any stored depth map -> float32 [H,W] in [0,1]: 16-bit PNG (ours), 8-bit PNG, or .npy."""
    if data[:6] == b"\x93NUMPY":
        return np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32)
    arr = np.asarray(Image.open(io.BytesIO(data)))
    return arr.astype(np.float32) / (255.0 if arr.dtype == np.uint8 else 65535.0)


def encode_uncertainty_png16(unc: np.ndarray) -> tuple[bytes, float]:
    """float [H,W] >= 0 -> (16-bit PNG of unc / scale, scale); scale = max (1 if all zero)."""
    peak = float(np.max(unc)) if unc.size else 0.0
    scale = peak if peak > 0 and np.isfinite(peak) else 1.0
    return _png16(unc / scale, {SCALE_KEY: repr(scale)}), scale


def decode_uncertainty_png16(data: bytes, scale: float | None = None) -> np.ndarray:
    """16-bit uncertainty PNG -> float32 [H,W]; scale from the argument, else the PNG's text."""
    img = Image.open(io.BytesIO(data))
    if scale is None:
        scale = float(getattr(img, "text", {}).get(SCALE_KEY, "1.0"))
    return np.asarray(img, dtype=np.float32) / 65535.0 * float(scale)


def column_buffers(batch: pa.Table, name: str) -> list[Any]:
    """A binary column's values as zero-copy buffers (None where null): the float maps are
    ~1.2 MB per 640x480 image, and copying them into Python bytes cost ~1 ms each."""
    if name not in batch.column_names:
        return [None] * batch.num_rows
    arr = batch.column(name).combine_chunks()
    if pa.types.is_null(arr.type):
        return [None] * len(arr)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset: arr.offset + len(arr) + 1]
    data = memoryview(arr.buffers()[2] or b"")
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    return [data[offsets[i]: offsets[i + 1]] if valid[i] else None for i in range(len(arr))]


def encode_batch(batch: pa.Table, quality: Any = None) -> pa.Table:
    """Ray Data UDF: PREDICTED rows -> ENCODED rows (errors and trailers pass through).

    With `quality` (a QualityConfig) each row's metadata gets the confidence verdict:
    scores, thresholds, pass/fail, reasons and `low_confidence`; a row with a metric fit
    that is not "ok" is `low_confidence` too (quality.row_verdict).
    """
    out = []
    maps = [column_buffers(batch, name) for name in ("depth_f32", "uncertainty_f32")]
    small = batch.drop_columns([n for n in ("depth_f32", "uncertainty_f32") if n in batch.column_names])
    for i, row in enumerate(small.to_pylist()):
        if records.is_trailer(row) or records.is_error(row):
            out.append(row)
            continue
        h, w = row["height"], row["width"]
        try:
            depth = np.frombuffer(maps[0][i], dtype=np.float32).reshape(h, w)
            unc = np.frombuffer(maps[1][i], dtype=np.float32).reshape(h, w)
            row["depth"] = encode_depth_png16(depth, row_meta.get(row).get("output_space", "depth"))
            row["uncertainty"], row["uncertainty_scale"] = encode_uncertainty_png16(unc)
            row["uncertainty_mean"] = float(unc.mean())
            verdict = row_verdict(assess(depth, unc, quality) if quality is not None else None,
                                  row_meta.get(row).get("metric"))
            if verdict:
                row_meta.put(row, **verdict)
        except Exception as e:  # a bad result must not take its neighbours with it (nor the job)
            out.append(records.error_row(row, "encode", "encode", f"{type(e).__name__}: {e}"))
            continue
        out.append(row)
    return records.to_table(out, records.ENCODED)
