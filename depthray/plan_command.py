"""`depthray plan`: what images will cost before a job runs, printed as a table.

The numbers are depthray/plan.py's (the tile planner inference uses); this module is what
the user sees around them: `--size WxH` and `--images GLOB` read into image sizes, and with
`--measure` the seconds one image of each size takes through `depthray predict`'s own path
on this machine (depthray/measure.py) in place of the configured rate.
"""

from __future__ import annotations

import argparse
import glob
import sys
from collections import Counter

from depthray.config import Config, load_config
from depthray.plan import ImagePlan, format_plans, image_sizes, plan_image


class _BadSize(ValueError):
    pass


def _sizes(args: argparse.Namespace) -> tuple[list[tuple[int, int]], dict[tuple[int, int], str]]:
    """(height, width) per planned image, and a file of each size read from `--images` (the
    user's own image is what `--measure` times; other sizes get a synthetic photo)."""
    sizes: list[tuple[int, int]] = []
    for text in args.size or []:
        try:
            w, h = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise _BadSize(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 4000x3000") from None
        sizes.extend([(h, w)] * args.count)
    files: dict[tuple[int, int], str] = {}
    for pattern in args.images or []:
        paths = sorted(glob.glob(pattern)) or [pattern]
        for path, size in zip(paths, image_sizes(paths)):
            sizes.append(size)
            files.setdefault(size, path)
    return sizes, files


def _measure(args: argparse.Namespace, cfg: Config, plans: list[tuple[ImagePlan, int]],
             counts: list[tuple[tuple[int, int], int]], files: dict[tuple[int, int], str]) -> None:
    """Each plan's seconds measured here, and `args.seconds_per_evaluation` the rate they
    imply; prints where the seconds went (model calls vs the rest of predict's path)."""
    from depthray.measure import measure_sizes

    # the model is loaded with the settings the plan used, so the timed calls are the planned ones
    if args.processing_resolution:
        cfg.model.processing_resolution = args.processing_resolution
    if args.steps:
        cfg.inference.num_inference_steps = args.steps
    timings = measure_sizes(cfg, [size for size, _ in counts], files)
    for (p, n), (size, _) in zip(plans, counts):
        p.gpu_seconds = timings[size].seconds
    total = sum(p.gpu_seconds * n for p, n in plans)
    args.seconds_per_evaluation = total / max(sum(p.model_evaluations * n for p, n in plans), 1)
    model_s = sum(timings[size].model_seconds * n for size, n in counts)
    print(f"measured {args.seconds_per_evaluation:.4g} s per evaluation (view x member x step), everything "
          f"an image costs in `depthray predict` on this machine: model {model_s:.1f} s + decoding, "
          f"tile fusion, encoding and preview {total - model_s:.1f} s over the planned images")


def run_plan(args: argparse.Namespace) -> int:
    """`depthray plan`: the table printed; 2 when no size was given or one is malformed."""
    cfg = load_config(args.config, args.set, require_io=False)
    try:
        sizes, files = _sizes(args)
    except _BadSize as e:
        print(f"depthray plan: {e}", file=sys.stderr)
        return 2
    if not sizes:
        print("depthray plan: give --size WxH and/or --images GLOB", file=sys.stderr)
        return 2
    counts = sorted(Counter(sizes).items())
    plans = [(plan_image(h, w, cfg, processing_resolution=args.processing_resolution, steps=args.steps,
                         seconds_per_evaluation=args.seconds_per_evaluation), n) for (h, w), n in counts]
    if args.measure:
        _measure(args, cfg, plans, counts, files)
    print(format_plans(plans, args.seconds_per_evaluation, measured=args.measure))
    return 0
