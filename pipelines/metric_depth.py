"""Metric depth pseudo-labels: relative depth aligned per image to the sparse metric depth
(LiDAR) each WebDataset sample or Parquet/Arrow row carries, or to a metric depth model's
map (issue #29; docs/metric.md).

    read (+ metric.member or metric.column) -> decode -> infer (+ metric.reference_model)
        -> metric -> encode -> write

The metric stage fits the relative label to the sample's sparse points or to the reference
map (depthray/metric_align.py) and stores the metric map (16-bit PNG, metres / scale) beside
the relative one, with the fit and its verdict in `meta.metric` (a low_confidence fit makes
the row's `low_confidence` true). A sample without the member (a Parquet/Arrow row: a null
`metric.column`), or whose member does not decode, is an error row. Run with `depthray run
CONFIG --pipeline metric_depth` or `python pipelines/metric_depth.py CONFIG`; the config names
the member (`metric: {member: lidar.png, encoding: png16_mm}`), for Parquet/Arrow inputs the
column (`metric: {column: lidar, encoding: png16_mm}`), or the metric model the infer actor
runs beside the relative one (`metric: {reference_model: path/to/depth-pro}`).
"""

from __future__ import annotations

import sys

from depthray.job.stages import decode_stage, encode_stage, infer_stage, metric_stage, read_stage, write_stage


def stages(cfg, run_id: str = "", device_kind: str | None = None) -> list:
    from depthray.job.checks import reference_problem

    m = cfg.metric
    if bool(m.member or m.column) == bool(m.reference_model):
        raise ValueError("pipeline metric_depth: set metric.member (the sample's sparse depth member, e.g. "
                         "lidar.png) or metric.column (Parquet/Arrow inputs), or metric.reference_model (a "
                         "metric depth checkpoint): one source")
    problem = reference_problem(m.reference_model) if m.reference_model else None
    if problem:  # before Ray: a relative reference would give labels that only look like metres
        raise ValueError(problem)
    return [
        read_stage(cfg, sparse=bool(m.member or m.column)),
        decode_stage(cfg),
        infer_stage(cfg, run_id, reference=bool(m.reference_model)),
        metric_stage(cfg),
        encode_stage(cfg),
        write_stage(cfg, run_id, device_kind, metric=True),
    ]


if __name__ == "__main__":  # python pipelines/metric_depth.py CONFIG [--set ...]: `depthray run` of this task
    from depthray.cli import run_pipeline_file

    sys.exit(run_pipeline_file(__file__, sys.argv[1:]))
