"""Tiled vs global-only depth on synthetic scenes with known depth (CPU, a few minutes).

    .venv/bin/python benchmarks/tiling_quality.py [--scenes 3] [--size 1536x2048] [--res 384]

Scenes come from depthray.samples (ground, slanted walls, boxes, 1-3 px poles and wires).
The model is a test double of the depth model interface that stands in for Marigold: it
reads depth from what it sees (channel 0 of the image carries the normalised GT depth), so
everything it misses is what a model at its processing resolution cannot see. Like
Marigold it
  - resolves detail only down to `detail` x its input resolution (latent-space blur),
  - makes a layout error tied to position in its view (the same for every member of a view,
    so ensembling cannot remove it, and different for each tile),
  - gives each member its own scale, shift and smooth low-resolution noise,
  - returns min-max normalised [0,1] depth (affine-invariant).

Metrics at full resolution after a least-squares scale and shift to GT (Marigold protocol):
AbsRel, delta1, AbsRel on pixels within 3 px of a GT depth edge, and a seam score: the mean
absolute gradient of the depth error within 4 px of tile borders divided by the same
elsewhere (1.0 = borders look like anywhere else; GT edge pixels are left out of both).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from depthray.config import InferenceConfig, TilingConfig
from depthray.predict import predict_image
from depthray.samples import make_scene
from depthray.tiling import plan_tiles

log = logging.getLogger("tiling_quality")


class SeeingDepthDouble:
    """Depth model test double: sees depth in channel 0 at limited resolution, errs like a model."""

    def __init__(self, processing_resolution: int = 384, detail: float = 0.5, layout_error: float = 0.08,
                 member_noise: float = 0.02):
        self.processing_resolution = processing_resolution
        self.detail = detail
        self.layout_error = layout_error
        self.member_noise = member_noise

    def __call__(self, views: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        n, _, h, w = views.shape
        # 1. What the model sees: its processing resolution, then its limited detail.
        scale = min(1.0, self.processing_resolution / max(h, w)) * self.detail
        small = (max(1, round(h * scale)), max(1, round(w * scale)))
        d = F.interpolate(views[:, :1], small, mode="area")  # [N,1,h',w']
        d = F.interpolate(d, (h, w), mode="bilinear", align_corners=False)[:, 0]  # [N,h,w]
        # 2. Layout error tied to position in the view: a bowl, the same for all members.
        yy = (torch.arange(h, dtype=torch.float32) + 0.5) / h - 0.5
        xx = (torch.arange(w, dtype=torch.float32) + 0.5) / w - 0.5
        bowl = (yy[:, None] ** 2 + xx[None, :] ** 2) * 2.0  # [h,w] 0 at centre, 1 at corners
        rng_d = (d.flatten(1).amax(1) - d.flatten(1).amin(1))[:, None, None]  # [N,1,1]
        d = d + self.layout_error * rng_d * bowl
        # 3. Per member: scale, shift, smooth noise at latent resolution (1/8).
        out = torch.empty_like(d)
        for i, seed in enumerate(seeds):
            g = torch.Generator().manual_seed(int(seed))
            a = 0.6 + 0.8 * torch.rand((), generator=g)
            b = 0.4 * torch.rand((), generator=g) - 0.2
            noise = torch.randn(1, 1, max(1, h // 8), max(1, w // 8), generator=g)
            noise = F.interpolate(noise, (h, w), mode="bilinear", align_corners=False)[0, 0]
            out[i] = a * (d[i] + self.member_noise * noise) + b
        # 4. Affine-invariant output in [0,1].
        lo = out.flatten(1).amin(1)[:, None, None]
        hi = out.flatten(1).amax(1)[:, None, None]
        return (out - lo) / (hi - lo).clamp_min(1e-6)


@dataclass
class Scores:
    absrel: float
    delta1: float
    edge_absrel: float
    seam: float


def align_lstsq(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Least-squares scale and shift of pred onto gt (float64)."""
    a = np.stack([pred.ravel().astype(np.float64), np.ones(pred.size)], 1)
    (s, t), *_ = np.linalg.lstsq(a, gt.ravel().astype(np.float64), rcond=None)
    return (s * pred + t).astype(np.float64)


def edge_mask(gt: np.ndarray, radius: int = 3, jump: float = 0.05) -> np.ndarray:
    """Pixels within `radius` of a GT depth discontinuity (log-depth step above `jump`)."""
    logd = np.log(gt)
    edges = np.zeros(gt.shape, bool)
    dy = np.abs(np.diff(logd, axis=0)) > jump
    dx = np.abs(np.diff(logd, axis=1)) > jump
    edges[1:] |= dy
    edges[:-1] |= dy
    edges[:, 1:] |= dx
    edges[:, :-1] |= dx
    t = torch.from_numpy(edges.astype(np.float32))[None, None]
    return (F.max_pool2d(t, 2 * radius + 1, stride=1, padding=radius)[0, 0] > 0).numpy()


def border_lines(plan, shape) -> tuple[list[int], list[int]]:
    """Interior tile border rows and columns of the finest level, in image pixels."""
    if not plan.levels:
        return [], []
    level = plan.levels[-1]
    sy, sx = shape[0] / level.size[0], shape[1] / level.size[1]
    rows, cols = set(), set()
    for t in level.tiles:
        for r in (t.top, t.top + t.height):
            if 0 < r < level.size[0]:
                rows.add(round(r * sy))
        for c in (t.left, t.left + t.width):
            if 0 < c < level.size[1]:
                cols.add(round(c * sx))
    return sorted(rows), sorted(cols)


