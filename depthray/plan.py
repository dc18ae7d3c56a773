"""Cost of a job before it runs: views, model evaluations and GPU time per image.

`depthray plan` and `plan_image` use the same tile planner as inference
(depthray.tiling.plan_tiles), so the view counts here are the ones a job will run.

Counting:
  views              = 1 global view + the tiles of every tile level
  member predictions = views x ensemble_size          (= DepthResult.model_evaluations)
  model evaluations  = member predictions x denoising steps   (UNet calls, one view each)
  GPU time           = model evaluations x seconds per evaluation (configured: model calls
                       only), or with --measure the seconds one image of that size took
                       through predict's own path here (depthray/measure.py)
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from depthray.config import Config
from depthray.tiling import plan_tiles
from depthray.tiling_budget import level_quotas

log = logging.getLogger(__name__)

@dataclass
class ImagePlan:
    height: int
    width: int
    processing_resolution: int
    global_size: tuple[int, int]  # (height, width) of the global view the model sees
    levels: list[tuple[int, int, int]]  # per tile level: (height, width, tiles); [] = global only
    views: int  # under tiling.budget < 1 an upper bound: at most these run (see quotas)
    ensemble_size: int
    steps: int
    member_predictions: int  # views x members
    model_evaluations: int  # views x members x steps
    gpu_seconds: float | None  # model_evaluations x seconds_per_evaluation, if known
    quotas: list[int] | None = None  # tiles per level the budget allows (None: every tile runs)
    planned_views: int | None = None  # views without the budget (None: = views)
    detail_threshold: float = 0.0  # tiling.detail_threshold: views may fall below the bound
    budget: float = 1.0


def model_settings(cfg: Config) -> tuple[int, int, str]:
    """(processing resolution, steps, where they came from) without loading the model.

    Config values win; then what the model's kind reads from its checkpoint (a Marigold
    model_index.json, a transformers preprocessor_config.json; depthray/models/kinds.py, the
    same reading the engine does when it loads); a factory plug-in is built to ask it.
    """
    from depthray.models.kinds import kind_of

    res, steps = cfg.model.processing_resolution, cfg.inference.num_inference_steps
    if res is not None and steps is not None:
        return int(res), int(steps), "config"
    if cfg.model.factory:
        return factory_settings(cfg)
    kind = kind_of(cfg.model)
    return kind.plan_settings(kind, cfg.model, res, steps)


def factory_settings(cfg: Config) -> tuple[int, int, str]:
    """A factory model's resolution and steps are its own: only the built model knows them
    (`processing_resolution`, and the default its `num_inference_steps` argument resolves
    to; a model without that argument runs one evaluation per member). So the factory is
    called here once per process, as a job's actor would; config values still win."""
    model = _factory_model(cfg.model.factory, json.dumps(cfg.model.options, sort_keys=True, default=str))
    res = cfg.model.processing_resolution or model.processing_resolution
    steps = cfg.inference.num_inference_steps
    if steps is None:
        default = getattr(model, "default_num_inference_steps", None)
        steps = default if default is not None else 1
    return int(res), int(steps), f"model.factory {cfg.model.factory} (built to read them)"


@functools.lru_cache(maxsize=4)
def _factory_model(factory: str, options_json: str):
    from depthray.models.loading import load_model

    log.info("building %s to read its processing resolution and steps", factory)
    return load_model({"factory": factory, "options": json.loads(options_json)})


