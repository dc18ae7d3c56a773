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

    python -m benchmarks.augmentation_ranking [--scenes 36] [--ensemble-size 5] [--json out.json]
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks._ranking import log_uniform, ranking_main, ranking_scores
from depthray.metrics import compute_metrics
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
        amp = log_uniform(rng, warp_range)
        coarse = torch.from_numpy(rng.standard_normal((1, 1, 6, 6)).astype(np.float32))
        field = F.interpolate(coarse, size=gt.shape, mode="bicubic", align_corners=False)[0, 0].numpy()
        img[..., 1] = 0.5 + amp * field / max(float(field.std()), 1e-6) / 4  # scene-fixed error
        img[..., 2] = log_uniform(rng, layout_range)
        images.append(img)
        gts.append(gt)
    cfg = {"ensemble_size": ensemble_size, "ensemble_reduction": "median", "batch_size": 16,
           "tiling": {"mode": "off"}}
    t0 = time.perf_counter()
    results = predict_images(images, DeterministicSeeingDouble(max(size)), cfg)
    assert all(r.members == "augmentations" for r in results)
    unc = np.array([float(r.uncertainty.mean()) for r in results])
    abs_rel = np.array([compute_metrics(r.depth, gt).abs_rel for r, gt in zip(results, gts)])
    return {"setting": name, "n_images": n, "ensemble_size": ensemble_size, **ranking_scores(unc, abs_rel),
            "seconds": time.perf_counter() - t0}


SETTINGS = {
    # name: (layout error range (moves with the view), scene-fixed error range (moves with the content))
    "resolution/detail errors only": ((0.0, 0.0), (0.0, 0.0)),
    "layout error (augmentations see it)": ((0.01, 0.3), (0.0, 0.0)),
    "layout + scene-fixed": ((0.01, 0.3), (0.01, 0.3)),
    "scene-fixed only (invisible part)": ((0.0, 0.0), (0.01, 0.3)),
}


def main(argv: list[str] | None = None) -> int:
    return ranking_main(argv, __doc__.split("\n")[0], SETTINGS, run_setting, 36, (96, 128), "augmentations")


if __name__ == "__main__":
    raise SystemExit(main())