def seam_score(err: np.ndarray, edges: np.ndarray, rows: list[int], cols: list[int], band: int = 4) -> float:
    """Mean |gradient of the error| within `band` px of tile borders / the same elsewhere.

    The band spans a whole noise cell of the double (8 px): a narrower one samples a
    phase of that periodic texture and reads +-10 % by chance, while a real seam (a step
    or kink at the border) still stands out, e.g. tiles blended without feathering.
    """
    gx = np.abs(np.diff(err, axis=1))  # [H,W-1] between column c and c+1
    gy = np.abs(np.diff(err, axis=0))  # [H-1,W]
    okx = ~(edges[:, 1:] | edges[:, :-1])
    oky = ~(edges[1:] | edges[:-1])
    on_x = np.zeros(gx.shape, bool)
    on_y = np.zeros(gy.shape, bool)
    for c in cols:
        on_x[:, max(c - band, 0) : c + band] = True
    for r in rows:
        on_y[max(r - band, 0) : r + band] = True
    border = np.concatenate([gx[on_x & okx], gy[on_y & oky]])
    rest = np.concatenate([gx[~on_x & okx], gy[~on_y & oky]])
    return float(border.mean() / max(rest.mean(), 1e-12)) if border.size else float("nan")


def score(pred: np.ndarray, gt: np.ndarray, edges: np.ndarray, rows, cols) -> Scores:
    aligned = np.maximum(align_lstsq(pred, gt), 1e-3)
    rel = np.abs(aligned - gt) / gt
    ratio = np.maximum(aligned / gt, gt / aligned)
    return Scores(
        absrel=float(rel.mean()),
        delta1=float((ratio < 1.25).mean()),
        edge_absrel=float(rel[edges].mean()),
        seam=seam_score((aligned - gt) / gt, edges, rows, cols),
    )


VARIANTS = {
    # name: tiling section overrides
    "global only": {"mode": "off"},
    "align, no feathering": {"mode": "on", "fusion": "align"},  # box weights: a seam check
    "align": {"mode": "on", "fusion": "align"},
    "lowfreq": {"mode": "on", "fusion": "lowfreq"},
    "pyramid": {"mode": "on", "fusion": "pyramid"},
    "pyramid-lowfreq": {"mode": "on", "fusion": "pyramid-lowfreq"},
}


@contextlib.contextmanager
def _box_weights(enabled: bool):
    """Blend tiles with flat weights (a plain average where they overlap), to show what the
    seam score reads when tiles are not feathered."""
    import depthray.predict as predict_module

    original = predict_module.tile_weights
    if enabled:
        predict_module.tile_weights = lambda tile, level: torch.ones(tile.height, tile.width)
    try:
        yield
    finally:
        predict_module.tile_weights = original


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=3)
    parser.add_argument("--size", default="1536x2048", help="HxW of the scenes")
    parser.add_argument("--res", type=int, default=384, help="the double's processing resolution")
    parser.add_argument("--ensemble-size", type=int, default=3)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = parser.parse_args(argv)
    # One thread: on a small shared CPU, torch's thread pool fighting other processes makes
    # small ops 10x slower; the numbers below do not depend on it.
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    h, w = (int(v) for v in args.size.split("x"))
    model = SeeingDepthDouble(args.res)
    totals: dict[str, list[Scores]] = {v: [] for v in args.variants}
    times: dict[str, float] = {v: 0.0 for v in args.variants}
    views: dict[str, int] = {}
    # Seam positions: those of the default tiled plan, for every variant (global only included,
    # so its score shows what "no seams" reads as).
    ref_plan = plan_tiles(h, w, args.res, TilingConfig(mode="on"))
    for seed in range(args.scenes):
        rgb, gt = make_scene(h, w, seed=seed)
        d01 = (gt - gt.min()) / (gt.max() - gt.min())
        image = np.stack([d01, rgb.mean(2) / 255.0, rgb.mean(2) / 255.0], axis=2).astype(np.float32)
        edges = edge_mask(gt)
        rows, cols = border_lines(ref_plan, gt.shape)
        for name in args.variants:
            cfg = InferenceConfig(ensemble_size=args.ensemble_size, batch_size=16,
                                  tiling=TilingConfig(**VARIANTS[name]))
            t0 = time.perf_counter()
            with _box_weights("no feathering" in name):
                result = predict_image(image, model, cfg)
            times[name] += time.perf_counter() - t0
            views[name] = result.num_views
            plan = plan_tiles(h, w, args.res, cfg.tiling)
            r, c = border_lines(plan, gt.shape) if plan.tiled else (rows, cols)
            totals[name].append(score(result.depth, gt, edges, r, c))
            log.info("scene %d %-30s %s", seed, name, totals[name][-1])

    print(f"\n{args.scenes} scenes {w}x{h} ({w * h / 1e6:.1f} MP), processing resolution {args.res}, "
          f"ensemble {args.ensemble_size}\n")
    print("| variant | views | AbsRel | δ1 | edge AbsRel | seam score | s/image (CPU) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.variants:
        m = {k: np.mean([getattr(s, k) for s in totals[name]]) for k in Scores.__dataclass_fields__}
        print(f"| {name} | {views[name]} | {m['absrel']:.4f} | {m['delta1']:.4f} | {m['edge_absrel']:.4f} "
              f"| {m['seam']:.2f} | {times[name] / args.scenes:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
