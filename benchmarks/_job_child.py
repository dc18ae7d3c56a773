"""One measured run, in its own process (started by benchmarks/_job.py):

    python benchmarks/_job_child.py ray  CONFIG.json        # the Ray job (depthray.pipeline)
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

import pyarrow as pa  # noqa: E402

from depthray.config import Config, config_from_dict  # noqa: E402


def run_ray(cfg: Config) -> dict:
    from depthray.pipeline import init_ray, run_job

    t0 = time.perf_counter()
    init_ray(cfg.compute.address)
    ray_init_s = time.perf_counter() - t0
    summary = run_job(cfg)
    keep = ("images", "errors", "wall_seconds", "infer_seconds", "actors", "stages", "shards_complete")
    return {"ray_init_s": ray_init_s, **{k: summary[k] for k in keep}}


def _shard_tables(cfg: Config):
    from depthray.io.sources import list_shards

    for s in list_shards(cfg.input, cfg.storage):
        yield pa.Table.from_pylist([{"name": s.name, "url": s.url, "format": s.format}])


def loop_once(cfg: Config, predictor) -> tuple[int, float]:
    """read -> decode -> infer -> encode -> write with the job's own stage functions."""
    from depthray.io.codecs import encode_batch
    from depthray.io.decode import decode_batch
    from depthray.io.records import is_trailer
    from depthray.io.sinks import write_batch
    from depthray.io.sources import read_shards
    from depthray.pipeline import model_label

    t0 = time.perf_counter()
    images = 0
    for item in _shard_tables(cfg):
        for block in read_shards(item, cfg.input, cfg.storage):
            decoded = decode_batch(block, cfg.input, keep_input=False)
            step = cfg.compute.images_per_batch
            encoded = [encode_batch(predictor(decoded.slice(i, step)), cfg.quality.max_uncertainty_mean)
                       for i in range(0, decoded.num_rows, step)]
            table = pa.concat_tables(encoded)
            images += sum(1 for r in table.to_pylist() if not is_trailer(r) and r.get("error") is None)
            write_batch(table, cfg.output, cfg.storage, model_label(cfg), cfg.hash())
    return images, time.perf_counter() - t0


def _with_urls(cfg: Config, input_url: str, output_url: str) -> Config:
    return dataclasses.replace(cfg, input=dataclasses.replace(cfg.input, url=input_url),
                               output=dataclasses.replace(cfg.output, url=output_url))


def run_loop(cfg: Config, big_input: str) -> dict:
    from depthray.pipeline import DepthPredictor

    t0 = time.perf_counter()
    # The same constructor arguments as build_dataset's fn_constructor_kwargs.
    predictor = DepthPredictor(model_spec=dataclasses.asdict(cfg.model), inference=cfg.inference,
                               storage=cfg.storage)
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
