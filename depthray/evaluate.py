"""`depthray eval`: score depth outputs against ground truth, matched by key (file stem).

Predictions: any output `depthray.io.outputs.read_outputs` reads (Parquet, WebDataset, folder
of 16-bit PNGs). Ground truth: a folder (or fsspec URL) of `{key}.png` / `{key}.depth.png`
(16-bit, value / gt_png_scale = depth; 0 = no data), `{key}.npy` (float depth) or
`{key}.pfm`; an optional valid mask `{key}.mask.png|npy` next to it or in its own folder
(non-zero = valid). Predictions are streamed, one image in memory at a time.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from depthray import metrics
from depthray.config import StorageConfig
from depthray.io.outputs import list_files, read_outputs
from depthray.resize import resize_map

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
            rows.append(EvalRow(rec.key, m, rec.uncertainty_mean))
        except (ValueError, OSError) as e:  # one bad file must not hide the others' scores
            log.warning("%s: not scored: %s", rec.key, e)
            rows.append(EvalRow(rec.key, None, rec.uncertainty_mean, f"{type(e).__name__}: {e}"))
    if resized:
        log.warning("%d predictions differ in size from their GT and were resized to it", resized)
    missing = sorted(set(gt_files) - seen)
    return EvalReport(rows, _summary(rows, missing, unmatched, space), missing, unmatched)


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


def format_rows(report: EvalReport) -> str:
    header = ["key", *_COLUMNS, "n_valid", "unc_mean"]
    body = []
    for r in report.rows:
        vals = [getattr(r.metrics, c) for c in _COLUMNS] if r.metrics else [None] * len(_COLUMNS)
        n_valid = r.metrics.n_valid if r.metrics else (r.error or "failed")
        body.append([r.key, *map(_fmt, vals), _fmt(n_valid), _fmt(r.uncertainty_mean)])
    return _table(header, body)


def format_summary(report: EvalReport) -> str:
    s = report.summary
    header = ["images", *_COLUMNS, "missing", "unmatched", "failed"]
    body = [[_fmt(s["n_images"]), *(_fmt(s[c]) for c in _COLUMNS),
             _fmt(s["n_missing"]), _fmt(s["n_unmatched"]), _fmt(s["n_failed"])]]
    text = f"summary ({s['space']} space alignment, mean over images)\n" + _table(header, body)
    if s.get("uncertainty_abs_rel_spearman") is not None:
        text += f"\nSpearman(uncertainty_mean, abs_rel) = {s['uncertainty_abs_rel_spearman']:.3f}"
    return text


def summary_json(report: EvalReport) -> str:
    """The summary as one line of JSON (NaN written as null)."""
    return json.dumps(report.summary, sort_keys=True)
