"""The rows that flow between pipeline stages, as fixed Arrow schemas.

Every row carries `source` (input shard name) and `key`. A row whose `error` is set is an
error record: later stages pass it through untouched and the sink writes it to `_errors/`.
A row whose `key` is null is a shard *trailer*: the reader emits one after the last row of
a shard with `shard_total` = rows emitted before it (and `error` set when the shard could
not be read to the end). The driver commits a shard once it has seen all of them written.

Fixed schemas (instead of inferring types per block) keep all-null columns typed, so
blocks from different tasks always concatenate.
"""

from __future__ import annotations

from typing import Any, Iterable

import pyarrow as pa

from depthray.io.row_meta import META

_COMMON = [
    ("source", pa.string()),
    ("key", pa.string()),
    ("stage", pa.string()),  # stage that failed (errors only)
    ("error", pa.string()),  # short reason, e.g. "decode", "too_large" (errors only)
    ("message", pa.string()),
    ("shard_total", pa.int64()),  # trailer only
    ("data", pa.binary()),  # encoded input image (dropped after decode unless passed through)
    ("ext", pa.string()),  # input image extension, e.g. "jpg"
    # the sample's sparse metric depth member, as stored (pipelines/metric_depth.py reads it;
    # null otherwise); the metric stage drops it once aligned
    ("sparse", pa.binary()),
]

SAMPLE = pa.schema(_COMMON + [("meta", META)])  # meta: typed facts (io/row_meta.py), the reader's first

DECODED = pa.schema(
    _COMMON
    + [
        ("pixels", pa.binary()),  # RGB uint8, row-major [height,width,3]
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("meta", META),  # + decode facts (orientation, original mode, frames)
    ]
)

PREDICTED = pa.schema(
    _COMMON
    + [
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("meta", META),  # + the label's space
        ("depth_f32", pa.binary()),  # float32 [height,width] in [0,1]
        ("uncertainty_f32", pa.binary()),  # float32 [height,width] >= 0
        ("num_views", pa.int32()),
        ("ensemble_size", pa.int32()),
        ("infer_s", pa.float64()),  # this row's share of its batch's model time
        # pipelines/metric_depth.py with metric.reference_model: the reference model's depth,
        # float32 metres [height,width] (io/metric_reference.py consumes and drops it)
        ("reference_f32", pa.binary()),
        # pipelines/metric_depth.py: 16-bit PNG of metres / scale (io/metric_labels.py)
        ("metric_depth", pa.binary()),
    ]
)

ENCODED = pa.schema(
    _COMMON
    + [
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("meta", META),  # + the quality verdict
        ("depth", pa.binary()),  # 16-bit PNG of depth * 65535
        ("uncertainty", pa.binary()),  # 16-bit PNG of uncertainty / scale * 65535
        ("uncertainty_scale", pa.float32()),
        ("uncertainty_mean", pa.float32()),
        ("num_views", pa.int32()),
        ("ensemble_size", pa.int32()),
        ("infer_s", pa.float64()),
        ("metric_depth", pa.binary()),  # as in PREDICTED; null unless the metric stage ran
    ]
)

# What the write stage returns to the driver: one row per (batch, source shard).
ACK = pa.schema(
    [
        ("source", pa.string()),
        ("rows", pa.int64()),  # rows consumed, trailer included
        ("outputs", pa.int64()),
        ("errors", pa.int64()),
        ("shard_total", pa.int64()),  # from the trailer when this batch held it
        ("shard_error", pa.string()),  # trailer's error: the shard could not be read
        ("parts", pa.list_(pa.string())),  # staged, relative to the output (see io/sinks.py)
        ("part_bytes", pa.list_(pa.int64())),
        ("error_parts", pa.list_(pa.string())),
        ("error_part_bytes", pa.list_(pa.int64())),
        ("error_reasons", pa.string()),  # JSON {reason: count}
        ("infer_s", pa.float64()),
        # JSON {member extension: count}: image members of WebDataset samples left unlabelled
        # beside the one input.image_member chose (e.g. "seg.png" beside "jpg")
        ("unlabelled_members", pa.string()),
    ]
)

# `_errors/` files, whatever the output format.
ERRORS = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("stage", pa.string()),
        ("error", pa.string()),
        ("message", pa.string()),
    ]
)


def to_table(rows: Iterable[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows (dicts; missing columns become null, extra keys are dropped) -> Arrow table."""
    names = schema.names
    cols: dict[str, list] = {n: [] for n in names}
    for row in rows:
        for n in names:
            cols[n].append(row.get(n))
    return pa.table(cols, schema=schema)


def is_trailer(row: dict[str, Any]) -> bool:
    return row.get("key") is None


def is_error(row: dict[str, Any]) -> bool:
    return row.get("key") is not None and row.get("error") is not None


def error_row(row: dict[str, Any], stage: str, error: str, message: str) -> dict[str, Any]:
    """Turn `row` into an error record (keeps source and key, drops payload)."""
    return {
        "source": row.get("source"),
        "key": row.get("key"),
        "stage": stage,
        "error": error,
        # a lone surrogate (a name that was not UTF-8) in a message would fail the whole table
        "message": message[:2000].encode("utf-8", "backslashreplace").decode("utf-8"),
        "ext": row.get("ext"),
    }
