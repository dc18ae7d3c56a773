"""Depth pseudo-labels: the job a plain config runs.

    read -> decode -> infer -> encode -> write

Each stage comes from depthray's job package (depthray/job/stages.py) with what it needs to
run on a cluster (actor pool, memory, batching); the executor (Ray or local) runs the list.
To declare another labelling task, copy this file, change the list, and run it with
`depthray run CONFIG --pipeline path/to/it.py` or `python path/to/it.py CONFIG`.
"""

from __future__ import annotations

import sys

from depthray.job.stages import decode_stage, encode_stage, infer_stage, read_stage, write_stage


def stages(cfg, run_id: str = "", device_kind: str | None = None) -> list:
    return [
        read_stage(cfg),
        decode_stage(cfg),
        infer_stage(cfg, run_id),
        encode_stage(cfg),
        write_stage(cfg, run_id, device_kind),
    ]


if __name__ == "__main__":  # python pipelines/depth.py CONFIG [--set ...]: `depthray run` of this task
    from depthray.cli import run_pipeline_file

    sys.exit(run_pipeline_file(__file__, sys.argv[1:]))
