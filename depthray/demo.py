"""`depthray demo`: the whole job on built-in sample images, offline, in about a minute.

It renders synthetic scenes (depthray.samples), packs them into two WebDataset shards,
builds the random-weight tiny Marigold once (cached), and runs the real pipeline on a
local Ray: read -> decode -> infer actor -> encode -> write, with manifests and errors.
The depth is meaningless (random weights); the plumbing is the product being shown.
"""

from __future__ import annotations

import io
import logging
import shutil
import tarfile
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

# Kept identical to configs/demo.yaml (a test checks), so `depthray run configs/demo.yaml`
# and `depthray submit configs/demo.yaml` repeat the demo after `depthray demo` made inputs.
DEMO_CONFIG = """\
input:
  url: demo_output/inputs/{00000..00001}.tar
  format: webdataset
output:
  url: demo_output/depth
  format: parquet
model:
  factory: depthray.demo:tiny_model
  options: {processing_resolution: 64}
inference:
  ensemble_size: 2
  batch_size: 8
compute:
  images_per_batch: 4
"""

NUM_SHARDS = 2
IMAGES_PER_SHARD = 6
IMAGE_SIZE = (96, 128)  # (height, width)


def tiny_model(processing_resolution: int = 64, device: str = "auto"):
    """Model factory for configs: the random-weight tiny Marigold, built once per machine."""
    from depthray.models.loading import load_model
    from depthray.models.tiny import ensure_tiny_model

    return load_model({"path": str(ensure_tiny_model()), "processing_resolution": processing_resolution,
                       "device": device})


def make_inputs(folder: Path, seed: int = 0) -> list[Path]:
    """Sample scenes packed as WebDataset shards `{folder}/0000N.tar` (key = scene name)."""
    from depthray.samples import write_sample_images

    folder.mkdir(parents=True, exist_ok=True)
    images = write_sample_images(folder / "images", n=NUM_SHARDS * IMAGES_PER_SHARD, size=IMAGE_SIZE, seed=seed)
    shards = []
    for s in range(NUM_SHARDS):
        path = folder / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for img in images[s * IMAGES_PER_SHARD : (s + 1) * IMAGES_PER_SHARD]:
                data = img.read_bytes()
                info = tarfile.TarInfo(img.name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        shards.append(path)
    return shards


def run_demo(workdir: str | Path = "demo_output", num_cpus: int | None = None) -> dict[str, Any]:
    """Make inputs (once), run the demo job from scratch, write a preview; returns the summary."""
    from depthray.config import config_from_dict
    from depthray.evaluate import evaluate
    from depthray.preview import write_preview
    from depthray.models.tiny import ensure_tiny_model
    from depthray.job.driver import init_ray, run_job

    root = Path(workdir).resolve()
    data = yaml.safe_load(DEMO_CONFIG)
    data["input"]["url"] = str(root / "inputs" / "{00000..00001}.tar")
    data["output"]["url"] = str(root / "depth")
    cfg = config_from_dict(data, require_io=True)
    if not (root / "inputs" / f"{NUM_SHARDS - 1:05d}.tar").exists():
        make_inputs(root / "inputs")
    shutil.rmtree(root / "depth", ignore_errors=True)  # the demo always starts fresh
    ensure_tiny_model()  # build once here, not in every actor at once
    init_ray(cfg.compute.address, num_cpus=num_cpus, dashboard=cfg.compute.dashboard)
    summary = run_job(cfg, log_every_s=5.0)
    # The demo ends where a user would: look at the labels, and score them against the
    # scenes' ground truth (meaningless numbers for random weights, but the real tools).
    inputs = root / "inputs"
    sheet, page = write_preview(str(root / "depth"), root / "preview", n=32,
                                inputs_url=str(inputs / "images"), gt_url=str(inputs / "gt"))
    summary["preview"], summary["preview_html"] = str(sheet), str(page)
    summary["eval"] = evaluate(str(root / "depth"), str(inputs / "gt")).summary
    return summary
