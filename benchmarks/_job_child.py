"""One measured run, in its own process (started by benchmarks/_job.py):

    python benchmarks/_job_child.py ray  CONFIG.json        # the Ray job (depthray.job.driver)
    python benchmarks/_job_child.py loop CONFIG.json OTHER_INPUT_URL
                                                            # the same stages, a plain loop

Prints one JSON line with its timings. The loop mode runs two inputs (1x then 10x) after
a warm-up pass over the 1x input, so the parent can take the steady-state rate from their difference.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from depthray.config import Config, config_from_dict  # noqa: E402


def run_ray(cfg: Config) -> dict:
    from depthray.job.driver import init_ray, run_job

    t0 = time.perf_counter()
    init_ray(cfg.compute.address)
    ray_init_s = time.perf_counter() - t0
    summary = run_job(cfg)
    keep = ("images", "errors", "wall_seconds", "infer_seconds", "actors", "stages", "shards_complete")
    return {"ray_init_s": ray_init_s, **{k: summary[k] for k in keep}}


def loop_once(cfg: Config, predictor) -> tuple[int, float]:
    """read -> decode -> infer -> encode -> write: the job's own stage chain, in a plain loop
    (depthray.job.local), sharing one loaded model between passes."""
    from depthray.job.checks import list_input_shards
    from depthray.job.local import LocalRunner, shard_tables
    from depthray.job.stages import job_stages

    t0 = time.perf_counter()
    runner = LocalRunner(job_stages(cfg), built={"infer": predictor})
    images = sum(sum(ack.column("outputs").to_pylist())
                 for ack in runner.run(shard_tables(list_input_shards(cfg))))
    return images, time.perf_counter() - t0


def _with_urls(cfg: Config, input_url: str, output_url: str) -> Config:
    return dataclasses.replace(cfg, input=dataclasses.replace(cfg.input, url=input_url),
                               output=dataclasses.replace(cfg.output, url=output_url))


def run_loop(cfg: Config, big_input: str) -> dict:
    from depthray.job.stages import job_stages, stage

    t0 = time.perf_counter()
    predictor = stage(job_stages(cfg), "infer").make()  # what each Ray actor builds
    load_s = time.perf_counter() - t0
    # Warm-up: the whole 1x input once, untimed, into its own output folder.
    loop_once(_with_urls(cfg, cfg.input.url, cfg.output.url + "-warmup"), predictor)
    predictor.model.clear_cache()  # a timed pass must not reuse the warm-up's encodes
    small = loop_once(cfg, predictor)
    predictor.model.clear_cache()
    big = loop_once(_with_urls(cfg, big_input, cfg.output.url + "-10x"), predictor)
    return {"model_load_s": load_s, "small": {"images": small[0], "seconds": small[1]},
            "big": {"images": big[0], "seconds": big[1]}}


def main(argv: list[str]) -> None:
    mode, cfg_path = argv[0], argv[1]
    cfg = config_from_dict(json.loads(Path(cfg_path).read_text()), require_io=True)
    out = run_ray(cfg) if mode == "ray" else run_loop(cfg, argv[2])
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
