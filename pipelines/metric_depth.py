"""Metric depth pseudo-labels: relative depth aligned per image to the sparse metric depth
(LiDAR) each WebDataset sample or Parquet/Arrow row carries (issue #29; docs/metric.md).

    read (+ the metric.member or metric.column) -> decode -> infer -> metric -> encode -> write

The metric stage fits the relative label to the sample's sparse points
(depthray/metric_align.py) and stores the metric map (16-bit PNG, metres / scale) beside the
relative one, with the fit and its verdict in `meta.metric` (a low_confidence fit makes the
row's `low_confidence` true). A sample without the member (a Parquet/Arrow row: a null
`metric.column`), or whose member does not decode, is an error row. Run with `depthray run
CONFIG --pipeline metric_depth` or `python pipelines/metric_depth.py CONFIG`; the config names the member
(`metric: {member: lidar.png, encoding: png16_mm}`) or, for Parquet/Arrow inputs, the column
(`metric: {column: lidar, encoding: png16_mm}`).
"""

from __future__ import annotations

import sys

from depthray.job.stages import decode_stage, encode_stage, infer_stage, metric_stage, read_stage, write_stage


def stages(cfg, run_id: str = "", device_kind: str | None = None) -> list:
    if not (cfg.metric.member or cfg.metric.column):
        raise ValueError("pipeline metric_depth: set metric.member (the sample's sparse depth member, e.g. "
                         "lidar.png) or metric.column (Parquet/Arrow inputs)")
    return [
        read_stage(cfg, sparse=True),
        decode_stage(cfg),
        infer_stage(cfg, run_id),
        metric_stage(cfg),
        encode_stage(cfg),
        write_stage(cfg, run_id, device_kind, metric=True),
    ]


if __name__ == "__main__":  # python pipelines/metric_depth.py CONFIG [--set ...]: `depthray run` of this task
    from depthray.cli import run_pipeline_file

    sys.exit(run_pipeline_file(__file__, sys.argv[1:]))
