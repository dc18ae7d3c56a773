"""The fixed job behind tests/data/job_golden.json: what the demo's inputs and model give.

`summarize(output_dir)` reduces a Parquet output to what must not change when the code is
reorganised: every column but the PNG bytes exactly, and the depth and uncertainty maps as
8x8 block means (robust to nothing, but small enough to keep in the repository).

Regenerate only when outputs change on purpose (and say why in the commit):
    python -m tests.golden_job tests/data/job_golden.json
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np

CONFIG = {
    "input": {"format": "webdataset"},
    "output": {"format": "parquet"},
    "model": {"factory": "depthray.demo:tiny_model", "options": {"processing_resolution": 64}},
    # the default tiling fusion (no `tiling:` section): the golden guards what users get
    "inference": {"ensemble_size": 3, "batch_size": 8, "seed": 0},
    "compute": {"images_per_batch": 4},
}


def job_config(input_url: str, output_url: str):
    from depthray.config import config_from_dict

    data = json.loads(json.dumps(CONFIG))
    data["input"]["url"] = input_url
    data["output"]["url"] = output_url
    return config_from_dict(data, require_io=True)


def _blocks(png: bytes, scale: float = 1.0) -> list[list[float]]:
    from PIL import Image

    arr = np.asarray(Image.open(io.BytesIO(png)), dtype=np.float64) / 65535.0 * scale  # [H,W]
    h, w = (arr.shape[0] // 8) * 8, (arr.shape[1] // 8) * 8
    pooled = arr[:h, :w].reshape(h // 8, 8, w // 8, 8).mean(axis=(1, 3))  # [H/8,W/8]
    return np.round(pooled, 6).tolist()


def summarize(output_dir: str | Path) -> dict[str, dict]:
    """key -> columns of its output row (PNGs as 8x8 block means)."""
    import pyarrow.parquet as pq

    table = pq.read_table(str(output_dir))
    rows = {}
    for r in table.to_pylist():
        meta = json.loads(r["meta"] or "{}")
        if "source_url" in meta:  # the input's place: its file name (the folder is a temporary one)
            meta["source_url"] = meta["source_url"].rsplit("/", 1)[-1]
        rows[r["key"]] = {
            "source": r["source"], "width": r["width"], "height": r["height"],
            "ensemble_size": r["ensemble_size"], "num_views": r["num_views"],
            "uncertainty_scale": round(float(r["uncertainty_scale"]), 6),
            "uncertainty_mean": round(float(r["uncertainty_mean"]), 6),
            "meta": meta,
            "depth_blocks": _blocks(r["depth"]),
            "uncertainty_blocks": _blocks(r["uncertainty"], float(r["uncertainty_scale"])),
        }
    return rows


def main(argv: list[str]) -> int:
    import tempfile

    import ray

    from depthray.demo import make_inputs
    try:
        from depthray.job.driver import run_job
    except ImportError:  # the layout before the job package
        from depthray.job.driver import run_job

    with tempfile.TemporaryDirectory() as tmp:
        make_inputs(Path(tmp) / "inputs")
        cfg = job_config(str(Path(tmp) / "inputs" / "{00000..00001}.tar"), str(Path(tmp) / "out"))
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
        summary = run_job(cfg)
        ray.shutdown()
        assert summary["images"] == 12 and not summary["errors"], summary
        Path(argv[0]).write_text(json.dumps(summarize(Path(tmp) / "out"), separators=(",", ":"), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
