"""Depth metrics under Marigold's protocol: per-image least-squares scale and shift, then
AbsRel, delta1, delta2, RMSE and an edge-region error (pure numpy, no I/O).

Predictions are affine-invariant, so each one is first fitted to its ground truth:

- ``space="depth"``: the prediction is affine-invariant depth; fit ``s*pred + t ~ gt``.
- ``space="disparity"``: the prediction is affine-invariant disparity (near = large, as
  disparity models output); fit ``s*pred + t ~ 1/gt``, then invert back to depth.

Metrics are then computed in depth units on the valid pixels (finite GT > 0, optional
mask, optional [min_depth, max_depth]) and averaged per image, then over images, as the
Marigold evaluation does.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np

SPACES = ("depth", "disparity")
METRIC_NAMES = ("abs_rel", "delta1", "delta2", "rmse", "edge_abs_rel", "soft_edge_error")
# A neighbour differing by more than this in log-depth (~10% jump) marks a depth edge.
EDGE_LOG_JUMP = 0.1
EDGE_RADIUS = 2  # pixels: the edge band is the edge dilated by this much


@dataclass
class ImageMetrics:
    abs_rel: float  # mean |d - d*| / d*
    delta1: float  # fraction with max(d/d*, d*/d) < 1.25
    delta2: float  # ... < 1.25^2
    rmse: float  # sqrt(mean (d - d*)^2), GT units
    edge_abs_rel: float  # AbsRel inside the band around GT depth edges (nan: no edges)
    soft_edge_error: float  # relative soft edge error on GT edge pixels (nan: no edges)
    n_valid: int
    n_edge: int
    scale: float  # fitted s (depth or disparity space)
    shift: float  # fitted t

    def to_dict(self) -> dict:
        return asdict(self)


def valid_mask(
    gt: np.ndarray,
    mask: np.ndarray | None = None,
    min_depth: float | None = None,
    max_depth: float | None = None,
) -> np.ndarray:
    """Pixels where GT depth is usable: finite, > 0, in range, and in `mask`. [H,W] bool."""
    ok = np.isfinite(gt) & (gt > 0)
    if min_depth is not None:
        ok &= gt >= min_depth
    if max_depth is not None:
        ok &= gt <= max_depth
    if mask is not None:
        ok &= np.asarray(mask, dtype=bool)
    return ok


def fit_scale_shift(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Least squares (s, t) minimising sum over mask of (s*pred + t - target)^2.

    pred, target: [H,W]; mask: [H,W] bool. Closed form on float64 moments.
    """
    x = pred[mask].astype(np.float64)  # [P]
    y = target[mask].astype(np.float64)  # [P]
    if x.size < 2:
        raise ValueError(f"need at least 2 valid pixels to fit scale and shift, got {x.size}")
    mx, my = x.mean(), y.mean()
    var = np.mean((x - mx) ** 2)
    if var < 1e-20:  # constant prediction: only the shift is identifiable
        return 0.0, float(my)
    s = np.mean((x - mx) * (y - my)) / var
    return float(s), float(my - s * mx)


def align(
    pred: np.ndarray, gt: np.ndarray, mask: np.ndarray, space: str = "depth"
) -> tuple[np.ndarray, float, float]:
    """Affine-invariant prediction -> metric depth aligned to `gt`: ([H,W] float64, s, t).

    Aligned depth is floored at a small positive value (and aligned disparity likewise), so
    the ratios in the metrics stay finite; the floor is relative to the valid GT range.
    """
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    pred = pred.astype(np.float64)
    gt = gt.astype(np.float64)
    g = gt[mask]
    if space == "depth":
        s, t = fit_scale_shift(pred, gt, mask)
        floor = 1e-3 * float(g.min())
        return np.maximum(s * pred + t, floor), s, t
    with np.errstate(divide="ignore"):
        gt_disp = np.where(mask, 1.0 / np.where(gt > 0, gt, 1.0), 0.0)  # [H,W]
    s, t = fit_scale_shift(pred, gt_disp, mask)
    # Farthest allowed aligned depth: 10x the farthest valid GT point.
    disp_floor = 0.1 / float(g.max())
    return 1.0 / np.maximum(s * pred + t, disp_floor), s, t


def depth_edges(gt: np.ndarray, valid: np.ndarray, log_jump: float = EDGE_LOG_JUMP) -> np.ndarray:
    """GT depth discontinuities: pixels whose 4-neighbour differs by > log_jump in log depth.

    Both pixels of a jumping pair are marked; pairs touching invalid pixels are ignored.
    gt, valid: [H,W] -> [H,W] bool.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        ld = np.where(valid, np.log(np.where(valid, gt, 1.0)), 0.0)  # [H,W]
    edges = np.zeros(gt.shape, dtype=bool)
    jump_v = (np.abs(ld[1:] - ld[:-1]) > log_jump) & valid[1:] & valid[:-1]  # [H-1,W]
    jump_h = (np.abs(ld[:, 1:] - ld[:, :-1]) > log_jump) & valid[:, 1:] & valid[:, :-1]  # [H,W-1]
    edges[1:] |= jump_v
    edges[:-1] |= jump_v
    edges[:, 1:] |= jump_h
    edges[:, :-1] |= jump_h
    return edges


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation with a (2r+1)^2 square, by shifted ORs (no scipy). [H,W] -> [H,W]."""
    out = mask.copy()
    h, w = mask.shape
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy == 0 and dx == 0:
                continue
            out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] |= mask[
                max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
            ]
    return out


