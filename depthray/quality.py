"""Confidence filtering: score one depth result against the `quality:` thresholds (pure).

Two scores, both from the ensemble's per-pixel uncertainty (depth units: the output depth
is in [0,1], so 0.05 = members disagree by 5% of the scene's depth range):

- `uncertainty_mean`: mean per-pixel uncertainty; above `quality.max_uncertainty_mean`
  the image is low confidence.
- `valid_fraction`: share of pixels with finite depth whose uncertainty is at most
  `max_pixel_uncertainty`; below `quality.min_valid_fraction` the image is low confidence.

The job stores `QualityVerdict.to_meta()` in the record's metadata (scores, thresholds,
pass/fail, reasons) and may route failing images to a separate output. `row_verdict` joins
it with a metric fit's verdict (pipelines/metric_depth.py) into the one `low_confidence`
flag readers filter on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

# Per-pixel threshold behind valid_fraction when the config does not name one.
DEFAULT_MAX_PIXEL_UNCERTAINTY = 0.05


@dataclass
class QualityVerdict:
    passed: bool
    uncertainty_mean: float
    valid_fraction: float
    max_uncertainty_mean: float | None  # thresholds as applied (None = not checked)
    min_valid_fraction: float | None
    max_pixel_uncertainty: float
    reasons: list[str] = field(default_factory=list)  # why it failed; empty when passed

    def to_meta(self) -> dict:
        """JSON-ready fields for the record's metadata (an infinite score becomes None)."""
        fields = {k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                  for k, v in asdict(self).items()}
        return {"quality": fields, "low_confidence": not self.passed}


def valid_fraction(depth: np.ndarray, uncertainty: np.ndarray, max_pixel_uncertainty: float) -> float:
    """Share of pixels with finite depth and uncertainty <= max_pixel_uncertainty. [H,W] -> float."""
    if depth.size == 0:
        return 0.0
    ok = np.isfinite(depth) & np.isfinite(uncertainty) & (uncertainty <= max_pixel_uncertainty)
    return float(ok.mean())


def assess(depth: np.ndarray, uncertainty: np.ndarray, config) -> QualityVerdict:
    """Score one result against a QualityConfig (or anything with its attributes).

    depth, uncertainty: float [H,W] as in DepthResult. Thresholds left at None are skipped.
    """
    if depth.shape != uncertainty.shape:
        raise ValueError(f"depth {depth.shape} and uncertainty {uncertainty.shape} differ in size")
    max_mean = getattr(config, "max_uncertainty_mean", None)
    min_valid = getattr(config, "min_valid_fraction", None)
    pixel_thr = getattr(config, "max_pixel_uncertainty", None)
    pixel_thr = DEFAULT_MAX_PIXEL_UNCERTAINTY if pixel_thr is None else float(pixel_thr)

    finite = np.isfinite(uncertainty)
    # A map with no finite uncertainty carries no confidence at all: score it as worst.
    mean = float(uncertainty[finite].mean()) if finite.any() else float("inf")
    frac = valid_fraction(depth, uncertainty, pixel_thr)
    reasons = []
    if max_mean is not None and not mean <= max_mean:
        reasons.append(f"uncertainty_mean {mean:.4g} > max_uncertainty_mean {max_mean:.4g}")
    if min_valid is not None and frac < min_valid:
        reasons.append(f"valid_fraction {frac:.4g} < min_valid_fraction {min_valid:.4g}")
    return QualityVerdict(
        passed=not reasons,
        uncertainty_mean=mean,
        valid_fraction=frac,
        max_uncertainty_mean=max_mean,
        min_valid_fraction=min_valid,
        max_pixel_uncertainty=pixel_thr,
        reasons=reasons,
    )


def row_verdict(quality: QualityVerdict | None, metric: dict | None) -> dict:
    """The row's top-level verdict, the flag readers filter on: `low_confidence` is true when
    the quality thresholds failed or the row's metric fit (`meta.metric`) is not "ok" (a
    stock reader keeping `low_confidence == false` must never take a poor metric label);
    `low_confidence_reasons` then names each failed check by its source ("quality: ...",
    "metric fit: ..."). Returns the facts for the row's metadata ({} when there are none)."""
    facts = quality.to_meta() if quality is not None else {}
    reasons = [f"quality: {r}" for r in quality.reasons] if quality is not None else []
    if metric is not None:
        verdict = metric.get("verdict")
        if verdict != "ok":  # anything but a passed fit, a missing verdict included
            reasons += [f"metric fit: {r}" for r in metric.get("reasons") or [f"verdict {verdict!r}"]]
        facts.setdefault("low_confidence", False)
    if reasons:
        facts.update(low_confidence=True, low_confidence_reasons=reasons)
    return facts
