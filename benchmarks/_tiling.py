"""Tiled inference cost: seconds per megapixel at two image sizes (should stay ~flat:
cost grows linearly with the number of tiles, which grows with the pixel count)."""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks._common import interleave, median, scene_images


@dataclass
class TileSettings:
    sizes: tuple[tuple[int, int], ...]  # (height, width) of the test images
    resolution: int  # the model's processing resolution (= tile size)
    ensemble_size: int
    batch_size: int
    rounds: int
    device: str


def tiled_cost(model, s: TileSettings) -> dict:
    """Time predict_image with tiling on (native working resolution, no tile cap)."""
    from depthray.config import TilingConfig
    from depthray.predict import predict_image
    from depthray.tiling import plan_tiles

    tiling = {"mode": "on", "working_resolution": 0, "max_tiles": 100_000}
    cfg = {"ensemble_size": s.ensemble_size, "batch_size": s.batch_size, "seed": 0, "tiling": tiling}
    images = {f"{h}x{w}": scene_images(1, h, w, seed=7)[0] for h, w in s.sizes}

    def run(image):
        def fn():
            model.clear_cache()
            return predict_image(image, model, cfg)
        return fn

    run(images[min(images, key=lambda k: images[k].size)])()  # warm-up: the smaller size once
    times = interleave({k: run(im) for k, im in images.items()}, s.rounds, s.device, warmup=0)
    out = {}
    for (h, w), (key, t) in zip(s.sizes, times.items()):
        plan = plan_tiles(h, w, model.processing_resolution, TilingConfig(**tiling))
        mp = h * w / 1e6
        evals = plan.num_views * s.ensemble_size
        out[key] = {"megapixels": mp, "num_views": plan.num_views, "model_evaluations": evals,
                    "seconds": median(t), "seconds_per_megapixel": median(t) / mp,
                    "seconds_per_evaluation": median(t) / evals, "fusion": plan.fusion}
    return out
