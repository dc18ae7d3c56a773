"""Does the ensemble's uncertainty rank the errors? Spearman(uncertainty_mean, AbsRel) per image.

Scenes with known depth (`depthray.samples.make_scene`) go through the real inference path
(`predict_images`: members, ensemble alignment, median fusion, MAD uncertainty) with a
test-double model, because the tiny random Marigold knows nothing about depth. The double
implements the model interface and knows each scene's GT; one member is

    member = minmax( a_s * (norm(GT) ** g_i + d_i * random_error(seed, i)) + c_s )

- d_i: per-image size of a smooth (layout) error that changes with the seed: what an
  ensemble can see;
- g_i = exp(+-b_i): a per-image depth-compression error every member shares: what no
  ensemble can see (a monotone warp of [0,1] onto itself, so it leaves the members' range,
  and with it the normalised uncertainty, alone);
- a_s, c_s: a random affine per member (members are affine-invariant, as Marigold's are).

Three settings are reported: seed-dependent error only; seed-dependent plus an independent
systematic error (the realistic middle); systematic error only (a negative control: the
uncertainty should then say nothing, rho ~ 0). For each, the mean AbsRel of all images and
of the 75% least uncertain shows what `quality.max_uncertainty_mean` filtering buys.

    .venv/bin/python -m benchmarks.uncertainty_ranking [--scenes 48] [--ensemble-size 5] [--json out.json]
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks._ranking import log_uniform, ranking_main, ranking_scores
from depthray.metrics import compute_metrics
from depthray.predict import predict_images
from depthray.samples import make_scene

log = logging.getLogger("uncertainty_ranking")


def _smooth_field(rng: np.random.Generator, h: int, w: int, cells: int = 6) -> torch.Tensor:
    """Zero-mean, unit-std low-frequency random field [h,w]: errors in layout, not pixel noise."""
    coarse = torch.from_numpy(rng.standard_normal((1, 1, cells, cells)).astype(np.float32))
    field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0, 0]
    return (field - field.mean()) / field.std().clamp_min(1e-6)


class NoisyOracle:
    """Depth model test double: GT plus per-image, per-seed errors (see the module docstring).

    Views are matched to registered scenes by an 8x8 colour thumbnail, so a resized view
    still finds its scene; run it with tiling off (a tile matches no scene).
    """

    def __init__(self, processing_resolution: int):
        self.processing_resolution = processing_resolution
        self._thumbs: list[torch.Tensor] = []  # [3,8,8] each
        self._scenes: list[tuple[torch.Tensor, float, float]] = []  # (norm GT [H,W], d_i, b_i)

    @staticmethod
    def _thumb(view: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(view[None], 8)[0]  # [3,8,8]

    def register(self, rgb: np.ndarray, gt: np.ndarray, random_error: float, systematic_error: float) -> None:
        view = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0  # [3,H,W]
        self._thumbs.append(self._thumb(view))
        norm = (gt - gt.min()) / max(float(gt.max() - gt.min()), 1e-6)
        self._scenes.append((torch.from_numpy(norm.astype(np.float32)), random_error, systematic_error))

    def _find(self, view: torch.Tensor) -> int:
        thumb = self._thumb(view)
        dist = (torch.stack(self._thumbs) - thumb).abs().mean(dim=(1, 2, 3))  # [S]
        i = int(dist.argmin())
        if float(dist[i]) > 0.02:
            raise LookupError("view matches no registered scene (tiling must be off)")
        return i

    def __call__(self, views: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        out = []
        for view, seed in zip(views, seeds):  # view: [3,h,w]
            i = self._find(view)
            gt, d, b = self._scenes[i]
            h, w = view.shape[-2:]
            gt = F.interpolate(gt[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
            own = np.random.default_rng([i, seed])
            gamma = float(np.exp(b if i % 2 else -b))  # shared by every seed of image i
            member = gt.clamp_min(0) ** gamma + d * _smooth_field(own, h, w)  # [h,w]
            member = own.uniform(0.7, 1.3) * member + own.uniform(-0.2, 0.2)
            lo, hi = member.min(), member.max()
            out.append((member - lo) / (hi - lo).clamp_min(1e-6))
        return torch.stack(out)  # [N,h,w] in [0,1]


def run_setting(name: str, n_scenes: int, size: tuple[int, int], ensemble_size: int,
                random_range: tuple[float, float], systematic_range: tuple[float, float], seed: int) -> dict:
    rng = np.random.default_rng(seed)
    model = NoisyOracle(processing_resolution=max(size))
    scenes = []
    for i in range(n_scenes):
        rgb, gt = make_scene(size[0], size[1], seed=seed * 1000 + i)
        # log-uniform sizes: some images easy, some hard
        d = log_uniform(rng, random_range)
        b = log_uniform(rng, systematic_range)
        model.register(rgb, gt, d, b)
        scenes.append((rgb, gt))
    cfg = {"ensemble_size": ensemble_size, "ensemble_reduction": "median", "seed": 0,
           "batch_size": 16, "tiling": {"mode": "off"}}
    t0 = time.perf_counter()
    results = predict_images([rgb for rgb, _ in scenes], model, cfg)
    unc = np.array([float(r.uncertainty.mean()) for r in results])
    abs_rel = np.array([compute_metrics(r.depth, gt).abs_rel for r, (_, gt) in zip(results, scenes)])
    return {"setting": name, "n_images": n_scenes, "ensemble_size": ensemble_size,
            **ranking_scores(unc, abs_rel), "seconds": time.perf_counter() - t0}


SETTINGS = {
    # name: (seed-dependent error range, systematic error range)
    "random error only": ((0.01, 0.2), (0.0, 0.0)),
    "random + systematic": ((0.01, 0.2), (0.05, 0.6)),
    "systematic only (control)": ((0.05, 0.05), (0.05, 0.6)),
}


def main(argv: list[str] | None = None) -> int:
    return ranking_main(argv, __doc__.split("\n")[0], SETTINGS, run_setting, 48, (192, 256), "members (seeds)")


if __name__ == "__main__":
    raise SystemExit(main())
