"""Metric pseudo-labels: align an affine-invariant label to metric depth (pure numpy).

A relative label (Marigold's [0,1] depth, or a disparity model's) is metric up to an
unknown scale and shift. Given metric depth at some pixels (LiDAR-like points, or a dense
metric model's map with its confidence) we fit that affine map robustly, score it on points
the fit never saw, and give each image a verdict a stage can act on.

The fit is made in the label's own space, where the relation is affine:

- ``space="depth"`` (Marigold): metric depth ~ s*label + t.
- ``space="disparity"`` (Depth Anything, DPT...): 1/metric ~ s*label + t.

Residuals are relative, r = (s*x + t)/y - 1 (y: the target in fit space), not absolute: the
label's error and LiDAR noise grow with depth, the verdict's metric (AbsRel) is relative,
and in disparity space r is about the relative depth error too, so one threshold serves both
spaces. The fit is still linear in (s, t): least squares of [x/y, 1/y] . (s, t) = 1.

Robust step: least median of squares over seeded random point pairs (each pair fixes s, t
exactly; the pair whose residuals have the smallest median wins: up to ~50 % outliers),
then least squares on the inliers (|r| <= inlier_k * sigma, sigma = 1.4826 * median |r|),
repeated until the inlier set settles. Deterministic given the seed.

Honest residual: a seeded ``holdout_fraction`` of the points is kept out of the fit. abs_rel
is measured on the held-out points the fit accepts as inliers (same rule as the fit's; those
rejected show up in ``inlier_fraction``), delta1 on all held-out points (an outlier simply
counts as a miss). Both in depth units, against the given metric depths (so against LiDAR
noise, or against the reference model for `align_to_reference`).

Verdict: "ok", or "low_confidence" with one line per failed check in ``reasons``; the
thresholds are keyword arguments of both aligners, defaults and reasons in `AlignOptions`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

SPACES = ("depth", "disparity")
COVERAGE_GRID = 8  # coverage = share of the cells of an 8x8 grid over the image with a point
MAD_TO_SIGMA = 1.4826  # median |r| -> standard deviation for Gaussian residuals


@dataclass(frozen=True)
class AlignOptions:
    """Fit settings and verdict thresholds; every field is a keyword of both aligners.

    An image failing any threshold is "low_confidence". A fitted scale <= 0 (inverted
    relation: the label runs the wrong way) always is.
    """

    holdout_fraction: float = 0.2  # valid points kept out of the fit to score it, in (0, 1)
    # Fewer valid points: fit on all of them, residual in-sample (50 leaves 10 held out).
    min_points: int = 50
    max_dropped_fraction: float = 0.2  # input points dropped (NaN, <= 0, outside, no label)
    min_coverage: float = 0.25  # share of an 8x8 grid of image cells holding a valid point
    # The points' label span (5-95 % quantiles) over the image's: below it, the scale is
    # unobservable (points at one depth say nothing about the slope).
    min_label_span: float = 0.1
    min_depth_ratio: float = 1.05  # points' metric depth 95 %/5 % quantiles: same reason
    min_inlier_fraction: float = 0.6  # share of all valid points the fit accepts
    max_abs_rel: float = 0.15  # held-out AbsRel
    max_invalid_fraction: float = 0.01  # pixels where the fitted map has no positive depth
    inlier_k: float = 2.5  # inlier: |r| <= inlier_k * sigma (Gaussian: rejects ~1 % of inliers)
    # Random pairs tried: at 50 % outliers a pair is clean with p = 0.25, none of 256 is with
    # p = 0.75**256 ~ 1e-32; the cost is a [256, N] residual matrix.
    hypotheses: int = 256

    def __post_init__(self):
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")


@dataclass
class MetricFit:
    scale: float  # s: fit space value = s * label + t (nan: no fit)
    shift: float  # t
    space: str  # "depth": metric ~ s*x + t; "disparity": 1/metric ~ s*x + t
    points_total: int  # points given (dense: pixels of the image)
    points_dropped: int  # invalid inputs: non-finite or <= 0 depth, outside the image, no label
    points_used: int  # fit points (not held out) the final fit accepts as inliers
    points_held_out: int  # valid points kept out of the fit (0: residual is in-sample)
    abs_rel: float  # mean |d - d*| / d* on accepted held-out points (nan: no fit)
    delta1: float  # share of held-out points with max(d/d*, d*/d) < 1.25
    inlier_fraction: float  # share of all valid points the fit accepts
    coverage: float  # share of the 8x8 grid cells holding a valid point
    sigma: float  # robust scale of the relative residuals (1.4826 * median |r|)
    verdict: str = "low_confidence"  # "ok" | "low_confidence"
    reasons: list[str] = field(default_factory=list)  # empty when ok

    def apply(self, relative: np.ndarray) -> np.ndarray:
        """Relative label [H,W] -> metric depth [H,W] float32, metres.

        Where the affine map gives no positive depth the result is NaN (depth space: s*x+t <= 0;
        disparity space: s*x+t < 0, behind infinity), or +inf (disparity exactly 0: at
        infinity). No fit (scale nan): all NaN.
        """
        v = self.scale * np.asarray(relative, np.float64) + self.shift
        with np.errstate(divide="ignore", invalid="ignore"):
            if self.space == "depth":
                out = np.where(v > 0, v, np.nan)
            else:
                out = np.where(v > 0, 1.0 / v, np.where(v == 0, np.inf, np.nan))
        return out.astype(np.float32)

    def to_meta(self) -> dict:
        """JSON-ready fields for a row's metadata (non-finite floats become None)."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in asdict(self).items()}


