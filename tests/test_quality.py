"""Confidence filtering verdicts against QualityConfig thresholds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from depthray.config import QualityConfig
from depthray.quality import assess


def _result(unc_value: float, h=20, w=30, noisy_rows=0):
    depth = np.linspace(0, 1, h * w, dtype=np.float32).reshape(h, w)
    unc = np.full((h, w), unc_value, np.float32)
    unc[:noisy_rows] = 0.5  # a band the ensemble disagrees on
    return depth, unc


def test_no_thresholds_pass_and_report_scores():
    v = assess(*_result(0.02, noisy_rows=5), QualityConfig())
    assert v.passed and v.reasons == []
    assert v.uncertainty_mean == pytest.approx((15 * 0.02 + 5 * 0.5) / 20)
    assert v.valid_fraction == pytest.approx(15 / 20)  # pixels at <= 0.05 uncertainty


def test_thresholds_fail_with_reasons_and_json_metadata():
    depth, unc = _result(0.02, noisy_rows=5)  # mean 0.14, valid 0.75
    v = assess(depth, unc, QualityConfig(max_uncertainty_mean=0.1, min_valid_fraction=0.9))
    assert not v.passed and len(v.reasons) == 2
    meta = json.loads(json.dumps(v.to_meta()))
    assert meta["low_confidence"] is True
    assert meta["quality"]["max_uncertainty_mean"] == 0.1 and meta["quality"]["min_valid_fraction"] == 0.9
    assert meta["quality"]["uncertainty_mean"] == pytest.approx(0.14)
    # Just inside both thresholds passes.
    ok = assess(depth, unc, QualityConfig(max_uncertainty_mean=0.15, min_valid_fraction=0.75))
    assert ok.passed and ok.to_meta()["low_confidence"] is False


def test_non_finite_pixels_are_not_valid():
    depth, unc = _result(0.01)
    depth[0, :10] = np.nan
    unc[1, :10] = np.inf
    v = assess(depth, unc, QualityConfig(min_valid_fraction=0.99))
    assert v.valid_fraction == pytest.approx(1 - 20 / 600) and not v.passed
    all_bad = assess(depth, np.full_like(unc, np.nan), QualityConfig(max_uncertainty_mean=1.0))
    assert not all_bad.passed and all_bad.to_meta()["quality"]["uncertainty_mean"] is None