def soft_edge_error(pred: np.ndarray, gt: np.ndarray, edges: np.ndarray) -> float:
    """Relative soft edge error: mean over GT edge pixels p of
    min over q in the 3x3 neighbourhood of p of |pred(q) - gt(p)| / gt(p).

    PatchFusion's soft edge error (SEE) forgives an edge that is off by one pixel but not a
    blurred one; divided by gt(p) here so it is comparable across scenes of any scale.
    """
    if not edges.any():
        return math.nan
    h, w = gt.shape
    padded = np.pad(pred.astype(np.float64), 1, mode="edge")  # [H+2,W+2]
    ys, xs = np.nonzero(edges)  # [K] each
    g = gt[ys, xs].astype(np.float64)  # [K]
    best = np.full(g.shape, np.inf)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            best = np.minimum(best, np.abs(padded[ys + dy, xs + dx] - g))
    return float(np.mean(best / g))


def compute_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    mask: np.ndarray | None = None,
    space: str = "depth",
    min_depth: float | None = None,
    max_depth: float | None = None,
) -> ImageMetrics:
    """Align one affine-invariant prediction to GT depth and score it.

    pred, gt: [H,W] (same size); mask: optional [H,W] bool of pixels to evaluate.
    """
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
    valid = valid_mask(gt, mask, min_depth, max_depth) & np.isfinite(pred)  # [H,W]
    aligned, s, t = align(pred, gt, valid, space)  # [H,W]
    d = aligned[valid]  # [P]
    g = gt[valid].astype(np.float64)  # [P]
    ratio = np.maximum(d / g, g / d)
    edges = depth_edges(gt, valid)
    band = dilate(edges, EDGE_RADIUS) & valid
    edge_abs_rel = (
        float(np.mean(np.abs(aligned[band] - gt[band]) / gt[band])) if band.any() else math.nan
    )
    return ImageMetrics(
        abs_rel=float(np.mean(np.abs(d - g) / g)),
        delta1=float(np.mean(ratio < 1.25)),
        delta2=float(np.mean(ratio < 1.25**2)),
        rmse=float(np.sqrt(np.mean((d - g) ** 2))),
        edge_abs_rel=edge_abs_rel,
        soft_edge_error=soft_edge_error(aligned, gt, edges),
        n_valid=int(valid.sum()),
        n_edge=int(edges.sum()),
        scale=s,
        shift=t,
    )


def summarize(rows: Iterable[ImageMetrics]) -> dict:
    """Mean of each metric over images (nan-aware for the edge errors) + n_images."""
    rows = list(rows)
    out: dict = {"n_images": len(rows)}
    for name in METRIC_NAMES:
        vals = np.array([getattr(r, name) for r in rows], dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        out[name] = float(vals.mean()) if vals.size else None
    return out


def rankdata(x: Sequence[float]) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as scipy.stats.rankdata). [N] -> [N]."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    # Average the ranks within each group of equal values.
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation of two equal-length sequences (nan if undefined)."""
    if len(a) != len(b):
        raise ValueError(f"lengths differ: {len(a)} vs {len(b)}")
    if len(a) < 2:
        return math.nan
    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = math.sqrt(float(np.sum(ra * ra) * np.sum(rb * rb)))
    return float(np.sum(ra * rb) / denom) if denom > 0 else math.nan


# ----------------------------------------------------------------------------- metric maps


@dataclass
class MetricErrors:
    """A metric map (metres) against GT in metres, as written: no scale, no shift."""

    abs_rel: float  # mean |d - d*| / d* over covered pixels (nan: none covered)
    rmse: float  # metres
    delta1: float  # fraction with max(d/d*, d*/d) < 1.25
    median_ratio: float  # median d / d*: 1 = right scale; ~1000 = GT in millimetres
    no_depth: float  # share of valid GT pixels where the map holds no depth
    n_valid: int  # valid GT pixels (mask, range)
    n_covered: int  # of those, with a finite positive metric depth

    def to_dict(self) -> dict:
        return asdict(self)


def metric_errors(
    pred_m: np.ndarray,
    gt_m: np.ndarray,
    mask: np.ndarray | None = None,
    min_depth: float | None = None,
    max_depth: float | None = None,
) -> MetricErrors:
    """Score a metric depth map as it is: the point of a metric label is its scale, so
    fitting one here would hide the very error it is meant to show.

    pred_m: [H,W] metres, NaN/<= 0 where the map holds no depth; gt_m: [H,W] metres. Pixels
    without a prediction are not scored but counted in `no_depth`, so a map that leaves out
    its hard parts cannot look better than it is."""
    if pred_m.shape != gt_m.shape:
        raise ValueError(f"metric map {pred_m.shape} and ground truth {gt_m.shape} differ in size")
    valid = valid_mask(gt_m, mask, min_depth, max_depth)  # [H,W]
    covered = valid & np.isfinite(pred_m) & (pred_m > 0)  # [H,W]
    n_valid, n_covered = int(valid.sum()), int(covered.sum())
    no_depth = 1.0 - n_covered / n_valid if n_valid else math.nan
    if not n_covered:
        return MetricErrors(math.nan, math.nan, math.nan, math.nan, no_depth, n_valid, 0)
    d = pred_m[covered].astype(np.float64)  # [P]
    g = gt_m[covered].astype(np.float64)  # [P]
    ratio = d / g
    return MetricErrors(
        abs_rel=float(np.mean(np.abs(d - g) / g)),
        rmse=float(np.sqrt(np.mean((d - g) ** 2))),
        delta1=float(np.mean(np.maximum(ratio, 1.0 / ratio) < 1.25)),
        median_ratio=float(np.median(ratio)),
        no_depth=no_depth,
        n_valid=n_valid,
        n_covered=n_covered,
    )
