"""The metric stage of pipelines/metric_depth.py when the labels are aligned to a metric
depth model (`metric.reference_model`) instead of sparse LiDAR (io/metric_labels.py).

The infer actor ran the reference on the same decoded image and left its depth in metres at
the image size in `reference_f32` (models/hf_metric.py). Here the relative label, as the
depth PNG stores it, is fitted to that map in the label's space
(`metric_align.align_to_reference`: a seeded sample of pixels, robust fit, held-out score,
verdict). transformers' depth models give no per-pixel confidence, so every pixel with a
positive finite reference weighs the same; the others are dropped and counted, and a map
without any gives a low_confidence label with no depth ("0 valid points"), never metres
made up. Outputs as the LiDAR path: the metric PNG and `meta.metric`, whose `source` is
"model" and `reference_model` the checkpoint.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from depthray.io import records, row_meta
from depthray.io.codecs import depth_as_stored
from depthray.io.metric_labels import UNIT, align_batch, encode_metric_png16
from depthray.metric_align import align_to_reference
from depthray.metric_config import MetricConfig


def align_reference_row(row: dict[str, Any], relative: np.ndarray, cfg: MetricConfig) -> dict[str, Any]:
    """One labelled row with its reference map -> the row with `metric_depth` and
    `meta.metric`, or an error row (no reference map, or one of another size)."""
    data, row["reference_f32"] = row.get("reference_f32"), None
    if data is None:
        return records.error_row(row, "metric", "no_reference",
                                 f"no map of metric.reference_model {cfg.reference_model!r} for this image")
    reference = np.frombuffer(data, dtype=np.float32)
    if reference.size != relative.size:
        return records.error_row(row, "metric", "reference_size",
                                 f"reference map of {reference.size} pixels, the image {relative.size}")
    label = depth_as_stored(relative)  # what the depth PNG holds: the fit applies to it exactly
    space = row_meta.get(row).get("output_space", "depth")
    fit = align_to_reference(label, space, reference.reshape(relative.shape), None, **cfg.align_options())
    row["metric_depth"], png_scale = encode_metric_png16(fit.apply(label))
    row_meta.put(row, metric={"unit": UNIT, "png_scale": png_scale, "source": "model",
                              "reference_model": cfg.reference_model, **fit.to_meta()})
    return row


def align_reference_batch(batch: pa.Table, cfg: MetricConfig) -> pa.Table:
    """Ray Data UDF: align_batch with the reference model's maps."""
    return align_batch(batch, cfg, align=align_reference_row)
