"""The `metric:` section of the job config (pipelines/metric_depth.py; docs/metric.md):
what the labels are aligned to (the WebDataset member or Parquet/Arrow column holding each
frame's sparse metric depth and how it stores metres, or a metric depth model), and the fit's
verdict thresholds. Part of depthray/config.py's `Config`, kept here to keep that
module short; `depthray init` documents these fields from their comments as any other."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from depthray.models.kinds import TORCH_DTYPES


# How a sparse metric depth member stores metres (pipelines/metric_depth.py; docs/metric.md).
METRIC_ENCODINGS = ("png16_mm", "png16_kitti", "npy")


@dataclass
class MetricConfig:
    # pipeline metric_depth: the WebDataset member holding each frame's sparse metric depth,
    # by extension (e.g. lidar.png); a sample without it, or whose member does not decode, is
    # an error row. null = none (the metric_depth pipeline needs this or reference_model).
    member: str | None = None
    # the same for Parquet / Arrow inputs: the column holding each row's sparse metric depth
    # (binary, or a {bytes, path} struct as datasets' Image() writes it), stored as `encoding`;
    # a null value is an error row. null = none (a Parquet input then refuses to start).
    column: str | None = None
    # how that member stores metres: png16_mm (16-bit PNG in millimetres, 0 = no return) |
    # png16_kitti (KITTI's 16-bit PNG, value / 256 = metres, 0 = none) | npy (float32 metres,
    # 0 or NaN = none)
    encoding: str = "png16_mm"
    # pipeline metric_depth, instead of member: a transformers metric depth checkpoint (Depth
    # Anything metric, ZoeDepth, Depth Pro with its field-of-view head; local folder, hub id or
    # URL) run in the infer actor on each image, on model.device; each label is aligned to its
    # map in metres. A relative checkpoint is refused. null = none. Set member or this, not both.
    reference_model: str | None = None
    # the reference model's dtype: auto (float16 on CUDA, float32 on CPU) | float32 | float16 | bfloat16
    reference_dtype: str = "auto"
    # The fit's verdict thresholds (depthray/metric_align.py's AlignOptions; docs/metric.md):
    # a failed check makes the image low_confidence (kept as a label, with the reasons).
    holdout_fraction: float = 0.2  # valid points kept out of the fit to score it, in (0, 1)
    min_points: int = 50  # fewer valid points: fit on all of them, residual in-sample
    min_coverage: float = 0.25  # share of an 8x8 grid of image cells holding a valid point
    min_inlier_fraction: float = 0.6  # share of all valid points the fit accepts
    max_abs_rel: float = 0.15  # held-out AbsRel against the sparse depths (or the reference map)

    def align_options(self) -> dict:
        """The keyword arguments metric_align's aligners take."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in _SOURCE_FIELDS}

    def task_settings(self, device_type: str) -> dict | None:
        """What the metric labels depend on, for the config hash of pipeline metric_depth: the
        source the config names and the thresholds (`reference_dtype: auto` as it runs on
        `device_type`); None when it names none."""
        from depthray.models.kinds import TRANSFORMERS

        settings = dataclasses.asdict(self)
        if self.member or self.column:
            # a setting left null is left out: LiDAR-member labels keep the hash they had
            # before `column` and `reference_model` existed
            return {k: v for k, v in settings.items()
                    if k not in _REFERENCE_FIELDS and not (k == "column" and v is None)}
        if self.reference_model:
            settings["reference_dtype"] = TRANSFORMERS.dtype(self.reference_dtype, device_type)
            return {k: v for k, v in settings.items() if k not in ("member", "column", "encoding")}
        return None


_REFERENCE_FIELDS = ("reference_model", "reference_dtype")
_SOURCE_FIELDS = ("member", "column", "encoding") + _REFERENCE_FIELDS


def validate_metric(m: MetricConfig, pipeline: str, errors: list[str]) -> None:
    """Appends every problem of the `metric:` section to `errors` (config.py's one message)."""
    if m.member is not None:
        m.member = m.member.lower().lstrip(".")
        if not m.member:
            errors.append("metric.member: the sparse depth member's extension (e.g. lidar.png), or null")
    if m.column is not None and not m.column.strip():
        errors.append("metric.column: the Parquet/Arrow column holding sparse metric depth, or null")
    if (m.member or m.column) and m.reference_model:
        errors.append("metric.member/column and metric.reference_model: set one (sparse metric depth, or a "
                      "metric depth model), not both")
    if pipeline == "metric_depth" and not (m.member or m.column or m.reference_model):
        errors.append("metric.member: pipeline metric_depth needs the member holding sparse metric depth "
                      "(e.g. lidar.png), metric.column for Parquet/Arrow inputs, or metric.reference_model "
                      "(a metric depth checkpoint)")
    if m.reference_dtype not in ("auto", *TORCH_DTYPES):
        errors.append(f"metric.reference_dtype: must be one of auto, {', '.join(TORCH_DTYPES)}, "
                      f"got {m.reference_dtype!r}")
    if not 0.0 < m.holdout_fraction < 1.0:
        errors.append(f"metric.holdout_fraction: must be in (0, 1), got {m.holdout_fraction}")
    if m.min_points < 2:
        errors.append(f"metric.min_points: must be >= 2, got {m.min_points}")
    for name in ("min_coverage", "min_inlier_fraction"):
        if not 0.0 <= getattr(m, name) <= 1.0:
            errors.append(f"metric.{name}: must be in [0, 1], got {getattr(m, name)}")
    if m.max_abs_rel <= 0:
        errors.append(f"metric.max_abs_rel: must be > 0, got {m.max_abs_rel}")
