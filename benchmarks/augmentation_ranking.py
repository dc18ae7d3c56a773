"""Do test-time augmentation ensembles rank errors for deterministic models?

Deterministic models (end-to-end Marigold, transformers models) give identical members for
every seed, so depthray ensembles them over augmentations (depthray/augment.py: flips,
zoom-outs with shifts), undone before fusion. This benchmark asks whether the resulting
uncertainty ranks per-image errors: Spearman(uncertainty_mean, AbsRel), as
benchmarks/uncertainty_ranking.py does for seed ensembles.

Scenes are the tiling benchmark's (`depthray.samples`, families yard/street/indoor). The
model is a deterministic test double in the manner of benchmarks/tiling_quality.py's
SeeingDepthDouble: it reads depth from channel 0 (the normalised GT), blurs it to its
resolution and detail, and adds a layout error tied to position in its view (a bowl plus a
left-right tilt) whose size differs per image (carried by channel 2, a constant). Such an
error moves with the view, so augmentations see it: what a model gets wrong about layout
depends on framing. The negative control has only an error fixed to the scene (a smooth
random field added to depth, carried by channel 1, so it moves with the content under
every augmentation and is undone with it): no ensemble of augmentations can see it, so it
can only dilute the ranking. It is not a null control: the double's own limited resolution
and detail already err on the scenes' thin poles and edges, differently at each zoom, and
augmentations see that (the first setting, with no added error, measures just that).

    PYTHONPATH=. python benchmarks/augmentation_ranking.py [--scenes 36] [--ensemble-size 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

from depthray.metrics import compute_metrics, spearman
from depthray.predict import predict_images
from depthray.samples import make_scene

FAMILIES = ("yard", "street", "indoor")


class DeterministicSeeingDouble:
    """Deterministic depth double: sees channel 0, errs in layout by channel 2 (in the view)
    and by channel 1 - 0.5 (a field fixed to the scene)."""

    deterministic = True

    def __init__(self, processing_resolution: int = 128, detail: float = 0.5):
        self.processing_resolution = processing_resolution
        self.detail = detail

    def __call__(self, views: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        n, _, h, w = views.shape
        scale = min(1.0, self.processing_resolution / max(h, w)) * self.detail
        small = (max(1, round(h * scale)), max(1, round(w * scale)))
        d = F.interpolate(views[:, :1], small, mode="area")
        d = F.interpolate(d, (h, w), mode="bilinear", align_corners=False)[:, 0]  # [N,h,w]
        d = d + (views[:, 1] - 0.5)  # scene-fixed error: moves with the content
        layout = views[:, 2].mean((1, 2))[:, None, None]  # per-image layout error size
        yy = (torch.arange(h, dtype=torch.float32) + 0.5) / h - 0.5
        xx = (torch.arange(w, dtype=torch.float32) + 0.5) / w - 0.5
        field = (yy[:, None] ** 2 + xx[None, :] ** 2) * 2.0 + xx[None, :]  # bowl + tilt, in the view
        d = d + layout * field
        lo, hi = d.flatten(1).amin(1)[:, None, None], d.flatten(1).amax(1)[:, None, None]
        return (d - lo) / (hi - lo).clamp_min(1e-6)


def run_setting(name: str, n: int, size: tuple[int, int], ensemble_size: int,
                layout_range: tuple[float, float], warp_range: tuple[float, float], seed: int) -> dict:
    rng = np.random.default_rng(seed)
    images, gts = [], []
    for i in range(n):
        rgb, gt = make_scene(size[0], size[1], seed=seed * 1000 + i, family=FAMILIES[i % len(FAMILIES)])
        norm = (gt - gt.min()) / max(float(gt.max() - gt.min()), 1e-6)
        img = np.empty((*gt.shape, 3), np.float32)
        img[..., 0] = norm
        amp = np.exp(rng.uniform(*np.log(warp_range))) if warp_range[1] > 0 else 0.0
        coarse = torch.from_numpy(rng.standard_normal((1, 1, 6, 6)).astype(np.float32))
        field = F.interpolate(coarse, size=gt.shape, mode="bicubic", align_corners=False)[0, 0].numpy()
        img[..., 1] = 0.5 + amp * field / max(float(field.std()), 1e-6) / 4  # scene-fixed error
        img[..., 2] = np.exp(rng.uniform(*np.log(layout_range))) if layout_range[1] > 0 else 0.0
        images.append(img)
        gts.append(gt)
    cfg = {"ensemble_size": ensemble_size, "ensemble_reduction": "median", "batch_size": 16,
           "tiling": {"mode": "off"}}
    t0 = time.perf_counter()
    results = predict_images(images, DeterministicSeeingDouble(max(size)), cfg)
    assert all(r.members == "augmentations" for r in results)
    unc = np.array([float(r.uncertainty.mean()) for r in results])
    abs_rel = np.array([compute_metrics(r.depth, gt).abs_rel for r, gt in zip(results, gts)])
    keep = unc <= np.quantile(unc, 0.75)
    return {"setting": name, "n_images": n, "ensemble_size": ensemble_size,
            "spearman": spearman(unc, abs_rel), "abs_rel_all": float(abs_rel.mean()),
            "abs_rel_kept_75pct": float(abs_rel[keep].mean()),
            "abs_rel_dropped_25pct": float(abs_rel[~keep].mean()), "seconds": time.perf_counter() - t0}


SETTINGS = {
    # name: (layout error range (moves with the view), scene-fixed error range (moves with the content))
    "resolution/detail errors only": ((0.0, 0.0), (0.0, 0.0)),
    "layout error (augmentations see it)": ((0.01, 0.3), (0.0, 0.0)),
    "layout + scene-fixed": ((0.01, 0.3), (0.01, 0.3)),
    "scene-fixed only (invisible part)": ((0.0, 0.0), (0.01, 0.3)),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenes", type=int, default=36)
    p.add_argument("--size", type=int, nargs=2, default=(96, 128), metavar=("H", "W"))
    p.add_argument("--ensemble-size", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    rows = [run_setting(name, args.scenes, tuple(args.size), args.ensemble_size, lay, warp, args.seed)
            for name, (lay, warp) in SETTINGS.items()]
    print(f"{args.scenes} scenes {args.size[0]}x{args.size[1]}, {args.ensemble_size} augmentations, median + MAD")
    print(f"{'setting':38s} {'spearman':>8s} {'AbsRel all':>10s} {'kept 75%':>9s} {'dropped 25%':>11s}")
    for r in rows:
        print(f"{r['setting']:38s} {r['spearman']:8.3f} {r['abs_rel_all']:10.4f} "
              f"{r['abs_rel_kept_75pct']:9.4f} {r['abs_rel_dropped_25pct']:11.4f}")
    print(json.dumps(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
