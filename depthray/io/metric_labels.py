"""Metric depth labels in the job: the metric stage of pipelines/metric_depth.py.

Per image, after infer: the sample's sparse metric depth (LiDAR: the WebDataset member
`metric.member` or the Parquet/Arrow column `metric.column`, stored as `metric.encoding`) is
decoded, its points aligned to the relative label (depthray/metric_align.py, in the row's
`output_space`), and the fitted map stored as a 16-bit PNG of metres / scale, 0 = no depth:

    metres = png / 65535 * scale     (scale: the PNG's text chunk "depthray_metric_scale",
                                      meta.metric.png_scale; unit "m")

The fit is made on the label as the depth PNG stores it, so `meta.metric.scale * depth_png /
65535 + shift` is the metric map too (in disparity space: its inverse). The fit and its
verdict go into `meta.metric`; a low_confidence verdict is a label with its reasons. A row
without its member, or whose member does not decode or match the image's size, becomes an
error row: never a relative-only label in a metric output.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from depthray.metric_config import MetricConfig
from depthray.io import records, row_meta
from depthray.io.codecs import depth_as_stored, encode_png16
from depthray.metric_align import align_to_points, points_from_map

SCALE_KEY = "depthray_metric_scale"  # metric PNG: metres = value / 65535 * scale
UNIT_KEY = "depthray_metric_unit"
UNIT = "m"
PNG_DIVISORS = {"png16_mm": 1000.0, "png16_kitti": 256.0}  # stored value / divisor = metres


class SparseError(ValueError):
    """The sparse member cannot be read as metric depth."""


def decode_sparse(data: bytes, encoding: str) -> np.ndarray:
    """A sparse member's bytes -> float64 [H,W] metres, 0 or NaN where there is no return.
    Raises SparseError saying why it cannot be read."""
    try:
        if encoding == "npy":
            arr = np.load(io.BytesIO(bytes(data)), allow_pickle=False)
            if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
                raise SparseError(f"npy: expected a 2-D array of metres, got {arr.dtype} {arr.shape}")
            return arr.astype(np.float64)
        if encoding not in PNG_DIVISORS:
            raise SparseError(f"unknown encoding {encoding!r} (one of npy, {', '.join(PNG_DIVISORS)})")
        img = Image.open(io.BytesIO(bytes(data)))
        if img.format != "PNG" or img.mode not in ("I;16", "I;16B", "I"):
            raise SparseError(f"{encoding}: expected a 16-bit grayscale PNG, got {img.format} mode {img.mode}")
        return np.asarray(img).astype(np.float64) / PNG_DIVISORS[encoding]
    except SparseError:
        raise
    except Exception as e:
        raise SparseError(f"{encoding}: {type(e).__name__}: {e}") from e


def encode_metric_png16(metric: np.ndarray) -> tuple[bytes, float]:
    """Metres [H,W] -> (16-bit PNG of metres / scale, scale = the largest finite depth).
    A pixel without a finite positive depth is 0; every other at least 1."""
    ok = np.isfinite(metric) & (metric > 0)
    peak = float(metric[ok].max()) if ok.any() else 0.0
    scale = peak if peak > 0 else 1.0
    values = np.where(ok, np.maximum(np.where(ok, metric, 0.0) / scale, 1.0 / 65535), 0.0)
    return encode_png16(values, {SCALE_KEY: repr(scale), UNIT_KEY: UNIT}), scale


def decode_metric_png16(data: bytes, scale: float | None = None) -> np.ndarray:
    """A metric PNG -> float32 [H,W] metres, NaN where it holds no depth; scale from the
    argument, else the PNG's text chunk."""
    img = Image.open(io.BytesIO(bytes(data)))
    if scale is None:
        scale = float(getattr(img, "text", {})[SCALE_KEY])
    q = np.asarray(img).astype(np.float32)
    return np.where(q > 0, q / 65535.0 * float(scale), np.nan).astype(np.float32)


def align_row(row: dict[str, Any], relative: np.ndarray, cfg: MetricConfig) -> dict[str, Any]:
    """One labelled row -> the row with `metric_depth` and `meta.metric`, or an error row."""
    data, row["sparse"] = row.get("sparse"), None
    # a Parquet/Arrow row (its reader notes the row number) carries it in metric.column
    origin = {"column": cfg.column} if "source_row" in row_meta.get(row) else {"member": cfg.member}
    where = " ".join(f"{k} {v!r}" for k, v in origin.items())
    if data is None:
        return records.error_row(row, "metric", "no_sparse_depth",
                                 f"no sparse metric depth for this image (metric.{where}: WebDataset members "
                                 "and Parquet/Arrow columns are read)")
    try:
        sparse = decode_sparse(data, cfg.encoding)
    except SparseError as e:
        return records.error_row(row, "metric", "sparse_undecodable", f"{where}: {e}")
    if sparse.shape != relative.shape:
        return records.error_row(row, "metric", "sparse_size",
                                 f"{where} is {sparse.shape[1]}x{sparse.shape[0]}, the image "
                                 f"{relative.shape[1]}x{relative.shape[0]}")
    label = depth_as_stored(relative)  # what the depth PNG holds: the fit applies to it exactly
    space = row_meta.get(row).get("output_space", "depth")
    uv, depth = points_from_map(sparse)
    fit = align_to_points(label, space, uv, depth, **cfg.align_options())
    row["metric_depth"], png_scale = encode_metric_png16(fit.apply(label))
    row_meta.put(row, metric={"unit": UNIT, "png_scale": png_scale, "source": "sparse", **origin,
                              "encoding": cfg.encoding, **fit.to_meta()})
    return row


def align_batch(batch: pa.Table, cfg: MetricConfig, align=align_row) -> pa.Table:
    """Ray Data UDF: PREDICTED rows -> PREDICTED rows with `metric_depth` and `meta.metric`
    (errors and trailers pass through; a row that cannot be aligned becomes an error row).
    `align(row, relative, cfg)`: to the sparse member (here) or to a reference model's map
    (io/metric_reference.py)."""
    out = []
    for row in batch.to_pylist():
        if records.is_trailer(row) or records.is_error(row):
            row["sparse"] = None
            out.append(row)
            continue
        try:
            relative = np.frombuffer(row["depth_f32"], dtype=np.float32).reshape(row["height"], row["width"])
            out.append(align(row, relative, cfg))
        except Exception as e:  # one image's failure must not take its neighbours (nor the job)
            out.append(records.error_row(row, "metric", "metric", f"{type(e).__name__}: {e}"))
    return records.to_table(out, records.PREDICTED)