def global_view_size(height: int, width: int, cfg: Config,
                     processing_resolution: int | None = None) -> tuple[int, int] | None:
    """The global view a job gives the model for an image (None: the long side at the
    processing resolution, the planner's default). A transformers model takes it at its
    processor's size for the image (TransformersDepthModel.view_size), which only its local
    checkpoint says; `processing_resolution` overrides the config's, as at load."""
    if cfg.model.factory:  # a plug-in with a view rule of its own (the model interface's view_size)
        model = _factory_model(cfg.model.factory, json.dumps(cfg.model.options, sort_keys=True, default=str))
        return tuple(model.view_size(height, width)) if hasattr(model, "view_size") else None
    if cfg.model.kind != "transformers":
        return None
    from depthray.models.kinds import transformers_view_rule

    rule = transformers_view_rule(cfg.model, processing_resolution)
    if rule is None:
        raise ValueError(f"model.path {cfg.model.path!r}: the network input size of a transformers model "
                         "follows its preprocessor_config.json, which is not in a local folder here; plan "
                         "with model.path set to a local copy of the checkpoint")
    return rule.size(height, width)


def plan_image(
    height: int,
    width: int,
    cfg: Config,
    *,
    processing_resolution: int | None = None,
    steps: int | None = None,
    seconds_per_evaluation: float | None = None,
) -> ImagePlan:
    """Views, evaluations and GPU time for one image of the given size."""
    default_res, default_steps, _ = model_settings(cfg)
    res = processing_resolution or default_res
    steps = steps or default_steps
    global_size = global_view_size(height, width, cfg, processing_resolution)
    plan = plan_tiles(height, width, res, cfg.inference.tiling, global_size=global_size)
    quotas = level_quotas(plan, plan.budget)
    views = 1 + sum(quotas)  # the budget's upper bound (= plan.num_views without one)
    e = cfg.inference.ensemble_size
    members = views * e
    evaluations = members * steps
    return ImagePlan(
        height=height,
        width=width,
        processing_resolution=res,
        global_size=plan.global_size,
        levels=[(lv.size[0], lv.size[1], len(lv.tiles)) for lv in plan.levels],
        views=views,
        ensemble_size=e,
        steps=steps,
        member_predictions=members,
        model_evaluations=evaluations,
        gpu_seconds=None if seconds_per_evaluation is None else evaluations * seconds_per_evaluation,
        quotas=quotas if views < plan.num_views else None,
        planned_views=plan.num_views,
        detail_threshold=plan.detail_threshold,
        budget=plan.budget,
    )


def image_sizes(paths: Iterable[str | Path]) -> list[tuple[int, int]]:
    """(height, width) of image files, read from their headers (no decoding)."""
    from PIL import Image

    sizes = []
    for path in paths:
        with Image.open(path) as im:
            w, h = im.size
            if _rotated(im):  # decoding turns EXIF-rotated photos upright: plan that size
                w, h = h, w
        sizes.append((h, w))
    return sizes


def _rotated(im) -> bool:
    try:
        return im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # orientations that swap the sides
    except Exception:  # noqa: BLE001 - a broken EXIF block means no rotation, as in decoding
        return False