@dataclass
class SparsePoints:
    uv: np.ndarray  # [N,2] int (column, row)
    depth: np.ndarray  # [N] float64 metres, noisy; outliers at a wrong depth
    outlier: np.ndarray  # [N] bool: which points were moved to a wrong depth


def relative_residuals(s, t, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """r = (s*x + t)/y - 1 for scalar or [K] (s, t): -> [N] or [K,N]."""
    s, t = np.asarray(s, np.float64)[..., None], np.asarray(t, np.float64)[..., None]
    return (s * x + t) / y - 1.0


def fit_relative(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least squares (s, t) minimising sum ((s*x + t)/y - 1)^2. x, y: [N], y > 0, N >= 2."""
    a = np.stack([x / y, 1.0 / y], axis=1)  # [N,2]
    # Columns scaled to unit norm first: 1/y spans orders of magnitude in disparity space.
    norm = np.linalg.norm(a, axis=0)
    norm[norm == 0] = 1.0
    p, *_ = np.linalg.lstsq(a / norm, np.ones(len(x)), rcond=None)
    s, t = p / norm
    return float(s), float(t)


def robust_fit(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, *, hypotheses: int = 256,
               inlier_k: float = 2.5, sigma_floor: float = 1e-3, rounds: int = 5, scored: int = 1024):
    """Least median of squares over random pairs, then least squares on inliers.

    x, y: [N] label and fit-space target (y > 0). Returns (s, t, sigma, inliers [N] bool);
    s = t = nan when no pair has two distinct labels (scale unobservable).
    sigma_floor keeps a noise-free fit from rejecting points by rounding alone.
    Hypotheses are scored on at most `scored` random points: the median of 1024 is as robust
    (breakdown 50 %) as that of all ~15k a LiDAR frame gives, at 1/15 of the cost (scoring
    every point was ~60 ms an image); the refinement below uses every point.
    """
    n = len(x)
    if n == 2:  # exactly determined: no redundancy to judge outliers by
        pairs = np.array([[0, 1]])
    elif n * (n - 1) // 2 <= hypotheses:
        pairs = np.stack(np.triu_indices(n, 1), axis=1)  # all pairs
    else:
        pairs = rng.integers(0, n, size=(hypotheses, 2))
    i, j = pairs[:, 0], pairs[:, 1]
    dx = x[i] - x[j]
    ok = np.abs(dx) > 1e-9
    if not ok.any():
        return math.nan, math.nan, math.nan, np.zeros(n, bool)
    s = (y[i] - y[j])[ok] / dx[ok]  # [K] line through each pair
    t = y[i][ok] - s * x[i][ok]
    sub = rng.choice(n, size=scored, replace=False) if n > scored else slice(None)
    med = np.median(np.abs(relative_residuals(s, t, x[sub], y[sub])), axis=1)  # [K]
    best = int(np.argmin(med))
    s, t = float(s[best]), float(t[best])
    if n == 2:
        return s, t, math.nan, np.ones(n, bool)
    # sigma from the median of all |r| (robust to < 50 % outliers), times Rousseeuw's
    # small-sample correction 1 + 5/(n - 2).
    inl = np.zeros(n, bool)
    for _ in range(rounds):
        r = np.abs(relative_residuals(s, t, x, y))
        sigma = max(MAD_TO_SIGMA * float(np.median(r)) * (1 + 5 / max(n - 2, 1)), sigma_floor)
        new = r <= inlier_k * sigma
        if new.sum() < 2 or np.array_equal(new, inl):
            break
        inl = new
        s, t = fit_relative(x[inl], y[inl])
    r = np.abs(relative_residuals(s, t, x, y))
    sigma = max(MAD_TO_SIGMA * float(np.median(r)) * (1 + 5 / max(n - 2, 1)), sigma_floor)
    return s, t, sigma, r <= inlier_k * sigma


def coverage(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int], grid: int = COVERAGE_GRID) -> float:
    """Share of the grid x grid cells of an image of `shape` holding at least one point."""
    h, w = shape
    cells = (rows * grid // h) * grid + cols * grid // w
    return len(np.unique(cells)) / float(grid * grid)


def _span(v: np.ndarray) -> float:
    lo, hi = np.quantile(v, [0.05, 0.95])
    return float(hi - lo)


def _fit(relative, space, rows, cols, depth, n_total, n_dropped, rng, o: AlignOptions) -> MetricFit:
    """The shared core: valid points (rows, cols, depth > 0) -> fit, held-out score, verdict."""
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    n = len(depth)
    x = relative[rows, cols].astype(np.float64)  # [N]
    y = depth if space == "depth" else 1.0 / depth  # [N] fit-space target
    reasons: list[str] = []
    if n_total and n_dropped / n_total > o.max_dropped_fraction:
        reasons.append(f"{n_dropped} of {n_total} points dropped ({100 * n_dropped / n_total:.0f}%: "
                       f"non-finite or <= 0 depth, outside the image, or no label; "
                       f"max_dropped_fraction {100 * o.max_dropped_fraction:.0f}%)")
    cov = coverage(rows, cols, relative.shape) if n else 0.0
    nan = math.nan
    result = dict(scale=nan, shift=nan, space=space, points_total=n_total, points_dropped=n_dropped,
                  points_used=0, points_held_out=0, abs_rel=nan, delta1=nan, inlier_fraction=nan,
                  coverage=cov, sigma=nan)
    if n < 2:
        reasons.append(f"{n} valid point{'s' if n != 1 else ''}: scale and shift need at least 2")
        return MetricFit(**result, reasons=reasons)
    if n < o.min_points:
        reasons.append(f"only {n} valid points (min_points {o.min_points}): fit on all of them, "
                       f"residual in-sample")
        fit_idx = held = np.arange(n)
    else:
        order = rng.permutation(n)
        n_held = max(1, int(round(o.holdout_fraction * n)))
        held, fit_idx = order[:n_held], order[n_held:]
        result["points_held_out"] = n_held
    if cov < o.min_coverage:
        reasons.append(f"points cover {100 * cov:.0f}% of the image (min_coverage {100 * o.min_coverage:.0f}%)")
    finite = relative[np.isfinite(relative)]
    label_span = _span(x) / max(_span(finite), 1e-12)
    if label_span < o.min_label_span:
        reasons.append(f"scale unobservable: the points span {100 * label_span:.1f}% of the label's "
                       f"range (min_label_span {100 * o.min_label_span:.0f}%)")
    lo, hi = np.quantile(depth, [0.05, 0.95])
    if hi / lo < o.min_depth_ratio:
        reasons.append(f"scale unobservable: the points lie at about one depth ({lo:.3g}-{hi:.3g} m, "
                       f"ratio {hi / lo:.3f} < min_depth_ratio {o.min_depth_ratio})")
    s, t, sigma, inl = robust_fit(x[fit_idx], y[fit_idx], rng, hypotheses=o.hypotheses, inlier_k=o.inlier_k)
    if not math.isfinite(s):
        if not any(r.startswith("scale unobservable") for r in reasons):
            reasons.append("scale unobservable: all points carry the same label value")
        return MetricFit(**result, reasons=reasons)
    result.update(scale=s, shift=t, points_used=int(inl.sum()), sigma=sigma)
    if s <= 0:
        reasons.append(f"inverted relation: fitted scale {s:.3g} <= 0 (the label's {space} runs "
                       f"the wrong way, or the label is not {space})")
    # Held-out score in depth units. An n == 2 fit has no sigma: accept every point.
    r_all = np.abs(relative_residuals(s, t, x, y))
    accepted = r_all <= o.inlier_k * sigma if math.isfinite(sigma) else np.ones(n, bool)
    result["inlier_fraction"] = float(accepted.mean())
    with np.errstate(divide="ignore", invalid="ignore"):
        v = s * x[held] + t
        pred = v if space == "depth" else 1.0 / v
    good = np.isfinite(pred) & (pred > 0)
    gt = depth[held]
    ratio = np.where(good, np.maximum(pred / gt, gt / np.where(good, pred, 1.0)), np.inf)
    result["delta1"] = float(np.mean(ratio < 1.25))
    keep = accepted[held] & good
    if keep.any():
        result["abs_rel"] = float(np.mean(np.abs(pred[keep] - gt[keep]) / gt[keep]))
    if result["inlier_fraction"] < o.min_inlier_fraction:
        reasons.append(f"only {100 * result['inlier_fraction']:.0f}% of the points agree with the fit "
                       f"(min_inlier_fraction {100 * o.min_inlier_fraction:.0f}%)")
    if not result["abs_rel"] <= o.max_abs_rel:  # nan (no accepted held-out point) fails too
        reasons.append(f"held-out abs_rel {result['abs_rel']:.3g} > max_abs_rel {o.max_abs_rel}")
    fit = MetricFit(**result)
    # Pixels `apply` leaves without a finite depth: where s*x + t is not positive (NaN in depth
    # space; behind or at infinity in disparity space), found without building the map.
    finite = relative[np.isfinite(relative)]
    bad = float(np.mean(~(fit.scale * finite.astype(np.float64) + fit.shift > 0))) if finite.size else 1.0
    if bad > o.max_invalid_fraction:
        reasons.append(f"the fit gives no positive depth at {100 * bad:.1f}% of the pixels "
                       f"(max_invalid_fraction {100 * o.max_invalid_fraction:.0f}%)")
    fit.reasons = reasons
    fit.verdict = "low_confidence" if reasons else "ok"
    return fit


def align_to_points(relative: np.ndarray, space: str, uv: np.ndarray, depth: np.ndarray, *,
                    seed: int = 0, **options) -> MetricFit:
    """Fit a relative label [H,W] to sparse metric points.

    uv: [N,2] pixel (column, row), rounded if float; depth: [N] metres. Points with a
    non-finite or <= 0 depth, outside the image, or on a non-finite label are dropped and
    counted. options: the fields of `AlignOptions`.
    """
    opts = AlignOptions(**options)
    relative = np.asarray(relative)
    h, w = relative.shape
    uv = np.rint(np.asarray(uv, np.float64)).reshape(-1, 2)
    depth = np.asarray(depth, np.float64).reshape(-1)
    if len(uv) != len(depth):
        raise ValueError(f"{len(uv)} pixel positions but {len(depth)} depths")
    with np.errstate(invalid="ignore"):
        ok = (np.isfinite(depth) & (depth > 0) & np.isfinite(uv).all(1)
              & (uv[:, 0] >= 0) & (uv[:, 0] < w) & (uv[:, 1] >= 0) & (uv[:, 1] < h))
    cols, rows = uv[ok, 0].astype(np.int64), uv[ok, 1].astype(np.int64)
    labelled = np.isfinite(relative[rows, cols])
    rows, cols, d = rows[labelled], cols[labelled], depth[ok][labelled]
    return _fit(relative, space, rows, cols, d, len(depth), len(depth) - len(d),
                np.random.default_rng(seed), opts)


def points_from_map(sparse_depth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A sparse metric depth image [H,W] (KITTI-style: 0 or non-finite = no return) ->
    (uv [N,2] (column, row), depth [N])."""
    sparse_depth = np.asarray(sparse_depth, np.float64)
    rows, cols = np.nonzero(np.isfinite(sparse_depth) & (sparse_depth != 0))
    return np.stack([cols, rows], axis=1), sparse_depth[rows, cols]


def align_to_reference(relative: np.ndarray, space: str, reference: np.ndarray,
                       confidence: np.ndarray | None = None, *, samples: int = 4096, seed: int = 0,
                       **options) -> MetricFit:
    """Fit a relative label [H,W] to a dense metric depth map [H,W] (metres), e.g. a metric
    depth model's output, weighted by its confidence [H,W] >= 0 (None: uniform).

    The fit runs on a fixed, seeded sample of `samples` pixels drawn with probability
    proportional to confidence (weighted sampling without replacement, Efraimidis-Spirakis):
    a confidence-weighted fit at a fixed cost per image; pixels of zero confidence never
    enter. The held-out part of the sample scores it. Pixels with a non-finite or <= 0
    reference are dropped and counted. options: the fields of `AlignOptions`.
    """
    opts = AlignOptions(**options)
    relative = np.asarray(relative)
    reference = np.asarray(reference, np.float64)
    if reference.shape != relative.shape:
        raise ValueError(f"reference {reference.shape} and label {relative.shape} differ in size")
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(reference) & (reference > 0) & np.isfinite(relative)  # [H,W]
    weight = np.ones(relative.shape) if confidence is None else np.asarray(confidence, np.float64)
    if weight.shape != relative.shape:
        raise ValueError(f"confidence {weight.shape} and label {relative.shape} differ in size")
    weight = np.where(valid & np.isfinite(weight) & (weight > 0), weight, 0.0).reshape(-1)
    rng = np.random.default_rng(seed)
    idx = np.flatnonzero(weight)
    with np.errstate(divide="ignore"):
        key = np.log(rng.random(len(idx))) / weight[idx]  # larger key = drawn first
    idx = idx[np.argsort(-key, kind="stable")[:samples]]
    rows, cols = np.divmod(idx, relative.shape[1])
    return _fit(relative, space, rows, cols, reference[rows, cols], relative.size,
                int(relative.size - valid.sum()), rng, opts)


def lidar_like_points(true_depth: np.ndarray, rng: np.random.Generator, scanlines: int = 64,
                      density: float = 0.05, noise: float = 0.01, outlier_fraction: float = 0.05,
                      horizon: float = 0.45) -> SparsePoints:
    """LiDAR-like sparse samples of a true depth map [H,W], for tests and benchmarks.

    `scanlines` rows, packed towards the row at `horizon` (share of the height) and spreading
    out above and below it, as a spinning LiDAR packs its beams near 0 deg elevation; about
    `density` of all pixels, spread evenly over the rows at random columns. Depth gets
    multiplicative Gaussian noise (`noise`: 0.01 = 1 %); `outlier_fraction` of the points are
    moved to a wrong depth (x or / by 1.3-3, log-uniform: glass, moving objects, edge bleeding).
    """
    h, w = true_depth.shape
    q = np.linspace(-1.0, 1.0, scanlines)
    reach = np.where(q < 0, horizon, 1.0 - horizon) * (h - 1)
    rows = np.unique(np.clip(np.rint(horizon * (h - 1) + reach * np.sign(q) * np.abs(q) ** 1.5), 0, h - 1))
    per_row = min(w, max(1, int(round(density * h * w / len(rows)))))
    cols = np.stack([np.sort(rng.choice(w, per_row, replace=False)) for _ in rows])  # [R,per_row]
    rr = np.broadcast_to(rows[:, None], cols.shape).astype(np.int64).reshape(-1)
    cc = cols.reshape(-1)
    true = true_depth[rr, cc].astype(np.float64)
    keep = np.isfinite(true) & (true > 0)
    rr, cc, true = rr[keep], cc[keep], true[keep]
    d = true * (1.0 + noise * rng.standard_normal(len(true)))
    outlier = np.zeros(len(d), bool)
    outlier[rng.choice(len(d), int(round(outlier_fraction * len(d))), replace=False)] = True
    k = int(outlier.sum())
    factor = np.exp(rng.uniform(np.log(1.3), np.log(3.0), k) * rng.choice([-1.0, 1.0], k))
    d[outlier] *= factor
    return SparsePoints(uv=np.stack([cc, rr], axis=1), depth=d, outlier=outlier)
