"""A row's metadata: one typed struct between stages, JSON in the outputs.

Each stage adds facts to the row's `meta` (where the image came from, how it decoded, what
space the label holds, the quality verdict). Between stages they travel as the typed struct
`META` (depthray/io/records.py's row schemas use it), so a misspelt or mistyped fact fails
where it is set instead of landing in a label; the outputs keep `meta` as JSON text (Parquet
column, WebDataset `{key}.json`), so every reader written for them keeps working.

Adding a metadata field is its line in `META` and the stage that fills it (`put`).
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

QUALITY = pa.struct([
    ("passed", pa.bool_()),
    ("uncertainty_mean", pa.float64()),
    ("valid_fraction", pa.float64()),
    ("max_uncertainty_mean", pa.float64()),  # thresholds as applied (null = not checked)
    ("min_valid_fraction", pa.float64()),
    ("max_pixel_uncertainty", pa.float64()),
    ("reasons", pa.list_(pa.string())),  # why the verdict failed; empty when it passed
])

# pipelines/metric_depth.py: the per-image fit to sparse metric depth or to a metric model's
# map (depthray/metric_align.py)
METRIC = pa.struct([
    ("unit", pa.string()),  # "m": metric PNG value / 65535 * png_scale = metres (0 = no depth)
    ("png_scale", pa.float64()),
    ("source", pa.string()),  # what it was aligned to: "sparse" (member) | "model" (reference_model)
    ("reference_model", pa.string()),  # source "model": the metric checkpoint (metric.reference_model)
    ("member", pa.string()),  # the sample's member it was aligned to, and how that stored metres
    ("column", pa.string()),  # ... or the Parquet/Arrow input's column
    ("encoding", pa.string()),
    ("scale", pa.float64()),  # fit: metric (depth space) or 1/metric (disparity) = scale * label + shift
    ("shift", pa.float64()),
    ("space", pa.string()),  # the label's space the fit was made in
    ("points_total", pa.int64()),
    ("points_dropped", pa.int64()),
    ("points_used", pa.int64()),
    ("points_held_out", pa.int64()),
    ("abs_rel", pa.float64()),  # held out, against the sparse depths
    ("delta1", pa.float64()),
    ("inlier_fraction", pa.float64()),
    ("coverage", pa.float64()),
    ("sigma", pa.float64()),
    ("verdict", pa.string()),  # "ok" | "low_confidence"
    ("reasons", pa.list_(pa.string())),  # one line per failed check; empty when ok
])

META = pa.struct([
    # read: where the image came from (docs/training.md, "Back to the input image")
    ("source_url", pa.string()),  # the image file, or the tar holding it
    ("source_member", pa.string()),  # a tar's image member
    ("source_offset", pa.int64()),  # the member's bytes in an uncompressed tar
    ("source_size", pa.int64()),
    ("source_table", pa.string()),  # the Parquet/Arrow file an embedded image is a value of
    ("source_row", pa.int64()),
    ("source_column", pa.string()),
    ("source_key", pa.string()),  # the input's key column
    ("source_path", pa.string()),  # a Parquet image struct's path
    ("image_member", pa.string()),  # the member labelled when a sample held several images
    ("unlabelled_members", pa.list_(pa.string())),
    ("columns", pa.string()),  # input.keep_columns' values, JSON (their types are the input's)
    # decode
    ("format", pa.string()),
    ("mode", pa.string()),
    ("frames", pa.int64()),  # an animated image: frames it had (the first is labelled)
    ("exif_orientation", pa.int64()),  # pixels were turned upright from this orientation
    # infer
    ("output_space", pa.string()),  # "depth" (0 = near) | "disparity" (1 = near)
    ("ensemble_members", pa.string()),  # how members differ when not by seed: "augmentations"
    # encode
    ("quality", QUALITY),
    ("low_confidence", pa.bool_()),  # the quality verdict failed, or the metric fit (quality.row_verdict)
    ("low_confidence_reasons", pa.list_(pa.string())),  # "quality: ...", "metric fit: ..." (when true)
    # metric (pipelines/metric_depth.py)
    ("metric", METRIC),
])

FIELDS = {f.name: f.type for f in META}
_JSON_FIELDS = ("columns",)  # values of any type: JSON inside the struct
# Python types a field takes as they are: checked here without building an Arrow scalar
# (~20 us a fact, on every row of every stage); anything else goes through Arrow.
_PLAIN = {pa.string(): (str,), pa.int64(): (int,), pa.float64(): (float, int), pa.bool_(): (bool,)}


def _holds(typ: pa.DataType, value: Any) -> bool:
    """Whether `value` surely converts to `typ` (False: ask Arrow)."""
    if value is None:
        return True
    if typ in _PLAIN:
        return type(value) in _PLAIN[typ] and not (type(value) is int and not -2**63 <= value < 2**63)
    if pa.types.is_struct(typ) and type(value) is dict:
        names = {f.name: f.type for f in typ}
        return all(k in names and _holds(names[k], v) for k, v in value.items())
    if pa.types.is_list(typ) and type(value) in (list, tuple):
        return all(_holds(typ.value_type, v) for v in value)
    return False


def _unknown_key(typ: pa.DataType, value: Any, path: str) -> str | None:
    """The first key of a (nested) dict the struct type does not name: Arrow drops such keys
    without a word when it converts a dict to a struct."""
    if pa.types.is_struct(typ) and isinstance(value, dict):
        names = {f.name: f.type for f in typ}
        for k, v in value.items():
            if k not in names:
                return f"{path}.{k}"
            found = _unknown_key(names[k], v, f"{path}.{k}")
            if found:
                return found
    elif pa.types.is_list(typ) and isinstance(value, (list, tuple)):
        for v in value:
            found = _unknown_key(typ.value_type, v, f"{path}[]")
            if found:
                return found
    return None


def get(row: dict[str, Any]) -> dict[str, Any]:
    """The facts a row holds (unset fields left out), as the outputs write them."""
    meta = row.get("meta")
    if not meta:
        return {}
    out = {k: v for k, v in meta.items() if v is not None}
    for name in _JSON_FIELDS:
        if name in out:
            out[name] = json.loads(out[name])
    return out


def put(row: dict[str, Any], **facts: Any) -> None:
    """Adds `facts` to the row's metadata; a name not in `META`, or a value its type cannot
    hold, raises here, naming it (a programming error, never a silent label)."""
    meta = dict(row.get("meta") or {})
    for name, value in facts.items():
        if name not in FIELDS:
            raise KeyError(f"metadata field {name!r} is not in depthray/io/row_meta.py's META")
        if name in _JSON_FIELDS and value is not None:
            value = json.dumps(value, default=str)
        if not _holds(FIELDS[name], value):
            unknown = _unknown_key(FIELDS[name], value, name)
            if unknown:
                raise KeyError(f"metadata field {unknown!r} is not in depthray/io/row_meta.py's META")
            try:  # Arrow's own verdict and message, for what the plain check does not know
                pa.scalar(value, type=FIELDS[name])
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as e:
                raise TypeError(f"metadata field {name!r}: {value!r} is not {FIELDS[name]} ({e})") from None
        meta[name] = value
    row["meta"] = meta


def to_json(row: dict[str, Any], **extra: Any) -> str:
    """The row's metadata as the outputs store it (JSON text), `extra` fields first."""
    return json.dumps({**extra, **get(row)}, default=str)
