"""Decode stage: encoded image bytes -> RGB uint8, following what a viewer would display.

EXIF orientation is applied; gray, gray+alpha, palette, RGBA, CMYK, 16-bit and float
images become 8-bit RGB (alpha dropped, as predict.image_to_tensor does); animated and
multi-page files give their first frame. Images over `input.max_pixels` (decompression
bombs) or under `input.min_side` are rejected before their pixels are decoded. Every
failure becomes an error record; nothing raises out of the stage.
"""

from __future__ import annotations

import io
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

from depthray.config import InputConfig
from depthray.io import records, row_meta

# File extensions read as images (input folders, WebDataset members, passthrough outputs).
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm", "pnm")

_limit_lock = threading.Lock()
_limit_users = 0  # decodes now inside `own_pixel_limit`, all threads
_pil_limit: int | None = None  # PIL's limit as it was when the first of them entered


@contextmanager
def own_pixel_limit() -> Iterator[None]:
    """PIL's decompression-bomb guard off for the block: the decoder enforces
    input.max_pixels itself from the header, and PIL's own limit (a process-wide global,
    ~89 MP) would warn or refuse at another threshold. Scoped, not set at import, so every
    other reader in the process (listing, status, preview, eval) keeps PIL's guard. Counted
    across threads: overlapping decodes restore PIL's value when the last one leaves."""
    global _limit_users, _pil_limit
    with _limit_lock:
        if _limit_users == 0:
            _pil_limit = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _limit_users += 1
    try:
        yield
    finally:
        with _limit_lock:
            _limit_users -= 1
            if _limit_users == 0:
                Image.MAX_IMAGE_PIXELS = _pil_limit


class DecodeError(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if mode == "F" or arr.dtype.kind == "f":
            arr = np.clip(np.nan_to_num(arr.astype(np.float32)), 0.0, 1.0) * 255.0
        elif mode.startswith("I;16") or arr.max(initial=0) > 255:  # 16-bit range
            arr = arr.astype(np.float32) / 257.0
        arr = np.rint(arr).clip(0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")  # L, LA, P, RGBA, CMYK, YCbCr, 1, ...


def decode_image(data: bytes, max_pixels: int, min_side: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Bytes -> (RGB uint8 [H,W,3] as displayed, facts about the decode)."""
    if not data:
        raise DecodeError("empty", "zero-byte image")
    with own_pixel_limit():
        return _decode_image(data, max_pixels, min_side)


def _decode_image(data: bytes, max_pixels: int, min_side: int) -> tuple[np.ndarray, dict[str, Any]]:
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as e:
        raise DecodeError("not_an_image", f"{type(e).__name__}: {e}") from e
    w, h = img.size
    if w * h > max_pixels:
        raise DecodeError("too_large", f"{w}x{h} = {w * h} pixels > input.max_pixels={max_pixels}")
    meta: dict[str, Any] = {"format": img.format, "mode": img.mode}
    frames = getattr(img, "n_frames", 1)
    if frames > 1:
        meta["frames"] = frames  # we keep the first
    try:
        img.seek(0)
        orientation = img.getexif().get(0x0112, 1)
        if orientation not in (None, 1):  # exif_transpose copies even an upright image
            img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
        img.load()
    except Exception as e:
        raise DecodeError("decode", f"{type(e).__name__}: {e}") from e
    if orientation not in (None, 1):
        meta["exif_orientation"] = int(orientation)  # pixels are rotated to display order
    if min(img.size) < min_side:
        raise DecodeError("too_small", f"{img.size[0]}x{img.size[1]}: a side < input.min_side={min_side}")
    arr = np.asarray(img, dtype=np.uint8)
    return arr, meta


def decode_rgb(data: bytes) -> np.ndarray:
    """Bytes -> RGB uint8 [H,W,3] as a viewer displays it, without the job's size limits
    (for reading outputs back: passthrough images, preview inputs)."""
    return decode_image(data, max_pixels=1 << 62, min_side=1)[0]


def displayed_bytes(data: bytes) -> bytes:
    """The input image as any reader opens it: an image whose EXIF orientation is not 1 is
    re-encoded with its pixels in displayed orientation and the tag cleared (same format,
    other EXIF kept); every other image is returned byte-identical. A passthrough image
    then pairs with its depth map whether or not the reader applies EXIF. For an image the
    decoder took (within input.max_pixels): PIL's own limit is off here too."""
    with own_pixel_limit():
        return _displayed_bytes(data)


def _displayed_bytes(data: bytes) -> bytes:
    img = Image.open(io.BytesIO(data))
    exif = img.getexif()
    if exif.get(0x0112, 1) in (None, 1):
        return data
    fmt = img.format
    upright = ImageOps.exif_transpose(img)
    exif[0x0112] = 1
    kw: dict[str, Any] = {"exif": exif.tobytes()}
    if fmt == "JPEG":
        kw.update(quality=95, subsampling=0)
    if upright.mode not in ("RGB", "L", "RGBA", "I;16", "I", "F", "CMYK", "LA") or \
            (fmt == "JPEG" and upright.mode not in ("RGB", "L", "CMYK")):
        upright = upright.convert("RGB")
    buf = io.BytesIO()
    upright.save(buf, format=fmt, **kw)
    return buf.getvalue()


def decode_batch(batch: pa.Table, cfg: InputConfig, keep_input: bool) -> pa.Table:
    """Ray Data UDF: SAMPLE rows -> DECODED rows (errors and trailers pass through)."""
    out = []
    for row in batch.to_pylist():
        if records.is_trailer(row) or records.is_error(row):
            row["data"] = None
            out.append(row)
            continue
        try:
            arr, meta = decode_image(row["data"], cfg.max_pixels, cfg.min_side)
        except DecodeError as e:
            # an image read from a path (Parquet/Arrow path columns, folders): name the file
            src = row_meta.get(row).get("source_url")
            out.append(records.error_row(row, "decode", e.reason, f"{src}: {e}" if src else str(e)))
            continue
        row_meta.put(row, **meta)  # beside the reader's facts (source key, ...)
        # arr.data: the pixels go into the Arrow column without another ~1 MB copy
        row.update(pixels=np.ascontiguousarray(arr).data, height=arr.shape[0], width=arr.shape[1])
        if not row.get("ext") and meta.get("format"):  # Parquet inputs carry no file name
            row["ext"] = {"JPEG": "jpg", "TIFF": "tif"}.get(meta["format"], meta["format"].lower())
        if not keep_input:
            row["data"] = None
        elif meta.get("exif_orientation"):
            row["data"] = displayed_bytes(row["data"])  # passthrough in the depth's orientation
        out.append(row)
    return records.to_table(out, records.DECODED)
