"""`depthray eval`: score depth outputs against ground truth, matched by key (file stem).

Predictions: any output `depthray.io.outputs.read_outputs` reads (Parquet, WebDataset, folder
of 16-bit PNGs). Ground truth: a folder (or fsspec URL) of `{key}.png` / `{key}.depth.png`
(16-bit, value / gt_png_scale = depth; 0 = no data), `{key}.npy` (float depth) or
`{key}.pfm`; an optional valid mask `{key}.mask.png|npy` next to it or in its own folder
(non-zero = valid). Predictions are streamed, one image in memory at a time.

Metric outputs (pipelines/metric_depth.py: Parquet `metric_depth`, WebDataset
`{key}.metric_depth.png`) are scored twice: the relative label as above, and the metric map
as written, in metres, with no scale or shift fitted (a fit would hide exactly the error a
metric label can have). That needs GT in metres: a 16-bit PNG divided by `gt_png_scale`
(1000: millimetres, KITTI 256) or .npy / .pfm holding metres. Rows also carry the fit's
verdict (`meta.metric.verdict`), counted in the summary.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from depthray import metrics
from depthray.config import StorageConfig
from depthray.io.outputs import list_files, read_outputs
from depthray.resize import resize_map, resize_with_holes

log = logging.getLogger(__name__)

GT_EXTS = ("png", "npy", "pfm")
MASK_ROLES = ("mask", "valid")
# 16-bit GT PNGs in millimetres, as `samples.write_sample_images`, NYUv2 and ScanNet store
# them; KITTI uses 256.
DEFAULT_GT_PNG_SCALE = 1000.0


@dataclass
class EvalRow:
    key: str
    metrics: metrics.ImageMetrics | None
    uncertainty_mean: float | None = None
    error: str | None = None  # why this image could not be scored
    metric: metrics.MetricErrors | None = None  # the metric map in metres, no fit (metric outputs)
    verdict: str | None = None  # meta.metric.verdict: ok | low_confidence
    held_out_abs_rel: float | None = None  # meta.metric.abs_rel: what the fit said of itself


@dataclass
class EvalReport:
    rows: list[EvalRow]
    summary: dict
    missing: list[str] = field(default_factory=list)  # GT keys with no prediction
    unmatched: list[str] = field(default_factory=list)  # predictions with no GT


# ----------------------------------------------------------------------------- reading GT


def read_pfm(data: bytes) -> np.ndarray:
    """PFM bytes -> float32 [H,W] (first channel of colour PFMs), top row first."""
    buf = io.BytesIO(data)
    kind = buf.readline().strip()
    if kind not in (b"Pf", b"PF"):
        raise ValueError(f"not a PFM file (header {kind!r})")
    dims = buf.readline().split()
    while not dims:  # tolerate blank lines
        dims = buf.readline().split()
    w, h = int(dims[0]), int(dims[1])
    scale = float(buf.readline().strip())
    channels = 3 if kind == b"PF" else 1
    dtype = "<f4" if scale < 0 else ">f4"  # negative scale = little endian
    arr = np.frombuffer(buf.read(h * w * channels * 4), dtype=dtype).reshape(h, w, channels)
    return np.flipud(arr[:, :, 0]).astype(np.float32)  # PFM stores the bottom row first


def decode_gt(data: bytes, name: str, png_scale: float = DEFAULT_GT_PNG_SCALE) -> np.ndarray:
    """GT file bytes -> float32 [H,W] in GT units (0 / non-finite = no data)."""
    ext = name.rsplit(".", 1)[-1].lower()
    if ext == "npy":
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        return np.squeeze(arr).astype(np.float32)
    if ext == "pfm":
        return read_pfm(data)
    if ext == "png":
        arr = np.asarray(Image.open(io.BytesIO(data)))
        if arr.ndim != 2:
            raise ValueError(f"{name}: GT PNG must be single-channel, got shape {arr.shape}")
        return arr.astype(np.float32) / png_scale
    raise ValueError(f"{name}: unsupported GT format (use .png, .npy or .pfm)")


def decode_mask(data: bytes, name: str) -> np.ndarray:
    """Mask file bytes (.png non-zero = valid, or .npy) -> bool [H,W]."""
    if name.lower().endswith(".npy"):
        return np.squeeze(np.load(io.BytesIO(data), allow_pickle=False)).astype(bool)
    arr = np.asarray(Image.open(io.BytesIO(data)))
    return (arr if arr.ndim == 2 else arr[..., 0]) != 0


_GT_RE = re.compile(r"^(?P<key>.+?)(?:\.(?P<role>depth|mask|valid|gt))?\.(?P<ext>png|npy|pfm)$", re.I)


def index_gt(url: str, storage: StorageConfig | None = None) -> tuple[object, dict[str, str], dict[str, str]]:
    """GT folder -> (fs, key -> depth file, key -> mask file)."""
    fs, files = list_files(url, storage)
    depth, masks = {}, {}
    for path in files:
        m = _GT_RE.match(path.rsplit("/", 1)[-1])
        if not m:
            continue
        key, role = m["key"], (m["role"] or "depth").lower()
        if role in MASK_ROLES:
            masks[key] = path
        elif key not in depth or role == "depth":  # an explicit .depth. file wins
            depth[key] = path
    return fs, depth, masks


def index_masks(url: str, storage: StorageConfig | None = None) -> tuple[object, dict[str, str]]:
    """A separate mask folder: `{key}.png`, `{key}.mask.png`, `{key}.npy` ..."""
    fs, files = list_files(url, storage)
    out = {}
    for path in files:
        m = _GT_RE.match(path.rsplit("/", 1)[-1])
        if m and m["ext"].lower() in ("png", "npy"):
            out[m["key"]] = path
    return fs, out


# ----------------------------------------------------------------------------- evaluation


def evaluate(
    pred_url: str,
    gt_url: str,
    space: str = "depth",
    mask_url: str | None = None,
    gt_png_scale: float = DEFAULT_GT_PNG_SCALE,
    gt_is_disparity: bool = False,
    min_depth: float | None = None,
    max_depth: float | None = None,
    storage: StorageConfig | None = None,
) -> EvalReport:
    """Score every prediction that has GT; report GT without predictions as missing.
    `storage` reaches object stores as the job does (endpoint, region, retries)."""
    if space not in metrics.SPACES:
        raise ValueError(f"space must be one of {metrics.SPACES}, got {space!r}")
    gt_fs, gt_files, mask_files = index_gt(gt_url, storage)
    mask_fs = gt_fs
    if mask_url:
        mask_fs, mask_files = index_masks(mask_url, storage)
    if not gt_files:
        raise FileNotFoundError(f"{gt_url}: no ground truth files (.png, .npy, .pfm)")
    rows: list[EvalRow] = []
    unmatched: list[str] = []
    seen: set[str] = set()
    resized = 0
    for rec in read_outputs(pred_url, with_uncertainty=False, with_image=False, storage=storage):
        if rec.key not in gt_files:
            unmatched.append(rec.key)
            continue
        seen.add(rec.key)
        try:
            held = rec.meta.get("output_space", space)  # what the label holds, as its row says
            if held != space:
                raise ValueError(f"the prediction holds {held} (meta.output_space) but is scored as "
                                 f"{space}: evaluate with space={held!r}")
            gt = decode_gt(gt_fs.cat_file(gt_files[rec.key]), gt_files[rec.key], gt_png_scale)
            if gt_is_disparity:
                with np.errstate(divide="ignore"):
                    gt = np.where(gt > 0, 1.0 / gt, 0.0).astype(np.float32)
            mask = None
            if rec.key in mask_files:
                mask = decode_mask(mask_fs.cat_file(mask_files[rec.key]), mask_files[rec.key])
            if rec.depth.shape != gt.shape:
                resized += 1
            pred = resize_map(rec.depth, gt.shape)
            m = metrics.compute_metrics(pred, gt, mask, space, min_depth, max_depth)
            rows.append(EvalRow(rec.key, m, rec.uncertainty_mean, **_metric_fields(rec, gt, mask, gt_is_disparity,
                                                                                  min_depth, max_depth)))
        except (ValueError, OSError) as e:  # one bad file must not hide the others' scores
            log.warning("%s: not scored: %s", rec.key, e)
            rows.append(EvalRow(rec.key, None, rec.uncertainty_mean, f"{type(e).__name__}: {e}",
                                **_fit_fields(rec)))
    if resized:
        log.warning("%d predictions differ in size from their GT and were resized to it", resized)
    missing = sorted(set(gt_files) - seen)
    return EvalReport(rows, _summary(rows, missing, unmatched, space), missing, unmatched)


def _fit_fields(rec) -> dict:
    """What the metric stage said of its own fit (meta.metric), for rows of metric outputs."""
    fit = rec.meta.get("metric")
    if rec.metric is None and not fit:
        return {}
    fit = fit or {}
    return {"verdict": fit.get("verdict") or "unknown", "held_out_abs_rel": fit.get("abs_rel")}


def _metric_fields(rec, gt, mask, gt_is_disparity, min_depth, max_depth) -> dict:
    """The metric map scored in metres as written (no fit), for rows that carry one."""
    out = _fit_fields(rec)
    if rec.metric is None or gt_is_disparity:  # disparity GT (pixels, 1/m?) has no stated unit
        return out
    pred = resize_with_holes(rec.metric, gt.shape)  # a hole stays a hole, not a blend with 0
    return out | {"metric": metrics.metric_errors(pred, gt, mask, min_depth, max_depth)}


# A metric map this many times off its GT in median is more likely a unit mix-up (GT in mm,
# or .npy in cm) than a bad fit: say so instead of only printing a huge AbsRel.
UNIT_SUSPECT_RATIO = 5.0


def _metric_summary(rows: list[EvalRow]) -> dict:
    """Mean metric errors over the images whose map covers some GT, the verdict counts, and
    the metres AbsRel per verdict (does the verdict separate good labels from bad?)."""
    with_fit = [r for r in rows if r.verdict is not None]
    if not with_fit:
        return {}
    scored = [r for r in with_fit if r.metric is not None]
    verdicts = Counter(r.verdict for r in with_fit)

    def mean(rs, name):
        vals = [getattr(r.metric, name) for r in rs]
        vals = [v for v in vals if math.isfinite(v)]
        return float(np.mean(vals)) if vals else None

    ratio = mean(scored, "median_ratio")
    if ratio is not None and not 1 / UNIT_SUSPECT_RATIO < ratio < UNIT_SUSPECT_RATIO:
        log.warning("metric maps are %.3g x their GT in median: is the GT in metres? (16-bit PNG: "
                    "--gt-png-scale; .npy/.pfm must hold metres)", ratio)
    return {
        "metric_n_images": sum(r.metric.n_covered > 0 for r in scored),
        **{f"metric_{n}": mean(scored, n) for n in ("abs_rel", "rmse", "delta1", "median_ratio", "no_depth")},
        "metric_verdicts": dict(sorted(verdicts.items())),
        "metric_abs_rel_by_verdict": {v: mean([r for r in scored if r.verdict == v], "abs_rel")
                                      for v in sorted(verdicts)},
        "metric_held_out_abs_rel": _mean_of([r.held_out_abs_rel for r in scored]),
    }


def _mean_of(vals) -> float | None:
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def _summary(rows: list[EvalRow], missing: list[str], unmatched: list[str], space: str) -> dict:
    scored = [r for r in rows if r.metrics is not None]
    out = metrics.summarize(r.metrics for r in scored)
    paired = [(r.uncertainty_mean, r.metrics.abs_rel) for r in scored if r.uncertainty_mean is not None]
    rho = metrics.spearman(*zip(*paired)) if len(paired) >= 3 else math.nan
    out.update(
        space=space,
        n_missing=len(missing),
        n_unmatched=len(unmatched),
        n_failed=len(rows) - len(scored),
        # Does the stored uncertainty rank the errors? (Spearman over scored images)
        uncertainty_abs_rel_spearman=None if math.isnan(rho) else rho,
    )
    out.update(_metric_summary(rows))
    return out


# ----------------------------------------------------------------------------- printing

_COLUMNS = ("abs_rel", "delta1", "delta2", "rmse", "edge_abs_rel", "soft_edge_error")


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


# Metric outputs: the map in metres as written (no fit), then what the fit said of itself.
_METRIC_COLUMNS = ("abs_rel", "rmse", "delta1", "no_depth")


def format_rows(report: EvalReport) -> str:
    metric = any(r.verdict is not None for r in report.rows)
    header = ["key", *_COLUMNS, "n_valid", "unc_mean"]
    if metric:
        header += [f"m_{c}" for c in _METRIC_COLUMNS] + ["held_out", "verdict"]
    body = []
    for r in report.rows:
        vals = [getattr(r.metrics, c) for c in _COLUMNS] if r.metrics else [None] * len(_COLUMNS)
        n_valid = r.metrics.n_valid if r.metrics else (r.error or "failed")
        cells = [r.key, *map(_fmt, vals), _fmt(n_valid), _fmt(r.uncertainty_mean)]
        if metric:
            mvals = [getattr(r.metric, c) for c in _METRIC_COLUMNS] if r.metric else [None] * len(_METRIC_COLUMNS)
            cells += [*map(_fmt, mvals), _fmt(r.held_out_abs_rel), r.verdict or "-"]
        body.append(cells)
    return _table(header, body)


def format_summary(report: EvalReport) -> str:
    s = report.summary
    header = ["images", *_COLUMNS, "missing", "unmatched", "failed"]
    body = [[_fmt(s["n_images"]), *(_fmt(s[c]) for c in _COLUMNS),
             _fmt(s["n_missing"]), _fmt(s["n_unmatched"]), _fmt(s["n_failed"])]]
    text = f"summary ({s['space']} space alignment, mean over images)\n" + _table(header, body)
    if s.get("uncertainty_abs_rel_spearman") is not None:
        text += f"\nSpearman(uncertainty_mean, abs_rel) = {s['uncertainty_abs_rel_spearman']:.3f}"
    if "metric_verdicts" in s:
        text += "\n\n" + _format_metric_summary(s)
    return text


def _format_metric_summary(s: dict) -> str:
    header = ["images", *_METRIC_COLUMNS, "median_ratio", "held_out"]
    body = [[_fmt(s["metric_n_images"]), *(_fmt(s[f"metric_{c}"]) for c in _METRIC_COLUMNS),
             _fmt(s["metric_median_ratio"]), _fmt(s["metric_held_out_abs_rel"])]]
    verdicts = ", ".join(f"{v} {n} (abs_rel {_fmt(s['metric_abs_rel_by_verdict'].get(v))})"
                         for v, n in s["metric_verdicts"].items())
    return ("metric depth (metres as written, no scale or shift fitted; GT taken as metres; "
            "rmse in m; mean over images)\n" + _table(header, body) + f"\nverdicts: {verdicts}")


def summary_json(report: EvalReport) -> str:
    """The summary as one line of JSON (NaN written as null)."""
    return json.dumps(report.summary, sort_keys=True)
