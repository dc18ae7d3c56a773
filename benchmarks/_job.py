"""The Ray job against a plain loop over the same stages, and its memory as data grows.

- pipeline_vs_engine: steady-state images/s of `depthray.job.driver.run_job` on local image
  folders / a plain Python loop calling the same read, decode, infer, encode and write
  functions on the same images. Steady state = extra images / extra seconds between a 1x
  and a 10x input, so fixed costs (actor start, model load, pipeline fill and drain) cancel;
  they are reported separately as start-up.
- rss_growth: peak PSS (RSS with shared pages split, so Ray's shared object store is not
  counted once per process) of the whole process tree of the Ray job on 10x / on 1x.

Each run is its own process (benchmarks/_job_child.py) so runs share no Ray state.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks._common import ROOT, PeakMemory, child_env, scene_images


@dataclass
class JobSettings:
    shards: int  # shards in the 1x input (10x has ten times as many, same size)
    images_per_shard: int
    image_size: tuple[int, int]  # (height, width)
    resolution: int
    ensemble_size: int  # steps: the checkpoint's default
    images_per_batch: int
    device: str

    @property
    def images(self) -> int:
        return self.shards * self.images_per_shard


def write_inputs(root: Path, shards: int, s: JobSettings) -> str:
    """`shards` folders of distinct JPEG images: a few scenes, cycled, each copy with its
    own pixel noise (so no two images are equal and no encode can be reused)."""
    scenes = scene_images(min(8, s.images_per_shard), *s.image_size)
    rng = np.random.default_rng(shards)
    for i in range(shards):
        folder = root / f"shard-{i:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(s.images_per_shard):
            noise = rng.integers(-4, 5, size=scenes[0].shape)
            img = np.clip(scenes[(i + j) % len(scenes)].astype(np.int16) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"img-{j:04d}.jpg", quality=90)
    return str(root)


def job_config(model_dir: Path, input_url: str, output_url: str, s: JobSettings) -> dict:
    return {
        "input": {"url": input_url, "format": "images"},
        "output": {"url": output_url, "format": "parquet"},
        "model": {"kind": "marigold", "path": str(model_dir), "processing_resolution": s.resolution,
                  "device": s.device, "dtype": "auto"},
        # 16 views per model call on a GPU, as the engine sections and configs/s3_webdataset.yaml
        # (the H200 run of 2026-11-28 used 8 here: 3.3 images/s against the engine's 4.4)
        "inference": {"ensemble_size": s.ensemble_size,
                      "batch_size": max(16 if s.device.startswith("cuda") else 8, s.ensemble_size),
                      "tiling": {"mode": "off"}},
        "compute": {"images_per_batch": s.images_per_batch},
    }


def run_child(args: list[str], env: dict) -> tuple[dict, int]:
    """Run _job_child.py; returns its JSON line and the peak PSS of its process tree."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "_job_child.py"), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    with PeakMemory(proc.pid) as mem:
        out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:1])} run failed (exit {proc.returncode}):\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1]), mem.peak


def infer_span_s(stages: list[str]) -> float | None:
    """Seconds from the inference operator's first task start to its last task end, as Ray
    Data's stats line reports it ("MapBatches(DepthPredictor): N tasks executed, N blocks
    produced in X s"): the actor's active span, without its model load or the pipeline's
    fill before and drain after."""
    for line in stages:
        m = re.search(r"MapBatches\(DepthPredictor\).*produced in ([0-9.]+)s", line)
        if m:
            return float(m.group(1))
    return None


def _steady_rate(small_images: int, small_s: float, big_images: int, big_s: float) -> float:
    return (big_images - small_images) / max(big_s - small_s, 1e-9)


def job_benchmark(model_dir: Path, workdir: Path, s: JobSettings) -> dict:
    """1x and 10x Ray job runs and the plain loop on the same inputs."""
    small_in = write_inputs(workdir / "in-1x", s.shards, s)
    big_in = write_inputs(workdir / "in-10x", 10 * s.shards, s)
    # One torch thread in both contenders: what Ray gives a 1-CPU actor anyway, and it keeps
    # the plain loop from winning or losing on thread count (OpenMP threads spinning on a
    # busy 2-core machine swing its speed several-fold), so the ratio measures the job.
    env = child_env(OMP_NUM_THREADS="1")
    runs = {}
    for name, url in (("1x", small_in), ("10x", big_in)):
        cfg_path = workdir / f"job-{name}.json"
        cfg_path.write_text(json.dumps(job_config(model_dir, url, str(workdir / f"out-ray-{name}"), s)))
        runs[name] = run_child(["ray", str(cfg_path)], env)
    loop_cfg = workdir / "loop.json"
    loop_cfg.write_text(json.dumps(job_config(model_dir, small_in, str(workdir / "out-loop"), s)))
    loop, _ = run_child(["loop", str(loop_cfg), big_in], env)

    (r1, m1), (r10, m10) = runs["1x"], runs["10x"]
    ray_rate = _steady_rate(r1["images"], r1["wall_seconds"], r10["images"], r10["wall_seconds"])
    loop_rate = _steady_rate(loop["small"]["images"], loop["small"]["seconds"],
                             loop["big"]["images"], loop["big"]["seconds"])
    actors = max(r10["actors"], 1)
    busy = r10["infer_seconds"] / max(r10["wall_seconds"] * actors, 1e-9)
    # Busy share of the extra 9x work alone: start-up (model load while nothing else can
    # run) and pipeline fill/drain cancel, as they do in the steady-state rates.
    busy_steady = (r10["infer_seconds"] - r1["infer_seconds"]) / max(
        (r10["wall_seconds"] - r1["wall_seconds"]) * actors, 1e-9)
    span = infer_span_s(r10["stages"])
    return {
        "pipeline_vs_engine": ray_rate / loop_rate,
        # infer seconds over the actor's active span, in one run: no cross-run difference, so
        # no noise from start-up costs that differ between the 1x and 10x runs
        "actor_busy_fraction_active": r10["infer_seconds"] / (span * actors) if span else None,
        "infer_span_s_10x": span,
        "ray_images_per_s": ray_rate,
        "loop_images_per_s": loop_rate,
        "ray_startup_s": {"ray_init": r10["ray_init_s"],
                          # fixed cost inside run_job: actor start + model load + fill/drain
                          "job_fixed": r10["wall_seconds"] - r10["images"] / ray_rate},
        "loop_model_load_s": loop["model_load_s"],
        "actor_busy_fraction_10x": busy,
        "actor_busy_fraction_steady": busy_steady,
        "rss_growth": m10 / m1,
        "peak_pss_mb": {"1x": m1 / 2**20, "10x": m10 / 2**20},
        "images": {"1x": r1["images"], "10x": r10["images"]},
        "errors": r1["errors"] + r10["errors"],
        "wall_s": {"1x": r1["wall_seconds"], "10x": r10["wall_seconds"]},
        "ray_stages_10x": r10["stages"],
    }