def format_plans(plans: list[tuple[ImagePlan, int]], seconds_per_evaluation: float | None,
                 measured: bool = False) -> str:
    """A table: one row per distinct image size (with its image count), then totals.
    `measured`: the seconds per image come from `depthray plan --measure` (depthray/measure.py)."""
    lines = [
        f"{'image (WxH)':>13} {'count':>6} {'tile levels (WxH:tiles)':>28} {'views':>6} "
        f"{'members':>8} {'evals':>7} {'GPU s/img':>9}",
    ]
    tot_images = tot_views = tot_evals = 0
    tot_seconds = 0.0
    for p, count in plans:
        quotas = p.quotas or [n for _, _, n in p.levels]
        levels = " ".join(f"{w}x{h}:{n}" if q == n else f"{w}x{h}:{q}/{n}"
                          for (h, w, n), q in zip(p.levels, quotas)) or "- (global only)"
        secs = f"{p.gpu_seconds:9.2f}" if p.gpu_seconds is not None else f"{'-':>9}"
        lines.append(f"{p.width:>6}x{p.height:<6} {count:>6} {levels:>28} {p.views:>6} "
                     f"{p.member_predictions:>8} {p.model_evaluations:>7} {secs}")
        tot_images += count
        tot_views += count * p.views
        tot_evals += count * p.model_evaluations
        tot_seconds += count * (p.gpu_seconds or 0.0)
    if plans:
        p0 = plans[0][0]
        lines.append("")
        lines.append(f"processing resolution {p0.processing_resolution}, ensemble {p0.ensemble_size}, "
                     f"{p0.steps} denoising step(s); evals = views x members x steps")
        lines.append(f"total: {tot_images} image(s), {tot_views} views, {tot_evals} model evaluations")
        budget = budget_line([p for p, _ in plans])
        if budget:
            lines.append(budget)
        if measured:
            lines.append(f"estimated time: {tot_seconds:.1f} s = {tot_seconds / 3600:.2f} GPU-hours, per image "
                         "as `depthray predict` spends it here (measured: model, VAE, decoding, tile fusion, "
                         "encoding; model loading and reading from storage extra)")
        elif seconds_per_evaluation is not None:
            lines.append(f"estimated GPU time: {tot_seconds:.1f} s = {tot_seconds / 3600:.2f} GPU-hours "
                         f"at {seconds_per_evaluation:g} s/evaluation (model calls only: decoding, tile "
                         "fusion and encoding come on top; --measure times them all)")
        else:
            lines.append("pass --seconds-per-evaluation (measured on your GPU) for a GPU-time estimate")
    return "\n".join(lines)


def budget_line(plans: list[ImagePlan]) -> str | None:
    """What tiling.budget / detail_threshold make of the counts (None: neither is set)."""
    p0 = plans[0]
    if p0.budget >= 1.0 and p0.detail_threshold <= 0.0:
        return None
    line = (f"tiling.budget {p0.budget:g}: at most {p0.budget:.0%} of each plan's views (levels show tiles "
            "run/planned), the finest tiles where the coarser estimate has the most depth detail")
    if p0.detail_threshold <= 0.0:
        return line + "; every image runs exactly these counts"
    return (line + f"; detail_threshold {p0.detail_threshold:g} skips tiles over flat regions too, so views, "
            "evals and GPU time are upper bounds: an image with flat regions runs fewer (docs/tiling.md)")


def measure_seconds_per_evaluation(cfg: Config, repeats: int = 2) -> float:
    """Time the configured model alone here: seconds per (view x member x step), VAE included.

    The model's share only: `depthray plan --measure` times whole images instead
    (depthray/measure.py), because an image costs far more than its model batches.

    Runs one model batch as a job builds it (`inference.batch_size` requests: each view of
    a 4:3 image at the processing resolution with its `ensemble_size` members) through the
    model (after one untimed warm-up call) and divides the best wall time by batch x steps. On the GPU a job will use, this is the number `plan` wants.
    """
    import time

    import torch

    from depthray.models.base import step_arguments
    from depthray.models.loading import load_model

    model = load_model(cfg.model)
    res = int(model.processing_resolution)
    b = cfg.inference.batch_size
    # A job's model batch holds ensemble_size members of each view, and the engine encodes a
    # view once for all its members: measure that batch, not b different views (which would
    # charge one VAE encode per member and overstate the cost).
    e = max(1, min(cfg.inference.ensemble_size, b))
    distinct = torch.rand(-(-b // e), 3, max(8, res * 3 // 4), res, generator=torch.Generator().manual_seed(0))
    views = distinct[[i // e for i in range(b)]]  # [b,3,h,w]: each view repeated e times
    kwargs = step_arguments(model, cfg.inference.num_inference_steps)
    steps = kwargs.get("num_inference_steps") or int(getattr(model, "default_num_inference_steps", 1))
    clear = getattr(model, "clear_cache", None)
    model(views, list(range(b)), **kwargs)  # warm-up: kernels, allocator, lazy init
    best = float("inf")
    for r in range(repeats):
        if clear:
            clear()  # encode every view, as a job does for new images
        t0 = time.perf_counter()
        model(views, [b * (r + 1) + i for i in range(b)], **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best / (b * steps)
